"""``oncopilot evaluate DATA --out DIR``: segment every annotated lesion from simulated prompts (the ONCOPILOT
paper's protocol) and report Dice and RECIST errors per mode.

DATA is a folder of ``<id>_ct`` + ``<id>_mask`` pairs or a CSV case list (columns image, mask, optional id,
label, kind); every connected component of a mask is a lesion. Writes to DIR: ``results.jsonl`` (kept for
resuming), ``lesions.csv``, ``summary.json``, ``report.md`` and PNG figures.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..evaluation import (DEFAULT_EMBEDDING_DIR, MODES, EvaluationConfig, ProgressBar, find_evaluation_cases,
                          run_evaluation)

logger = logging.getLogger(__name__)


def _modes(text: str) -> tuple[str, ...]:
    modes = tuple(dict.fromkeys(m.strip() for m in text.split(",") if m.strip()))
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise argparse.ArgumentTypeError(f"unknown mode(s) {', '.join(unknown) or '(none)'}; "
                                         f"choose from {', '.join(MODES)}")
    return modes


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("evaluate", help="evaluate segmentation from simulated prompts (Dice, RECIST)",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", help="folder of <id>_ct + <id>_mask pairs, or a CSV case list")
    parser.add_argument("--out", required=True, type=Path, help="output folder (resumed if it holds results)")
    parser.add_argument("--modes", type=_modes, default=MODES, help="comma-separated subset of "
                        f"{','.join(MODES)} (default: all)")
    parser.add_argument("--model", default="litemedsam", help="registry name or OncoPilot checkpoint path")
    parser.add_argument("--checkpoint", default=None, help="weights for a registry model (SAM, MedSAM)")
    parser.add_argument("--device", default=None, help="torch device (default: automatic)")
    parser.add_argument("--embedding-cache", default=str(DEFAULT_EMBEDDING_DIR), metavar="DIR",
                        help="keep image embeddings on disk there, so re-runs cost decoder time only "
                             "(default: %(default)s; 'none' to disable)")
    parser.add_argument("--max-clicks", type=int, default=4, help="edit clicks at most in point-edit (default 4)")
    parser.add_argument("--edit-click", choices=("barycentre", "interior"), default="barycentre",
                        help="point-edit click in the largest error region: its barycentre (the paper's) or the "
                             "voxel deepest inside it")
    parser.add_argument("--jobs", type=int, default=1, help="cases evaluated in parallel processes (default 1)")
    parser.add_argument("--ids", type=lambda s: [v.strip() for v in s.split(",") if v.strip()],
                        help="comma-separated case ids to evaluate")
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N cases only")
    parser.add_argument("--overwrite", action="store_true", help="discard earlier results in --out")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--bf16", action="store_true", help="image encoder in bfloat16 (faster on CPUs with bf16 "
                        "support; results differ, see docs/BENCHMARKS.md section 1)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cache = None if args.embedding_cache.lower() == "none" else args.embedding_cache
    config = EvaluationConfig(modes=args.modes, model=args.model, checkpoint=args.checkpoint, embedding_dir=cache,
                              max_clicks=args.max_clicks, edit_strategy=args.edit_click, seed=args.seed,
                              device=args.device, autocast_bf16=args.bf16)
    cases = find_evaluation_cases(args.data, args.ids, args.limit)
    logger.info("evaluating %d cases, modes %s, into %s", len(cases), ", ".join(config.modes), args.out)
    run_evaluation(cases, config, args.out, jobs=args.jobs, overwrite=args.overwrite, data=args.data,
                   progress=None if args.no_progress else ProgressBar)
    from ..report import write_report

    summary = write_report(args.out, config.modes)
    for mode, stats in summary["modes"].items():
        print(f"{mode:>10}: n={stats['n']}  Dice mean {stats['dice_mean']:.3f} median {stats['dice_median']:.3f}  "
              f"LA error median {stats['la_abs_error_median_mm']:.1f} mm / {stats['la_rel_error_median_pct']:.1f} %")
    print(f"report: {args.out / 'report.md'}")
    return 0
