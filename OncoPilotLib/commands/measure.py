"""``oncopilot measure CT MASK``: RECIST axes, volume, sphericity and HU of each label in a mask."""

from __future__ import annotations

import argparse
import csv
import json
import logging
from pathlib import Path

import numpy as np

from .. import io
from ..measurements import LesionMeasurement, measure_lesion

logger = logging.getLogger(__name__)

# Columns of the printed table: (dict key, header, format).
_TABLE = [("label", "label", "{}"), ("long_axis_mm", "LA mm", "{:.1f}"), ("short_axis_mm", "SA mm", "{:.1f}"),
          ("long_axis_slice_k", "LA k", "{}"), ("volume_ml", "vol mL", "{:.2f}"), ("sphericity", "spher", "{:.3f}"),
          ("max_diameter_3d_mm", "3D max mm", "{:.1f}"), ("n_slices", "slices", "{}"),
          ("n_components", "comps", "{}"), ("hu_mean", "HU mean", "{:.1f}"), ("hu_sd", "HU sd", "{:.1f}")]


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("measure", help="measure lesions (RECIST long/short axis, volume, sphericity, HU)",
                                   description=__doc__)
    parser.add_argument("ct", help="CT volume (NIfTI, NRRD, MHA or DICOM folder), in HU")
    parser.add_argument("mask", help="label map on the CT's grid; each non-zero label is measured separately")
    parser.add_argument("--label", type=int, default=None, help="measure only this label value")
    parser.add_argument("--all-components", action="store_true",
                        help="measure every connected component of a label (default: the largest, 26-connected)")
    parser.add_argument("--frame", choices=("RAS", "LPS"), default="RAS", help="patient frame of the points written")
    parser.add_argument("--json", type=Path, help="write the measurements as a JSON list")
    parser.add_argument("--csv", type=Path, help="write the measurements as CSV, one row per label")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    ct = io.read_volume(args.ct, label=f"CT {args.ct}")
    mask = io.read_mask(args.mask, like=ct)
    labels = [args.label] if args.label is not None else [int(v) for v in np.unique(mask) if v != 0]
    rows = [_measure(mask, ct, label, not args.all_components).to_dict(frame=args.frame) for label in labels]
    print(format_table(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2))
    if args.csv and rows:
        _write_csv(args.csv, rows)
    return 0


def _measure(mask: np.ndarray, ct: io.CTVolume, label: int, largest: bool) -> LesionMeasurement:
    logger.info("measuring label %d", label)
    return measure_lesion(mask, ct.geometry, ct.array, largest_component=largest, label=label)


def format_table(rows: list[dict]) -> str:
    """Fixed-width text table of measurement dicts (one row each); 'empty' for labels with no voxel."""
    if not rows:
        return "no labelled voxels in the mask"
    cells = [[header for _, header, _ in _TABLE]]
    for row in rows:
        cells.append([_cell(row, key, fmt) for key, _, fmt in _TABLE])
    widths = [max(len(line[column]) for line in cells) for column in range(len(_TABLE))]
    return "\n".join("  ".join(text.rjust(width) for text, width in zip(line, widths)) for line in cells)


def _cell(row: dict, key: str, fmt: str) -> str:
    if row["empty"] and key not in ("label",):
        return "empty" if key == "long_axis_mm" else "-"
    value = row.get(key)
    return "-" if value is None else fmt.format(value)


def _write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
