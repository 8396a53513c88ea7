"""``oncopilot train``: fine-tune the prompt encoder and mask decoder (or the whole model) on CT lesions."""

from __future__ import annotations

import argparse
import json
import logging
import sys

logger = logging.getLogger(__name__)


def _prompt_mix(text: str) -> dict[str, float]:
    from ..training_data import DEFAULT_PROMPT_MIX

    mix = {}
    for item in text.split(","):
        name, _, weight = item.partition("=")
        if name.strip() not in DEFAULT_PROMPT_MIX or not weight:
            raise argparse.ArgumentTypeError(f"bad prompt mix item {item!r}: use KIND=WEIGHT with KIND one of "
                                             f"{', '.join(DEFAULT_PROMPT_MIX)}")
        mix[name.strip()] = float(weight)
    return mix


def add_parser(subparsers) -> None:
    from ..training import DEFAULT_CACHE_DIR, TrainConfig

    defaults = TrainConfig(data="", output="")
    parser = subparsers.add_parser(
        "train", help="fine-tune a model on CT lesions with point, box, mask and edit prompts",
        description="Fine-tune on a folder of <id>_ct + <id>_mask pairs (or a CSV with image, mask columns). "
                    "Cases are split by case into train / held-out (seeded); 2D Dice per prompt type on the "
                    "held-out lesions is measured before and after and stored in the checkpoint.")
    parser.add_argument("data", help="folder of <id>_ct/<id>_mask pairs or CSV case list")
    parser.add_argument("-o", "--output", required=True, help="checkpoint to write (.pth); load it with --model PATH")
    parser.add_argument("--model", default=defaults.model, help="model to start from: registry name or checkpoint")
    parser.add_argument("--train-encoder", action="store_true",
                        help="also train the image encoder (mixed precision; meant for a GPU)")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="optimiser steps")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="slices per step")
    parser.add_argument("--lr", type=float, default=defaults.lr, help="AdamW learning rate (decoder)")
    parser.add_argument("--encoder-lr", type=float, default=None, help="learning rate of the image encoder")
    parser.add_argument("--val-fraction", type=float, default=defaults.val_fraction,
                        help="fraction of cases of each kind held out (0: train on all)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--max-slices", type=int, default=defaults.max_slices,
                        help="slices per training lesion (ends of the lesion always included)")
    parser.add_argument("--max-val-slices", type=int, default=defaults.max_val_slices)
    parser.add_argument("--prompt-mix", type=_prompt_mix, default=None,
                        help="e.g. point=0.2,box=0.3,mask=0.2,edit=0.3 (default: the documented mix)")
    parser.add_argument("--cache-dir", default=str(DEFAULT_CACHE_DIR), help="where slice embeddings are cached")
    parser.add_argument("--device", default=None, help="cuda, mps or cpu (default: best available)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    parser.add_argument("--time-limit", type=float, default=None, help="stop training after this many minutes")
    parser.add_argument("--fp32", action="store_true", help="save float32 weights (default float16)")
    parser.add_argument("--no-eval", action="store_true", help="skip the before/after held-out evaluation")
    parser.add_argument("--max-cases", type=int, default=None, help="use only the first N cases (smoke tests)")
    parser.add_argument("--report", default=None, help="also write the checkpoint metadata as JSON here")
    parser.set_defaults(func=run)


def run(args) -> int:
    from ..device import set_cpu_threads
    from ..training import TrainConfig, train

    set_cpu_threads(args.threads)
    config = TrainConfig(
        data=args.data, output=args.output, model=args.model, train_encoder=args.train_encoder, steps=args.steps,
        batch_size=args.batch_size, lr=args.lr, encoder_lr=args.encoder_lr, val_fraction=args.val_fraction,
        seed=args.seed, max_slices=args.max_slices, max_val_slices=args.max_val_slices,
        cache_dir=args.cache_dir, device=args.device, save_fp16=not args.fp32, evaluate=not args.no_eval,
        time_limit_s=None if args.time_limit is None else 60.0 * args.time_limit, max_cases=args.max_cases)
    if args.prompt_mix:
        config.prompt_mix = args.prompt_mix
    result = train(config)
    if args.report:
        with open(args.report, "w") as handle:
            json.dump(result.metadata, handle, indent=2)
    metrics = result.metadata["metrics"]
    for kind, after in metrics["val_dice_2d_after"].items():
        before = metrics["val_dice_2d_before"][kind]
        sys.stdout.write(f"held-out 2D Dice {kind:<15} before {before['slices']:.3f} after {after['slices']:.3f} "
                         f"({after['n']} slices)\n")
    sys.stdout.write(f"{result.checkpoint}\n")
    return 0
