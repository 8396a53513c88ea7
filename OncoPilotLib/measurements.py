"""Lesion measurements from a (K, J, I) mask: RECIST 1.1 axes, volume, surface, sphericity, HU statistics.

Conventions (all spacing- and direction-aware):

- Long axis (RECIST 1.1): the longest segment between two mask voxel centres lying in one axial slice, over
  all slices (the manifest's convention; voxel centres lie inside the lesion, so it never exceeds the true
  length and came out 0.04 .. 1.12 pixel short on 120 random voxelised ellipses, 0.38 on average). Lengths
  use the physical in-plane vectors (the i and j columns of ``ijk_to_ras``), so anisotropic pixels and
  rotated or flipped in-plane directions give the same millimetres. Per slice we take the convex hull of the
  voxel centres (qhull) and the farthest pair of hull vertices (brute force: a hull has at most a few
  hundred vertices). Ties go to the lowest slice, then the first pair found.
- Short axis: the longest segment exactly perpendicular to the long axis (angular tolerance zero), on the
  long-axis slice, lying inside the mask. We scan chords along the exact perpendicular, one every quarter of
  the smaller in-plane pixel across the long axis, and sample each every quarter pixel. "Inside" means the
  bilinear interpolation of the slice's mask is >= 0.5, so a chord's ends are where the line exits the mask
  (refined linearly between samples) and its inside part is its longest inside run: the segment lies in
  the lesion, also for concave ones. These exits lie about half a pixel beyond the outermost voxel centres,
  i.e. the short axis is measured edge to edge while the long axis is centre to centre. Why: voxel centres
  quantise a chord to the rows it crosses, and on an axis-aligned ellipse that lost up to 1.3 pixels.
  Rule: the reported short axis is min(edge-to-edge chord, long axis), a longer chord being shortened about
  its midpoint (so it stays inside). RECIST's short axis is a diameter perpendicular to the longest one and
  cannot exceed it, while the raw chord carries the 0.83 .. 1 pixel edge excess (0.83 along a pixel diagonal,
  1 along a pixel row) that the centre-to-centre long axis lacks: a 10 x 10 pixel square measured 13.56 mm
  across against a 12.73 mm diagonal. The rule fires only where the perpendicular width is within about a
  pixel of the long axis, i.e. on near-round lesions, and there reports SA = LA, the RECIST answer for a
  round lesion (87 of 90 random voxelised circles, 0.02 .. 0.31 pixel below 2r; 2 of 120 random ellipses).
  Over those 120 ellipses the short axis measured -0.36 .. +0.69 pixel against the analytic perpendicular
  diameter, and it stays at most 0.87 mm above the manifest's centre-to-centre width on the 32 real lesions.
- Volume: voxel count x voxel volume (mL). Surface: smoothed, volume-preserving isosurface (see
  :mod:`OncoPilotLib.surface`; its blur shrinks on objects thinner than 6 voxels along an axis);
  sphericity pi^(1/3) (6 V)^(2/3) / A with the voxel-count V, always in (0, 1]. Degenerate masks: a
  one-slice mask is measured as a slab one slice thick (10 x 10 pixels at 1 mm: 0.47, the box itself 0.43);
  a single voxel or a 2 x 2 x 2 cube as a rounded box (1.0 at isotropic spacing, 0.83 for a 0.7 x 0.7 x 2.5 mm
  voxel). Below about 5 voxels across, sphericity says little about the lesion.
- 3D maximum diameter: farthest pair of voxel centres (3D convex hull of the boundary voxels).
- Connected components: 26-connectivity (``scipy.ndimage.label`` with a 3x3x3 structure). By default only the
  largest component is measured (``largest_component=True``): a RECIST target is one lesion, and a stray
  voxel a few centimetres away would otherwise set the long axis. ``n_components`` always reports how many
  components the selected label had.
- HU mean and standard deviation (population, ddof = 0) over the measured voxels.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

from .geometry import VolumeGeometry
from .surface import smoothed_surface_area_mm2, sphericity as _sphericity

logger = logging.getLogger(__name__)

# Chord spacing and sampling step along chords, as a fraction of the smaller in-plane pixel size.
_CHORD_STEP_PIXELS = 0.25
_RAS_TO_LPS = np.array([-1.0, -1.0, 1.0])
_STRUCTURE_26 = np.ones((3, 3, 3), dtype=bool)


@dataclass
class LesionMeasurement:
    """Measurements of one lesion. Lengths in mm, volume in mL, area in mm^2, HU in Hounsfield units.

    Point arrays are (2, 3): two endpoints, as voxel indices (i, j, k) (``*_ijk``, float for the short axis
    whose endpoints fall between voxel centres) or RAS mm (``*_ras``; LPS via :meth:`long_axis_lps` and
    :meth:`short_axis_lps`). ``long_axis_slice`` and ``slice_range`` are k indices of the input volume.
    """

    empty: bool
    label: int | None = None
    n_voxels: int = 0
    n_components: int = 0
    volume_ml: float = 0.0
    surface_mm2: float = 0.0
    sphericity: float | None = None
    long_axis_mm: float = 0.0
    short_axis_mm: float = 0.0
    long_axis_slice: int | None = None
    long_axis_ijk: np.ndarray | None = None
    short_axis_ijk: np.ndarray | None = None
    long_axis_ras: np.ndarray | None = None
    short_axis_ras: np.ndarray | None = None
    max_diameter_3d_mm: float = 0.0
    n_slices: int = 0
    slice_range: tuple[int, int] | None = None
    centroid_ijk: np.ndarray | None = None
    centroid_ras: np.ndarray | None = None
    hu_mean: float | None = None
    hu_sd: float | None = None
    spacing_mm: tuple[float, float, float] = field(default=(0.0, 0.0, 0.0))

    def long_axis_lps(self) -> np.ndarray | None:
        """(2, 3) long-axis endpoints in LPS mm (DICOM / ITK frame)."""
        return None if self.long_axis_ras is None else self.long_axis_ras * _RAS_TO_LPS

    def short_axis_lps(self) -> np.ndarray | None:
        """(2, 3) short-axis endpoints in LPS mm."""
        return None if self.short_axis_ras is None else self.short_axis_ras * _RAS_TO_LPS

    def centroid_lps(self) -> np.ndarray | None:
        return None if self.centroid_ras is None else self.centroid_ras * _RAS_TO_LPS

    def to_dict(self, frame: str = "RAS") -> dict:
        """Flat JSON-able dict; keys carry units; patient points in ``frame`` ('RAS' or 'LPS') mm."""
        frame = frame.upper()
        if frame not in ("RAS", "LPS"):
            raise ValueError(f"frame must be 'RAS' or 'LPS', got {frame!r}")
        flip = _RAS_TO_LPS if frame == "LPS" else np.ones(3)
        out = {"empty": self.empty, "label": self.label, "n_voxels": self.n_voxels,
               "n_components": self.n_components, "volume_ml": self.volume_ml, "surface_mm2": self.surface_mm2,
               "sphericity": self.sphericity, "long_axis_mm": self.long_axis_mm, "short_axis_mm": self.short_axis_mm,
               "max_diameter_3d_mm": self.max_diameter_3d_mm, "long_axis_slice_k": self.long_axis_slice,
               "n_slices": self.n_slices, "slice_k_min": None, "slice_k_max": None,
               "hu_mean": self.hu_mean, "hu_sd": self.hu_sd, "frame": frame}
        if self.slice_range is not None:
            out["slice_k_min"], out["slice_k_max"] = (int(v) for v in self.slice_range)
        out.update(_point_keys("centroid", self.centroid_ijk, self.centroid_ras, flip, frame))
        for name in ("long_axis", "short_axis"):
            ijk, ras = getattr(self, f"{name}_ijk"), getattr(self, f"{name}_ras")
            for end in (0, 1):
                out.update(_point_keys(f"{name}_p{end}", None if ijk is None else ijk[end],
                                       None if ras is None else ras[end], flip, frame))
        out["spacing_x_mm"], out["spacing_y_mm"], out["spacing_z_mm"] = (float(v) for v in self.spacing_mm)
        return out


def _point_keys(prefix: str, ijk, ras, flip: np.ndarray, frame: str) -> dict:
    keys = {}
    for axis, name in enumerate("ijk"):
        keys[f"{prefix}_{name}"] = None if ijk is None else float(ijk[axis])
    for axis, name in enumerate(frame.lower()):
        keys[f"{prefix}_{name}_mm"] = None if ras is None else float(ras[axis] * flip[axis])
    return keys


def measure_lesion(mask_kji: np.ndarray, geometry: VolumeGeometry, ct_hu: np.ndarray | None = None,
                   largest_component: bool = True, label: int | None = None) -> LesionMeasurement:
    """Measure one lesion.

    Args:
        mask_kji: (K, J, I) mask (bool or integer labels), same shape as ``geometry.shape_kji``.
        geometry: the voxel grid (``ijk_to_ras`` maps (i, j, k) voxel indices to RAS mm).
        ct_hu: optional (K, J, I) CT in HU on the same grid, for ``hu_mean`` / ``hu_sd``.
        largest_component: measure only the largest 26-connected component (default) or all voxels.
        label: measure ``mask == label``; None measures every non-zero voxel.

    Returns:
        A :class:`LesionMeasurement`; ``empty=True`` (zeros and None) when no voxel is selected.

    Raises:
        ValueError: the mask is not 3D, or its shape differs from the geometry's or the CT's.
    """
    mask_kji = np.asarray(mask_kji)
    _check_shapes(mask_kji, geometry, ct_hu)
    spacing = tuple(float(v) for v in geometry.spacing)
    crop, offset_kji, n_components = _select(mask_kji, label, largest_component)
    if crop is None:
        return LesionMeasurement(empty=True, label=label, spacing_mm=spacing)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    n_voxels = int(np.count_nonzero(crop))
    result = LesionMeasurement(empty=False, label=label, n_voxels=n_voxels, n_components=n_components,
                               volume_ml=n_voxels * voxel_ml, spacing_mm=spacing)
    result.surface_mm2 = smoothed_surface_area_mm2(crop, spacing)
    result.sphericity = _sphericity(n_voxels * voxel_ml * 1000.0, result.surface_mm2)
    _fill_extent(result, crop, offset_kji, geometry)
    _fill_axes(result, crop, offset_kji, geometry)
    if ct_hu is not None:
        _fill_hu(result, crop, offset_kji, ct_hu)
    return result


def _check_shapes(mask_kji: np.ndarray, geometry: VolumeGeometry, ct_hu: np.ndarray | None) -> None:
    if mask_kji.ndim != 3:
        raise ValueError(f"mask must be a 3D (K, J, I) array, got shape {mask_kji.shape}")
    if tuple(mask_kji.shape) != tuple(geometry.shape_kji):
        raise ValueError(f"mask shape {mask_kji.shape} (K, J, I) differs from the geometry's "
                         f"{tuple(geometry.shape_kji)}")
    if ct_hu is not None and tuple(np.shape(ct_hu)) != tuple(mask_kji.shape):
        raise ValueError(f"mask shape {mask_kji.shape} (K, J, I) differs from the CT's {tuple(np.shape(ct_hu))}")


def _bounding_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    """Bounding box of the non-zero voxels via two any() passes (a 512x512x300 mask: ~40 ms, not np.nonzero)."""
    any_ki = mask.any(axis=1)
    ks, is_ = np.nonzero(any_ki.any(axis=1))[0], np.nonzero(any_ki.any(axis=0))[0]
    if ks.size == 0:
        return None
    js = np.nonzero(mask[ks[0]:ks[-1] + 1, :, is_[0]:is_[-1] + 1].any(axis=(0, 2)))[0]
    return slice(ks[0], ks[-1] + 1), slice(js[0], js[-1] + 1), slice(is_[0], is_[-1] + 1)


def _select(mask_kji: np.ndarray, label: int | None,
            largest_component: bool) -> tuple[np.ndarray | None, np.ndarray, int]:
    """Cropped boolean lesion mask, the crop's (k, j, i) offset and the number of 26-connected components."""
    box = _bounding_box(mask_kji)
    if box is None:
        return None, np.zeros(3, dtype=int), 0
    crop = mask_kji[box] != 0 if label is None else mask_kji[box] == label
    offset = np.array([s.start for s in box], dtype=int)
    if not crop.any():
        return None, offset, 0
    components, n_components = ndimage.label(crop, structure=_STRUCTURE_26)
    if largest_component and n_components > 1:
        sizes = np.bincount(components.ravel())
        sizes[0] = 0
        crop = components == int(np.argmax(sizes))
        logger.info("measuring the largest of %d components (%d of %d voxels)", n_components,
                    int(sizes.max()), int(sizes.sum()))
    inner = _bounding_box(crop)
    return np.ascontiguousarray(crop[inner]), offset + [s.start for s in inner], int(n_components)


def _fill_extent(result: LesionMeasurement, crop: np.ndarray, offset_kji: np.ndarray,
                 geometry: VolumeGeometry) -> None:
    """Slices spanned, centroid and 3D maximum diameter."""
    ks = np.nonzero(crop.any(axis=(1, 2)))[0] + offset_kji[0]
    result.n_slices = int(ks.size)
    result.slice_range = (int(ks[0]), int(ks[-1]))
    kji = np.argwhere(crop) + offset_kji
    result.centroid_ijk = kji.mean(axis=0)[::-1]
    result.centroid_ras = geometry.ijk_to_ras_points(result.centroid_ijk)
    boundary = crop & ~ndimage.binary_erosion(crop, border_value=0)
    points = geometry.ijk_to_ras_points((np.argwhere(boundary) + offset_kji)[:, ::-1])
    result.max_diameter_3d_mm = float(_farthest_pair(points)[2])


def _fill_hu(result: LesionMeasurement, crop: np.ndarray, offset_kji: np.ndarray, ct_hu: np.ndarray) -> None:
    box = tuple(slice(int(o), int(o) + n) for o, n in zip(offset_kji, crop.shape))
    values = np.asarray(ct_hu[box])[crop].astype(np.float64)
    result.hu_mean = float(values.mean())
    result.hu_sd = float(values.std())


def _farthest_pair(points: np.ndarray) -> tuple[int, int, float]:
    """Indices and distance of the farthest pair of (N, D) points (N >= 1), via the convex hull's vertices."""
    candidates = _hull_vertices(points)
    hull = points[candidates]
    best = (0, 0, 0.0)
    # Row blocks keep the pairwise matrix under ~16 MB even for a 3D hull of thousands of vertices.
    for start in range(0, len(hull), 2048):
        block = hull[start:start + 2048]
        squared = np.sum((block[:, None, :] - hull[None, :, :]) ** 2, axis=-1)
        flat = int(np.argmax(squared))
        row, col = divmod(flat, squared.shape[1])
        if squared[row, col] > best[2] ** 2:
            best = (int(candidates[start + row]), int(candidates[col]), float(np.sqrt(squared[row, col])))
    return best


def _hull_vertices(points: np.ndarray) -> np.ndarray:
    """Indices of the convex-hull vertices; all points when the hull is degenerate (flat, collinear, tiny)."""
    if len(points) <= points.shape[1] + 1:
        return np.arange(len(points))
    try:
        return np.unique(ConvexHull(points).vertices)
    except QhullError:
        # Flat or collinear sets (a one-slice lesion in 3D, a one-pixel-wide line in 2D).
        if len(points) <= 4096:
            return np.arange(len(points))
        return np.unique(ConvexHull(points, qhull_options="QJ").vertices)


def _fill_axes(result: LesionMeasurement, crop: np.ndarray, offset_kji: np.ndarray,
               geometry: VolumeGeometry) -> None:
    """Long axis over all slices, then the short axis on the long-axis slice."""
    plane = _InPlane(geometry)
    k, ends_ij, length = _long_axis(crop, plane)
    short_ij, short_length = _short_axis(crop[k], ends_ij, plane)
    k_global = int(k + offset_kji[0])
    shift_ij = np.array([offset_kji[2], offset_kji[1]], dtype=float)
    result.long_axis_slice = k_global
    result.long_axis_mm = float(length)
    result.short_axis_mm = float(short_length)
    result.long_axis_ijk = np.column_stack([ends_ij + shift_ij, [k_global, k_global]]).astype(int)
    result.short_axis_ijk = np.column_stack([short_ij + shift_ij, [k_global, k_global]])
    result.long_axis_ras = geometry.ijk_to_ras_points(result.long_axis_ijk)
    result.short_axis_ras = geometry.ijk_to_ras_points(result.short_axis_ijk)


class _InPlane:
    """Isometric 2D coordinates (mm) of the axial plane: (i, j) -> R @ (i, j), R from the QR of the i, j columns.

    |A d| = |R d| for the (3, 2) matrix A of in-plane voxel vectors, so distances in these coordinates are
    physical distances whatever the pixel aspect, rotation or flip of the in-plane direction cosines.
    """

    def __init__(self, geometry: VolumeGeometry) -> None:
        _, r = np.linalg.qr(geometry.ijk_to_ras[:3, :2])
        # A positive diagonal makes R the (unique) Cholesky factor of the Gram matrix, so in-plane rotations
        # and flips of the direction cosines give bit-identical coordinates and chord samples.
        r = r * np.sign(np.diag(r))[:, None]
        self.to_mm = r
        self.to_ij = np.linalg.inv(r)
        self.step_mm = _CHORD_STEP_PIXELS * float(min(geometry.spacing[:2]))
        self.max_pixel_mm = float(max(geometry.spacing[:2]))

    def mm(self, ij: np.ndarray) -> np.ndarray:
        return np.asarray(ij, dtype=float) @ self.to_mm.T

    def ij(self, xy: np.ndarray) -> np.ndarray:
        return np.asarray(xy, dtype=float) @ self.to_ij.T


def _long_axis(crop: np.ndarray, plane: _InPlane) -> tuple[int, np.ndarray, float]:
    """Slice (crop k), (2, 2) endpoint (i, j) crop indices and length (mm) of the in-slice farthest pair."""
    in_plane_cross = np.zeros((3, 3, 3), dtype=bool)
    in_plane_cross[1] = ndimage.generate_binary_structure(2, 1)
    boundary = crop & ~ndimage.binary_erosion(crop, structure=in_plane_cross, border_value=0)
    best = (0, np.zeros((2, 2)), -1.0)
    for k in range(crop.shape[0]):
        ij = np.argwhere(boundary[k])[:, ::-1]
        if ij.size == 0:
            continue
        first, second, length = _farthest_pair(plane.mm(ij))
        if length > best[2] + 1e-9:
            best = (k, ij[[first, second]].astype(float), length)
    return best


def _short_axis(slice_ji: np.ndarray, ends_ij: np.ndarray, plane: _InPlane) -> tuple[np.ndarray, float]:
    """(2, 2) crop (i, j) endpoints and length (mm) of the longest inside chord perpendicular to the long axis."""
    start, end = plane.mm(ends_ij)
    length = float(np.linalg.norm(end - start))
    if length == 0.0:
        return ends_ij.copy(), 0.0
    along = (end - start) / length
    across = np.array([-along[1], along[0]])
    offsets = (plane.mm(np.argwhere(slice_ji)[:, ::-1]) - start) @ across
    step, margin = plane.step_mm, plane.max_pixel_mm + plane.step_mm
    # Every voxel centre projects within [0, length] on the long axis (it is the farthest pair), so these
    # chords cover the lesion; along each chord we start and stop one pixel outside the outermost centres.
    ts = np.arange(0.0, length + 0.5 * step, step)
    ss = np.arange(offsets.min() - margin, offsets.max() + margin + 0.5 * step, step)
    image = np.pad(slice_ji.astype(np.float32), 1)
    best = (-1.0, 0.0, 0.0, 0.0)
    for block in range(0, ts.size, 256):
        candidate = _best_chord(image, start, along, across, ts[block:block + 256], ss, plane)
        if candidate[0] > best[0]:
            best = candidate
    best_length, t, s0, s1 = best
    if best_length > length:
        # RECIST: never longer than the long axis (module docstring); shortened about its midpoint, it stays inside.
        middle = 0.5 * (s0 + s1)
        best_length, s0, s1 = length, middle - 0.5 * length, middle + 0.5 * length
    points = start + t * along + np.outer([s0, s1], across)
    return plane.ij(points), max(best_length, 0.0)


def _best_chord(image: np.ndarray, start: np.ndarray, along: np.ndarray, across: np.ndarray,
                ts: np.ndarray, ss: np.ndarray, plane: _InPlane) -> tuple[float, float, float, float]:
    """Longest inside run over the chords at offsets ``ts``: (length mm, t, s_entry, s_exit).

    ``image`` is the (J + 2, I + 2) slice mask padded by one voxel. Inside means the bilinear interpolation of
    the mask is >= 0.5; entry and exit are refined by linear interpolation between neighbouring samples.
    """
    points = start + ts[:, None, None] * along + ss[None, :, None] * across
    ij = plane.ij(points) + 1.0
    values = ndimage.map_coordinates(image, [ij[..., 1].ravel(), ij[..., 0].ravel()], order=1, mode="constant")
    values = values.reshape(ij.shape[:2]).astype(np.float64)
    edges = np.diff(np.pad(values >= 0.5, ((0, 0), (1, 1))).astype(np.int8), axis=1)
    run_starts, run_ends = np.argwhere(edges == 1), np.argwhere(edges == -1)
    if run_starts.size == 0:
        return -1.0, 0.0, 0.0, 0.0
    chord, first, last = run_starts[:, 0], run_starts[:, 1], run_ends[:, 1] - 1
    # Samples span one pixel beyond the outermost centres, so first >= 1 and last <= n - 2.
    step = ss[1] - ss[0]
    s_entry = ss[first] - step * _crossing(values[chord, first - 1], values[chord, first])
    s_exit = ss[last] + step * _crossing(values[chord, last + 1], values[chord, last])
    best = int(np.argmax(s_exit - s_entry))
    return float(s_exit[best] - s_entry[best]), float(ts[chord[best]]), float(s_entry[best]), float(s_exit[best])


def _crossing(outside: np.ndarray, inside: np.ndarray) -> np.ndarray:
    """Fraction of the step from the inside sample towards the outside one where the value crosses 0.5."""
    return (inside - 0.5) / np.maximum(inside - outside, 1e-12)
