"""``oncopilot segment CT --point x,y,z --out mask.nii.gz``: one lesion from a click, a box or a 3D ROI."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from .. import io


def _triples(text: str, count: int) -> np.ndarray:
    try:
        values = [float(v) for v in text.replace(";", ",").split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected {3 * count} comma-separated numbers") from None
    if len(values) != 3 * count:
        raise argparse.ArgumentTypeError(f"{text!r}: expected {3 * count} comma-separated numbers, got {len(values)}")
    return np.array(values).reshape(count, 3)


def _window(text: str) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected LOW,HIGH in HU, e.g. -160,240") from None
    if high <= low:
        raise argparse.ArgumentTypeError(f"{text!r}: HIGH must be above LOW")
    return low, high


def _edit(text: str) -> tuple[bool, np.ndarray]:
    if not text or text[0] not in "+-":
        raise argparse.ArgumentTypeError(f"{text!r}: an edit click starts with + (lesion) or - (background)")
    return text[0] == "+", _triples(text[1:], 1)[0]


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("segment", help="segment one lesion from a click, a box or a 3D ROI",
                                   description=__doc__)
    parser.add_argument("ct", help="CT volume in HU: NIfTI, NRRD, MHA file or a DICOM folder")
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--point", type=lambda t: _triples(t, 1)[0], help="click x,y,z on the lesion")
    prompt.add_argument("--box", type=lambda t: _triples(t, 2),
                        help="two opposite corners x0,y0,z0,x1,y1,z1 of a box on one axial slice")
    prompt.add_argument("--roi", type=lambda t: _triples(t, 2),
                        help="two opposite corners of a 3D box; propagation stays within its slices")
    parser.add_argument("--edit", type=_edit, action="append", default=[], metavar="+x,y,z|-x,y,z",
                        help="edit click after segmenting: + adds lesion, - removes background (repeatable)")
    parser.add_argument("--coords", choices=("ijk", "ras", "lps"), default="ijk",
                        help="frame of the coordinates: voxel indices i,j,k (default) or patient mm")
    parser.add_argument("--out", type=Path, required=True, help="where to write the mask (e.g. lesion.nii.gz)")
    parser.add_argument("--json", type=Path, help="write the measurements as JSON")
    parser.add_argument("--model", default="litemedsam", help="registry name or OncoPilot checkpoint path")
    parser.add_argument("--checkpoint", help="weights for a registry model that does not bundle them (SAM, MedSAM)")
    parser.add_argument("--device", default=None, help="cuda, mps or cpu (default: best available)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    parser.add_argument("--window", type=_window, default=None, metavar="LOW,HIGH",
                        help="HU window fed to the model (default: the model's own, -500,1000 as in the paper)")
    parser.add_argument("--bf16", action="store_true",
                        help="run the image encoder in bfloat16: ~2x faster on CPUs with AMX / AVX-512 bf16, "
                             "masks differ slightly (docs/BENCHMARKS.md section 1)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def _to_ijk(points: np.ndarray, frame: str, geometry) -> np.ndarray:
    if frame == "ras":
        return geometry.ras_to_ijk_points(points)
    if frame == "lps":
        return geometry.lps_to_ijk_points(points)
    return np.asarray(points, dtype=float)


def build_prompt(args, geometry):
    """PointPrompt / BoxPrompt / RoiPrompt in voxel indices from the command-line arguments."""
    from ..session import BoxPrompt, PointPrompt, RoiPrompt

    if args.point is not None:
        return PointPrompt(tuple(_to_ijk(args.point, args.coords, geometry)))
    corners = _to_ijk(args.box if args.box is not None else args.roi, args.coords, geometry)
    low, high = corners.min(axis=0), corners.max(axis=0)
    if args.box is not None:
        return BoxPrompt(int(round(corners[:, 2].mean())), (low[0], low[1], high[0], high[1]))
    return RoiPrompt(tuple(low), tuple(high))


class ProgressBar:
    """A one-line progress bar on stderr fed by session ProgressEvents."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and sys.stderr is not None
        self.start = time.perf_counter()

    def __call__(self, event) -> None:
        if not self.enabled:
            return
        width = 30
        filled = int(width * min(1.0, event.done / max(1, event.total)))
        sys.stderr.write(f"\r{event.stage:>9} [{'#' * filled}{'.' * (width - filled)}] slice {event.slice_index:4d} "
                         f"{time.perf_counter() - self.start:6.1f} s")
        if event.stage == "done":
            sys.stderr.write("\n")
        sys.stderr.flush()


def run(args: argparse.Namespace) -> int:
    from ..commands.measure import format_table
    from ..device import set_cpu_threads
    from ..measurements import measure_lesion
    from ..models import load_model
    from ..session import SegmentationSession

    set_cpu_threads(args.threads)
    ct = io.read_volume(args.ct, label=f"CT {args.ct}")
    prompt = build_prompt(args, ct.geometry)
    model = load_model(args.model, checkpoint=args.checkpoint, device=args.device)
    if model.device.type == "cpu":
        print("running on the CPU: expect about 1 s per slice", file=sys.stderr)
    session = SegmentationSession(ct.array, ct.geometry, model=model, window_hu=args.window, autocast_bf16=args.bf16)
    progress = ProgressBar(not args.quiet)
    lesion = session.segment(prompt, progress=progress)
    for positive, point in args.edit:
        session.edit(lesion.id, _to_ijk(point, args.coords, ct.geometry), positive, progress=progress)
    path = io.write_mask(args.out, lesion.mask.astype(np.uint8), ct.geometry)
    measurement = measure_lesion(lesion.mask, ct.geometry, ct.array)
    row = {"lesion": lesion.name, "mode": lesion.mode, "model": model.spec.name, **measurement.to_dict()}
    print(format_table([row]))
    print(f"mask written to {path}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(row, indent=2, default=float))
        print(f"measurements written to {args.json.resolve()}")
    return 0
