"""What each propagation stop rule buys: 3D Dice and slice counts on the shared lesions, bbox and point modes.

Usage: python bench/propagation.py [--ids a,b] [--variants 0,3] [--embedding-cache DIR] [--data ../shared/data]

``--variants`` runs only those variants (numbers as printed), e.g. to split the table over two processes.

Prompts follow the paper's simulation (OncoPilotLib.simulation): GT middle-slice box + 15 px, and the GT
barycentre click. Each variant runs on the same cached embeddings (only the decoder runs once the cache is
warm). Prints one line per variant: mean 3D Dice per mode, lesions whose mask spans > 2x the true slices.
"""

from __future__ import annotations

import argparse
import csv
from dataclasses import replace
from pathlib import Path

import numpy as np

from OncoPilotLib.io import read_mask, read_volume
from OncoPilotLib.predictor import VolumePredictor
from OncoPilotLib.propagation import PropagationSettings
from OncoPilotLib.session import NothingFoundError, SegmentationSession
from OncoPilotLib.simulation import dice, simulate_box, simulate_point

ALL_RULES = PropagationSettings().rules
VARIANTS = {
    "default (all rules)": PropagationSettings(),
    "only 'empty'": PropagationSettings(rules=("empty",)),
    **{f"all but {rule}": PropagationSettings(rules=tuple(r for r in ALL_RULES if r != rule))
       for rule in ALL_RULES if rule != "empty"},
    "box -2 px, no mask prompt (first rule)": replace(PropagationSettings(), box_margin_px=-2.0,
                                                      use_mask_prompt=False),
    "box +0 px + mask prompt": replace(PropagationSettings(), box_margin_px=0.0),
    "box +3 px + mask prompt": replace(PropagationSettings(), box_margin_px=3.0),
    "box +1 px, no mask prompt": replace(PropagationSettings(), use_mask_prompt=False),
    "no logit memory": replace(PropagationSettings(), logit_memory=0.0),
}


def run_variant(cases, predictor, settings) -> dict:
    scores = {"bbox": [], "point": []}
    leaks = []
    for lesion_id, ct, truth in cases:
        # A new session per lesion: the in-memory cache restarts, the on-disk store keeps the embeddings.
        session = SegmentationSession(ct.array, ct.geometry, model=predictor, settings=settings)
        spanned = int(truth.any(axis=(1, 2)).sum())
        for mode, prompt in (("bbox", simulate_box(truth)), ("point", simulate_point(truth, ct.geometry.spacing))):
            session.lesions.clear()
            try:
                lesion = session.segment(prompt)
            except NothingFoundError:
                scores[mode].append(0.0)
                continue
            scores[mode].append(dice(lesion.mask, truth))
            if len(lesion.slices) > 2 * spanned:
                leaks.append(f"{lesion_id}/{mode}")
    return {"bbox": float(np.mean(scores["bbox"])), "point": float(np.mean(scores["point"])), "leaks": leaks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--ids", default=None)
    parser.add_argument("--variants", default=None, help="comma-separated variant numbers (default: all)")
    parser.add_argument("--embedding-cache", default=str(Path.home() / ".cache" / "oncopilot" / "embeddings"))
    args = parser.parse_args()
    with open(args.data / "manifest.csv", newline="") as handle:
        ids = [row["id"] for row in csv.DictReader(handle)]
    if args.ids:
        ids = [i for i in ids if i in args.ids.split(",")]
    predictor = VolumePredictor(cache_bytes=64 << 20, embedding_dir=args.embedding_cache)
    cases = []
    for lesion_id in ids:
        ct = read_volume(args.data / "lesions" / f"{lesion_id}_ct.nii.gz")
        cases.append((lesion_id, ct, read_mask(args.data / "lesions" / f"{lesion_id}_mask.nii.gz", like=ct) > 0))
    print(f"{len(ids)} lesions")
    chosen = None if args.variants is None else {int(v) for v in args.variants.split(",")}
    for number, (name, settings) in enumerate(VARIANTS.items()):
        if chosen is not None and number not in chosen:
            continue
        result = run_variant(cases, predictor, settings)
        print(f"{number:2d} {name:38s} bbox {result['bbox']:.3f}  point {result['point']:.3f}  "
              f"leaks>2x: {', '.join(result['leaks']) or 'none'}", flush=True)


if __name__ == "__main__":
    main()
