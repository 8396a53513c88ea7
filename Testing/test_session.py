"""Session tests: click / box / ROI -> 3D lesion, stop rules, several lesions, point-edit and undo, bad input.

Real LiteMedSAM weights; real CT for the lesion tests, a synthetic CT for the stop-rule test (closed-form truth).
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

pytest.importorskip("torch")

from OncoPilotLib.geometry import VolumeGeometry  # noqa: E402
from OncoPilotLib.io import read_mask, read_volume  # noqa: E402
from OncoPilotLib.models import load_model  # noqa: E402
from OncoPilotLib.predictor import VolumePredictor  # noqa: E402
from OncoPilotLib.propagation import Cancelled  # noqa: E402
from OncoPilotLib.session import (BoxPrompt, NothingFoundError, PointPrompt, RoiPrompt,  # noqa: E402
                                  SegmentationSession)


def dice(a, b) -> float:
    return 2.0 * np.count_nonzero(a & b) / max(1, np.count_nonzero(a) + np.count_nonzero(b))


@pytest.fixture(scope="module")
def model():
    return load_model("litemedsam")


@pytest.fixture(scope="module")
def nodule(data_dir, model):
    """lidc_0003_n1 (11 slices, 0.82 mm) with one predictor shared by the tests (embeddings encoded once)."""
    ct = read_volume(data_dir / "lesions" / "lidc_0003_n1_ct.nii.gz")
    truth = read_mask(data_dir / "lesions" / "lidc_0003_n1_mask.nii.gz", like=ct) > 0
    return ct, truth, VolumePredictor(model)


def _session(nodule):
    ct, _, predictor = nodule
    if predictor.volume is not ct.array:
        predictor.set_volume(ct.array, ct.geometry.spacing)
    return SegmentationSession(ct.array, ct.geometry, model=predictor)


def _click(truth):
    k = int(np.flatnonzero(truth.any(axis=(1, 2))).mean().round())
    rows, cols = np.nonzero(truth[k])
    return float(cols.mean()), float(rows.mean()), k


def test_point_prompt_segments_the_nodule(nodule):
    ct, truth, _ = nodule
    session = _session(nodule)
    events = []
    lesion = session.segment(PointPrompt(_click(truth)), progress=events.append)
    score = dice(lesion.mask, truth)
    print(f"lidc_0003_n1 point: 3D Dice {score:.3f}, slices {len(lesion.slices)} vs {truth.any(axis=(1, 2)).sum()}")
    assert score >= 0.7
    assert events[0].stage == "seed" and events[0].mask2d is not None and events[-1].stage == "done"
    assert np.array_equal(events[0].mask2d, lesion.mask[events[0].slice_index])
    assert len(lesion.slices) <= 2 * truth.any(axis=(1, 2)).sum()


def test_box_and_roi_prompts(nodule):
    ct, truth, _ = nodule
    session = _session(nodule)
    k = _click(truth)[2]
    rows, cols = np.nonzero(truth[k])
    box = (cols.min() - 15, rows.min() - 15, cols.max() + 15, rows.max() + 15)
    lesion = session.segment(BoxPrompt(k, box))
    assert dice(lesion.mask, truth) >= 0.6
    session.remove(lesion.id)
    roi = session.segment(RoiPrompt((box[0], box[1], k - 1), (box[2], box[3], k + 1)))
    assert set(roi.slices) <= {k - 1, k, k + 1} and k in roi.slices


def test_second_lesion_never_overwrites_the_first(nodule):
    ct, truth, _ = nodule
    session = _session(nodule)
    first = session.segment(PointPrompt(_click(truth)))
    before = first.mask.copy()
    i, j, k = _click(truth)
    second = session.segment(BoxPrompt(k, (i - 25, j - 25, i + 25, j + 25)))
    assert not np.any(first.mask & second.mask)
    assert np.array_equal(first.mask, before)
    assert [lesion.name for lesion in session.lesions.values()] == ["Lesion 1", "Lesion 2"]


def test_edit_clicks_and_exact_undo(nodule):
    ct, truth, _ = nodule
    session = _session(nodule)
    lesion = session.segment(PointPrompt(_click(truth)))
    original = lesion.mask.copy()
    k = int(lesion.slices[len(lesion.slices) // 2])
    rows, cols = np.nonzero(lesion.mask[k])
    inside = (float(cols[0]), float(rows[0]), float(k))
    session.edit(lesion.id, inside, positive=False)
    assert not lesion.mask[k, rows[0], cols[0]], "a negative click removes the voxel it lands on"
    assert lesion.mode == "point-edit" and len(lesion.clicks) == 1
    after_first = lesion.mask.copy()
    session.edit(lesion.id, inside, positive=True)
    assert lesion.mask[k, rows[0], cols[0]], "a positive click adds the voxel it lands on"
    session.undo(lesion.id)
    assert np.array_equal(lesion.mask, after_first) and len(lesion.clicks) == 1
    session.undo(lesion.id)
    assert np.array_equal(lesion.mask, original) and lesion.clicks == []
    with pytest.raises(ValueError, match="no edit to undo"):
        session.undo(lesion.id)
    session.lock(lesion.id)
    with pytest.raises(ValueError, match="locked"):
        session.edit(lesion.id, inside, positive=False)


def test_cancel_adds_nothing(nodule):
    ct, truth, _ = nodule
    session = _session(nodule)
    cancel = threading.Event()

    def cancel_after_seed(event):
        if event.stage == "seed":
            cancel.set()

    with pytest.raises(Cancelled):
        session.segment(PointPrompt(_click(truth)), progress=cancel_after_seed, cancel=cancel)
    assert session.lesions == {}


def test_bad_prompts_get_clear_errors(nodule):
    ct, truth, _ = nodule
    session = _session(nodule)
    shape = ct.array.shape
    with pytest.raises(ValueError, match="outside the volume"):
        session.segment(PointPrompt((shape[2] + 5.0, 3.0, 2.0)))
    with pytest.raises(ValueError, match="outside the volume"):
        session.segment(PointPrompt((3.0, 3.0, -4.0)))
    air = np.argwhere(ct.array < -950)
    if len(air):
        k, j, i = air[len(air) // 2]
        with pytest.raises(ValueError, match="in air"):
            session.segment(PointPrompt((float(i), float(j), float(k))))
    with pytest.raises(ValueError, match="maximum corner"):
        session.segment(BoxPrompt(2, (40, 40, 10, 10)))
    with pytest.raises(ValueError, match="3D"):
        SegmentationSession(ct.array[0], model=nodule[2])


def test_stop_rules_on_a_synthetic_lesion(model, monkeypatch):
    """A bright ellipsoid (17 slices) in a noisy soft-tissue background: propagation stops near its ends."""
    rng = np.random.default_rng(0)
    k, j, i = np.mgrid[:31, :128, :128]
    truth = ((i - 64) / 22.0) ** 2 + ((j - 60) / 16.0) ** 2 + ((k - 15) / 8.6) ** 2 <= 1.0
    ct = np.where(truth, 120.0, 20.0) + rng.normal(0, 15, truth.shape)
    ct[:, :, :10] = -1000.0  # air at one side so that the volume looks like a CT
    session = SegmentationSession(ct.astype(np.int16), VolumeGeometry.from_spacing((0.8, 0.8, 2.5), ct.shape),
                                  model=model)
    lesion = session.segment(PointPrompt((64.0, 60.0, 15.0)))
    spanned = truth.any(axis=(1, 2)).sum()
    print(f"synthetic: Dice {dice(lesion.mask, truth):.3f}, slices {len(lesion.slices)} vs {spanned}, "
          f"stops {lesion.log.stops}")
    assert dice(lesion.mask, truth) >= 0.85
    assert abs(len(lesion.slices) - spanned) <= 3

    # A negative click on a part smaller than SMALL_PART of the largest slice removes it and the lesion beyond
    # it (here every part counts as small); on the seed slice it only trims.
    import OncoPilotLib.editing as editing

    monkeypatch.setattr(editing, "SMALL_PART", 1.01)
    end = int(lesion.slices[-3])
    session.edit(lesion.id, (64.0, 60.0, float(end)), positive=False)
    assert not lesion.mask[end:].any() and lesion.mask[end - 1].any()
    session.edit(lesion.id, (64.0, 60.0, 15.0), positive=False)
    assert lesion.mask[15].any() and not lesion.mask[15, 60, 64]


def test_nothing_found_is_said(model):
    flat = np.full((5, 64, 64), 40, np.int16)
    flat[:, :, :4] = -1000
    session = SegmentationSession(flat, model=model)
    try:
        lesion = session.segment(PointPrompt((32.0, 32.0, 2.0)))
    except NothingFoundError as error:
        assert "no lesion found" in str(error)
    else:  # the model may outline a uniform region; then it must at least contain the click
        assert lesion.mask[2, 32, 32]


def test_logit_memory_mixes_the_previous_slice(nodule):
    """The next slice's logits are (1 - m) * the decoder's + m * the previous slice's; the mask is their sign."""
    from dataclasses import replace

    from OncoPilotLib.propagation import PropagationSettings, SliceResult, predict_next

    ct, truth, predictor = nodule
    if predictor.volume is not ct.array:
        predictor.set_volume(ct.array, ct.geometry.spacing)
    k = int(np.flatnonzero(truth.any(axis=(1, 2))).mean().round())
    seed = predictor.predict(k, box=np.array([*np.argwhere(truth[k])[:, ::-1].min(0) - 3,
                                               *np.argwhere(truth[k])[:, ::-1].max(0) + 3], float))
    previous = SliceResult(seed.mask, seed.logits, seed.iou)
    plain = predict_next(predictor, k + 1, previous, replace(PropagationSettings(), logit_memory=0.0))
    mixed = predict_next(predictor, k + 1, previous, replace(PropagationSettings(), logit_memory=0.5))
    np.testing.assert_allclose(mixed.logits, 0.5 * plain.logits + 0.5 * seed.logits, atol=1e-4)
    assert not np.array_equal(mixed.logits, plain.logits)
    assert np.array_equal(mixed.mask[mixed.mask], (mixed.logits > 0)[mixed.mask])  # mask pixels have logit > 0
    assert mixed.mask.any() and dice(mixed.mask, truth[k + 1]) > 0.5


def test_negative_click_trims_a_large_part(nodule):
    """A negative click in the outline of the seed slice trims it (it never empties the lesion)."""
    ct, truth, _ = nodule
    session = _session(nodule)
    lesion = session.segment(PointPrompt(_click(truth)))
    k = lesion.seed_slice
    before = lesion.mask.copy()
    rows, cols = np.nonzero(before[k])
    edge = int(np.argmin(cols))  # the leftmost pixel: on the outline
    session.edit(lesion.id, (float(cols[edge]), float(rows[edge]), float(k)), positive=False)
    assert not lesion.mask[k, rows[edge], cols[edge]]
    kept = np.count_nonzero(lesion.mask[k])
    assert 0.5 * np.count_nonzero(before[k]) <= kept < np.count_nonzero(before[k]), "trimmed, not emptied"
    assert not (lesion.mask[k] & ~before[k]).any(), "a negative click never adds"
    session.undo(lesion.id)
    assert np.array_equal(lesion.mask, before)


def test_small_lesion_in_a_whole_slice_zooms_only_its_seed(data_dir, model, monkeypatch):
    """The lidc_0001 nodule in its whole 512 x 512 slab: the seed slice is re-encoded as a zoomed crop, every
    other slice is decoded on whole-slice embeddings (what the background prefetch encodes), and the nodule is
    found (3D Dice 0.84 when this test was written; 0.80 with the crop on every slice)."""
    ct = read_volume(data_dir / "volumes" / "lidc_0001_ct.nii.gz")
    truth = read_mask(data_dir / "volumes" / "lidc_0001_nodule1_mask.nii.gz", like=ct) > 0
    predictor = VolumePredictor(model)
    encoded = []
    encode = predictor._encode

    def recording_encode(slice_index, transform):
        encoded.append((slice_index, transform.crop))
        return encode(slice_index, transform)

    monkeypatch.setattr(predictor, "_encode", recording_encode)
    session = SegmentationSession(ct.array, ct.geometry, model=predictor)
    lesion = session.segment(PointPrompt(_click(truth)))
    score = dice(lesion.mask, truth)
    print(f"lidc_0001 nodule in its slab: 3D Dice {score:.3f}, seed crop {lesion.seed_crop}, encodes {encoded}")
    whole = (0, 0, ct.array.shape[2], ct.array.shape[1])
    assert lesion.seed_crop is not None and lesion.seed_crop != whole
    assert [k for k, crop in encoded if crop != whole] == [lesion.seed_slice]
    assert {k for k, crop in encoded if crop == whole} >= set(lesion.slices.tolist())
    assert score >= 0.75
