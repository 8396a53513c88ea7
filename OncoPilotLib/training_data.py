"""Training data for ``oncopilot train``: lesion slices, cached image embeddings and the prompts OncoPilot sends.

All prompt geometry is in slice pixel coordinates ``(x, y) = (i, j)`` (pixel centres at integers) and goes through
the same :class:`~OncoPilotLib.preprocess.SliceTransform` as inference, so training sees exactly what
:class:`~OncoPilotLib.predictor.VolumePredictor` feeds the model.

Prompt kinds (the ``kind`` of a :class:`Prompt`):

- ``point``: the barycentre click (centroid, moved to the nearest lesion pixel when outside it);
- ``points``: 1-3 random clicks inside the lesion;
- ``box``: the lesion box loosened by a random margin per side (0 to 2, 5, 15 or 30 px), always containing it;
- ``box_point``: a loosened box plus one click inside;
- ``mask``: the adjacent slice's ground-truth mask as mask logits (what slice propagation sends);
- ``mask_box``: that mask plus the neighbour's box loosened by 0-8 px (what propagation sends: its box is the
  previous slice's mask box + 3 px);
- ``edit``: the first prompt (clicks or a box), a wrong "current" mask and one edit click in an error region
  (label 1 in a missed region, 0 in a leak).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

DEFAULT_PROMPT_MIX = {"point": 0.15, "points": 0.10, "box": 0.20, "box_point": 0.05, "mask": 0.15,
                      "mask_box": 0.10, "edit": 0.25}
# Upper bound of the box margin (px per side) drawn by the sampler: mostly near-tight boxes (OncoPilot's own seeding
# and propagation use mask box + 3 px), sometimes the +15 px a hurried user draws, or beyond. A box does not tell
# its margin: with bounds 5/15/30 (p .35/.45/.20) the decoder learnt to shrink every box, and tight-box Dice fell
# on the inner validation lesions (0.73 -> 0.64 after 60 steps) and on the held-out ones (0.77 -> 0.64 at +5 px).
BOX_MARGIN_CHOICES = (2.0, 5.0, 15.0, 30.0)
BOX_MARGIN_PROBS = (0.35, 0.30, 0.25, 0.10)
PROPAGATION_MARGIN_PX = 3.0  # base margin of the 'mask_box' prompt (propagation now sends +1 px; jitter covers it)
MASK_PROMPT_LOGIT = 10.0  # amplitude of a hard mask turned into logits for evaluation (training draws 3-20)


@dataclass
class Prompt:
    """Prompts for one slice, in slice pixel coordinates.

    Attributes:
        kind: prompt kind (see the module docstring).
        box: (4,) float (x0, y0, x1, y1), pixel centres of the box's extreme pixels, or None.
        points: (N, 2) float clicks as (i, j), or None; labels: (N,) int, 1 = lesion, 0 = background.
        mask_logits: (J, I) float32 logits of a previous mask on the slice grid, or None.
    """

    kind: str
    box: np.ndarray | None = None
    points: np.ndarray | None = None
    labels: np.ndarray | None = None
    mask_logits: np.ndarray | None = None


# ---- geometry of a 2D lesion mask ------------------------------------------------------------------------------
def mask_box(mask: np.ndarray) -> np.ndarray:
    """(J, I) bool mask -> (4,) float box (i_min, j_min, i_max, j_max) of its pixels (centres)."""
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        raise ValueError("empty mask has no box")
    return np.array([cols.min(), rows.min(), cols.max(), rows.max()], dtype=float)


def loosen_box(box: np.ndarray, margins, shape: tuple[int, int]) -> np.ndarray:
    """Grow a box by (left, top, right, bottom) px margins >= 0, clipped to a (J, I) slice of ``shape``."""
    margins = np.asarray(margins, dtype=float)
    grown = box + np.array([-1.0, -1.0, 1.0, 1.0]) * margins
    return np.clip(grown, 0.0, [shape[1] - 1, shape[0] - 1, shape[1] - 1, shape[0] - 1])


def barycentre_click(mask: np.ndarray) -> np.ndarray:
    """(2,) (i, j) click at the mask's centroid, or at the nearest mask pixel when the centroid falls outside."""
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        raise ValueError("empty mask has no barycentre")
    centre = np.array([cols.mean(), rows.mean()])
    ij = np.round(centre).astype(int)
    if mask[ij[1], ij[0]]:
        return ij.astype(float)
    nearest = int(np.argmin((cols - centre[0]) ** 2 + (rows - centre[1]) ** 2))
    return np.array([cols[nearest], rows[nearest]], dtype=float)


def random_clicks(mask: np.ndarray, rng: np.random.Generator, count: int = 1) -> np.ndarray:
    """(count, 2) random (i, j) pixels of the mask; half the time only from its inner half (users aim inside)."""
    from scipy import ndimage

    region = mask
    if rng.random() < 0.5:
        distance = ndimage.distance_transform_edt(mask)
        inner = distance >= 0.5 * distance.max()
        region = inner if inner.any() else mask
    rows, cols = np.nonzero(region)
    picks = rng.integers(0, rows.size, size=count)
    return np.stack([cols[picks], rows[picks]], axis=1).astype(float)


def jittered_box(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The mask's box loosened by an independent random margin per side; always contains the mask."""
    limit = rng.choice(BOX_MARGIN_CHOICES, p=BOX_MARGIN_PROBS)
    return loosen_box(mask_box(mask), rng.uniform(0.0, limit, size=4), mask.shape)


def hard_mask_logits(mask: np.ndarray, amplitude: float = MASK_PROMPT_LOGIT) -> np.ndarray:
    """(J, I) bool mask -> (J, I) float32 logits +amplitude inside, -amplitude outside."""
    return np.where(mask, amplitude, -amplitude).astype(np.float32)


def adjacent_slice(lesion: np.ndarray, k: int, rng: np.random.Generator | None = None) -> int | None:
    """Index of a neighbour of slice ``k`` holding the lesion, or None.

    Without ``rng``: the neighbour nearer the lesion's middle slice (propagation runs outwards from it).
    """
    candidates = [n for n in (k - 1, k + 1) if 0 <= n < lesion.shape[0] and lesion[n].any()]
    if not candidates:
        return None
    if rng is not None:
        return int(rng.choice(candidates))
    slices = np.nonzero(lesion.any(axis=(1, 2)))[0]
    middle = 0.5 * (slices.min() + slices.max())
    return min(candidates, key=lambda n: abs(n - middle))


# ---- edit clicks ------------------------------------------------------------------------------------------------
def error_regions(current: np.ndarray, truth: np.ndarray) -> list[tuple[np.ndarray, int]]:
    """Connected error regions of ``current`` vs ``truth`` (both (J, I) bool), largest first.

    Returns:
        list of (region bool mask, click label): label 1 for a missed region (false negative), 0 for a leak.
    """
    from scipy import ndimage

    regions = []
    for errors, label in ((truth & ~current, 1), (current & ~truth, 0)):
        components, count = ndimage.label(errors)
        regions += [(components == index, label) for index in range(1, count + 1)]
    return sorted(regions, key=lambda item: -int(item[0].sum()))


def edit_click(current: np.ndarray, truth: np.ndarray, rng: np.random.Generator | None = None):
    """The click a user makes to correct ``current``: ((2,) (i, j), label) or None when there is no error.

    Without ``rng``: the innermost pixel of the largest error region (standard click simulation). With it: a random
    region (weighted by area) and a random pixel of its inner half.
    """
    from scipy import ndimage

    regions = error_regions(current, truth)
    if not regions:
        return None
    if rng is None:
        region, label = regions[0]
    else:
        areas = np.array([r.sum() for r, _ in regions], dtype=float)
        region, label = regions[int(rng.choice(len(regions), p=areas / areas.sum()))]
    distance = ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]
    if rng is None:
        j, i = np.unravel_index(int(np.argmax(distance)), distance.shape)
    else:
        rows, cols = np.nonzero(distance >= 0.5 * distance.max())
        pick = int(rng.integers(rows.size))
        j, i = rows[pick], cols[pick]
    return np.array([i, j], dtype=float), label


def corrupt_mask(truth: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A plausible wrong prediction: ``truth`` (J, I) bool eroded, dilated, shifted or with a leak or a hole."""
    from scipy import ndimage

    size = max(1, int(round(0.15 * np.sqrt(truth.sum()))))
    radius = int(rng.integers(1, size + 2))
    choice = rng.integers(5)
    if choice == 0:
        wrong = ndimage.binary_erosion(truth, iterations=radius)
    elif choice == 1:
        wrong = ndimage.binary_dilation(truth, iterations=radius)
    elif choice == 2:
        wrong = np.roll(truth, tuple(rng.integers(-radius, radius + 1, size=2)), axis=(0, 1))
    else:
        rows, cols = np.nonzero(ndimage.binary_dilation(truth, iterations=radius + 2) ^ truth if choice == 3
                                else truth)
        pick = int(rng.integers(rows.size))
        grid_j, grid_i = np.ogrid[: truth.shape[0], : truth.shape[1]]
        blob = (grid_j - rows[pick]) ** 2 + (grid_i - cols[pick]) ** 2 <= (radius + 1) ** 2
        wrong = truth | blob if choice == 3 else truth & ~blob
    return wrong if (wrong ^ truth).any() else ndimage.binary_dilation(truth)


# ---- sampling ---------------------------------------------------------------------------------------------------
def _first_prompt(truth: np.ndarray, rng: np.random.Generator) -> Prompt:
    if rng.random() < 0.7:
        return Prompt("edit", points=barycentre_click(truth)[None], labels=np.ones(1, dtype=int))
    return Prompt("edit", box=jittered_box(truth, rng))


def edit_prompt(truth: np.ndarray, rng: np.random.Generator) -> Prompt:
    """A first prompt (click or box), a corrupted current mask and one edit click on its error."""
    prompt = _first_prompt(truth, rng)
    current = corrupt_mask(truth, rng)
    click, label = edit_click(current, truth, rng)
    points = click[None] if prompt.points is None else np.concatenate([prompt.points, click[None]])
    labels = np.array([label]) if prompt.labels is None else np.append(prompt.labels, label)
    prompt.points, prompt.labels = points, labels.astype(int)
    prompt.mask_logits = hard_mask_logits(current, float(rng.uniform(3.0, 20.0)))
    return prompt


def sample_prompt(lesion: np.ndarray, k: int, rng: np.random.Generator, mix: dict[str, float]) -> Prompt:
    """A random prompt of the kinds in ``mix`` (weights) for slice ``k`` of a (K, J, I) bool lesion."""
    truth = lesion[k]
    kinds = sorted(mix)
    kind = str(rng.choice(kinds, p=np.array([mix[x] for x in kinds]) / sum(mix.values())))
    neighbour = adjacent_slice(lesion, k, rng) if kind.startswith("mask") else None
    if kind.startswith("mask") and neighbour is None:
        kind = "box"  # a one-slice lesion has no neighbour to propagate from
    ones = np.ones(1, dtype=int)
    if kind == "point":
        return Prompt(kind, points=barycentre_click(truth)[None], labels=ones)
    if kind == "points":
        count = int(rng.integers(1, 4))
        return Prompt(kind, points=random_clicks(truth, rng, count), labels=np.ones(count, dtype=int))
    if kind == "box":
        return Prompt(kind, box=jittered_box(truth, rng))
    if kind == "box_point":
        return Prompt(kind, box=jittered_box(truth, rng), points=random_clicks(truth, rng, 1), labels=ones)
    if kind == "edit":
        return edit_prompt(truth, rng)
    logits = hard_mask_logits(lesion[neighbour], float(rng.uniform(3.0, 20.0)))
    # Propagation boxes the neighbour's mask (+3 px by default), which need not contain this slice's lesion.
    box = loosen_box(mask_box(lesion[neighbour]), rng.uniform(0.0, 8.0, size=4), truth.shape)
    return Prompt(kind, box=box if kind == "mask_box" else None, mask_logits=logits)


def evaluation_prompts(lesion: np.ndarray, k: int) -> dict[str, Prompt]:
    """The fixed prompts of the 2D benchmark for slice ``k`` (point+edit is built from the model's own output)."""
    truth = lesion[k]
    box = mask_box(truth)
    prompts = {"point": Prompt("point", points=barycentre_click(truth)[None], labels=np.ones(1, dtype=int)),
               "box+0": Prompt("box", box=box),
               "box+5": Prompt("box", box=loosen_box(box, [5.0] * 4, truth.shape)),
               "box+15": Prompt("box", box=loosen_box(box, [15.0] * 4, truth.shape))}
    neighbour = adjacent_slice(lesion, k)
    if neighbour is not None:
        logits = hard_mask_logits(lesion[neighbour])
        prompts["mask(adjacent)"] = Prompt("mask", mask_logits=logits)
        prompts["propagation"] = Prompt("mask_box", mask_logits=logits,
                                        box=loosen_box(mask_box(lesion[neighbour]), [PROPAGATION_MARGIN_PX] * 4,
                                                       truth.shape))
    return prompts


# ---- slices and embeddings --------------------------------------------------------------------------------------
def select_slices(lesion: np.ndarray, max_slices: int) -> list[int]:
    """Up to ``max_slices`` slice indices of a (K, J, I) bool lesion: its 2 end slices on each side (the small
    cross-sections) plus evenly spaced ones in between."""
    slices = [int(k) for k in np.nonzero(lesion.any(axis=(1, 2)))[0]]
    if len(slices) <= max_slices:
        return slices
    end = min(2, max_slices // 2)
    ends = slices[:end] + slices[len(slices) - end:]
    middle = slices[end:len(slices) - end]
    count = max(0, max_slices - len(ends))
    picks = [middle[int(round(p))] for p in np.linspace(0, len(middle) - 1, count)] if count else []
    return sorted(set(ends + picks))


@dataclass
class LesionData:
    """One lesion of one case, with the slices used for it.

    Attributes:
        case_id, lesion_index: identity (components numbered largest first).
        volume: (K, J, I) HU array of the case (shared between lesions of a case).
        lesion: (K, J, I) bool mask of this lesion.
        slices: slice indices k used.
        kind: the case kind.
    """

    case_id: str
    lesion_index: int
    volume: np.ndarray
    lesion: np.ndarray
    slices: list[int]
    kind: str = ""
    embeddings: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.case_id if self.lesion_index == 0 else f"{self.case_id}#{self.lesion_index}"


def load_lesions(cases, max_slices: int, min_voxels: int = 10) -> list[LesionData]:
    """Read cases and split them into lesions, keeping up to ``max_slices`` slices of each."""
    from .datasets import load_case, split_lesions

    out = []
    for case in cases:
        volume, mask = load_case(case)
        for index, lesion in enumerate(split_lesions(mask, min_voxels)):
            out.append(LesionData(case.id, index, volume.array, lesion, select_slices(lesion, max_slices), case.kind))
    return out


def _cache_key(case_id: str, volume: np.ndarray, model_tag: str) -> str:
    digest = hashlib.sha1(np.ascontiguousarray(volume).tobytes()).hexdigest()[:12]
    return f"{model_tag}/{case_id}_{digest}"


def cache_embeddings(lesions: list[LesionData], predictor, cache_dir, model_tag: str) -> None:
    """Fill ``lesion.embeddings[k]`` with (1, C, H, W) float16 image embeddings of the whole slice, read from
    ``cache_dir`` or encoded once by ``predictor`` (a VolumePredictor, so exactly as at inference) and stored
    there as ``<tag>/<case>_<volume hash>/k0000.pt``."""
    import torch

    for lesion in lesions:
        folder = Path(cache_dir) / _cache_key(lesion.case_id, lesion.volume, model_tag)
        folder.mkdir(parents=True, exist_ok=True)
        missing = [k for k in lesion.slices if not (folder / f"k{k:04d}.pt").is_file()]
        if missing:
            logger.info("encoding %d slices of %s", len(missing), lesion.name)
            predictor.set_volume(lesion.volume)
            for k in missing:
                partial = folder / f"k{k:04d}.pt.partial"  # renamed when complete: an interrupted run leaves no stub
                torch.save(predictor.embedding(k).half().cpu().clone(), str(partial))
                partial.replace(folder / f"k{k:04d}.pt")
        lesion.embeddings = {k: torch.load(str(folder / f"k{k:04d}.pt"), weights_only=True) for k in lesion.slices}
