"""The ``oncopilot`` command end to end on real CT: segment writes a mask and measurements; bad input -> exit 2."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("torch")

from OncoPilotLib.cli import main  # noqa: E402
from OncoPilotLib.io import read_mask, read_volume  # noqa: E402


def test_segment_from_a_ras_click(data_dir, tmp_path, capsys):
    ct_path = data_dir / "lesions" / "lidc_0003_n1_ct.nii.gz"
    ct = read_volume(ct_path)
    truth = read_mask(data_dir / "lesions" / "lidc_0003_n1_mask.nii.gz", like=ct) > 0
    k = int(np.flatnonzero(truth.any(axis=(1, 2))).mean().round())
    rows, cols = np.nonzero(truth[k])
    ras = ct.geometry.ijk_to_ras_points([cols.mean(), rows.mean(), k])
    out, report = tmp_path / "lesion.nii.gz", tmp_path / "lesion.json"
    code = main(["segment", str(ct_path), "--point", ",".join(f"{v:.3f}" for v in ras), "--coords", "ras",
                 "--out", str(out), "--json", str(report), "--quiet"])
    printed = capsys.readouterr().out
    assert code == 0 and "mask written to" in printed and "LA mm" in printed
    mask = read_mask(out, like=ct) > 0
    assert 2 * np.count_nonzero(mask & truth) / (mask.sum() + truth.sum()) >= 0.7
    values = json.loads(report.read_text())
    assert values["mode"] == "point" and values["model"] == "litemedsam"
    assert values["volume_ml"] == pytest.approx(mask.sum() * np.prod(ct.geometry.spacing) / 1000.0, rel=1e-6)


def test_segment_bf16_option_reaches_the_encoder(data_dir, tmp_path, capsys, monkeypatch):
    import OncoPilotLib.session as session_module

    sessions = []

    class Recording(session_module.SegmentationSession):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            sessions.append(self)

    monkeypatch.setattr(session_module, "SegmentationSession", Recording)
    ct_path = data_dir / "lesions" / "lidc_0003_n1_ct.nii.gz"
    ct = read_volume(ct_path)
    truth = read_mask(data_dir / "lesions" / "lidc_0003_n1_mask.nii.gz", like=ct) > 0
    k = int(np.flatnonzero(truth.any(axis=(1, 2))).mean().round())
    rows, cols = np.nonzero(truth[k])
    out = tmp_path / "lesion.nii.gz"
    code = main(["segment", str(ct_path), "--point", f"{cols.mean():.1f},{rows.mean():.1f},{k}", "--bf16",
                 "--out", str(out), "--quiet"])
    assert code == 0 and "mask written to" in capsys.readouterr().out
    assert len(sessions) == 1 and sessions[0].predictor.autocast_bf16
    mask = read_mask(out, like=ct) > 0
    assert 2 * np.count_nonzero(mask & truth) / (mask.sum() + truth.sum()) >= 0.7


def test_segment_bad_input_is_a_clear_error(data_dir, tmp_path, capsys):
    ct_path = data_dir / "lesions" / "lidc_0003_n1_ct.nii.gz"
    code = main(["segment", str(ct_path), "--point", "5000,3,2", "--out", str(tmp_path / "x.nii.gz"), "--quiet"])
    assert code == 2 and "outside the volume" in capsys.readouterr().err
    code = main(["segment", str(tmp_path / "missing.nii.gz"), "--point", "1,2,3", "--out", str(tmp_path / "x.nii.gz")])
    assert code == 2 and "no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["segment", str(ct_path), "--point", "1,2", "--out", str(tmp_path / "x.nii.gz")])
    with pytest.raises(SystemExit):
        main(["segment", str(ct_path), "--point", "1,2,3", "--edit", "1,2,3", "--out", str(tmp_path / "x.nii.gz")])
    assert not (tmp_path / "x.nii.gz").exists()


def test_dicom_folder_and_two_dimensional_input(data_dir, tmp_path):
    from OncoPilotLib.io import VolumeError

    dicom = read_volume(data_dir / "dicom" / "lidc_0001")
    nifti = read_volume(data_dir / "volumes" / "lidc_0001_ct.nii.gz")
    assert dicom.array.shape == nifti.array.shape
    assert np.array_equal(dicom.array, nifti.array)
    assert np.allclose(dicom.geometry.ijk_to_ras, nifti.geometry.ijk_to_ras, atol=1e-3)
    import SimpleITK as sitk

    flat = tmp_path / "flat.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((20, 20), np.int16)), str(flat))
    with pytest.raises(VolumeError, match="3D volume"):
        read_volume(flat)


def test_oblique_volume_is_refused_and_sagittal_reoriented(tmp_path):
    import SimpleITK as sitk

    from OncoPilotLib.io import VolumeError

    image = sitk.GetImageFromArray(np.zeros((6, 8, 10), np.int16))
    angle = np.radians(20)
    image.SetDirection((1, 0, 0, 0, np.cos(angle), -np.sin(angle), 0, np.sin(angle), np.cos(angle)))
    sitk.WriteImage(image, str(tmp_path / "oblique.nrrd"))
    with pytest.raises(VolumeError, match="oblique"):
        read_volume(tmp_path / "oblique.nrrd")
    sagittal = sitk.GetImageFromArray(np.arange(6 * 8 * 10, dtype=np.int16).reshape(6, 8, 10))
    sagittal.SetDirection((0, 0, 1, 1, 0, 0, 0, 1, 0))
    sitk.WriteImage(sagittal, str(tmp_path / "sagittal.nrrd"))
    volume = read_volume(tmp_path / "sagittal.nrrd")
    assert volume.geometry.is_axial()
    assert sorted(volume.array.shape) == [6, 8, 10]


def test_negative_values_reach_their_option():
    from OncoPilotLib.cli import build_parser, _attach_signed_values

    argv = ["segment", "ct.nii.gz", "--point", "-72.6,-77,-190.4", "--coords", "ras", "--edit", "-1,2,3",
            "--edit", "+4,5,6", "--out", "x.nii.gz"]
    args = build_parser().parse_args(_attach_signed_values(argv))
    assert list(args.point) == [-72.6, -77.0, -190.4] and args.coords == "ras"
    assert [positive for positive, _ in args.edit] == [False, True]
