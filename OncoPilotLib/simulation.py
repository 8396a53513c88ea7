"""Simulated radiologist prompts for evaluation, following the ONCOPILOT paper's protocol (Raidium 2024, Sec. 3).

All masks are (K, J, I) bool arrays (axial slice first); prompts are voxel indices (i, j, k) of that grid.

- box: the 2D bounding box of the ground-truth mask on its middle slice (the middle of the slices it spans),
  expanded by 15 pixels on every side and clipped at the image border;
- point: the barycentre of the ground-truth 3D mask (slice = round(k barycentre)); when the barycentre falls
  outside the mask (a C-shaped or hollow lesion) the in-mask voxel closest to it (in mm) is used instead;
- edit click: the barycentre (or the closest in-region voxel) of the largest error region, i.e. the largest
  3D connected component (26-connectivity, by voxel count) of the false-negative and false-positive sets:
  a positive click where lesion is missing, a negative click where background is covered. The paper's
  barycentre lands on the region's edge when the region is a rim (an under- or over-segmented border): on
  lidc_0003_n1 the point result (Dice 0.81) misses a 1,019-voxel rim whose barycentre is inside the prediction,
  and the closest rim voxel is a -282 HU border pixel. ``strategy="interior"`` clicks instead the region's voxel
  farthest (in mm) from its boundary, the usual protocol of interactive-segmentation benchmarks.

Everything here is deterministic: no randomness, ties broken by the lowest flat index.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from .session import BoxPrompt, PointPrompt

# The paper expands the ground-truth box by 15 pixels (Sec. 3.2, "bounding box prompts").
BOX_MARGIN_PX = 15
# An error region this small (a few voxels of boundary disagreement) is not worth a click.
MIN_ERROR_VOXELS = 10
EDIT_STRATEGIES = ("barycentre", "interior")
_STRUCTURE_26 = np.ones((3, 3, 3), dtype=bool)


@dataclass(frozen=True)
class EditClick:
    """A simulated edit click.

    Attributes:
        ijk: voxel index (i, j, k) of the click, inside the error region.
        positive: True = "this is lesion" (false-negative region), False = "this is background" (false positive).
        region_voxels: size of the error region clicked, in voxels.
    """

    ijk: tuple[int, int, int]
    positive: bool
    region_voxels: int


def _check_mask(mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 3:
        raise ValueError(f"a 3D (K, J, I) mask is needed, got shape {mask.shape}")
    if not mask.any():
        raise ValueError("the ground-truth mask is empty: no prompt can be simulated")
    return mask


def middle_slice(mask: np.ndarray) -> int:
    """k of the middle of the slices a (K, J, I) mask spans ((k_min + k_max) // 2); if that slice is empty
    (a mask with a gap), the nearest non-empty slice, lower k first."""
    slices = np.flatnonzero(_check_mask(mask).any(axis=(1, 2)))
    middle = (int(slices[0]) + int(slices[-1])) // 2
    return int(slices[np.argmin(np.abs(slices - middle))])


def simulate_box(mask: np.ndarray, margin_px: float = BOX_MARGIN_PX) -> BoxPrompt:
    """Box prompt on the ground truth's middle slice: its 2D box grown by ``margin_px`` pixels, clipped to the
    slice. Returns a :class:`BoxPrompt` with (i_min, j_min, i_max, j_max) inclusive voxel indices."""
    mask = _check_mask(mask)
    k = middle_slice(mask)
    rows = np.flatnonzero(mask[k].any(axis=1))
    cols = np.flatnonzero(mask[k].any(axis=0))
    box = np.array([cols[0] - margin_px, rows[0] - margin_px, cols[-1] + margin_px, rows[-1] + margin_px], float)
    box[[0, 2]] = np.clip(box[[0, 2]], 0, mask.shape[2] - 1)
    box[[1, 3]] = np.clip(box[[1, 3]], 0, mask.shape[1] - 1)
    return BoxPrompt(k, tuple(float(v) for v in box))


def nearest_inside(mask: np.ndarray, ijk, spacing=(1.0, 1.0, 1.0)) -> tuple[int, int, int]:
    """The voxel (i, j, k) of a (K, J, I) mask closest to the continuous point ``ijk``, distances in mm
    (``spacing`` = (sx, sy, sz) mm); the point's own voxel when it lies inside the mask."""
    mask = _check_mask(mask)
    i, j, k = (int(round(v)) for v in ijk)
    inside = 0 <= k < mask.shape[0] and 0 <= j < mask.shape[1] and 0 <= i < mask.shape[2] and mask[k, j, i]
    if inside:
        return i, j, k
    kji = np.argwhere(mask)
    scale = np.asarray(spacing, dtype=float)[::-1]
    target = np.asarray(ijk, dtype=float)[::-1]
    best = kji[int(np.argmin((((kji - target) * scale) ** 2).sum(axis=1)))]
    return int(best[2]), int(best[1]), int(best[0])


def barycentre_ijk(mask: np.ndarray) -> np.ndarray:
    """(i, j, k) float barycentre of a non-empty (K, J, I) mask, voxel units."""
    return np.argwhere(_check_mask(mask)).mean(axis=0)[::-1]


def simulate_point(mask: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> PointPrompt:
    """Click at the ground truth's 3D barycentre rounded to a voxel, or the closest in-mask voxel (mm)."""
    return PointPrompt(tuple(float(v) for v in nearest_inside(mask, barycentre_ijk(mask), spacing)))


def largest_error_region(prediction: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, bool] | None:
    """The largest 3D connected component of the false negatives and false positives of ``prediction``.

    Returns (region (K, J, I) bool, True if it is a false-negative region) or None when both sets are empty.
    On equal sizes the false-negative region wins (missing lesion is the commoner complaint).
    """
    prediction, truth = np.asarray(prediction, dtype=bool), np.asarray(truth, dtype=bool)
    if prediction.shape != truth.shape:
        raise ValueError(f"prediction {prediction.shape} and ground truth {truth.shape} differ in shape")
    best = None
    for errors, positive in ((truth & ~prediction, True), (prediction & ~truth, False)):
        labels, count = ndi.label(errors, structure=_STRUCTURE_26)
        if count == 0:
            continue
        sizes = np.bincount(labels.ravel())[1:]
        index = int(np.argmax(sizes))
        if best is None or sizes[index] > best[2]:
            best = (labels == index + 1, positive, int(sizes[index]))
    return None if best is None else (best[0], best[1])


def deepest_inside(mask: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> tuple[int, int, int]:
    """The voxel (i, j, k) of a non-empty (K, J, I) mask farthest from its outside, in mm (3D Euclidean distance
    transform with ``spacing`` = (sx, sy, sz) mm; the volume border counts as outside). Ties: lowest flat index."""
    padded = np.pad(_check_mask(mask), 1)
    distance = ndi.distance_transform_edt(padded, sampling=np.asarray(spacing, dtype=float)[::-1])[1:-1, 1:-1, 1:-1]
    k, j, i = np.unravel_index(int(np.argmax(distance)), distance.shape)
    return int(i), int(j), int(k)


def simulate_edit(prediction: np.ndarray, truth: np.ndarray, spacing=(1.0, 1.0, 1.0),
                  min_voxels: int = MIN_ERROR_VOXELS, strategy: str = "barycentre") -> EditClick | None:
    """Next corrective click for ``prediction`` against ``truth`` (both (K, J, I) bool), or None when no error
    region reaches ``min_voxels`` voxels (the segmentation is as good as clicks can make it).

    ``strategy``: "barycentre" (the paper's: barycentre of the region, or its closest voxel) or "interior" (the
    region's voxel deepest inside it).
    """
    if strategy not in EDIT_STRATEGIES:
        raise ValueError(f"unknown edit click strategy {strategy!r}: choose from {', '.join(EDIT_STRATEGIES)}")
    found = largest_error_region(prediction, truth)
    if found is None:
        return None
    region, positive = found
    size = int(np.count_nonzero(region))
    if size < min_voxels:
        return None
    if strategy == "interior":
        return EditClick(deepest_inside(region, spacing), positive, size)
    return EditClick(nearest_inside(region, barycentre_ijk(region), spacing), positive, size)


def dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    """3D Dice of two (K, J, I) bool masks; 1.0 when both are empty."""
    prediction, truth = np.asarray(prediction, dtype=bool), np.asarray(truth, dtype=bool)
    total = np.count_nonzero(prediction) + np.count_nonzero(truth)
    return 1.0 if total == 0 else 2.0 * np.count_nonzero(prediction & truth) / total
