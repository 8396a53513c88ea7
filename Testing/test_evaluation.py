"""Tests of ``oncopilot evaluate``: the prompt simulator on synthetic masks with closed-form answers, the report's
agreement with the CSV, resuming, and the harness end to end on two small real lesions with the real model."""

from __future__ import annotations

import csv
import json
import re
import statistics
from pathlib import Path

import numpy as np
import pytest

from OncoPilotLib import evaluation
from OncoPilotLib.evaluation import FIELDS, EvaluationConfig, find_evaluation_cases, run_evaluation, write_csv
from OncoPilotLib.report import read_rows, write_report
from OncoPilotLib.simulation import (barycentre_ijk, deepest_inside, dice, largest_error_region, middle_slice,
                                     simulate_box, simulate_edit, simulate_point)


# ---- prompt simulation (exact) ----------------------------------------------------------------------------------
def _u_shape() -> np.ndarray:
    """A U on slice 3 of a (7, 21, 21) volume: bars at columns 2-3 and 17-18 (rows 2-18) joined by rows 17-18.

    Barycentre: i = 10 by symmetry; j = (68 voxels x 10 + 26 voxels x 17.5) / 94 = 12.07, i.e. voxel (10, 12, 3),
    which lies in the U's opening."""
    mask = np.zeros((7, 21, 21), bool)
    mask[3, 2:19, 2:4] = mask[3, 2:19, 17:19] = mask[3, 17:19, 2:19] = True
    return mask


def test_point_is_the_barycentre_when_inside():
    mask = np.zeros((9, 30, 40), bool)
    mask[2:7, 10:21, 5:16] = True  # centre (i, j, k) = (10, 15, 4)
    assert simulate_point(mask).ijk == (10.0, 15.0, 4.0)


def test_point_outside_a_u_shaped_mask_moves_to_the_nearest_inside_voxel():
    mask = _u_shape()
    assert np.allclose(barycentre_ijk(mask), (10.0, 1135.0 / 94.0, 3.0))
    # Isotropic: the bottom bar (j = 17) is 4.9 voxels away, the side bars (i = 3 or 17) 7.
    assert simulate_point(mask).ijk == (10.0, 17.0, 3.0)
    # Rows 2 mm apart: the bottom bar is 9.9 mm away, the side bars still 7 mm; ties go to the lowest index.
    assert simulate_point(mask, spacing=(1.0, 2.0, 1.0)).ijk == (3.0, 12.0, 3.0)


def test_box_is_the_middle_slice_box_plus_15_pixels_clipped_at_the_border():
    mask = np.zeros((10, 40, 50), bool)
    mask[2:8, 20:31, 3:11] = True  # slices 2..7 -> middle (2 + 7) // 2 = 4
    mask[4, 25, 30] = True  # only on the middle slice: widens its box to i = 30
    box = simulate_box(mask)
    assert box.slice_index == 4
    assert box.box == (0.0, 5.0, 45.0, 39.0)  # (3 - 15 -> 0, 20 - 15, 30 + 15, 30 + 15 -> 39)
    assert simulate_box(mask, margin_px=0).box == (3.0, 20.0, 30.0, 30.0)


def test_middle_slice_of_a_mask_with_a_gap_is_the_nearest_filled_slice():
    mask = np.zeros((10, 8, 8), bool)
    mask[[1, 2, 7, 8], 3, 3] = True  # middle of 1..8 is 4, empty: nearest filled slice is 2
    assert middle_slice(mask) == 2


def _cube(shape=(12, 30, 30), low=(2, 5, 5), high=(10, 25, 25)) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[low[0]:high[0], low[1]:high[1], low[2]:high[2]] = True
    return mask


def test_edit_click_is_positive_in_the_largest_missed_region():
    truth = _cube()
    prediction = truth.copy()
    prediction[4:7, 6:9, 6:9] = False  # 27 missed voxels centred on (7, 7, 5)
    prediction[0, 0:2, 0:2] = True  # 4 false-positive voxels: smaller
    click = simulate_edit(prediction, truth)
    assert (click.ijk, click.positive, click.region_voxels) == ((7, 7, 5), True, 27)


def test_edit_click_is_negative_in_the_largest_covered_background():
    truth = _cube()
    prediction = truth.copy()
    prediction[4:7, 26:29, 10:15] = True  # 45 voxels of background, centre (12, 27, 5)
    prediction[5, 10, 10] = False  # one missed voxel
    click = simulate_edit(prediction, truth)
    assert (click.ijk, click.positive, click.region_voxels) == ((12, 27, 5), False, 45)


def test_no_edit_click_when_the_errors_are_tiny():
    truth = _cube()
    prediction = truth.copy()
    prediction[5, 10, 10:13] = False
    assert simulate_edit(prediction, truth, min_voxels=4) is None
    assert simulate_edit(prediction, truth, min_voxels=3).positive
    assert simulate_edit(truth, truth) is None


def test_edit_click_on_a_rim_barycentre_vs_interior():
    truth = _cube(low=(2, 5, 5), high=(10, 25, 25))
    prediction = _cube(low=(2, 8, 8), high=(10, 22, 22))  # misses a 3-voxel rim around the core
    region, positive = largest_error_region(prediction, truth)
    assert positive and region.sum() == truth.sum() - prediction.sum()
    paper = simulate_edit(prediction, truth)
    assert paper.positive and region[paper.ijk[2], paper.ijk[1], paper.ijk[0]]
    interior = simulate_edit(prediction, truth, strategy="interior")
    assert interior.ijk == deepest_inside(region) and region[interior.ijk[2], interior.ijk[1], interior.ijk[0]]
    with pytest.raises(ValueError, match="strategy"):
        simulate_edit(prediction, truth, strategy="random")


def test_dice_closed_form():
    a, b = _cube(low=(0, 0, 0), high=(2, 10, 10)), _cube(low=(1, 0, 0), high=(3, 10, 10))
    assert dice(a, b) == pytest.approx(2 * 100 / 400)
    assert dice(np.zeros((2, 2, 2)), np.zeros((2, 2, 2))) == 1.0


# ---- report -----------------------------------------------------------------------------------------------------
def _fake_records(n: int = 7) -> list[dict]:
    rng = np.random.default_rng(3)
    records = []
    for index in range(n):
        gt_la, gt_vol = float(rng.uniform(5, 60)), float(rng.uniform(0.2, 40))
        for mode in ("point", "bbox", "point-edit"):
            found = not (index == 0 and mode == "bbox")
            la = float(gt_la * rng.uniform(0.8, 1.2)) if found else 0.0
            vol = float(gt_vol * rng.uniform(0.7, 1.3)) if found else 0.0
            records.append({
                "lesion_id": f"l{index}", "case_id": f"l{index}", "kind": "nodule" if index % 2 else "sarcoma",
                "mode": mode, "status": "ok" if found else "nothing_found", "dice": float(rng.uniform(0.3, 0.95))
                if found else 0.0, "gt_long_axis_mm": gt_la, "pred_long_axis_mm": la,
                "long_axis_abs_error_mm": abs(la - gt_la), "long_axis_rel_error_pct": 100 * abs(la - gt_la) / gt_la,
                "gt_short_axis_mm": gt_la / 2, "pred_short_axis_mm": la / 2,
                "short_axis_abs_error_mm": abs(la - gt_la) / 2,
                "gt_volume_ml": gt_vol, "pred_volume_ml": vol, "volume_rel_error_pct": 100 * abs(vol - gt_vol) / gt_vol,
                "gt_sphericity": float(rng.uniform(0.4, 0.9)), "pred_sphericity": None if not found else 0.7,
                "gt_slices": 5, "pred_slices": 11 if index == 1 and mode == "point" else 5,
                "leak": index == 1 and mode == "point", "seconds": 1.5, "clicks": 2 if mode == "point-edit" else 0,
                "dice_trace": "", "edit_clicks": "", "prompt": "", "stops": "+:empty@3 -:hu_drift@0",
                "message": "" if found else "no lesion found"})
    return records


def test_dice_by_click_carries_the_last_dice_forward():
    from OncoPilotLib.report import dice_by_click

    rows = [{"dice_trace": "0.5 0.7 0.9", "dice": 0.9}, {"dice_trace": "0.6", "dice": 0.6},
            {"dice_trace": "", "dice": 0.0}]
    table = dice_by_click(rows)
    assert [(x["clicks"], x["n_clicked"]) for x in table] == [(0, 3), (1, 1), (2, 1)]
    assert [x["dice_mean"] for x in table] == pytest.approx([1.1 / 3, 1.3 / 3, 1.5 / 3])


def _markdown_main_table(text: str) -> dict[str, dict[str, str]]:
    lines = text.split("## Results per mode")[1].strip().splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(header, cells))
    return rows


def _check_report_matches_csv(out: Path) -> None:
    """Every number of the main table, and the breakdown by kind, recomputed independently from lesions.csv."""
    with open(out / "lesions.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    table = _markdown_main_table((out / "report.md").read_text())
    summary = json.loads((out / "summary.json").read_text())
    assert set(table) == {r["mode"] for r in rows} == set(summary["modes"])
    for mode, cells in table.items():
        mine = [r for r in rows if r["mode"] == mode]
        values = lambda key: [float(r[key]) for r in mine if r[key] != ""]  # noqa: E731
        assert int(cells["n"]) == len(mine) == summary["modes"][mode]["n"]
        assert int(cells["found"]) == sum(r["status"] == "ok" for r in mine)
        assert cells["Dice mean"] == f"{statistics.fmean(values('dice')):.3f}"
        assert cells["Dice median"] == f"{statistics.median(values('dice')):.3f}"
        assert cells["LA abs err median (mm)"] == f"{statistics.median(values('long_axis_abs_error_mm')):.1f}"
        assert cells["LA rel err median (%)"] == f"{statistics.median(values('long_axis_rel_error_pct')):.1f}"
        assert cells["vol rel err median (%)"] == f"{statistics.median(values('volume_rel_error_pct')):.1f}"
        assert int(cells["leaks"]) == sum(r["leak"] == "True" for r in mine)
        assert summary["modes"][mode]["dice_mean"] == pytest.approx(statistics.fmean(values("dice")))
        for kind in {r["kind"] for r in rows}:
            kind_dice = [float(r["dice"]) for r in mine if r["kind"] == kind]
            assert summary["breakdowns"]["kind"][kind][mode]["dice_mean"] == pytest.approx(statistics.fmean(kind_dice))
            assert f"| {kind} |" in (out / "report.md").read_text()


def test_report_numbers_match_the_csv(tmp_path):
    write_csv(_fake_records(), tmp_path / "lesions.csv")
    summary = write_report(tmp_path, ["point", "bbox", "point-edit"])
    _check_report_matches_csv(tmp_path)
    assert summary["leaks"] == [{"lesion_id": "l1", "mode": "point", "gt_slices": 5, "pred_slices": 11}]
    assert summary["not_found"][0]["lesion_id"] == "l0"
    assert summary["stop_reasons"]["point"] == {"empty": 7, "hu_drift": 7}
    edit_dice = [r["dice"] for r in read_rows(tmp_path / "lesions.csv") if r["mode"] == "point-edit"]
    assert [x["clicks"] for x in summary["dice_by_click"]] == [0]  # no trace: the final Dice only
    assert summary["dice_by_click"][0]["dice_mean"] == pytest.approx(statistics.fmean(edit_dice))
    groups = summary["breakdowns"]
    assert set(groups) == {"kind", "sphericity", "long axis", "volume"}
    assert sum(g["point"]["n"] for g in groups["volume"].values()) == 7
    for name in ("dice_per_mode", "long_axis_error", "bland_altman_long_axis", "dice_by_group"):
        assert (tmp_path / f"{name}.png").stat().st_size > 1000
    assert [r["mode"] for r in read_rows(tmp_path / "lesions.csv")][:3] == ["point", "bbox", "point-edit"]


# ---- resuming (the segmentation replaced by a stub: no model) ---------------------------------------------------
def _write_case(folder: Path, case_id: str, components: int) -> None:
    import SimpleITK as sitk

    ct = np.full((6, 24, 24), 40, np.int16)
    mask = np.zeros(ct.shape, np.uint8)
    mask[1:4, 2:8, 2:8] = 1
    if components > 1:
        mask[1:3, 15:18, 15:18] = 1
    for array, suffix in ((ct, "ct"), (mask, "mask")):
        sitk.WriteImage(sitk.GetImageFromArray(array), str(folder / f"{case_id}_{suffix}.nii.gz"))


@pytest.fixture
def stub_segmentation(monkeypatch):
    """Replace the model and session: each (lesion, mode) 'segmentation' is recorded in ``calls``."""
    calls = []

    def fake_lesion(session, truth, info, modes, config):
        for mode in modes:
            calls.append((info["lesion_id"], mode))
            yield {**{k: None for k in FIELDS}, **info, "mode": mode, "status": "ok", "dice": 1.0, "stops": "",
                   "leak": False}

    monkeypatch.setattr(evaluation, "evaluate_lesion", fake_lesion)
    monkeypatch.setattr(evaluation, "SegmentationSession", lambda *args, **kwargs: object())
    monkeypatch.setattr(evaluation, "make_predictor", lambda config: object())
    return calls


def test_resume_skips_finished_lesions(tmp_path, stub_segmentation):
    data, out = tmp_path / "data", tmp_path / "out"
    data.mkdir()
    _write_case(data, "a", 1)
    _write_case(data, "b", 2)
    (data / "manifest.csv").write_text("id,kind\nb,liver metastasis\n")
    cases = find_evaluation_cases(data)
    assert [(c.id, c.kind) for c in cases] == [("a", "lesion"), ("b", "liver metastasis")]
    config = EvaluationConfig(modes=("point", "bbox"), embedding_dir=None)
    run_evaluation(cases, config, out, progress=None)
    expected = [(lesion, mode) for lesion in ("a", "b_c1", "b_c2") for mode in ("point", "bbox")]
    assert stub_segmentation == expected
    stub_segmentation.clear()
    run_evaluation(cases, config, out, progress=None)
    assert stub_segmentation == []
    # An interruption lost the last record: only it is redone.
    results = out / "results.jsonl"
    results.write_text("".join(results.read_text().splitlines(keepends=True)[:-1]) + '{"lesion_id": "b_c2", "mo')
    records = run_evaluation(cases, config, out, progress=None)
    assert stub_segmentation == [("b_c2", "bbox")] and len(records) == 6
    with pytest.raises(ValueError, match="another configuration"):
        run_evaluation(cases, EvaluationConfig(modes=("point",), max_clicks=2, embedding_dir=None), out, progress=None)
    with pytest.raises(ValueError, match="another configuration"):  # bf16 results must not mix with fp32 ones
        run_evaluation(cases, EvaluationConfig(modes=("point", "bbox"), embedding_dir=None, autocast_bf16=True), out,
                       progress=None)
    assert "autocast_bf16" not in config.identity()  # folders written before the option still resume
    stub_segmentation.clear()
    run_evaluation(cases, config, out, overwrite=True, progress=None)
    assert stub_segmentation == expected


# ---- end to end on real CT with the real model ------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_run(data_dir, tmp_path_factory):
    """``oncopilot evaluate`` on a lung nodule and the smallest sarcoma; embeddings from the shared disk cache."""
    from OncoPilotLib.cli import main

    out = tmp_path_factory.mktemp("evaluate")
    code = main(["evaluate", str(data_dir / "lesions"), "--ids", "lidc_0003_n1,sts_019", "--modes",
                 "point,bbox,point-edit", "--max-clicks", "1", "--out", str(out), "--no-progress"])
    assert code == 0
    return out


def test_harness_end_to_end_on_real_lesions(real_run, manifest):
    rows = read_rows(real_run / "lesions.csv")
    assert [(r["lesion_id"], r["mode"]) for r in rows] == [
        (lesion, mode) for lesion in ("lidc_0003_n1", "sts_019") for mode in ("point", "bbox", "point-edit")]
    for row in rows:
        assert row["kind"] == manifest[row["lesion_id"]]["kind"]
        assert row["gt_long_axis_mm"] == pytest.approx(float(manifest[row["lesion_id"]]["axial_LA_mm"]), abs=0.1)
        assert row["gt_slices"] == int(manifest[row["lesion_id"]]["n_slices"])
        assert 0.0 <= row["dice"] <= 1.0 and row["status"] in ("ok", "nothing_found")
        assert row["clicks"] <= (1 if row["mode"] == "point-edit" else 0)
    point = {r["lesion_id"]: r for r in rows if r["mode"] == "point"}
    # Measured at 736172b: lidc_0003_n1 point Dice 0.81.
    assert point["lidc_0003_n1"]["dice"] > 0.6
    edits = {r["lesion_id"]: r for r in rows if r["mode"] == "point-edit"}
    for lesion_id, row in edits.items():  # point-edit starts from the very same point result
        assert float(row["dice_trace"].split()[0]) == pytest.approx(point[lesion_id]["dice"], abs=1e-3)
    _check_report_matches_csv(real_run)
    assert re.search(r"\| point \| 2 \|", (real_run / "report.md").read_text())
