"""Engine speed: encoder ms/slice and decoder ms/prompt (one box, and a batch of 10 boxes) for LiteMedSAM (model's
own modules, the exact inference rewrites of OncoPilotLib/fastpath.py, bf16 autocast) and SAM ViT-B.

Usage: python bench/engine.py [--runs N] [--sam-runs M] [--threads T] [--data ../shared/data]

Prints medians of N timed runs (after one warm-up), the agreement of the rewrites and of bf16 (on top of the
rewrites, as ``--bf16`` runs) with the model's own fp32 modules (embeddings, logits and 2D Dice of the masks from
the same box prompts on real lesion slices) and SAM ViT-B (random weights: same compute as the real model)
encoding a 1024 x 1024 input. All in one process so that ratios are comparable on a noisy machine.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from OncoPilotLib.device import set_cpu_threads
from OncoPilotLib.io import read_mask, read_volume
from OncoPilotLib.models import REGISTRY, LoadedModel, load_model
from OncoPilotLib.predictor import VolumePredictor
from OncoPilotLib.preprocess import SliceTransform, model_input

LESIONS = ("sts_002", "sts_019", "lidc_0001_n1", "lidc_0003_n1")


def timed(function, runs: int) -> list[float]:
    function()  # warm-up
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        function()
        times.append(1000.0 * (time.perf_counter() - start))
    return times


def lesion_slices(data: Path):
    for lesion_id in LESIONS:
        ct = read_volume(data / "lesions" / f"{lesion_id}_ct.nii.gz")
        truth = read_mask(data / "lesions" / f"{lesion_id}_mask.nii.gz", like=ct) > 0
        k = int(np.flatnonzero(truth.any(axis=(1, 2))).mean().round())
        rows, cols = np.nonzero(truth[k])
        yield lesion_id, ct, k, (cols.min() - 5, rows.min() - 5, cols.max() + 5, rows.max() + 5)


def encoder_ms(predictor: VolumePredictor, k: int, runs: int) -> list[float]:
    def encode():
        predictor.cache.clear()
        predictor.embedding(k)
    return timed(encode, runs)


def bench_litemedsam(model: LoadedModel, data: Path, runs: int) -> None:
    exact = VolumePredictor(model, fast=False)
    fast = VolumePredictor(model)
    bf16 = VolumePredictor(model, autocast_bf16=True)
    enc = {"exact": [], "fast": [], "bf16": []}
    dec = {"exact": [], "fast": []}
    batch = {"exact": [], "fast": []}  # 10 boxes in one decoder call, as a click seed decodes them
    embedding_err, logit_err, pixels, dices = [], [], [], []
    for lesion_id, ct, k, box in lesion_slices(data):
        for predictor in (exact, fast, bf16):
            predictor.set_volume(ct.array, ct.geometry.spacing)
        for name, predictor in (("exact", exact), ("fast", fast), ("bf16", bf16)):
            enc[name] += encoder_ms(predictor, k, runs)
        dec["exact"] += timed(lambda: exact.predict(k, box=box), 4 * runs)
        dec["fast"] += timed(lambda: fast.predict(k, box=box), 4 * runs)
        boxes = np.array([np.add(box, (i, i, -i, -i)) for i in range(-5, 5)], dtype=float)
        batch["exact"] += timed(lambda: exact.predict_batch(k, boxes), runs)
        batch["fast"] += timed(lambda: fast.predict_batch(k, boxes), runs)
        a, b = exact.embedding(k), fast.embedding(k)
        embedding_err.append(float((a - b).norm() / a.norm()))
        x, y = exact.predict(k, box=box), fast.predict(k, box=box)
        logit_err.append(float(np.abs(x.logits - y.logits).max()))
        pixels.append(int(np.count_nonzero(x.mask != y.mask)))
        z = bf16.predict(k, box=box).mask
        dices.append(2.0 * np.count_nonzero(x.mask & z) / max(1, x.mask.sum() + z.sum()))
    base = statistics.median(enc["exact"])
    print(f"LiteMedSAM encoder fp32, own modules : median {base:8.1f} ms/slice (N={len(enc['exact'])})")
    for name, label in (("fast", "fp32, fastpath    "), ("bf16", "bf16, fastpath    ")):
        value = statistics.median(enc[name])
        print(f"LiteMedSAM encoder {label}: median {value:8.1f} ms/slice ({value / base:.2f} x)")
    base = statistics.median(dec["exact"])
    value = statistics.median(dec["fast"])
    print(f"LiteMedSAM decoder, box, own modules : median {base:8.1f} ms/prompt (N={len(dec['exact'])})")
    print(f"LiteMedSAM decoder, box, fastpath    : median {value:8.1f} ms/prompt ({value / base:.2f} x)")
    base, value = statistics.median(batch["exact"]), statistics.median(batch["fast"])
    print(f"LiteMedSAM decoder, 10 boxes, own modules : median {base:8.1f} ms/batch (N={len(batch['exact'])})")
    print(f"LiteMedSAM decoder, 10 boxes, fastpath    : median {value:8.1f} ms/batch ({value / base:.2f} x)")
    print(f"fastpath vs own modules: embedding relative error max {max(embedding_err):.1e}, "
          f"max |logit difference| {max(logit_err):.1e}, mask pixels differing {sum(pixels)} over {len(pixels)} slices")
    print(f"bf16 vs fp32 masks: 2D Dice min {min(dices):.4f}, mean {np.mean(dices):.4f} over {len(dices)} lesions")


def bench_sam(runs: int) -> None:
    spec = REGISTRY["sam_vit_b"]
    network = spec.build().eval()
    image = model_input(np.zeros((512, 512), np.float32), SliceTransform.for_slice((512, 512), 1024),
                        spec.window_hu, spec.pixel_mean, spec.pixel_std)
    with torch.inference_mode():
        times = timed(lambda: network.image_encoder(image), runs)
    print(f"SAM ViT-B encoder (1024 px, random weights): median {statistics.median(times):8.1f} ms/slice (N={runs})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--sam-runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    args = parser.parse_args()
    set_cpu_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device cpu")
    bench_litemedsam(load_model("litemedsam", device="cpu"), args.data, args.runs)
    if args.sam_runs:
        bench_sam(args.sam_runs)


if __name__ == "__main__":
    main()
