"""Zoom (crop) choice for small lesions.

A 512 x 512 slice fed to LiteMedSAM's 256 x 256 input is halved: a 6 mm nodule (~9 px at 0.7 mm) shrinks to
~4 model pixels. When the seed mask is small relative to the slice, OncoPilot re-encodes the seed slice as a
square crop around it, so that the lesion spans about a quarter of the model input, and seeds again there.

Propagation and edits then use whole-slice embeddings, not the crop. Measured on the four nodules of the whole
512 x 512 LIDC slabs (docs/BENCHMARKS.md section 4), 3D Dice bbox / point: crop on every slice 0.47 / 0.54,
zoomed seed then whole slices 0.63 / 0.55, no zoom at all 0.45 / 0.42; identical results on the 32 lesion crops
(all three modes). And a click where the background prefetch has already encoded the whole slices costs one
encode (the seed's crop) instead of one per slice of the lesion.
"""

from __future__ import annotations

import numpy as np

# Zoom when the lesion would span fewer model pixels than this with the whole slice encoded.
ZOOM_BELOW_MODEL_PX = 64
# Crop side as a multiple of the lesion's largest side (context around the lesion for the model).
CROP_FACTOR = 4.0
MIN_CROP_PX = 32


def choose_crop(mask2d: np.ndarray, img_size: int) -> tuple[int, int, int, int] | None:
    """Square crop (x0, y0, x1, y1), half-open, around a (J, I) seed mask, or None to keep the whole slice."""
    rows = np.flatnonzero(mask2d.any(axis=1))
    cols = np.flatnonzero(mask2d.any(axis=0))
    if rows.size == 0:
        return None
    slice_side = max(mask2d.shape)
    lesion_side = max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1
    if lesion_side * img_size / slice_side >= ZOOM_BELOW_MODEL_PX:
        return None
    side = int(max(MIN_CROP_PX, np.ceil(CROP_FACTOR * lesion_side)))
    if side >= min(mask2d.shape):
        return None
    centre = np.array([(cols[0] + cols[-1]) / 2.0, (rows[0] + rows[-1]) / 2.0])
    start = np.round(centre - side / 2.0).astype(int)
    start = np.clip(start, 0, np.array([mask2d.shape[1], mask2d.shape[0]]) - side)
    return int(start[0]), int(start[1]), int(start[0] + side), int(start[1] + side)
