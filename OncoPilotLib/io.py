"""Reading CT volumes (NIfTI, NRRD, MHA or a DICOM folder) and writing masks, via SimpleITK.

Every volume comes back with axial slices along the first numpy axis: an axis-aligned sagittal or
coronal acquisition is reoriented (``DICOMOrient`` to LPS, no resampling); an oblique one is refused,
because OncoPilot segments and measures in the axial plane (RECIST 1.1).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .geometry import VolumeGeometry

logger = logging.getLogger(__name__)

# Lowest HU expected in a CT that contains air (air = -1000 HU). MR or a PET volume rarely goes below it.
_CT_AIR_HU = -500.0


class VolumeError(ValueError):
    """A volume that OncoPilot cannot segment or measure (wrong dimension, oblique, unreadable)."""


@dataclass
class CTVolume:
    """A CT volume in Hounsfield units.

    Attributes:
        array: (K, J, I) array (slices, rows, columns), HU, as stored (typically int16).
        geometry: voxel grid and its patient-coordinate mapping.
        path: where it was read from, if anywhere.
    """

    array: np.ndarray
    geometry: VolumeGeometry
    path: str | None = None


def _read_sitk(path: Path):
    import SimpleITK as sitk

    if path.is_dir():
        reader = sitk.ImageSeriesReader()
        series = reader.GetGDCMSeriesIDs(str(path))
        if not series:
            raise VolumeError(f"{path}: folder holds no DICOM series")
        if len(series) > 1:
            logger.warning("%s holds %d DICOM series; reading the first (%s)", path, len(series), series[0])
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(path), series[0]))
        return reader.Execute()
    if not path.exists():
        raise VolumeError(f"{path}: no such file or folder")
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise VolumeError(f"{path}: not a readable image ({str(error).strip().splitlines()[-1]})") from error


def _axis_aligned(direction: np.ndarray, tolerance: float = 1e-3) -> bool:
    return bool(np.all(np.isclose(np.abs(direction), np.round(np.abs(direction)), atol=tolerance)))


def to_axial(image, label: str = "volume"):
    """Reorient a 3D SimpleITK image so that its third axis is the patient's S-I axis; refuse oblique ones."""
    import SimpleITK as sitk

    if image.GetDimension() != 3 or min(image.GetSize()) < 1:
        raise VolumeError(f"{label}: a 3D volume is needed, got a {image.GetDimension()}D image")
    geometry = VolumeGeometry.from_sitk(image)
    if geometry.is_axial():
        return image
    if not _axis_aligned(geometry.direction_ras):
        raise VolumeError(
            f"{label}: oblique acquisition (slice normal {geometry.slice_normal_angle_deg():.1f} deg from the "
            "S-I axis); resample it to axial slices first (e.g. Slicer's Resample Scalar Volume)")
    logger.info("%s: reoriented to axial slices", label)
    return sitk.DICOMOrient(image, "LPS")


def read_volume(path, label: str | None = None) -> CTVolume:
    """Read a CT (NIfTI, NRRD, MHA file or DICOM folder) as a :class:`CTVolume` with axial slices."""
    import SimpleITK as sitk

    path = Path(path)
    image = to_axial(_read_sitk(path), label or str(path))
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise VolumeError(f"{path}: a scalar (grey-level) CT is needed, got {image.GetNumberOfComponentsPerPixel()} "
                          "components per voxel")
    return CTVolume(sitk.GetArrayFromImage(image), VolumeGeometry.from_sitk(image), str(path))


def read_mask(path, like: CTVolume | None = None) -> np.ndarray:
    """Read a label map as a (K, J, I) integer array; if ``like`` is given its geometry must match."""
    volume = read_volume(path, label=f"mask {path}")
    if like is not None:
        check_same_geometry(like.geometry, volume.geometry, f"mask {path}", f"CT {like.path}")
    return volume.array


def check_same_geometry(a: VolumeGeometry, b: VolumeGeometry, name_a: str = "mask", name_b: str = "CT",
                        atol_mm: float = 1e-3) -> None:
    """Raise VolumeError unless both grids have the same shape and voxel-to-patient mapping."""
    if tuple(a.shape_kji) != tuple(b.shape_kji):
        raise VolumeError(f"{name_a} has shape {tuple(a.shape_kji)} (K, J, I) but {name_b} has {tuple(b.shape_kji)}")
    if not np.allclose(a.ijk_to_ras, b.ijk_to_ras, atol=atol_mm):
        raise VolumeError(f"{name_a} and {name_b} have the same shape but different spacing, origin or direction")


def write_mask(path, mask: np.ndarray, geometry: VolumeGeometry) -> str:
    """Write a (K, J, I) mask (uint8 labels) with the given geometry; returns the absolute path."""
    import SimpleITK as sitk

    if tuple(mask.shape) != tuple(geometry.shape_kji):
        raise VolumeError(f"mask shape {mask.shape} does not match the volume's {tuple(geometry.shape_kji)}")
    image = sitk.GetImageFromArray(np.ascontiguousarray(mask, dtype=np.uint8))
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ geometry.ijk_to_ras
    image.SetSpacing([float(s) for s in geometry.spacing])
    image.SetOrigin([float(v) for v in lps[:3, 3]])
    image.SetDirection([float(v) for v in (lps[:3, :3] / geometry.spacing[None, :]).ravel()])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), True)
    return str(path.resolve())


def looks_like_ct(array: np.ndarray) -> bool:
    """Heuristic: a CT holds air (< -500 HU) somewhere; MR intensities are non-negative."""
    return float(np.min(array)) < _CT_AIR_HU
