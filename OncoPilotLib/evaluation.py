"""Evaluation harness: segment every annotated lesion from simulated prompts and score it (``oncopilot evaluate``).

One record per (lesion, mode), with modes ``point``, ``bbox`` and ``point-edit`` (see :mod:`.simulation` for the
paper's prompt protocol). A lesion is one connected component (26-connectivity) of a case's mask, so a
multi-lesion mask yields several lesions ``<case>_c1``, ``<case>_c2``... (largest first); a single-lesion case
keeps its case id. Records are appended to ``<out>/results.jsonl`` as soon as they exist, so an interrupted
run resumes where it stopped; ``lesions.csv`` is rewritten from them at the end.

Metrics: 3D Dice; RECIST long / short axis (mm, axial, largest 26-connected component, as ``oncopilot measure``)
of prediction and ground truth; volume (mL); sphericity; slices spanned; wall time (s, depends on how many
embeddings were already cached); clicks; propagation stop reasons. When the model finds nothing, Dice is 0 and
the predicted lengths and volume are 0 (so their errors count fully), with status ``nothing_found``.
"""

from __future__ import annotations

import csv
import functools
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from .datasets import Case, find_cases, load_case, split_lesions
from .measurements import LesionMeasurement, measure_lesion
from .propagation import PropagationSettings
from .session import NothingFoundError, SegmentationSession
from .simulation import BOX_MARGIN_PX, MIN_ERROR_VOXELS, dice, simulate_box, simulate_edit, simulate_point

logger = logging.getLogger(__name__)

MODES = ("point", "bbox", "point-edit")
DEFAULT_EMBEDDING_DIR = Path.home() / ".cache" / "oncopilot" / "embeddings"
RESULTS_FILE, CSV_FILE, RUN_FILE = "results.jsonl", "lesions.csv", "run.json"
# A prediction spanning more than this many times the true slice count has leaked along z.
LEAK_SLICE_FACTOR = 2.0

FIELDS = ("lesion_id", "case_id", "kind", "mode", "status", "dice",
          "gt_long_axis_mm", "pred_long_axis_mm", "long_axis_abs_error_mm", "long_axis_rel_error_pct",
          "gt_short_axis_mm", "pred_short_axis_mm", "short_axis_abs_error_mm",
          "gt_volume_ml", "pred_volume_ml", "volume_rel_error_pct", "gt_sphericity", "pred_sphericity",
          "gt_slices", "pred_slices", "leak", "seconds", "clicks", "dice_trace", "edit_clicks", "prompt", "stops",
          "message")


@dataclass
class EvaluationConfig:
    """What an evaluation run does; stored in ``<out>/run.json`` and checked on resume.

    Attributes:
        modes: subset of :data:`MODES`, in report order.
        model / checkpoint: as for :func:`~OncoPilotLib.models.load_model`.
        embedding_dir: on-disk embedding store (None: in-memory only).
        max_clicks: edit clicks at most in ``point-edit``; min_error_voxels: smaller error regions get no click;
        edit_strategy: where in the error region to click (:func:`~OncoPilotLib.simulation.simulate_edit`).
        box_margin_px: growth of the ground-truth box in ``bbox`` mode (paper: 15).
        seed: seeds numpy and torch (the protocol itself has no randomness).
        autocast_bf16: image encoder under bfloat16 autocast (see :class:`~OncoPilotLib.predictor.VolumePredictor`).
        settings: propagation settings of the session.
    """

    modes: tuple[str, ...] = MODES
    model: str = "litemedsam"
    checkpoint: str | None = None
    embedding_dir: str | None = str(DEFAULT_EMBEDDING_DIR)
    max_clicks: int = 4
    min_error_voxels: int = MIN_ERROR_VOXELS
    edit_strategy: str = "barycentre"
    box_margin_px: float = BOX_MARGIN_PX
    seed: int = 0
    device: str | None = None
    autocast_bf16: bool = False
    settings: PropagationSettings = field(default_factory=PropagationSettings)

    def __post_init__(self):
        unknown = [m for m in self.modes if m not in MODES]
        if unknown or not self.modes:
            raise ValueError(f"unknown mode(s) {', '.join(unknown) or '(none)'}: choose from {', '.join(MODES)}")
        if self.max_clicks < 0:
            raise ValueError("max_clicks must be >= 0")

    def identity(self) -> dict:
        """The settings results depend on (a resumed run must not mix results of different ones)."""
        keys = ("model", "checkpoint", "max_clicks", "min_error_voxels", "box_margin_px")
        identity = {**{k: getattr(self, k) for k in keys}, "settings": asdict(self.settings)}
        # Absent at their defaults, so that older result folders still match.
        if self.edit_strategy != "barycentre":
            identity["edit_strategy"] = self.edit_strategy
        if self.autocast_bf16:
            identity["autocast_bf16"] = True
        return identity


# ---- lesions ----------------------------------------------------------------------------------------------
def _manifest_kinds(path: Path) -> dict[str, str]:
    for candidate in (path / "manifest.csv", path.parent / "manifest.csv"):
        if candidate.is_file():
            with open(candidate, newline="") as handle:
                rows = list(csv.DictReader(handle))
            if rows and {"id", "kind"} <= set(rows[0]):
                logger.info("lesion kinds from %s", candidate)
                return {row["id"]: row["kind"].strip() for row in rows if row["kind"].strip()}
    return {}


def find_evaluation_cases(data, ids: Iterable[str] | None = None, limit: int | None = None) -> list[Case]:
    """Cases of a folder or CSV (:func:`~OncoPilotLib.datasets.find_cases`) with their lesion kind: the CSV's
    ``kind``, else a ``manifest.csv`` (columns ``id``, ``kind``) in or beside the folder, else "lesion".

    ``ids`` keeps only those case ids (in the data's order); ``limit`` keeps the first N after that.
    """
    path = Path(data)
    cases = find_cases(path)
    kinds = _manifest_kinds(path) if path.is_dir() else {}
    cases = [replace(c, kind=(c.kind if not path.is_dir() else kinds.get(c.id, "")) or "lesion") for c in cases]
    if ids:
        wanted = list(dict.fromkeys(ids))
        missing = [i for i in wanted if i not in {c.id for c in cases}]
        if missing:
            raise ValueError(f"no case with id {', '.join(missing)} in {path}")
        cases = [c for c in cases if c.id in wanted]
    return cases[:limit] if limit is not None else cases


def lesion_ids(case: Case, count: int) -> list[str]:
    """Names of the ``count`` lesions (components, largest first) of a case."""
    return [case.id] if count == 1 else [f"{case.id}_c{n}" for n in range(1, count + 1)]


# ---- one lesion -------------------------------------------------------------------------------------------
@dataclass
class ModeOutcome:
    """What one mode produced: the (K, J, I) bool mask (empty when nothing was found) and how."""

    mask: np.ndarray
    status: str
    seconds: float
    prompt: str
    clicks: int = 0
    dice_trace: list = field(default_factory=list)
    edit_clicks: list = field(default_factory=list)
    stops: str = ""
    message: str = ""


def _format_stops(stops: dict) -> str:
    return " ".join(f"{'+' if d > 0 else '-'}:{reason}@{k}" for d, (reason, k) in sorted(stops.items()))


def _segment(session: SegmentationSession, prompt, text: str) -> tuple[ModeOutcome, int | None]:
    """Run one prompt; (outcome, lesion id in the session or None)."""
    shape = session.volume.shape
    start = time.perf_counter()
    try:
        lesion = session.segment(prompt)
    except NothingFoundError as error:
        return ModeOutcome(np.zeros(shape, bool), "nothing_found", time.perf_counter() - start, text,
                           message=str(error)), None
    except ValueError as error:  # e.g. a barycentre click in air: scored as a miss, never a crash
        return ModeOutcome(np.zeros(shape, bool), "prompt_error", time.perf_counter() - start, text,
                           message=str(error)), None
    return ModeOutcome(lesion.mask.copy(), "ok", time.perf_counter() - start, text,
                       stops=_format_stops(lesion.log.stops)), lesion.id


def _prompt_text(prompt) -> str:
    if hasattr(prompt, "box"):
        return f"box k={prompt.slice_index} ({', '.join(f'{v:.0f}' for v in prompt.box)})"
    return f"point ({', '.join(f'{v:.0f}' for v in prompt.ijk)})"


def _edit(session: SegmentationSession, lesion_id: int | None, start: ModeOutcome, truth: np.ndarray,
          config: EvaluationConfig) -> ModeOutcome:
    """Point-edit: up to ``max_clicks`` simulated corrections of the point result (which is left unchanged)."""
    outcome = replace(start, mask=start.mask.copy(), dice_trace=[dice(start.mask, truth)], edit_clicks=[])
    if lesion_id is None:
        return outcome
    spacing = session.geometry.spacing
    for _ in range(config.max_clicks):
        click = simulate_edit(outcome.mask, truth, spacing, config.min_error_voxels, config.edit_strategy)
        if click is None:
            break
        began = time.perf_counter()
        try:
            lesion = session.edit(lesion_id, click.ijk, click.positive)
        except (ValueError, RuntimeError) as error:
            outcome.message = f"edit {outcome.clicks + 1} failed: {error}"
            break
        outcome.seconds += time.perf_counter() - began
        outcome.clicks += 1
        outcome.edit_clicks.append(f"{'+' if click.positive else '-'}({','.join(str(v) for v in click.ijk)})")
        outcome.mask = lesion.mask.copy()
        outcome.dice_trace.append(dice(outcome.mask, truth))
        outcome.stops = _format_stops(lesion.log.stops)
    return outcome


def _relative_pct(pred: float, truth: float) -> float | None:
    return None if truth == 0 else 100.0 * abs(pred - truth) / truth


def _record(info: dict, mode: str, outcome: ModeOutcome, truth: np.ndarray, gt: LesionMeasurement,
            pred: LesionMeasurement) -> dict:
    gt_slices = int(np.count_nonzero(truth.any(axis=(1, 2))))
    pred_slices = int(np.count_nonzero(outcome.mask.any(axis=(1, 2))))
    return {**info, "mode": mode, "status": outcome.status, "dice": dice(outcome.mask, truth),
            "gt_long_axis_mm": gt.long_axis_mm, "pred_long_axis_mm": pred.long_axis_mm,
            "long_axis_abs_error_mm": abs(pred.long_axis_mm - gt.long_axis_mm),
            "long_axis_rel_error_pct": _relative_pct(pred.long_axis_mm, gt.long_axis_mm),
            "gt_short_axis_mm": gt.short_axis_mm, "pred_short_axis_mm": pred.short_axis_mm,
            "short_axis_abs_error_mm": abs(pred.short_axis_mm - gt.short_axis_mm),
            "gt_volume_ml": gt.volume_ml, "pred_volume_ml": pred.volume_ml,
            "volume_rel_error_pct": _relative_pct(pred.volume_ml, gt.volume_ml),
            "gt_sphericity": gt.sphericity, "pred_sphericity": pred.sphericity,
            "gt_slices": gt_slices, "pred_slices": pred_slices,
            "leak": pred_slices > LEAK_SLICE_FACTOR * gt_slices, "seconds": round(outcome.seconds, 3),
            "clicks": outcome.clicks, "dice_trace": " ".join(f"{d:.3f}" for d in outcome.dice_trace),
            "edit_clicks": " ".join(outcome.edit_clicks), "prompt": outcome.prompt, "stops": outcome.stops,
            "message": outcome.message}


def _clear(session: SegmentationSession) -> None:
    session.lesions.clear()


def evaluate_lesion(session: SegmentationSession, truth: np.ndarray, info: dict, modes: Iterable[str],
                    config: EvaluationConfig) -> Iterator[dict]:
    """Yield one record per mode for one ground-truth lesion ((K, J, I) bool on the session's grid).

    ``point-edit`` continues from the ``point`` result when both are asked (same click, as in the paper),
    so its time includes the point segmentation. The session holds no lesion before or after.
    """
    modes = list(modes)
    geometry, ct = session.geometry, session.volume
    gt = measure_lesion(truth, geometry, ct)

    def measure(outcome: ModeOutcome) -> LesionMeasurement:
        return measure_lesion(outcome.mask, geometry, ct)

    _clear(session)
    if "bbox" in modes:
        box = simulate_box(truth, config.box_margin_px)
        outcome, _ = _segment(session, box, _prompt_text(box))
        _clear(session)
        yield _record(info, "bbox", outcome, truth, gt, measure(outcome))
    if "point" in modes or "point-edit" in modes:
        point = simulate_point(truth, geometry.spacing)
        outcome, lesion_id = _segment(session, point, _prompt_text(point))
        if "point" in modes:
            yield _record(info, "point", outcome, truth, gt, measure(outcome))
        if "point-edit" in modes:
            edited = _edit(session, lesion_id, outcome, truth, config)
            yield _record(info, "point-edit", edited, truth, gt, measure(edited))
        _clear(session)


def evaluate_case(case: Case, config: EvaluationConfig, model,
                  done: set | frozenset = frozenset()) -> Iterator[dict]:
    """Yield the records of every lesion x mode of a case not already in ``done`` ({(lesion_id, mode)}).

    ``model``: a registry name, LoadedModel or VolumePredictor (reused across cases to keep the model loaded), or
    a function returning one, called only if something is left to do.
    """
    volume, mask = load_case(case)
    components = split_lesions(mask)
    if not components:
        logger.warning("%s: empty mask, nothing to evaluate", case.id)
        return
    session = None
    for lesion_id, truth in zip(lesion_ids(case, len(components)), components):
        todo = [m for m in config.modes if (lesion_id, m) not in done]
        if not todo:
            continue
        if session is None:
            predictor = model() if callable(model) else model
            session = SegmentationSession(volume.array, volume.geometry, model=predictor, settings=config.settings)
        info = {"lesion_id": lesion_id, "case_id": case.id, "kind": case.kind}
        yield from evaluate_lesion(session, truth, info, todo, config)


# ---- result files -----------------------------------------------------------------------------------------
def read_results(out_dir) -> list[dict]:
    """Records of ``<out>/results.jsonl`` (the last one wins for a repeated (lesion, mode))."""
    path = Path(out_dir) / RESULTS_FILE
    if not path.is_file():
        return []
    records = {}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut by an interruption
            logger.warning("%s: skipping an incomplete line", path)
            continue
        records[(record["lesion_id"], record["mode"])] = record
    return list(records.values())


def write_csv(records: list[dict], path, modes: Iterable[str] = MODES) -> None:
    """Per-lesion CSV (columns :data:`FIELDS`), sorted by lesion id then mode order."""
    order = {m: n for n, m in enumerate(modes)}
    rows = sorted(records, key=lambda r: (r["lesion_id"], order.get(r["mode"], len(order))))
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def git_commit() -> str:
    """HEAD of the repository holding this package (+ '-dirty' when tracked files differ), or 'unknown'."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "OncoPilotLib"],
                               cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    commit = head.stdout.strip() or "unknown"
    return commit + ("-dirty" if dirty.stdout.strip() else "")


def prepare_out_dir(out_dir, config: EvaluationConfig, overwrite: bool, data: str) -> set:
    """Create ``out_dir``; return the (lesion_id, mode) pairs already done there (none with ``overwrite``).

    Raises:
        ValueError: earlier results there were made with other settings (model, clicks, propagation...).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    run_file = out / RUN_FILE
    if overwrite:
        for name in (RESULTS_FILE, CSV_FILE):
            (out / name).unlink(missing_ok=True)
    elif run_file.is_file() and (out / RESULTS_FILE).is_file():
        previous = json.loads(run_file.read_text()).get("identity")
        if previous != json.loads(json.dumps(config.identity())):
            raise ValueError(f"{out} holds results of another configuration ({previous}); "
                             "use --overwrite or another --out")
    _drop_partial_line(out / RESULTS_FILE)
    run = {"identity": config.identity(), "modes": list(config.modes), "data": str(data), "seed": config.seed,
           "git_commit": git_commit(), "command": " ".join(sys.argv), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    run_file.write_text(json.dumps(run, indent=2))
    return {(r["lesion_id"], r["mode"]) for r in read_results(out)}


def _drop_partial_line(path: Path) -> None:
    """Cut a record left half-written by an interruption, so that the next record starts on its own line."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        logger.warning("%s: dropping an incomplete last record", path)
        path.write_bytes(data[: data.rfind(b"\n") + 1])


def _append(out_dir, record: dict) -> None:
    with open(Path(out_dir) / RESULTS_FILE, "a") as handle:
        handle.write(json.dumps(record) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


# ---- running ----------------------------------------------------------------------------------------------
class ProgressBar:
    """A one-line text progress bar on a stream (stderr); one line per update when it is not a terminal."""

    def __init__(self, total: int, stream=None, width: int = 24):
        self.total, self.done, self.width = max(int(total), 0), 0, width
        self.stream = stream if stream is not None else sys.stderr
        self.start = time.monotonic()

    def update(self, text: str = "", step: int = 1) -> None:
        self.done += step
        filled = int(self.width * self.done / self.total) if self.total else self.width
        elapsed = time.monotonic() - self.start
        eta = elapsed / self.done * (self.total - self.done) if self.done else 0.0
        line = (f"[{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total} "
                f"{elapsed / 60:.1f} min, eta {eta / 60:.1f} min  {text}")
        terminal = getattr(self.stream, "isatty", lambda: False)()
        self.stream.write(("\r" + line.ljust(100)) if terminal else line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if getattr(self.stream, "isatty", lambda: False)():
            self.stream.write("\n")
            self.stream.flush()


def _seed_everything(seed: int) -> None:
    np.random.seed(seed)
    try:
        import torch
    except ImportError:
        return
    torch.manual_seed(seed)


def make_predictor(config: EvaluationConfig):
    """A VolumePredictor for ``config`` (model loaded, on-disk embedding store if configured)."""
    from .models import load_model
    from .predictor import VolumePredictor

    model = load_model(config.model, config.checkpoint, device=config.device)
    return VolumePredictor(model, embedding_dir=config.embedding_dir, autocast_bf16=config.autocast_bf16)


_WORKER: dict = {}


def _init_worker(config: EvaluationConfig, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    _seed_everything(config.seed)
    _WORKER["config"], _WORKER["predictor"] = config, make_predictor(config)


def _worker_case(case: Case, done: set) -> list[dict]:
    return list(evaluate_case(case, _WORKER["config"], _WORKER["predictor"], done))


def _expected(cases: list[Case], config: EvaluationConfig, done: set) -> int:
    """Records still to compute, assuming one lesion per case (multi-lesion cases extend the bar)."""
    return sum(1 for c in cases for m in config.modes if (c.id, m) not in done)


def run_evaluation(cases: list[Case], config: EvaluationConfig, out_dir, jobs: int = 1, overwrite: bool = False,
                   data: str = "", progress: Callable[[int], ProgressBar] | None = ProgressBar) -> list[dict]:
    """Evaluate ``cases`` into ``out_dir`` (resuming unless ``overwrite``); returns all records there and
    writes ``lesions.csv``. ``jobs`` > 1 evaluates cases in that many processes, each with its own model."""
    done = prepare_out_dir(out_dir, config, overwrite, data)
    bar = progress(_expected(cases, config, done)) if progress else None

    def keep(record):
        _append(out_dir, record)
        if bar is not None:
            bar.update(f"{record['lesion_id']} {record['mode']} dice {record['dice']:.3f}")

    if jobs <= 1:
        _seed_everything(config.seed)
        predictor = functools.cache(lambda: make_predictor(config))  # loaded only if something is left to do
        for case in cases:
            for record in evaluate_case(case, config, predictor, done):
                keep(record)
    else:
        _run_parallel(cases, config, done, jobs, keep)
    if bar is not None:
        bar.close()
    records = read_results(out_dir)
    write_csv(records, Path(out_dir) / CSV_FILE, config.modes)
    return records


def _run_parallel(cases: list[Case], config: EvaluationConfig, done: set, jobs: int, keep) -> None:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    threads = max(1, (os.cpu_count() or 1) // jobs)
    # spawn, not fork: a forked torch with live OpenMP threads can deadlock.
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
                             initargs=(config, threads)) as pool:
        futures = {pool.submit(_worker_case, case, done): case for case in cases}
        for future in as_completed(futures):
            for record in future.result():
                keep(record)
