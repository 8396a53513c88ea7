"""The exact inference rewrites (OncoPilotLib/fastpath.py) against the model's own modules, on real CT slices."""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from OncoPilotLib.device import set_cpu_threads  # noqa: E402
from OncoPilotLib import fastpath  # noqa: E402
from OncoPilotLib.fastpath import InferenceMaskDecoder, inference_decoder, inference_encoder  # noqa: E402
from OncoPilotLib.io import read_mask, read_volume  # noqa: E402
from OncoPilotLib.models import load_model  # noqa: E402
from OncoPilotLib.predictor import VolumePredictor  # noqa: E402

LESIONS = ["sts_003", "lidc_0001_n1"]


@pytest.fixture(scope="module")
def model():
    set_cpu_threads(int(os.environ.get("ONCOPILOT_TEST_THREADS", "2")))
    return load_model("litemedsam")


def _middle_slice(data_dir, lesion_id):
    ct = read_volume(data_dir / "lesions" / f"{lesion_id}_ct.nii.gz")
    truth = read_mask(data_dir / "lesions" / f"{lesion_id}_mask.nii.gz", like=ct) > 0
    slices = np.flatnonzero(truth.any(axis=(1, 2)))
    k = int((slices[0] + slices[-1]) // 2)
    rows, cols = np.nonzero(truth[k])
    return ct, k, (cols.min() - 5, rows.min() - 5, cols.max() + 5, rows.max() + 5)


@pytest.mark.parametrize("lesion_id", LESIONS)
def test_fast_path_gives_the_models_own_masks(model, data_dir, lesion_id):
    ct, k, box = _middle_slice(data_dir, lesion_id)
    fast, exact = VolumePredictor(model), VolumePredictor(model, fast=False)
    assert isinstance(fast.mask_decoder, InferenceMaskDecoder) and fast.image_encoder is not exact.image_encoder
    for predictor in (fast, exact):
        predictor.set_volume(ct.array, ct.geometry.spacing)
    a, b = fast.embedding(k), exact.embedding(k)
    assert a.shape == b.shape == (1, 256, 64, 64) and a.is_contiguous()
    assert float((a - b).norm() / b.norm()) < 1e-5
    # Same embedding for both decoders, so that only the decoder rewrite is compared below.
    fast.cache.put((k, fast.transform().crop), b)
    previous = exact.predict(k, box=box)
    centre = [(box[0] + box[2]) / 2, (box[1] + box[3]) / 2]
    prompts = [dict(box=box), dict(box=box, mask_logits=previous.logits),
               dict(points=[centre, box[:2]], point_labels=[1, 0], mask_logits=previous.logits),
               dict(box=box, points=[centre], point_labels=[1]), dict(box=box, multimask_output=True),
               # 12 clicks + a box: 19 tokens x 8 heads exceed the attention's width, the decoder's plain attention
               dict(box=box, points=[centre] * 6 + [box[:2]] * 6, point_labels=[1] * 6 + [0] * 6,
                    mask_logits=previous.logits)]
    for prompt in prompts:
        x, y = fast.predict(k, **prompt), exact.predict(k, **prompt)
        assert np.abs(x.logits - y.logits).max() < 1e-3, prompt.keys()
        assert abs(x.iou - y.iou) < 1e-4
        assert np.count_nonzero(x.mask != y.mask) <= 2  # a pixel exactly on the 0 level may flip
        assert x.mask.any()
    boxes = np.array([box, np.add(box, (3, 3, -3, -3)), np.add(box, (-9, -9, 9, 9))], dtype=float)
    for x, y in zip(fast.predict_batch(k, boxes), exact.predict_batch(k, boxes)):
        assert np.abs(x.logits - y.logits).max() < 1e-3 and abs(x.iou - y.iou) < 1e-4
    for x, y in zip(fast.predict_batch(k, boxes, mask_logits=previous.logits),
                    exact.predict_batch(k, boxes, mask_logits=previous.logits)):
        assert np.abs(x.logits - y.logits).max() < 1e-3 and abs(x.iou - y.iou) < 1e-4


def test_fast_path_leaves_the_trainable_network_alone(model):
    before = {name: tensor.clone() for name, tensor in model.network.state_dict().items()}
    predictor = VolumePredictor(model)
    after = model.network.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)
    # The encoder is a folded copy; the decoder rewrite reads the network's own weights, so a decoder trained
    # after the predictor was built is what the predictor decodes with.
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in predictor.image_encoder.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.network.image_encoder.modules())
    assert predictor.mask_decoder.decoder is model.network.mask_decoder


def test_rewrites_only_apply_where_they_are_exact(model):
    other = torch.nn.Conv2d(3, 8, 3)
    assert inference_encoder(other) is other
    decoder = copy.deepcopy(model.network.mask_decoder)
    decoder.output_upscaling[0] = torch.nn.ConvTranspose2d(256, 64, kernel_size=4, stride=2, padding=1)
    assert inference_decoder(decoder) is decoder
    assert isinstance(inference_decoder(model.network.mask_decoder), InferenceMaskDecoder)


def test_fused_gelu_layers_and_their_autocast_fallback(model, data_dir):
    """oneDNN's convolution / linear + GELU primitives replace the encoder's layer + GELU pairs where this torch has
    them (checked above: same embeddings); under bf16 autocast the same encoder runs the layers and GELUs in turn."""
    fast = VolumePredictor(model)
    fused = [m for m in fast.image_encoder.modules() if isinstance(m, fastpath._FusedGELU)]
    assert fastpath._fused_gelu_works() == bool(fused)
    if fused:  # TinyViT-5M: 2 MBConv x 2, patch embedding, 3 patch mergings x 2, 10 MLPs
        assert len(fused) == 21
    ct, k, box = _middle_slice(data_dir, "sts_003")
    bf16 = VolumePredictor(model, autocast_bf16=True)
    for predictor in (fast, bf16):
        predictor.set_volume(ct.array, ct.geometry.spacing)
    a, b = fast.predict(k, box=box).mask, bf16.predict(k, box=box).mask
    assert bf16.embedding(k).dtype == torch.float32
    assert 2.0 * np.count_nonzero(a & b) / (a.sum() + b.sum()) > 0.9
