"""Voxel geometry: voxel indices <-> patient coordinates (RAS as in Slicer, LPS as in DICOM/ITK).

Conventions used throughout OncoPilotLib:
- a volume array is indexed ``[k, j, i]`` (KJI: slice, row, column), as numpy sees SimpleITK images and
  ``slicer.util.arrayFromVolume``;
- a voxel index triple is written ``(i, j, k)`` (IJK: column, row, slice);
- ``spacing`` is ``(sx, sy, sz)`` in mm along i, j, k.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

# A slice normal further than this from the patient's superior axis is treated as non-axial.
AXIAL_TOLERANCE_DEG = 1.0


@dataclass(frozen=True)
class VolumeGeometry:
    """Grid of a 3D volume.

    Attributes:
        ijk_to_ras: (4, 4) float64 affine mapping homogeneous voxel indices (i, j, k, 1) to RAS mm.
        shape_kji: array shape (K, J, I) = (slices, rows, columns).
    """

    ijk_to_ras: np.ndarray
    shape_kji: tuple[int, int, int]

    @classmethod
    def from_spacing(cls, spacing, shape_kji, origin=(0.0, 0.0, 0.0), direction=None, frame: str = "RAS"):
        """Build from spacing (sx, sy, sz) mm, origin and a 3x3 direction (columns = i, j, k axes) in ``frame``."""
        direction = np.eye(3) if direction is None else np.asarray(direction, dtype=float).reshape(3, 3)
        matrix = np.eye(4)
        matrix[:3, :3] = direction * np.asarray(spacing, dtype=float)[None, :]
        matrix[:3, 3] = np.asarray(origin, dtype=float)
        if frame.upper() == "LPS":
            matrix = _LPS_TO_RAS @ matrix
        elif frame.upper() != "RAS":
            raise ValueError(f"frame must be 'RAS' or 'LPS', got {frame!r}")
        return cls(matrix, tuple(int(s) for s in shape_kji))

    @classmethod
    def from_sitk(cls, image) -> "VolumeGeometry":
        """Geometry of a SimpleITK image (ITK stores LPS)."""
        size = image.GetSize()
        return cls.from_spacing(image.GetSpacing(), (size[2], size[1], size[0]), image.GetOrigin(),
                                image.GetDirection(), frame="LPS")

    @property
    def spacing(self) -> np.ndarray:
        """(sx, sy, sz) voxel size in mm along i, j, k."""
        return np.linalg.norm(self.ijk_to_ras[:3, :3], axis=0)

    @property
    def direction_ras(self) -> np.ndarray:
        """(3, 3) unit direction cosines of the i, j, k axes (columns) in RAS."""
        return self.ijk_to_ras[:3, :3] / self.spacing[None, :]

    @property
    def origin_ras(self) -> np.ndarray:
        return self.ijk_to_ras[:3, 3].copy()

    def ijk_to_ras_points(self, ijk) -> np.ndarray:
        """(N, 3) or (3,) voxel indices (float allowed) -> RAS mm, same shape."""
        ijk = np.asarray(ijk, dtype=float)
        return ijk @ self.ijk_to_ras[:3, :3].T + self.ijk_to_ras[:3, 3]

    def ras_to_ijk_points(self, ras) -> np.ndarray:
        """(N, 3) or (3,) RAS mm -> continuous voxel indices, same shape."""
        ras = np.asarray(ras, dtype=float)
        inverse = np.linalg.inv(self.ijk_to_ras)
        return ras @ inverse[:3, :3].T + inverse[:3, 3]

    def ijk_to_lps_points(self, ijk) -> np.ndarray:
        return self.ijk_to_ras_points(ijk) * np.array([-1.0, -1.0, 1.0])

    def lps_to_ijk_points(self, lps) -> np.ndarray:
        return self.ras_to_ijk_points(np.asarray(lps, dtype=float) * np.array([-1.0, -1.0, 1.0]))

    def contains_ijk(self, ijk) -> bool:
        """True if the continuous index lies inside the grid (voxel centres at integers, +-0.5 voxel)."""
        ijk = np.asarray(ijk, dtype=float)
        upper = np.array(self.shape_kji[::-1], dtype=float) - 0.5
        return bool(np.all(ijk >= -0.5) and np.all(ijk <= upper))

    def slice_normal_angle_deg(self) -> float:
        """Angle between the k axis and the patient's superior-inferior axis, in degrees (0 = axial)."""
        cos = abs(self.direction_ras[2, 2])
        return float(np.degrees(np.arccos(np.clip(cos, -1.0, 1.0))))

    def is_axial(self, tolerance_deg: float = AXIAL_TOLERANCE_DEG) -> bool:
        return self.slice_normal_angle_deg() <= tolerance_deg
