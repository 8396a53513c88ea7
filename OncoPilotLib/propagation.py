"""Slice-by-slice propagation of a 2D seed mask along z, with stop rules.

As in the paper, each next slice is prompted from the previous slice's mask: its box plus a margin and,
optionally, its logits as a dense mask prompt (LiteMedSAM fails on a bare mask prompt, but box + mask works).
The new logits are then mixed with the previous slice's (``logit_memory``) so the mask changes smoothly along z.
Propagation in one direction stops at the first slice that breaks a rule; that slice is not kept:

- ``empty``: the mask (after removing other lesions) has fewer than ``min_area_px`` pixels;
- ``low_iou``: the decoder's predicted IoU is below ``min_iou``;
- ``hu_drift``: the mask's mean HU left the seed's mean by more than ``hu_sd_factor`` seed SDs;
- ``area_jump``: the area grew more than ``max_area_growth`` times the previous slice's (leak into an organ);
- ``low_overlap``: less than ``min_overlap`` of the new mask lies on the previous slice's mask.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from scipy import ndimage as ndi

from .prompts import clip_box, mask_box


@dataclass
class PropagationSettings:
    """Tunable propagation parameters (defaults chosen on the 32 shared lesions; see docs/BENCHMARKS.md)."""

    # LiteMedSAM fills whatever box it is given where the CT shows no clear edge (sarcoma in muscle), so the box
    # margin decides whether the mask grows, holds or fades from slice to slice. Measured on the shared lesions
    # (GT box + 15 px seed, same seed for every variant; docs/BENCHMARKS.md section 3): the
    # previous mask's box shrunk by 2 px (the first rule) made sarcomas fade within a few slices (mean 3D Dice
    # 0.53 on 13 lesions, volume 0.25-0.6x the truth); +3 px with the logits ran through whole crops (0.65);
    # +1 px with the previous logits as mask prompt held the lesion best (0.67; 0.80 -> 0.78/0.74 on the two
    # nodules, which a +3 px box on sharp edges suited slightly better).
    box_margin_px: float = 1.0
    use_mask_prompt: bool = True
    # The next slice's logits are mixed with the previous slice's: (1 - m) * new + m * previous. On weak edges the
    # box alone decides, so masks fade or grow a few pixels a slice; the memory damps that drift. Measured on the
    # 32 shared lesions (bbox seed; docs/BENCHMARKS.md section 3): mean 3D Dice 0.613 -> 0.642 at m = 0.5 (0.611
    # -> 0.698 from a GT box + 3 px seed); averaging the logits of several box margins instead gave 0.626.
    logit_memory: float = 0.5
    min_area_px: int = 3
    min_iou: float = 0.5
    hu_sd_factor: float = 2.5
    max_area_growth: float = 2.0
    min_overlap: float = 0.5
    rules: tuple[str, ...] = ("empty", "low_iou", "hu_drift", "area_jump", "low_overlap")


@dataclass
class SliceResult:
    """Mask of one slice: (J, I) bool mask, (J, I) float32 logits, predicted IoU."""

    mask: np.ndarray
    logits: np.ndarray
    iou: float


@dataclass
class PropagationLog:
    """Why each direction stopped: {+1: ('hu_drift', k), -1: ('end_of_range', k)}."""

    stops: dict = field(default_factory=dict)


class Cancelled(RuntimeError):
    """Raised when the caller's cancel event is set between two slices."""


def hu_stats(slice_hu: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """Mean and SD (HU) of a slice inside a mask."""
    values = slice_hu[mask].astype(np.float64)
    return float(values.mean()), float(values.std())


def seed_stats(slice_hu: np.ndarray, mask: np.ndarray, erode_px: int = 2) -> tuple[float, float]:
    """Reference HU (mean, SD) of a seed mask for the ``hu_drift`` rule: the mean of its core (``erode_px``
    inside the outline, when a quarter of the mask is left), the SD of the whole mask.

    The outline mixes lesion and surroundings and pulls the mean towards them: on a synthetic 120 HU lesion in
    20 HU tissue the whole-mask mean (107 HU) let masks of pure surrounding tissue pass; the core's (118 HU)
    does not. The whole-mask SD keeps the tolerance wide enough for the partial-volume end slices of lung
    nodules (mean -100 to -200 HU around a +50 HU seed), which the core's SD cut off.
    """
    core = ndi.binary_erosion(mask, iterations=erode_px)
    mean, sd = hu_stats(slice_hu, mask)
    if np.count_nonzero(core) >= 0.25 * np.count_nonzero(mask):
        mean = hu_stats(slice_hu, core)[0]
    return mean, sd


def _best_overlap_component(mask: np.ndarray, previous: np.ndarray) -> np.ndarray:
    """The 8-connected component of ``mask`` overlapping ``previous`` most (the lesion's continuation)."""
    labels, count = ndi.label(mask, structure=np.ones((3, 3)))
    if count <= 1:
        return mask
    overlap = np.bincount(labels[previous], minlength=count + 1)[1:]
    if overlap.max() == 0:
        overlap = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    return labels == 1 + int(np.argmax(overlap))


def stop_reason(result: SliceResult, previous: SliceResult, slice_hu, reference, settings) -> str | None:
    """The first stop rule that ``result`` breaks, or None if the slice belongs to the lesion."""
    area = int(np.count_nonzero(result.mask))
    rules = settings.rules
    if "empty" in rules and area < settings.min_area_px:
        return "empty"
    if "low_iou" in rules and result.iou < settings.min_iou:
        return "low_iou"
    if "hu_drift" in rules:
        mean, _ = hu_stats(slice_hu, result.mask)
        if abs(mean - reference[0]) > settings.hu_sd_factor * max(reference[1], 1.0):
            return "hu_drift"
    if "area_jump" in rules and area > settings.max_area_growth * max(1, np.count_nonzero(previous.mask)):
        return "area_jump"
    if "low_overlap" in rules and np.count_nonzero(result.mask & previous.mask) < settings.min_overlap * area:
        return "low_overlap"
    return None


def predict_next(predictor, slice_index: int, previous: SliceResult, settings: PropagationSettings,
                 blocked: np.ndarray | None = None) -> SliceResult:
    """Predict slice ``slice_index`` prompted by the adjacent slice's result (whole-slice embeddings)."""
    margin = settings.box_margin_px
    box = mask_box(previous.mask) + np.array([-margin, -margin, margin, margin])
    centre, half = (box[:2] + box[2:]) / 2.0, np.maximum((box[2:] - box[:2]) / 2.0, 1.0)  # never inverted
    box = clip_box(np.concatenate([centre - half, centre + half]), predictor.volume.shape[1:])
    prediction = predictor.predict(slice_index, box=box,
                                   mask_logits=previous.logits if settings.use_mask_prompt else None)
    logits = prediction.logits
    if settings.logit_memory:
        logits = ((1.0 - settings.logit_memory) * logits + settings.logit_memory * previous.logits).astype(np.float32)
    mask = logits > 0
    if blocked is not None:
        mask &= ~blocked
    if mask.any():
        mask = _best_overlap_component(mask, previous.mask)
    return SliceResult(mask, logits, prediction.iou)


def propagate(predictor, seed_index: int, seed: SliceResult, direction: int, z_range: tuple[int, int],
              settings: PropagationSettings, blocked_volume: np.ndarray | None = None,
              on_slice: Callable[[int, SliceResult], None] | None = None,
              cancel: threading.Event | None = None, log: PropagationLog | None = None) -> dict[int, SliceResult]:
    """Propagate from ``seed_index`` in ``direction`` (+1 or -1) within ``z_range`` = (k_min, k_max) inclusive.

    Returns {slice index: SliceResult} for the slices kept (the seed excluded). ``blocked_volume`` (K, J, I)
    marks voxels of other lesions, never included. ``on_slice`` is called after each kept slice.
    Raises :class:`Cancelled` when ``cancel`` is set.
    """
    volume = predictor.volume
    reference = seed_stats(volume[seed_index], seed.mask)
    results: dict[int, SliceResult] = {}
    previous, k = seed, seed_index + direction
    reason = "end_of_range"
    while z_range[0] <= k <= z_range[1]:
        if cancel is not None and cancel.is_set():
            raise Cancelled("segmentation cancelled")
        blocked = None if blocked_volume is None else blocked_volume[k]
        result = predict_next(predictor, k, previous, settings, blocked)
        reason = stop_reason(result, previous, volume[k], reference, settings)
        if reason is not None:
            break
        results[k] = result
        if on_slice is not None:
            on_slice(k, result)
        previous, k = result, k + direction
    if log is not None:
        log.stops[direction] = (reason or "end_of_range", k)
    return results
