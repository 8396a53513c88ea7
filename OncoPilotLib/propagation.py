"""Slice-by-slice propagation of a 2D seed mask along z, with stop rules.

As in the paper, each next slice is prompted from the previous slice's mask: its box plus a margin and,
optionally, its logits as a dense mask prompt (LiteMedSAM fails on a bare mask prompt, but box + mask works).
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

    # LiteMedSAM fills whatever box it is given where the CT shows no clear edge. Measured with the previous
    # mask's box + 3 px and its logits as mask prompt: sts_002 (sarcoma in muscle, 16 slices) ran through all 24
    # slices of its crop, 3D Dice 0.41; with the box shrunk by 2 px the mask must push past the box to grow and
    # fades out where the lesion ends: 14 slices, Dice 0.72. But a nodule in lung (lidc_0003_n1) has sharp edges
    # the model follows, and there the shrinking box cut it short (Dice 0.81 -> 0.51). So the margin follows
    # the edge contrast of the previous slice's mask (see :func:`edge_contrast`). On the reference outlines of
    # the shared lesions that contrast is 1.6-2.9 (10th-90th percentile) for the two lung nodules and below 1.5
    # on most slices of the 30 sarcomas (median 0.07-1.3; 2.0 for sts_013 and sts_025): threshold 1.5.
    box_margin_px: float = -2.0
    use_mask_prompt: bool = False
    high_contrast: float = 1.5
    high_contrast_margin_px: float = 3.0
    high_contrast_mask_prompt: bool = True
    min_area_px: int = 3
    min_iou: float = 0.5
    hu_sd_factor: float = 3.0
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


def _best_overlap_component(mask: np.ndarray, previous: np.ndarray) -> np.ndarray:
    """The 8-connected component of ``mask`` overlapping ``previous`` most (the lesion's continuation)."""
    labels, count = ndi.label(mask, structure=np.ones((3, 3)))
    if count <= 1:
        return mask
    overlap = np.bincount(labels[previous], minlength=count + 1)[1:]
    if overlap.max() == 0:
        overlap = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    return labels == 1 + int(np.argmax(overlap))


def stop_reason(result: SliceResult, previous: SliceResult, slice_hu, seed_stats, settings) -> str | None:
    """The first stop rule that ``result`` breaks, or None if the slice belongs to the lesion."""
    area = int(np.count_nonzero(result.mask))
    rules = settings.rules
    if "empty" in rules and area < settings.min_area_px:
        return "empty"
    if "low_iou" in rules and result.iou < settings.min_iou:
        return "low_iou"
    if "hu_drift" in rules:
        mean, _ = hu_stats(slice_hu, result.mask)
        if abs(mean - seed_stats[0]) > settings.hu_sd_factor * max(seed_stats[1], 1.0):
            return "hu_drift"
    if "area_jump" in rules and area > settings.max_area_growth * max(1, np.count_nonzero(previous.mask)):
        return "area_jump"
    if "low_overlap" in rules and np.count_nonzero(result.mask & previous.mask) < settings.min_overlap * area:
        return "low_overlap"
    return None


def edge_contrast(slice_hu: np.ndarray, mask: np.ndarray, ring_px: int = 3) -> float:
    """|mean HU inside - mean HU in a ring of ``ring_px`` around the mask| / SD inside (>= 10 HU)."""
    ring = ndi.binary_dilation(mask, iterations=ring_px) & ~mask
    if not ring.any() or not mask.any():
        return 0.0
    inside = slice_hu[mask].astype(np.float64)
    return float(abs(inside.mean() - slice_hu[ring].astype(np.float64).mean()) / max(inside.std(), 10.0))


def predict_next(predictor, slice_index: int, previous: SliceResult, settings: PropagationSettings,
                 crop=None, blocked: np.ndarray | None = None) -> SliceResult:
    """Predict slice ``slice_index`` prompted by the adjacent slice's result."""
    # Contrast of the previous mask's outline on this slice (adjacent slices share their anatomy).
    sharp = edge_contrast(predictor.volume[slice_index], previous.mask) >= settings.high_contrast
    margin = settings.high_contrast_margin_px if sharp else settings.box_margin_px
    use_mask = settings.high_contrast_mask_prompt if sharp else settings.use_mask_prompt
    box = mask_box(previous.mask) + np.array([-margin, -margin, margin, margin])
    centre, half = (box[:2] + box[2:]) / 2.0, np.maximum((box[2:] - box[:2]) / 2.0, 1.0)  # never inverted
    box = clip_box(np.concatenate([centre - half, centre + half]), predictor.volume.shape[1:])
    prediction = predictor.predict(slice_index, box=box, crop=crop,
                                   mask_logits=previous.logits if use_mask else None)
    mask = prediction.mask if blocked is None else prediction.mask & ~blocked
    if mask.any():
        mask = _best_overlap_component(mask, previous.mask)
    return SliceResult(mask, prediction.logits, prediction.iou)


def propagate(predictor, seed_index: int, seed: SliceResult, direction: int, z_range: tuple[int, int],
              settings: PropagationSettings, crop=None, blocked_volume: np.ndarray | None = None,
              on_slice: Callable[[int, SliceResult], None] | None = None,
              cancel: threading.Event | None = None, log: PropagationLog | None = None) -> dict[int, SliceResult]:
    """Propagate from ``seed_index`` in ``direction`` (+1 or -1) within ``z_range`` = (k_min, k_max) inclusive.

    Returns {slice index: SliceResult} for the slices kept (the seed excluded). ``blocked_volume`` (K, J, I)
    marks voxels of other lesions, never included. ``on_slice`` is called after each kept slice.
    Raises :class:`Cancelled` when ``cancel`` is set.
    """
    volume = predictor.volume
    seed_stats = hu_stats(volume[seed_index], seed.mask)
    results: dict[int, SliceResult] = {}
    previous, k = seed, seed_index + direction
    reason = "end_of_range"
    while z_range[0] <= k <= z_range[1]:
        if cancel is not None and cancel.is_set():
            raise Cancelled("segmentation cancelled")
        blocked = None if blocked_volume is None else blocked_volume[k]
        result = predict_next(predictor, k, previous, settings, crop, blocked)
        reason = stop_reason(result, previous, volume[k], seed_stats, settings)
        if reason is not None:
            break
        results[k] = result
        if on_slice is not None:
            on_slice(k, result)
        previous, k = result, k + direction
    if log is not None:
        log.stops[direction] = (reason or "end_of_range", k)
    return results
