"""Tests of ``oncopilot train``: case discovery, prompt sampling (exact, synthetic), the forward pass's parity with
the predictor, a tiny end-to-end fine-tuning on real lesions, the encoder regime and checkpoint refusal."""

from __future__ import annotations

import numpy as np
import pytest

from OncoPilotLib.datasets import Case, find_cases, split_lesions
from OncoPilotLib.training_data import (LesionData, adjacent_slice, barycentre_click, corrupt_mask, edit_click,
                                        evaluation_prompts, jittered_box, loosen_box, mask_box, random_clicks,
                                        sample_prompt, select_slices, DEFAULT_PROMPT_MIX)


def _disc(shape=(64, 80), centre=(30, 40), radius=10) -> np.ndarray:
    rows, cols = np.ogrid[: shape[0], : shape[1]]
    return (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= radius ** 2


def _int_click(click):
    point, label = click
    return (int(point[0]), int(point[1])), label


# ---- datasets ---------------------------------------------------------------------------------------------------
def test_find_cases_folder_and_csv(tmp_path):
    for name in ("a_1_ct.nii.gz", "a_1_mask.nii.gz", "lidc_2_ct.nrrd", "lidc_2_mask.nii.gz", "orphan_ct.nii"):
        (tmp_path / name).touch()
    cases = find_cases(tmp_path)
    assert [(c.id, c.kind, c.label) for c in cases] == [("a_1", "a", None), ("lidc_2", "lidc", None)]
    (tmp_path / "list.csv").write_text("image,mask,label,kind\nx/p_ct.nii.gz,x/p_seg.nrrd,2,nodule\n")
    (case,) = find_cases(tmp_path / "list.csv")
    assert case == Case("p", str(tmp_path / "x/p_ct.nii.gz"), str(tmp_path / "x/p_seg.nrrd"), 2, "nodule")
    (tmp_path / "bad.csv").write_text("ct,seg\na,b\n")
    with pytest.raises(ValueError, match="'image' and 'mask'"):
        find_cases(tmp_path / "bad.csv")


def test_split_lesions_separates_components_largest_first():
    mask = np.zeros((5, 20, 20), bool)
    mask[1:3, 2:5, 2:5] = True       # 18 voxels
    mask[2:5, 10:15, 10:15] = True   # 75 voxels
    mask[0, 19, 19] = True           # a 1-voxel speck
    lesions = split_lesions(mask, min_voxels=2)
    assert [int(m.sum()) for m in lesions] == [75, 18]


def test_split_cases_is_seeded_disjoint_and_stratified():
    from OncoPilotLib.training import split_cases

    cases = [Case(f"sts_{i:02d}", "", "", None, "sts") for i in range(30)] + \
            [Case(f"lidc_{i}", "", "", None, "lidc") for i in range(2)]
    train, val = split_cases(cases, 0.25, seed=0)
    assert len(train) == 24 and len(val) == 8
    assert sum(c.kind == "lidc" for c in val) == 1 and sum(c.kind == "lidc" for c in train) == 1
    assert {c.id for c in train}.isdisjoint({c.id for c in val})
    assert [c.id for c in split_cases(cases, 0.25, seed=0)[1]] == [c.id for c in val]


# ---- prompt sampler ---------------------------------------------------------------------------------------------
def test_boxes_exact_and_jittered_boxes_contain_the_lesion():
    disc = _disc()
    np.testing.assert_array_equal(mask_box(disc), [30, 20, 50, 40])
    np.testing.assert_array_equal(loosen_box(mask_box(disc), [5, 25, 40, 1], disc.shape), [25, 0, 79, 41])
    rng = np.random.default_rng(0)
    boxes = np.array([jittered_box(disc, rng) for _ in range(200)])
    assert np.all(boxes[:, :2] <= [30, 20]) and np.all(boxes[:, 2:] >= [50, 40])
    assert boxes[:, 0].min() < 30 - 15  # some boxes are looser than +15 px


def test_clicks_land_inside_the_mask():
    ring = _disc(radius=12) & ~_disc(radius=6)
    click = barycentre_click(ring)  # the centroid (40, 30) is in the hole: nearest ring pixel (6.08 px away)
    assert ring[int(click[1]), int(click[0])] and np.hypot(click[0] - 40, click[1] - 30) == pytest.approx(37 ** 0.5)
    np.testing.assert_array_equal(barycentre_click(_disc()), [40, 30])
    points = random_clicks(ring, np.random.default_rng(1), 500)
    assert ring[points[:, 1].astype(int), points[:, 0].astype(int)].all()


def test_edit_clicks_hit_the_error_region_with_its_label():
    truth = np.zeros((40, 40), bool)
    truth[10:30, 10:30] = True
    missed = truth.copy()
    missed[10:30, 10:16] = False      # a 20 x 6 false-negative band: innermost pixels at columns 12-13
    (i, j), label = _int_click(edit_click(missed, truth))
    assert label == 1 and truth[j, i] and not missed[j, i] and 12 <= i <= 13
    leaked = truth.copy()
    leaked[30:36, 10:30] = True       # a 6 x 20 leak below the lesion
    (i, j), label = _int_click(edit_click(leaked, truth))
    assert label == 0 and leaked[j, i] and not truth[j, i] and 32 <= j <= 33
    assert edit_click(truth, truth) is None
    rng = np.random.default_rng(2)
    for _ in range(100):
        wrong = corrupt_mask(truth, rng)
        (i, j), label = _int_click(edit_click(wrong, truth, rng))
        assert (label == 1 and truth[j, i] and not wrong[j, i]) or (label == 0 and wrong[j, i] and not truth[j, i])


def test_sample_prompt_kinds_are_well_formed():
    lesion = np.stack([_disc(radius=r) for r in (0, 4, 9, 12, 6)])
    lesion[0] = False
    rng = np.random.default_rng(3)
    for kind in DEFAULT_PROMPT_MIX:
        for _ in range(10):
            prompt = sample_prompt(lesion, 2, rng, {kind: 1.0})
            assert prompt.kind == kind
            if prompt.points is not None:
                assert prompt.points.shape == (len(prompt.labels), 2)
            if prompt.mask_logits is not None:
                assert prompt.mask_logits.shape == lesion.shape[1:] and prompt.mask_logits.dtype == np.float32
    one_slice = np.zeros_like(lesion)
    one_slice[2] = lesion[2]
    assert sample_prompt(one_slice, 2, rng, {"mask": 1.0}).kind == "box"  # no neighbour to propagate from
    assert adjacent_slice(lesion, 1) == 2 and adjacent_slice(lesion, 4) == 3
    assert set(evaluation_prompts(lesion, 4)) == {"point", "box+0", "box+5", "box+15", "mask(adjacent)",
                                                   "propagation"}


def test_select_slices_keeps_the_small_ends():
    lesion = np.zeros((30, 4, 4), bool)
    lesion[5:25] = True
    picked = select_slices(lesion, 8)
    assert len(picked) == 8 and picked[:2] == [5, 6] and picked[-2:] == [23, 24]
    assert select_slices(lesion, 50) == list(range(5, 25))


def test_model_frame_target_is_exact():
    from OncoPilotLib.preprocess import SliceTransform
    from OncoPilotLib.training import model_frame_target

    mask = np.ones((64, 128), bool)   # resized to 128 x 256: the padded bottom half is background
    target = model_frame_target(mask, SliceTransform.for_slice(mask.shape, 256), 256)
    assert target.shape == (1, 1, 256, 256)
    assert target[0, 0, :128].min() == 1 and target[0, 0, 128:].max() == 0


# ---- model-level tests ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def litemedsam():
    import torch

    from OncoPilotLib.models import load_model

    torch.set_num_threads(1)
    return load_model("litemedsam", device="cpu")


def test_decode_matches_the_predictor(litemedsam):
    import torch

    from OncoPilotLib.predictor import VolumePredictor
    from OncoPilotLib.preprocess import SliceTransform, logits_to_slice
    from OncoPilotLib.training import decode

    torch.manual_seed(0)
    predictor = VolumePredictor(litemedsam)
    predictor.set_volume(np.zeros((3, 90, 120), np.int16))
    embedding = torch.randn(1, 256, 64, 64)
    predictor.cache.put((1, predictor.transform().crop), embedding)
    truth = _disc((90, 120), (40, 60), 15)
    prompt = sample_prompt(np.stack([truth] * 3), 1, np.random.default_rng(0), {"edit": 1.0})
    expected = predictor.predict(1, box=prompt.box, points=prompt.points, point_labels=prompt.labels,
                                 mask_logits=prompt.mask_logits).logits
    transform = SliceTransform.for_slice(truth.shape, 256)
    with torch.no_grad():
        low_res, _ = decode(litemedsam.network, embedding, prompt, transform)
    np.testing.assert_allclose(logits_to_slice(low_res, transform, truth.shape), expected, atol=1e-4)


def test_tiny_training_run_writes_a_loadable_checkpoint(tmp_path, data_dir):
    import torch

    from OncoPilotLib.models import load_model
    from OncoPilotLib.predictor import VolumePredictor, model_tag
    from OncoPilotLib.training import TrainConfig, train

    torch.set_num_threads(1)
    folder = tmp_path / "data"
    folder.mkdir()
    for case_id in ("lidc_0001_n1", "lidc_0003_n1"):
        for part in ("ct", "mask"):
            (folder / f"{case_id}_{part}.nii.gz").symlink_to(data_dir / "lesions" / f"{case_id}_{part}.nii.gz")
    config = TrainConfig(data=str(folder), output=str(tmp_path / "tiny.pth"), steps=2, batch_size=2, max_slices=1,
                         val_fraction=0.0, evaluate=False, cache_dir=str(tmp_path / "cache"), device="cpu")
    result = train(config)
    loaded = load_model(result.checkpoint, device="cpu")
    assert loaded.metadata["train_lesions"] == ["lidc_0001_n1", "lidc_0003_n1"]
    assert loaded.metadata["steps_run"] == 2 and loaded.metadata["trained_parts"] == ["prompt_encoder", "mask_decoder"]
    base_model = load_model("litemedsam", device="cpu")
    base = base_model.network.state_dict()
    state = loaded.network.state_dict()
    # A decoder-only fine-tune has the base encoder: it shares the base model's on-disk embedding cache.
    assert model_tag(loaded, (-500, 1000)) == model_tag(base_model, (-500, 1000))
    assert model_tag(loaded, (-500, 1000)) != model_tag(base_model, (-160, 240))
    assert torch.equal(state["image_encoder.neck.0.weight"], base["image_encoder.neck.0.weight"])
    assert not torch.equal(state["mask_decoder.iou_token.weight"], base["mask_decoder.iou_token.weight"])
    predictor = VolumePredictor(loaded)
    predictor.set_volume(np.zeros((2, 64, 64), np.int16) - 1000)
    prediction = predictor.predict(0, box=(20, 20, 40, 40))
    assert prediction.logits.shape == (64, 64) and np.isfinite(prediction.logits).all()


def test_encoder_regime_runs_a_mixed_precision_step_on_cpu(litemedsam):
    import torch

    from OncoPilotLib.training import Trainer, TrainConfig

    model = type(litemedsam)(litemedsam.spec, __import__("copy").deepcopy(litemedsam.network), litemedsam.device,
                             None)
    trainer = Trainer(model, TrainConfig(data="", output="", train_encoder=True, batch_size=1, lr=1e-4))
    assert trainer.amp_dtype == torch.bfloat16
    volume = np.full((1, 48, 48), -1000, np.int16)
    volume[0, 16:32, 16:32] = 40
    lesion = LesionData("synthetic", 0, volume, volume > 0, [0])
    before = model.network.image_encoder.neck[0].weight.detach().clone()
    loss = trainer.step([(lesion, 0)], np.random.default_rng(0))
    assert np.isfinite(loss)
    assert not torch.equal(before, model.network.image_encoder.neck[0].weight)


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    import torch.nn as nn
    from segment_anything.modeling import MaskDecoder, TwoWayTransformer

    from OncoPilotLib.models import CheckpointError, load_model, save_checkpoint

    wrong = nn.Module()
    wrong.mask_decoder = MaskDecoder(transformer_dim=32, transformer=TwoWayTransformer(depth=1, embedding_dim=32,
                                                                                      mlp_dim=64, num_heads=2))
    path = save_checkpoint(tmp_path / "wrong.pth", wrong, "litemedsam", {}, ("mask_decoder",))
    with pytest.raises(CheckpointError, match="another architecture"):
        load_model(path, device="cpu")
    unknown = save_checkpoint(tmp_path / "unknown.pth", wrong, "no_such_model", {}, ("mask_decoder",))
    with pytest.raises(CheckpointError, match="naming its base model"):
        load_model(unknown, device="cpu")
