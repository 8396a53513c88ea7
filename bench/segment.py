"""Click -> 3D lesion speed, cold (no cached embeddings) and warm (embeddings prefetched), and peak memory.

Usage: python bench/segment.py [--threads T] [--data ../shared/data] [--paths fast,exact,bf16]

Cases: the LIDC-IDRI-0001 nodule clicked in its whole 512 x 512 x 16 slab, and a sarcoma spanning 20 slices
(sts_003). Prints model load time, time to the first 2D (seed) mask, time to the 3D mask, slices, and the
process's peak resident memory. ``--paths`` runs every case, in one process, with the exact inference rewrites
(``fast``, OncoPilotLib/fastpath.py, the default), with the model's own modules (``exact``) and/or with the
rewrites and the encoder under bfloat16 autocast (``bf16``, the ``--bf16`` option of ``oncopilot segment``).
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from OncoPilotLib.device import set_cpu_threads
from OncoPilotLib.io import read_mask, read_volume
from OncoPilotLib.models import load_model
from OncoPilotLib.session import PointPrompt, SegmentationSession


def cases(data: Path):
    yield ("lidc_0001 nodule, 512x512x16 slab", data / "volumes" / "lidc_0001_ct.nii.gz",
           data / "volumes" / "lidc_0001_nodule1_mask.nii.gz")
    yield "sts_003 sarcoma, 20 slices", data / "lesions" / "sts_003_ct.nii.gz", data / "lesions" / "sts_003_mask.nii.gz"


def click_of(mask: np.ndarray) -> tuple[float, float, float]:
    k, j, i = ndi.center_of_mass(mask)
    k = int(round(k))
    if not mask[k, int(round(j)), int(round(i))]:
        rows, cols = np.nonzero(mask[k])
        nearest = np.argmin((cols - i) ** 2 + (rows - j) ** 2)
        i, j = cols[nearest], rows[nearest]
    return float(i), float(j), float(k)


def run_once(session: SegmentationSession, click) -> tuple[float, float, int]:
    start = time.perf_counter()
    first = []

    def progress(event):
        if event.stage == "seed" and not first:
            first.append(time.perf_counter() - start)

    lesion = session.segment(PointPrompt(click), progress=progress)
    total = time.perf_counter() - start
    session.remove(lesion.id)
    return first[0], total, len(lesion.slices)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--paths", default="fast", help="comma-separated: fast (default), exact, bf16")
    args = parser.parse_args()
    paths = [p.strip() for p in args.paths.split(",")]
    if not paths or set(paths) - {"fast", "exact", "bf16"}:
        parser.error(f"--paths takes fast, exact and/or bf16, got {args.paths!r}")
    set_cpu_threads(args.threads)
    start = time.perf_counter()
    model = load_model("litemedsam", device="cpu")
    print(f"model load: {time.perf_counter() - start:.2f} s")
    for name, ct_path, mask_path in cases(args.data):
        ct = read_volume(ct_path)
        truth = read_mask(mask_path, like=ct) > 0
        click = click_of(truth)
        for path in paths:
            session = SegmentationSession(ct.array, ct.geometry, model=model, fast=path != "exact",
                                          autocast_bf16=path == "bf16")
            first, total, slices = run_once(session, click)
            print(f"{name} [{path}]: cold  first 2D mask {first:6.2f} s, 3D mask {total:6.2f} s, {slices} slices")
            session.predictor.cache.clear()
            session.prefetch_around(int(click[2]), radius=ct.array.shape[0])
            session.predictor.wait_prefetch()
            first, total, slices = run_once(session, click)
            print(f"{name} [{path}]: warm  first 2D mask {first:6.2f} s, 3D mask {total:6.2f} s, {slices} slices")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    print(f"peak resident memory: {peak:.0f} MiB")


if __name__ == "__main__":
    main()
