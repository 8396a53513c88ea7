"""Benchmark and real-lesion table for OncoPilotLib.measurements.

    python bench/measure.py                 # speed: 512 x 512 x 300 mask holding a ~100 mL lesion
    python bench/measure.py --table         # markdown table of the 32 real lesions vs ../shared/data/manifest.csv
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from OncoPilotLib import io
from OncoPilotLib.geometry import VolumeGeometry
from OncoPilotLib.measurements import measure_lesion

DATA = Path(os.environ.get("ONCOPILOT_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def synthetic_case(spacing=(0.7, 0.7, 1.0), shape_kji=(300, 512, 512), volume_ml: float = 100.0):
    """(K, J, I) uint8 mask with one rotated ellipsoid of ``volume_ml`` (semi-axes ratio 1.3 : 1 : 0.8)."""
    scale = (volume_ml * 1000.0 / (4.0 / 3.0 * math.pi * 1.3 * 1.0 * 0.8)) ** (1.0 / 3.0)
    a, b, c = 1.3 * scale, scale, 0.8 * scale
    z, y, x = ((np.arange(n) - n / 2 + 0.3) * s for n, s in zip(shape_kji, spacing[::-1]))
    rows = np.nonzero(np.abs(z) <= c)[0]
    zz, yy, xx = np.meshgrid(z[rows], y, x, indexing="ij")
    u, v = 0.8 * xx + 0.6 * yy, -0.6 * xx + 0.8 * yy
    mask = np.zeros(shape_kji, np.uint8)
    mask[rows] = (u / a) ** 2 + (v / b) ** 2 + (zz / c) ** 2 <= 1.0
    ct = np.where(mask > 0, 40, -100).astype(np.int16)
    return mask, ct, VolumeGeometry.from_spacing(spacing, shape_kji)


def bench_speed(runs: int) -> None:
    mask, ct, geometry = synthetic_case()
    measure_lesion(mask, geometry, ct)  # warm-up: imports, qhull and allocator caches
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        result = measure_lesion(mask, geometry, ct)
        times.append(time.perf_counter() - start)
    spacing = " x ".join(f"{s:g}" for s in geometry.spacing)
    print(f"mask {mask.shape} (K, J, I) at {spacing} mm, lesion {result.volume_ml:.1f} mL, "
          f"LA {result.long_axis_mm:.1f} mm, SA {result.short_axis_mm:.1f} mm, sphericity {result.sphericity:.3f}")
    print(f"measure_lesion (with CT): median {statistics.median(times):.3f} s over {runs} runs "
          f"(min {min(times):.3f}, max {max(times):.3f})")


def real_table() -> None:
    with open(DATA / "manifest.csv", newline="") as handle:
        manifest = list(csv.DictReader(handle))
    print("Lengths in mm, volumes in mL; width = the manifest's axial_SA_mm.\n")
    print("| id | LA manifest | LA ours | diff | width | SA ours | SA - width | vol manifest | vol ours "
          "| sphericity | 3D max |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    la_diffs, sa_excess = [], []
    for row in manifest:
        ct = io.read_volume(DATA / "lesions" / f"{row['id']}_ct.nii.gz")
        mask = io.read_mask(DATA / "lesions" / f"{row['id']}_mask.nii.gz", like=ct)
        m = measure_lesion(mask, ct.geometry, ct.array)
        la, width = float(row["axial_LA_mm"]), float(row["axial_SA_mm"])
        la_diffs.append(m.long_axis_mm - la)
        sa_excess.append(m.short_axis_mm - width)
        print(f"| {row['id']} | {la:.1f} | {m.long_axis_mm:.2f} | {la_diffs[-1]:+.2f} | {width:.1f} | "
              f"{m.short_axis_mm:.2f} | {sa_excess[-1]:+.2f} | {float(row['vol_ml']):.2f} | {m.volume_ml:.2f} | "
              f"{m.sphericity:.3f} | {m.max_diameter_3d_mm:.1f} |")
    print(f"\nLA - manifest: max |diff| {max(abs(d) for d in la_diffs):.2f} mm over {len(la_diffs)} lesions; "
          f"SA - manifest width: {min(sa_excess):+.2f} .. {max(sa_excess):+.2f} mm")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", action="store_true", help="print the real-lesion markdown table instead")
    parser.add_argument("--runs", type=int, default=7, help="timed runs for the speed benchmark")
    args = parser.parse_args(argv)
    if args.table:
        real_table()
    else:
        bench_speed(args.runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
