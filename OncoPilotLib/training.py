"""Fine-tuning a SAM-family model on CT lesions with the prompts OncoPilot sends (``oncopilot train``).

One code path, two regimes:

- decoder-only (default): the image encoder is frozen; image embeddings of the training slices are computed once
  and cached on disk (float16), and only the prompt encoder and mask decoder learn. Runs on a laptop CPU.
- full fine-tuning (``train_encoder=True``): every slice goes through the image encoder under ``torch.autocast``
  (bfloat16, or float16 with gradient scaling on a GPU without bfloat16) and all three parts learn.

Each step draws lesion slices (small lesions and small cross-sections favoured), a prompt per slice from
:func:`~OncoPilotLib.training_data.sample_prompt`, and minimises Dice + BCE between the decoder's low-resolution
logits and the ground truth mapped into the model frame, plus an MSE loss on the predicted IoU and, for box
prompts, a retention loss towards the starting model's own box masks (learning without forgetting).
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import hashlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .preprocess import SliceTransform, model_input, slice_logits_to_model
from .training_data import (DEFAULT_PROMPT_MIX, LesionData, Prompt, cache_embeddings, edit_click,
                            evaluation_prompts, load_lesions, sample_prompt)

logger = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = Path.home() / ".cache" / "oncopilot" / "embeddings"
DECODER_PARTS = ("prompt_encoder", "mask_decoder")
ALL_PARTS = ("image_encoder",) + DECODER_PARTS
# Lesions whose largest cross-section is under this many pixels (~ a 40 mm nodule at 0.7 mm) are drawn 3x as often.
SMALL_LESION_PIXELS = 2500


@dataclass
class TrainConfig:
    """Settings of one training run (every field is recorded in the checkpoint's metadata)."""

    data: str
    output: str
    model: str = "litemedsam"
    train_encoder: bool = False
    steps: int = 600
    batch_size: int = 4
    lr: float = 1e-4  # beat 3e-5 on 6 of 7 prompt kinds of the inner validation split (bench/train.py, 60 steps)
    encoder_lr: float | None = None
    weight_decay: float = 0.01
    iou_loss_weight: float = 1.0
    retention_weight: float = 0.5
    val_fraction: float = 0.25
    seed: int = 0
    max_slices: int = 8
    max_val_slices: int = 8
    prompt_mix: dict = field(default_factory=lambda: dict(DEFAULT_PROMPT_MIX))
    cache_dir: str = str(DEFAULT_CACHE_DIR)
    device: str | None = None
    time_limit_s: float | None = None
    save_fp16: bool = True
    evaluate: bool = True
    max_cases: int | None = None


@dataclass
class TrainResult:
    """What a run produced: checkpoint path, metadata written into it, and the loss history."""

    checkpoint: str
    metadata: dict
    losses: list[float]


# ---- splitting and sampling -------------------------------------------------------------------------------------
def split_cases(cases, val_fraction: float = 0.25, seed: int = 0):
    """Seeded split by case (hence by lesion: all lesions of a patient fall on one side), stratified by kind.

    Each kind with >= 2 cases gives ``max(1, floor(n * val_fraction))`` cases to validation.
    Returns (train cases, validation cases), each in the input order.
    """
    rng = np.random.default_rng(seed)
    held = set()
    for kind in sorted({case.kind for case in cases}):
        ids = sorted(case.id for case in cases if case.kind == kind)
        if len(ids) >= 2 and val_fraction > 0:
            count = max(1, int(len(ids) * val_fraction))
            held.update(rng.permutation(ids)[:count].tolist())
    return [c for c in cases if c.id not in held], [c for c in cases if c.id in held]


class SliceSampler:
    """Draws (lesion, slice k): lesions equally (small ones 3x), slices with probability ~ 1 / sqrt(area)."""

    def __init__(self, lesions: list[LesionData], rng: np.random.Generator):
        self.lesions, self.rng = lesions, rng
        areas = [np.array([lesion.lesion[k].sum() for k in lesion.slices], dtype=float) for lesion in lesions]
        weights = np.array([3.0 if a.max() < SMALL_LESION_PIXELS else 1.0 for a in areas])
        self.lesion_p = weights / weights.sum()
        self.slice_p = [a ** -0.5 / (a ** -0.5).sum() for a in areas]

    def draw(self) -> tuple[LesionData, int]:
        index = int(self.rng.choice(len(self.lesions), p=self.lesion_p))
        lesion = self.lesions[index]
        return lesion, int(lesion.slices[int(self.rng.choice(len(lesion.slices), p=self.slice_p[index]))])


# ---- forward pass -----------------------------------------------------------------------------------------------
def low_res_size(network) -> int:
    """Side of the decoder's output logits (4 x the embedding side: 256 for LiteMedSAM and SAM)."""
    return 4 * int(network.prompt_encoder.image_embedding_size[0])


def prompt_tensors(prompt: Prompt, transform: SliceTransform, low_res: int, device):
    """Prompt-encoder inputs (points, boxes, masks) exactly as :meth:`VolumePredictor.predict` builds them."""
    import torch

    points = boxes = masks = None
    if prompt.box is not None:
        boxes = torch.as_tensor(transform.box_to_model(prompt.box), dtype=torch.float32, device=device)[None]
    if prompt.points is not None:
        coords = torch.as_tensor(transform.to_model(prompt.points), dtype=torch.float32, device=device)[None]
        points = (coords, torch.as_tensor(np.asarray(prompt.labels), dtype=torch.int64, device=device)[None])
    if prompt.mask_logits is not None:
        masks = slice_logits_to_model(prompt.mask_logits, transform, low_res).to(device)
    return points, boxes, masks


def decode(network, embedding, prompt: Prompt, transform: SliceTransform):
    """(1, C, H, W) embedding + prompt -> ((1, 1, L, L) low-res logits in the model frame, (1, 1) predicted IoU)."""
    points, boxes, masks = prompt_tensors(prompt, transform, low_res_size(network), embedding.device)
    sparse, dense = network.prompt_encoder(points=points, boxes=boxes, masks=masks)
    return network.mask_decoder(image_embeddings=embedding, image_pe=network.prompt_encoder.get_dense_pe(),
                                sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                multimask_output=False)


def model_frame_target(mask: np.ndarray, transform: SliceTransform, low_res: int):
    """(J, I) bool ground truth -> (1, 1, L, L) float {0, 1} target in the decoder's output frame (padding = 0)."""
    signed = np.where(mask, 1.0, -1.0).astype(np.float32)
    return (slice_logits_to_model(signed, transform, low_res, fill=-1.0) > 0).float()


def segmentation_loss(logits, iou_pred, target, iou_weight: float):
    """Soft Dice + BCE on (1, 1, L, L) logits vs target, plus ``iou_weight`` x MSE of the predicted IoU."""
    import torch
    import torch.nn.functional as F

    logits = logits.float()
    prob = torch.sigmoid(logits)
    dice = 1.0 - (2.0 * (prob * target).sum() + 1.0) / (prob.sum() + target.sum() + 1.0)
    bce = F.binary_cross_entropy_with_logits(logits, target)
    with torch.no_grad():
        hard = (logits > 0).float()
        iou = (hard * target).sum() / ((hard + target).clamp(max=1.0).sum()).clamp(min=1.0)
    return dice + bce + iou_weight * F.mse_loss(iou_pred.float()[:, 0], iou.reshape(1))


# ---- the trainer ------------------------------------------------------------------------------------------------
class Trainer:
    """Optimises a loaded model on lesion slices; ``train_encoder`` selects the regime."""

    def __init__(self, loaded, config: TrainConfig):
        import torch

        self.loaded, self.config = loaded, config
        self.network, self.device = loaded.network, loaded.device
        self.low_res = low_res_size(self.network)
        self.parts = ALL_PARTS if config.train_encoder else DECODER_PARTS
        for name, part in ((n, getattr(self.network, n)) for n in ALL_PARTS):
            part.requires_grad_(name in self.parts)
        groups = [{"params": list(getattr(self.network, n).parameters()), "lr": config.lr} for n in DECODER_PARTS]
        if config.train_encoder:
            groups.append({"params": list(self.network.image_encoder.parameters()),
                           "lr": config.encoder_lr or config.lr})
        self.optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay)
        self.amp_dtype, self.scaler = self._mixed_precision()
        self.teacher = self._frozen_decoder() if config.retention_weight > 0 else None

    def _frozen_decoder(self):
        """A frozen copy of the starting prompt encoder and mask decoder (the retention loss's reference)."""
        import torch.nn as nn

        teacher = nn.Module()
        for name in DECODER_PARTS:
            setattr(teacher, name, copy.deepcopy(getattr(self.network, name)).requires_grad_(False).eval())
        return teacher

    def _mixed_precision(self):
        import torch

        if not self.config.train_encoder:
            return None, None
        if self.device.type == "cuda" and not torch.cuda.is_bf16_supported():
            return torch.float16, torch.amp.GradScaler("cuda")
        return torch.bfloat16, None

    def _autocast(self):
        import torch

        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _embedding(self, lesion: LesionData, k: int, transform: SliceTransform):
        spec = self.loaded.spec
        if not self.config.train_encoder:
            return lesion.embeddings[k].to(self.device).float()
        image = model_input(lesion.volume[k], transform, spec.window_hu, spec.pixel_mean, spec.pixel_std)
        return self.network.image_encoder(image.to(self.device))

    def sample_loss(self, lesion: LesionData, k: int, rng: np.random.Generator):
        """Loss of one (slice, random prompt) sample, with the graph for backward."""
        transform = SliceTransform.for_slice(lesion.volume.shape[1:], self.loaded.spec.img_size)
        prompt = sample_prompt(lesion.lesion, k, rng, self.config.prompt_mix)
        target = model_frame_target(lesion.lesion[k], transform, self.low_res).to(self.device)
        with self._autocast():
            embedding = self._embedding(lesion, k, transform)
            logits, iou = decode(self.network, embedding, prompt, transform)
        loss = segmentation_loss(logits, iou, target, self.config.iou_loss_weight)
        if self.teacher is not None and prompt.kind == "box":
            loss = loss + self.config.retention_weight * self._retention_loss(logits, embedding, prompt, transform)
        return loss

    def _retention_loss(self, logits, embedding, prompt: Prompt, transform: SliceTransform):
        """BCE towards the starting model's output on a box prompt (learning without forgetting): the base model
        was trained on boxes, and plain Dice + BCE on 24 lesions made its box masks worse."""
        import torch
        import torch.nn.functional as F

        with torch.no_grad(), self._autocast():
            reference, _ = decode(self.teacher, embedding.detach(), prompt, transform)
        return F.binary_cross_entropy_with_logits(logits.float(), torch.sigmoid(reference.float()))

    def step(self, samples, rng: np.random.Generator) -> float:
        """One optimiser step on a list of (lesion, k); returns the mean loss."""
        import torch

        self.network.train()
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for lesion, k in samples:  # one decoder call per sample: SAM's decoder repeats the image per prompt
            loss = self.sample_loss(lesion, k, rng) / len(samples)
            (self.scaler.scale(loss) if self.scaler else loss).backward()
            total += loss.item()
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.network.eval()
        return total

    def fit(self, lesions: list[LesionData], rng: np.random.Generator) -> list[float]:
        """Run ``config.steps`` steps (or until ``config.time_limit_s``); returns the loss per step."""
        sampler, losses, start = SliceSampler(lesions, rng), [], time.monotonic()
        for step in range(self.config.steps):
            losses.append(self.step([sampler.draw() for _ in range(self.config.batch_size)], rng))
            if step % 25 == 0 or step == self.config.steps - 1:
                logger.info("step %d/%d loss %.4f (mean of last 25: %.4f) %.0f s", step + 1, self.config.steps,
                            losses[-1], float(np.mean(losses[-25:])), time.monotonic() - start)
            if self.config.time_limit_s and time.monotonic() - start > self.config.time_limit_s:
                logger.warning("time limit reached after %d steps", step + 1)
                break
        return losses


# ---- evaluation -------------------------------------------------------------------------------------------------
def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two bool masks (1.0 when both are empty)."""
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def _point_edit_dice(predictor, k: int, point_prompt: Prompt, truth: np.ndarray) -> float:
    first = predictor.predict(k, points=point_prompt.points, point_labels=point_prompt.labels)
    click = edit_click(first.mask, truth)
    if click is None:
        return dice(first.mask, truth)
    points = np.concatenate([point_prompt.points, click[0][None]])
    labels = np.append(point_prompt.labels, click[1])
    return dice(predictor.predict(k, points=points, point_labels=labels, mask_logits=first.logits).mask, truth)


def evaluate_2d(loaded, lesions: list[LesionData]) -> dict[str, dict[str, list[float]]]:
    """2D Dice per prompt kind on every selected slice, through :class:`VolumePredictor` exactly as at inference.

    Returns:
        {prompt kind: {lesion name: [Dice per slice]}}; kinds: point, point+edit, box+0, box+5, box+15,
        mask(adjacent), propagation (adjacent mask + its box + 3 px). Cached embeddings are used when present.
    """
    from .predictor import VolumePredictor

    predictor, results = VolumePredictor(loaded), {}
    for lesion in lesions:
        predictor.set_volume(lesion.volume)
        for k in lesion.slices:
            if k in lesion.embeddings:
                predictor.cache.put((k, predictor.transform().crop), lesion.embeddings[k].float())
            truth = lesion.lesion[k]
            prompts = evaluation_prompts(lesion.lesion, k)
            scores = {name: dice(predictor.predict(k, box=p.box, points=p.points, point_labels=p.labels,
                                                   mask_logits=p.mask_logits).mask, truth)
                      for name, p in prompts.items()}
            scores["point+edit"] = _point_edit_dice(predictor, k, prompts["point"], truth)
            for name, value in scores.items():
                results.setdefault(name, {}).setdefault(lesion.name, []).append(value)
    return results


def summarise(results: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, float]]:
    """{kind: {"slices": mean Dice over all slices, "lesions": mean of per-lesion means, "n": slice count}}."""
    out = {}
    for kind, per_lesion in results.items():
        pooled = [v for values in per_lesion.values() for v in values]
        out[kind] = {"slices": float(np.mean(pooled)), "lesions": float(np.mean([np.mean(v) for v in
                                                                                 per_lesion.values()])),
                     "n": len(pooled)}
    return out


# ---- the whole run ----------------------------------------------------------------------------------------------
def model_tag(name_or_path: str) -> str:
    """Cache folder name for the image encoder of a model: its registry name, or name + file hash."""
    path = Path(name_or_path)
    if not path.is_file():
        return str(name_or_path)
    return f"{path.stem}-{hashlib.sha1(path.read_bytes()).hexdigest()[:10]}"


def prepare_lesions(loaded, cases, config: TrainConfig, max_slices: int) -> list[LesionData]:
    """Read cases into lesions; in the decoder-only regime also load (or compute once) their slice embeddings."""
    from .predictor import VolumePredictor

    lesions = load_lesions(cases, max_slices)
    if not config.train_encoder:
        cache_embeddings(lesions, VolumePredictor(loaded), config.cache_dir, model_tag(config.model))
    return lesions


def save_trained(network, path, base_model: str, parts, metadata: dict, fp16: bool) -> str:
    """Write the trained ``parts`` (optionally as float16) with ``metadata`` via :func:`models.save_checkpoint`."""
    import torch.nn as nn

    from .models import save_checkpoint

    container = nn.Module()
    for name in parts:
        part = copy.deepcopy(getattr(network, name))
        setattr(container, name, part.half() if fp16 else part)
    return save_checkpoint(path, container, base_model, metadata, tuple(parts))


def _metadata(config: TrainConfig, base: str, train_lesions, val_lesions, losses, seconds, parts) -> dict:
    import torch

    settings = {k: v for k, v in vars(config).items() if k not in ("output", "cache_dir", "prompt_mix")}
    return {"base_model": base, "trained_parts": list(parts), "date": datetime.date.today().isoformat(),
            "torch": str(torch.__version__), "data": str(config.data), "prompt_mix": dict(config.prompt_mix),
            "settings": settings, "steps_run": len(losses), "seconds": round(seconds, 1),
            "final_loss": float(np.mean(losses[-25:])) if losses else None,
            "train_lesions": [lesion.name for lesion in train_lesions],
            "val_lesions": [lesion.name for lesion in val_lesions],
            "train_slices": sum(len(l.slices) for l in train_lesions)}


def train(config: TrainConfig) -> TrainResult:
    """Split the data by case, fine-tune, evaluate on the held-out lesions before and after, save a checkpoint."""
    import torch

    from .datasets import find_cases
    from .models import REGISTRY, load_model

    torch.manual_seed(config.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    rng = np.random.default_rng(config.seed)
    cases = find_cases(config.data)[: config.max_cases]
    train_cases, val_cases = split_cases(cases, config.val_fraction, config.seed)
    loaded = load_model(config.model, device=config.device)
    base = config.model if config.model in REGISTRY else loaded.spec.name
    train_lesions = prepare_lesions(loaded, train_cases, config, config.max_slices)
    val_lesions = prepare_lesions(loaded, val_cases, config, config.max_val_slices) if config.evaluate else []
    before = summarise(evaluate_2d(loaded, val_lesions)) if val_lesions else {}
    trainer, start = Trainer(loaded, config), time.monotonic()
    losses = trainer.fit(train_lesions, rng)
    seconds = time.monotonic() - start
    after = summarise(evaluate_2d(loaded, val_lesions)) if val_lesions else {}
    # A model that was itself fine-tuned (a checkpoint path) may differ from its registry base in every part.
    parts = trainer.parts if config.model in REGISTRY else ALL_PARTS
    metadata = _metadata(config, base, train_lesions, val_lesions, losses, seconds, parts)
    metadata["metrics"] = {"val_dice_2d_before": before, "val_dice_2d_after": after}
    path = save_trained(loaded.network, config.output, base, parts, metadata, config.save_fp16)
    logger.info("wrote %s", path)
    return TrainResult(path, metadata, losses)
