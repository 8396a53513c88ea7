"""Point-edit: positive / negative clicks that refine a lesion, then re-propagation until slices stop changing.

A click on slice k re-predicts that slice from the current mask's box (grown to include positive clicks), the
accumulated clicks of that slice as point prompts and the current logits as mask prompt. Because LiteMedSAM
barely reacts to point prompts (it was trained with boxes), the clicks are also enforced: a positive click
outside the result adds the component found by a click-seed there; a negative click still inside removes the
connected part of the mask around it that the click-seed there would segment. Then the change is propagated
outward from k in both directions until a slice's new mask agrees with its old one (IoU >= 0.9).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from .prompts import clip_box, component_at, iou, mask_box, seed_from_click
from .propagation import Cancelled, SliceResult, predict_next, stop_reason, hu_stats

_MASK_LOGIT = 10.0
STABLE_IOU = 0.9


def mask_logits(mask: np.ndarray) -> np.ndarray:
    """A hard (J, I) mask as logits (+-10) for use as a mask prompt."""
    return np.where(mask, _MASK_LOGIT, -_MASK_LOGIT).astype(np.float32)


def _slice_clicks(clicks, k: int):
    points = np.array([c[0][:2] for c in clicks if int(round(c[0][2])) == k], dtype=float).reshape(-1, 2)
    labels = np.array([1 if c[1] else 0 for c in clicks if int(round(c[0][2])) == k], dtype=int)
    return points, labels


def edit_slice(session, lesion, k: int, blocked2d: np.ndarray) -> SliceResult:
    """New mask of slice k from the current mask and all clicks on k (see module docstring)."""
    predictor = session.predictor
    points, labels = _slice_clicks(lesion.clicks, k)
    current = lesion.mask[k]
    positives = points[labels == 1]
    if not current.any():
        # A positive click where the lesion is missing is a new seed, as good as a first click.
        mask = np.zeros_like(current)
        seeds = [seed_from_click(predictor, k, p, session.geometry.spacing[:2], lesion.crop, blocked2d)
                 for p in positives]
        for seed in seeds:
            mask |= seed.mask if seed is not None else False
        logits = next((s.logits for s in seeds if s is not None), mask_logits(mask))
        mask = _enforce_clicks(session, lesion, k, mask, points, labels, blocked2d)
        return SliceResult(mask, np.where(mask, np.abs(logits) + 0.1, -np.abs(logits) - 0.1).astype(np.float32),
                           1.0)
    margin = 3.0
    corners = [mask_box(current).reshape(2, 2)]
    corners += [positives - margin, positives + margin] if len(positives) else []
    stacked = np.vstack(corners)
    box = clip_box(np.concatenate([stacked.min(0), stacked.max(0)]), current.shape)
    prediction = predictor.predict(k, box=box, points=points, point_labels=labels,
                                   mask_logits=lesion.logits.get(k, mask_logits(current)), crop=lesion.crop)
    mask = prediction.mask & ~blocked2d
    if mask.any():
        keep = current | _click_mask(positives, current.shape)
        mask = _components_touching(mask, keep)
    mask = _enforce_clicks(session, lesion, k, mask, points, labels, blocked2d)
    return SliceResult(mask, np.where(mask, np.abs(prediction.logits) + 0.1, -np.abs(prediction.logits) - 0.1)
                       .astype(np.float32), prediction.iou)


def _click_mask(points: np.ndarray, shape) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    for i, j in np.round(points).astype(int):
        mask[j, i] = True
    return mask


def _components_touching(mask: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """The 8-connected components of ``mask`` that overlap ``keep`` (drops stray blobs far from the lesion)."""
    labels, count = ndi.label(mask, structure=np.ones((3, 3)))
    wanted = np.unique(labels[keep & mask])
    return np.isin(labels, wanted[wanted > 0])


def _enforce_clicks(session, lesion, k, mask, points, labels, blocked2d):
    spacing_xy = session.geometry.spacing[:2]
    for point, label in zip(points, labels):
        pixel = (int(round(point[0])), int(round(point[1])))
        inside = bool(mask[pixel[1], pixel[0]])
        if label == 1 and not inside:
            seed = seed_from_click(session.predictor, k, point, spacing_xy, lesion.crop, blocked2d)
            if seed is not None:
                mask = mask | seed.mask
            mask[pixel[1], pixel[0]] = True
        elif label == 0 and inside:
            mask = mask & ~_region_to_remove(session, lesion, k, mask, point, blocked2d)
    return mask


def _region_to_remove(session, lesion, k, mask, point, blocked2d):
    """Pixels a negative click removes: what a click-seed there segments, or else the component under it."""
    pixel = (int(round(point[0])), int(round(point[1])))
    seed = seed_from_click(session.predictor, k, point, session.geometry.spacing[:2], lesion.crop, blocked2d)
    if seed is not None and seed.mask[pixel[1], pixel[0]] and seed.mask.sum() < 0.8 * mask.sum():
        return seed.mask
    return component_at(mask, pixel)


def repropagate(session, lesion, k: int, result: SliceResult, blocked, cancel=None, on_slice=None) -> None:
    """Propagate slice k's new result outward until the new masks agree with the old ones."""
    lesion.mask[k], lesion.logits[k] = result.mask, result.logits
    seed_stats = hu_stats(session.volume[k], result.mask) if result.mask.any() else None
    # An emptied slice cuts the lesion: only the part beyond it (away from the seed) goes too.
    away = 1 if k >= lesion.seed_slice else -1
    for direction in ((+1, -1) if result.mask.any() else (away,)):
        previous, j = result, k + direction
        while lesion.z_range[0] <= j <= lesion.z_range[1]:
            if cancel is not None and cancel.is_set():
                raise Cancelled("edit cancelled")
            if not previous.mask.any():
                new = SliceResult(np.zeros_like(previous.mask), mask_logits(np.zeros_like(previous.mask)), 1.0)
            else:
                new = predict_next(session.predictor, j, previous, session.settings, lesion.crop, blocked[j])
                if seed_stats is None or stop_reason(new, previous, session.volume[j], seed_stats,
                                                     session.settings):
                    new = SliceResult(np.zeros_like(new.mask), mask_logits(np.zeros_like(new.mask)), new.iou)
            old = lesion.mask[j].copy()
            lesion.mask[j], lesion.logits[j] = new.mask, new.logits
            if on_slice is not None:
                on_slice(j, new)
            if iou(old, new.mask) >= STABLE_IOU:
                break
            previous, j = new, j + direction
