"""A segmentation session: one CT, many lesions, each from one prompt, refined by edit clicks, with undo.

Coordinates: prompts are voxel indices ``(i, j, k)`` of the (K, J, I) volume (``k`` = axial slice); use
:meth:`PointPrompt.from_ras` / ``from_lps`` for patient coordinates. Lesion masks are (K, J, I) bool arrays.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .geometry import VolumeGeometry
from .io import looks_like_ct
from .predictor import VolumePredictor
from .editing import edit_slice, repropagate
from .prompts import SeedResult, seed_from_box, seed_from_click
from .propagation import PropagationLog, PropagationSettings, SliceResult, propagate
from .zoom import choose_crop

logger = logging.getLogger(__name__)

# A click whose 3 x 3 neighbourhood has a median below this is in air (lung parenchyma is ~ -850 HU).
AIR_HU = -900.0


class NothingFoundError(ValueError):
    """The prompt did not yield any lesion (nothing is saved)."""


@dataclass(frozen=True)
class PointPrompt:
    """A click at voxel index (i, j, k) (continuous values allowed)."""

    ijk: tuple[float, float, float]

    @classmethod
    def from_ras(cls, ras, geometry: VolumeGeometry) -> "PointPrompt":
        return cls(tuple(float(v) for v in geometry.ras_to_ijk_points(ras)))

    @classmethod
    def from_lps(cls, lps, geometry: VolumeGeometry) -> "PointPrompt":
        return cls(tuple(float(v) for v in geometry.lps_to_ijk_points(lps)))


@dataclass(frozen=True)
class BoxPrompt:
    """A 2D box on axial slice ``slice_index``: (i_min, j_min, i_max, j_max) voxel indices."""

    slice_index: int
    box: tuple[float, float, float, float]


@dataclass(frozen=True)
class RoiPrompt:
    """A 3D box from (i, j, k) min to max corner (inclusive voxel indices); its centre slice gives the 2D box and
    propagation stays within its k range."""

    ijk_min: tuple[float, float, float]
    ijk_max: tuple[float, float, float]


@dataclass
class ProgressEvent:
    """Sent to the progress callback: stage 'seed' (``mask2d`` = the seed slice's mask), 'propagate' (one more
    slice), 'done'. ``done``/``total`` count slices processed / the maximum that may be processed."""

    stage: str
    slice_index: int
    done: int
    total: int
    mask2d: np.ndarray | None = None


@dataclass
class Lesion:
    """One segmented lesion.

    Attributes:
        id: session-unique number; name: "Lesion <id>" unless given.
        mask: (K, J, I) bool.
        mode: 'point', 'box', 'roi', then 'point-edit' once edited.
        seed_slice: k of the seed; z_range: (k_min, k_max) propagation was allowed in.
        seed_crop: (x0, y0, x1, y1) zoom region the seed slice was encoded in (a small lesion), or None for the whole
            slice. Propagation and edits always use whole-slice embeddings (see :mod:`OncoPilotLib.zoom`).
        clicks: edit clicks as ((i, j, k), positive).
        locked: a locked lesion is never changed by edits.
    """

    id: int
    name: str
    mask: np.ndarray
    mode: str
    seed_slice: int
    z_range: tuple[int, int]
    seed_crop: tuple[int, int, int, int] | None = None
    clicks: list = field(default_factory=list)
    locked: bool = False
    logits: dict = field(default_factory=dict, repr=False)
    log: PropagationLog = field(default_factory=PropagationLog, repr=False)
    history: list = field(default_factory=list, repr=False)

    @property
    def slices(self) -> np.ndarray:
        return np.flatnonzero(self.mask.any(axis=(1, 2)))


class SegmentationSession:
    """Segment lesions in one CT volume.

    Args:
        volume_hu: (K, J, I) CT in HU, axial slices along the first axis.
        geometry: the volume's voxel geometry (spacing in mm is used for click box sizes).
        model: registry name, checkpoint path, a LoadedModel or a ready VolumePredictor.
        settings: propagation settings.
    """

    def __init__(self, volume_hu: np.ndarray, geometry: VolumeGeometry | None = None, model="litemedsam",
                 settings: PropagationSettings | None = None, device: str | None = None, **predictor_options):
        volume_hu = np.asarray(volume_hu)
        if volume_hu.ndim != 3:
            raise ValueError(f"a 3D CT volume is needed, got an array of shape {volume_hu.shape}")
        self.geometry = geometry or VolumeGeometry.from_spacing((1.0, 1.0, 1.0), volume_hu.shape)
        if tuple(self.geometry.shape_kji) != volume_hu.shape:
            raise ValueError(f"geometry shape {self.geometry.shape_kji} does not match the volume {volume_hu.shape}")
        if not looks_like_ct(volume_hu):
            logger.warning("this volume holds no air-like values (< -500 HU): is it a CT? OncoPilot's models "
                           "expect Hounsfield units; results on MR or PET are not validated")
        self.predictor = model if isinstance(model, VolumePredictor) else VolumePredictor(
            model, device=device, **predictor_options)
        self.predictor.set_volume(volume_hu, self.geometry.spacing)
        self.settings = settings or PropagationSettings()
        self.lesions: dict[int, Lesion] = {}
        self._next_id = 1

    @property
    def volume(self) -> np.ndarray:
        return self.predictor.volume

    # ---- lesions ------------------------------------------------------------------------------------------
    def segment(self, prompt, progress: Callable[[ProgressEvent], None] | None = None,
                cancel: threading.Event | None = None, name: str | None = None) -> Lesion:
        """Segment a new lesion from a PointPrompt, BoxPrompt or RoiPrompt; it never overlaps finished ones.

        Raises:
            ValueError: prompt outside the volume or in air; NothingFoundError: no lesion at the prompt;
            Cancelled: ``cancel`` was set (nothing is added).
        """
        seed_slice, z_range, seed_fn = self._seed_plan(prompt)
        blocked = self._blocked(None)
        seed, crop = self._seed(seed_fn, seed_slice, blocked[seed_slice])
        mode = {PointPrompt: "point", BoxPrompt: "box", RoiPrompt: "roi"}[type(prompt)]
        lesion = Lesion(self._next_id, name or f"Lesion {self._next_id}", np.zeros(self.volume.shape, bool),
                        mode, seed_slice, z_range, crop)
        self._fill(lesion, seed_slice, seed, blocked, progress, cancel)
        self.lesions[lesion.id] = lesion
        self._next_id += 1
        return lesion

    def edit(self, lesion_id: int, ijk, positive: bool = True,
             progress: Callable[[ProgressEvent], None] | None = None,
             cancel: threading.Event | None = None) -> Lesion:
        """Add a positive (lesion) or negative (background) click at voxel (i, j, k) and refine the lesion.

        Clicks accumulate; :meth:`undo` restores the exact mask before this click. A cancelled edit changes nothing.
        """
        lesion = self._lesion(lesion_id)
        if lesion.locked:
            raise ValueError(f"{lesion.name} is locked: unlock it before editing")
        i, j, k = (float(v) for v in np.asarray(ijk, dtype=float))
        if not self.geometry.contains_ijk((i, j, k)):
            raise ValueError(f"the click {(round(i), round(j), round(k))} (i, j, k) lies outside the volume")
        k = int(round(k))
        snapshot = self._snapshot(lesion)
        lesion.clicks.append(((i, j, float(k)), bool(positive)))
        try:
            self._apply_edit(lesion, (i, j), k, bool(positive), progress, cancel)
        except Exception:
            self._restore(lesion, snapshot)
            raise
        lesion.history.append(snapshot)
        lesion.mode = "point-edit"
        return lesion

    def undo(self, lesion_id: int) -> Lesion:
        """Undo the last edit click of a lesion, restoring its exact previous mask."""
        lesion = self._lesion(lesion_id)
        if not lesion.history:
            raise ValueError(f"{lesion.name} has no edit to undo")
        self._restore(lesion, lesion.history.pop())
        return lesion

    def _apply_edit(self, lesion: Lesion, point, k: int, positive: bool, progress, cancel) -> None:
        blocked = self._blocked(lesion.id)
        total = lesion.z_range[1] - lesion.z_range[0] + 1
        result = edit_slice(self, lesion, k, point, positive, blocked[k])
        if progress is not None:
            progress(ProgressEvent("seed", k, 1, total, result.mask.copy()))
        count = [1]

        def on_slice(index, new):
            count[0] += 1
            if progress is not None:
                progress(ProgressEvent("propagate", index, count[0], total, new.mask.copy()))

        repropagate(self, lesion, k, result, blocked, cancel, on_slice)
        if progress is not None:
            progress(ProgressEvent("done", k, count[0], total, None))

    @staticmethod
    def _snapshot(lesion: Lesion) -> tuple:
        return (np.packbits(lesion.mask), dict(lesion.logits), list(lesion.clicks), lesion.mode)

    @staticmethod
    def _restore(lesion: Lesion, snapshot: tuple) -> None:
        packed, logits, clicks, mode = snapshot
        lesion.mask[...] = np.unpackbits(packed, count=lesion.mask.size).reshape(lesion.mask.shape).astype(bool)
        lesion.logits, lesion.clicks, lesion.mode = logits, clicks, mode

    def remove(self, lesion_id: int) -> Lesion:
        return self.lesions.pop(self._lesion(lesion_id).id)

    def lock(self, lesion_id: int, locked: bool = True) -> None:
        self._lesion(lesion_id).locked = locked

    def prefetch_around(self, slice_index: int, radius: int = 10, crop=None) -> None:
        """Encode slices nearest ``slice_index`` first in the background, so a click there costs decoder time only."""
        self.predictor.prefetch_around(int(slice_index), radius, crop)

    # ---- seeds --------------------------------------------------------------------------------------------
    def _seed_plan(self, prompt):
        """(seed slice, allowed z range, function(crop, blocked) -> SeedResult) for a prompt."""
        last = self.volume.shape[0] - 1
        if isinstance(prompt, PointPrompt):
            i, j, k = self._check_point(prompt.ijk)
            spacing_xy = self.geometry.spacing[:2]
            return k, (0, last), lambda crop, blocked: seed_from_click(self.predictor, k, (i, j), spacing_xy,
                                                                         crop, blocked)
        if isinstance(prompt, BoxPrompt):
            k = self._check_slice(prompt.slice_index)
            box = self._check_box(prompt.box)
            return k, (0, last), lambda crop, blocked: seed_from_box(self.predictor, k, box, crop, blocked)
        if isinstance(prompt, RoiPrompt):
            low, high = np.minimum(prompt.ijk_min, prompt.ijk_max), np.maximum(prompt.ijk_min, prompt.ijk_max)
            k0, k1 = (self._check_slice(int(round(v))) for v in (low[2], high[2]))
            k = (k0 + k1) // 2
            box = self._check_box((low[0], low[1], high[0], high[1]))
            return k, (k0, k1), lambda crop, blocked: seed_from_box(self.predictor, k, box, crop, blocked)
        raise TypeError(f"unsupported prompt {prompt!r}: use PointPrompt, BoxPrompt or RoiPrompt")

    def _seed(self, seed_fn, seed_slice: int, blocked2d: np.ndarray):
        seed = seed_fn(None, blocked2d)
        if seed is None:
            raise NothingFoundError(f"no lesion found at the prompt on slice {seed_slice}")
        crop = choose_crop(seed.mask, self.predictor.img_size)
        if crop is not None:
            zoomed = seed_fn(crop, blocked2d)
            if zoomed is not None:
                seed = zoomed
            else:
                crop = None
        return seed, crop

    def _check_point(self, ijk) -> tuple[float, float, int]:
        ijk = np.asarray(ijk, dtype=float)
        if ijk.shape != (3,) or not self.geometry.contains_ijk(ijk):
            raise ValueError(f"the point {tuple(np.round(ijk, 1))} (i, j, k) lies outside the volume "
                             f"(I x J x K = {self.volume.shape[2]} x {self.volume.shape[1]} x {self.volume.shape[0]})")
        i, j, k = (int(round(v)) for v in ijk)
        patch = self.volume[k, max(0, j - 1):j + 2, max(0, i - 1):i + 2]
        if float(np.median(patch)) < AIR_HU:
            raise ValueError(f"the point {(i, j, k)} is in air ({float(np.median(patch)):.0f} HU): click on the lesion")
        return float(ijk[0]), float(ijk[1]), k

    def _check_slice(self, k) -> int:
        k = int(round(k))
        if not 0 <= k < self.volume.shape[0]:
            raise ValueError(f"slice {k} lies outside the volume (0..{self.volume.shape[0] - 1})")
        return k

    def _check_box(self, box) -> tuple[float, float, float, float]:
        x0, y0, x1, y1 = (float(v) for v in box)
        rows, cols = self.volume.shape[1:]
        if x1 < x0 or y1 < y0:
            raise ValueError(f"box {box}: the maximum corner must not be below the minimum corner")
        if x1 < 0 or y1 < 0 or x0 > cols - 1 or y0 > rows - 1:
            raise ValueError(f"box {box} lies outside the {cols} x {rows} slice")
        if x1 - x0 < 2 or y1 - y0 < 2:
            raise ValueError(f"box {box} is smaller than 3 x 3 pixels: draw it around the whole lesion")
        return x0, y0, x1, y1

    def _blocked(self, lesion_id: int | None) -> np.ndarray:
        """(K, J, I) union of all lesions except ``lesion_id``: a new mask never takes their voxels."""
        blocked = np.zeros(self.volume.shape, dtype=bool)
        for other in self.lesions.values():
            if other.id != lesion_id:
                blocked |= other.mask
        return blocked

    # ---- propagation --------------------------------------------------------------------------------------
    def _fill(self, lesion: Lesion, seed_slice: int, seed: SeedResult, blocked: np.ndarray, progress, cancel):
        total = lesion.z_range[1] - lesion.z_range[0] + 1
        done = [1]
        self._store(lesion, seed_slice, SliceResult(seed.mask, seed.logits, seed.iou))
        if progress is not None:
            progress(ProgressEvent("seed", seed_slice, 1, total, seed.mask.copy()))

        def on_slice(k, result):
            done[0] += 1
            self._store(lesion, k, result)
            if progress is not None:
                progress(ProgressEvent("propagate", k, done[0], total, result.mask.copy()))

        start = SliceResult(seed.mask, seed.logits, seed.iou)
        for direction in (+1, -1):
            propagate(self.predictor, seed_slice, start, direction, lesion.z_range, self.settings,
                      blocked_volume=blocked, on_slice=on_slice, cancel=cancel, log=lesion.log)
        if progress is not None:
            progress(ProgressEvent("done", seed_slice, done[0], total, None))

    @staticmethod
    def _store(lesion: Lesion, k: int, result: SliceResult) -> None:
        lesion.mask[k] = result.mask
        lesion.logits[k] = result.logits

    def _lesion(self, lesion_id: int) -> Lesion:
        if lesion_id not in self.lesions:
            raise KeyError(f"no lesion {lesion_id} in this session (have {sorted(self.lesions)})")
        return self.lesions[lesion_id]
