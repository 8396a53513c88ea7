"""Engine tests on the real LiteMedSAM weights and real CT (no mocks)."""

from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from OncoPilotLib.device import select_device, set_cpu_threads  # noqa: E402
from OncoPilotLib.io import read_mask, read_volume  # noqa: E402
from OncoPilotLib.models import CheckpointError, REGISTRY, load_model, save_checkpoint  # noqa: E402
from OncoPilotLib.predictor import EmbeddingCache, VolumePredictor  # noqa: E402
from OncoPilotLib.preprocess import SliceTransform, logits_to_slice, model_input, slice_logits_to_model  # noqa: E402

TIGHT_BOX_LESIONS = ["sts_002", "sts_008", "sts_019", "sts_025", "lidc_0001_n1", "lidc_0003_n1"]


@pytest.fixture(scope="module")
def model():
    set_cpu_threads(int(os.environ.get("ONCOPILOT_TEST_THREADS", "2")))
    return load_model("litemedsam")


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / max(1, np.count_nonzero(a) + np.count_nonzero(b))


def test_tight_box_on_real_lesions(model, data_dir):
    predictor = VolumePredictor(model)
    scores = {}
    for lesion_id in TIGHT_BOX_LESIONS:
        ct = read_volume(data_dir / "lesions" / f"{lesion_id}_ct.nii.gz")
        truth = read_mask(data_dir / "lesions" / f"{lesion_id}_mask.nii.gz", like=ct) > 0
        predictor.set_volume(ct.array, ct.geometry.spacing)
        slices = np.flatnonzero(truth.any(axis=(1, 2)))
        k = int((slices[0] + slices[-1]) // 2)
        rows, cols = np.nonzero(truth[k])
        box = (cols.min() - 5, rows.min() - 5, cols.max() + 5, rows.max() + 5)
        prediction = predictor.predict(k, box=box)
        scores[lesion_id] = dice(prediction.mask, truth[k])
        assert prediction.logits.shape == truth[k].shape
        assert 0.0 <= prediction.iou <= 1.5
    print("tight-box 2D Dice:", {key: round(value, 3) for key, value in scores.items()})
    assert min(scores.values()) >= 0.7, scores


@pytest.mark.parametrize("shape,crop", [((512, 512), None), ((140, 90), None), ((97, 203), None),
                                        ((512, 512), (100, 200, 180, 260)), ((300, 200), (10, 20, 170, 90))])
def test_coordinate_round_trip(shape, crop):
    transform = SliceTransform.for_slice(shape, 256, crop)
    rng = np.random.default_rng(0)
    x0, y0, x1, y1 = transform.crop
    points = np.column_stack([rng.uniform(x0, x1 - 1, 50), rng.uniform(y0, y1 - 1, 50)])
    back = transform.to_slice(transform.to_model(points))
    assert np.max(np.abs(back - points)) < 1e-9
    # The model frame of the region spans exactly the resized image: the region's outer edges map to
    # 0 and the resized size in model pixels (pixel centres at integers, edges at -0.5 / n - 0.5).
    edges = transform.to_model(np.array([[x0 - 0.5, y0 - 0.5], [x1 - 0.5, y1 - 0.5]]))
    rows, cols = transform.resized_shape
    assert np.allclose(edges, [[-0.5, -0.5], [cols - 0.5, rows - 0.5]])
    assert max(rows, cols) == 256


@pytest.mark.parametrize("shape,crop", [((140, 90), None), ((97, 203), None), ((512, 512), (100, 200, 180, 260))])
def test_image_and_mask_land_where_the_mapping_says(shape, crop):
    """A bright disc on the slice appears in the model image and back on the slice within half a voxel."""
    transform = SliceTransform.for_slice(shape, 256, crop)
    x0, y0, x1, y1 = transform.crop
    centre = np.array([x0 + 0.37 * (x1 - x0), y0 + 0.61 * (y1 - y0)])
    radius = 0.12 * min(x1 - x0, y1 - y0)
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    disc = (xx - centre[0]) ** 2 + (yy - centre[1]) ** 2 <= radius ** 2
    image = model_input(np.where(disc, 1000.0, -500.0), transform, (-500.0, 1000.0))[0, 0].numpy()
    weights = np.clip(image, 0, None)
    model_centre = np.array([(weights * np.arange(256)[None, :]).sum(), (weights * np.arange(256)[:, None]).sum()])
    model_centre /= weights.sum()
    in_slice = transform.to_slice(model_centre)
    assert np.linalg.norm(in_slice - centre) < 0.5
    logits = np.where(disc, 8.0, -8.0).astype(np.float32)
    low_res = slice_logits_to_model(logits, transform, 256)
    back = logits_to_slice(low_res, transform, shape) > 0
    region = np.zeros(shape, bool)
    region[y0:y1, x0:x1] = True
    assert dice(back, disc & region) > 0.97
    rows, cols = np.nonzero(back)
    assert abs(cols.mean() - centre[0]) < 0.5 and abs(rows.mean() - centre[1]) < 0.5


def test_cache_bound_is_honoured(model, data_dir):
    ct = read_volume(data_dir / "lesions" / "sts_019_ct.nii.gz")
    one = 256 * 64 * 64 * 4
    predictor = VolumePredictor(model, cache_bytes=int(2.5 * one))
    predictor.set_volume(ct.array, ct.geometry.spacing)
    for k in (3, 4, 5, 6):
        predictor.embedding(k)
        assert predictor.cache.nbytes <= predictor.cache.max_bytes
    assert len(predictor.cache) == 2
    assert predictor.is_cached(5) and predictor.is_cached(6) and not predictor.is_cached(3)
    predictor.embedding(5)  # touching 5 makes 6 the least recently used
    predictor.embedding(7)
    assert predictor.is_cached(5) and predictor.is_cached(7) and not predictor.is_cached(6)


def test_cache_lru_unit():
    cache = EmbeddingCache(max_bytes=3 * 400)
    for key in "abcd":
        cache.put(key, torch.zeros(100))
    assert len(cache) == 3 and "a" not in cache and cache.nbytes == 1200
    cache.put("huge", torch.zeros(1000))
    assert "huge" not in cache and len(cache) == 3


def test_prefetch_makes_slices_cached(model, data_dir):
    ct = read_volume(data_dir / "lesions" / "lidc_0003_n1_ct.nii.gz")
    predictor = VolumePredictor(model)
    predictor.set_volume(ct.array, ct.geometry.spacing)
    predictor.prefetch_around(5, radius=1)
    assert predictor.wait_prefetch(timeout=120)
    assert all(predictor.is_cached(k) for k in (4, 5, 6)) and not predictor.is_cached(8)


def test_predictor_rejects_bad_use(model):
    predictor = VolumePredictor(model)
    with pytest.raises(RuntimeError, match="set_volume"):
        predictor.predict(0, box=(0, 0, 5, 5))
    with pytest.raises(ValueError, match="3D"):
        predictor.set_volume(np.zeros((64, 64)))
    predictor.set_volume(np.full((3, 64, 64), -1000, np.int16))
    with pytest.raises(IndexError, match="outside"):
        predictor.predict(3, box=(0, 0, 5, 5))
    with pytest.raises(ValueError, match="at least one prompt"):
        predictor.predict(0)


# ---- checkpoints --------------------------------------------------------------------------------------
def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist.*sam_vit_b"):
        load_model("sam_vit_b", checkpoint=tmp_path / "nope.pth")


def test_registry_model_without_checkpoint_is_refused():
    with pytest.raises(CheckpointError, match="needs a checkpoint"):
        load_model("medsam_vit_b")
    with pytest.raises(CheckpointError, match="unknown model"):
        load_model("not_a_model")


def test_truncated_and_corrupt_checkpoints(tmp_path):
    bundled = Path(REGISTRY["litemedsam"].bundled_weights())
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(bundled.read_bytes()[: 1 << 20])
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(np.random.default_rng(0).bytes(4096))
    for path in (truncated, corrupt):
        with pytest.raises(CheckpointError, match=f"{path.name}.*not a loadable"):
            load_model("litemedsam", checkpoint=path)


class _Payload:
    """A pickle that would create a file if it were ever executed."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_with_code_is_never_executed(tmp_path):
    marker = tmp_path / "executed"
    path = tmp_path / "evil.pth"
    with open(path, "wb") as handle:
        pickle.dump({"state_dict": _Payload(marker)}, handle)
    with pytest.raises(CheckpointError, match="evil.pth"):
        load_model("litemedsam", checkpoint=path)
    assert not marker.exists()


def test_checkpoint_of_another_architecture(tmp_path):
    bundled = REGISTRY["litemedsam"].bundled_weights()
    with pytest.raises(CheckpointError, match="does not fit a sam_vit_b checkpoint.*another architecture"):
        load_model("sam_vit_b", checkpoint=bundled)
    foreign = tmp_path / "foreign.pth"
    torch.save({"encoder.weight": torch.zeros(3, 3)}, foreign)
    with pytest.raises(CheckpointError, match="foreign.pth.*unexpected"):
        load_model("litemedsam", checkpoint=foreign)


def test_oncopilot_checkpoint_round_trip(tmp_path, model):
    path = save_checkpoint(tmp_path / "decoder.pth", model.network, "litemedsam", {"note": "test"},
                           parts=("mask_decoder",))
    loaded = load_model(path)
    assert loaded.spec.name == "litemedsam" and loaded.metadata == {"note": "test"}
    for key, value in model.network.state_dict().items():
        assert torch.equal(value, loaded.network.state_dict()[key])
    plain = tmp_path / "plain.pth"
    torch.save(model.network.state_dict(), plain)
    with pytest.raises(CheckpointError, match="not an OncoPilot checkpoint"):
        load_model(plain)


# ---- device -------------------------------------------------------------------------------------------
def test_cpu_fallback(caplog):
    assert select_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        with caplog.at_level(logging.WARNING):
            assert select_device("cuda").type == "cpu"
        assert "not available" in caplog.text
    best = "cuda" if torch.cuda.is_available() else ("mps" if torch.backends.mps.is_available() else "cpu")
    assert select_device(None).type == best and select_device("auto").type == best
    with pytest.raises(ValueError):
        set_cpu_threads(0)
