"""Learning-rate choice for ``oncopilot train``, measured on the training split only.

The training cases (the held-out split of ``oncopilot train`` is never read) are split again, seeded, into
inner-train / inner-validation cases; each learning rate fine-tunes a fresh copy of the base decoder for the same
number of steps and is scored by 2D Dice per prompt kind on the inner-validation lesions.

    nice python bench/train.py /work/shared/data/lesions --lrs 3e-5 1e-4 --steps 60 --out bench/train_lr.json

With ``--compare CHECKPOINT`` it instead scores the base model and that checkpoint on the held-out lesions of
``oncopilot train``'s split (evaluation only, nothing is chosen on it), per lesion and prompt kind.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging

import numpy as np

from OncoPilotLib.datasets import find_cases
from OncoPilotLib.device import set_cpu_threads
from OncoPilotLib.models import load_model
from OncoPilotLib.training import TrainConfig, Trainer, evaluate_2d, prepare_lesions, split_cases, summarise

logger = logging.getLogger("bench.train")


def sweep(args) -> dict:
    """{"base": summary, "<lr>": summary} on the inner-validation lesions."""
    train_cases, _ = split_cases(find_cases(args.data), 0.25, seed=0)
    inner_train, inner_val = split_cases(train_cases, 0.2, seed=1)
    base = load_model("litemedsam", device="cpu")
    config = TrainConfig(data=args.data, output="", steps=args.steps, batch_size=args.batch_size)
    train_lesions = prepare_lesions(base, inner_train, config, config.max_slices)
    val_lesions = prepare_lesions(base, inner_val, config, args.val_slices)
    results = {"inner_val": [lesion.name for lesion in val_lesions],
               "base": summarise(evaluate_2d(base, val_lesions))}
    for lr in args.lrs:
        model = copy.copy(base)
        model.network = copy.deepcopy(base.network)
        config.lr = lr
        Trainer(model, config).fit(train_lesions, np.random.default_rng(0))
        results[f"{lr:g}"] = summarise(evaluate_2d(model, val_lesions))
        logger.info("lr %g: %s", lr, {k: round(v["slices"], 3) for k, v in results[f"{lr:g}"].items()})
    return results


def compare(args) -> dict:
    """{"base": {kind: {lesion: mean Dice}}, "tuned": ...} on the held-out split of ``oncopilot train``."""
    _, val_cases = split_cases(find_cases(args.data), 0.25, seed=0)
    out = {}
    for label, name in (("base", "litemedsam"), ("tuned", args.compare)):
        model = load_model(name, device="cpu")
        config = TrainConfig(data=args.data, output="", model="litemedsam")  # same encoder: reuse its cache
        lesions = prepare_lesions(model, val_cases, config, args.val_slices)
        results = evaluate_2d(model, lesions)
        out[label] = {kind: {lesion: float(np.mean(v)) for lesion, v in per.items()} for kind, per in results.items()}
        out[label + "_summary"] = summarise(results)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data")
    parser.add_argument("--lrs", type=float, nargs="+", default=[3e-5, 1e-4])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--val-slices", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None)
    parser.add_argument("--compare", default=None, help="checkpoint to score against the base on the held-out split")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    set_cpu_threads(args.threads)
    results = compare(args) if args.compare else sweep(args)
    text = json.dumps(results, indent=2)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(text + "\n")
    logger.info("%s", text)


if __name__ == "__main__":
    main()
