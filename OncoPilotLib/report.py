"""Evaluation report: summary statistics, Markdown and PNG figures, all computed from ``lesions.csv``.

Every number of ``summary.json`` and ``report.md`` is derived from the per-lesion CSV (never from in-memory
results), so the report always agrees with the CSV. Breakdowns follow the ONCOPILOT paper (Table 2 / Fig. 4):
Dice by lesion kind, by ground-truth sphericity (< 0.6 vs >= 0.6), long axis (< 15 mm vs >= 15 mm) and volume
(< 1 mL vs >= 1 mL). matplotlib is imported only when figures are drawn (Agg backend, no display).
"""

from __future__ import annotations

import csv
import json
import logging
import statistics
from collections import Counter
from pathlib import Path
from typing import Iterable

logger = logging.getLogger(__name__)

_INTEGER = ("gt_slices", "pred_slices", "clicks")
_TEXT = ("lesion_id", "case_id", "kind", "mode", "status", "dice_trace", "edit_clicks", "prompt", "stops",
         "message")
# (name, GT column, threshold, label below, label at/above), as in the paper's stratification.
STRATA = (("sphericity", "gt_sphericity", 0.6, "< 0.6", ">= 0.6"),
          ("long axis", "gt_long_axis_mm", 15.0, "< 15 mm", ">= 15 mm"),
          ("volume", "gt_volume_ml", 1.0, "< 1 mL", ">= 1 mL"))
# Paper (ONCOPILOT, Raidium 2024) values per mode: mean Dice, long-axis median abs error mm, median rel error %.
PAPER = {"point": (0.70, 1.6, 10.8), "bbox": (0.70, 1.5, 10.4), "point-edit": (0.78, 1.1, 7.4)}
FIGURES = ("dice_per_mode.png", "long_axis_error.png", "bland_altman_long_axis.png", "dice_by_group.png")


# ---- reading ----------------------------------------------------------------------------------------------
def _parse(key: str, text: str):
    if key in _TEXT:
        return text
    if text == "":
        return None
    if key == "leak":
        return text == "True"
    return int(text) if key in _INTEGER else float(text)


def read_rows(csv_path) -> list[dict]:
    """Rows of an evaluation ``lesions.csv`` with numbers parsed (empty cells -> None, ``leak`` -> bool)."""
    with open(csv_path, newline="") as handle:
        return [{k: _parse(k, v) for k, v in row.items()} for row in csv.DictReader(handle)]


# ---- statistics -------------------------------------------------------------------------------------------
def _values(rows: Iterable[dict], key: str) -> list[float]:
    return [r[key] for r in rows if r.get(key) is not None]


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def mode_stats(rows: list[dict]) -> dict:
    """Statistics of one mode's rows: Dice (mean, median, SD), long/short-axis and volume errors (mm, %)."""
    dices = _values(rows, "dice")
    return {"n": len(rows), "n_found": sum(r["status"] == "ok" for r in rows),
            "dice_mean": _mean(dices), "dice_median": _median(dices),
            "dice_sd": statistics.stdev(dices) if len(dices) > 1 else None,
            "la_abs_error_median_mm": _median(_values(rows, "long_axis_abs_error_mm")),
            "la_abs_error_mean_mm": _mean(_values(rows, "long_axis_abs_error_mm")),
            "la_rel_error_median_pct": _median(_values(rows, "long_axis_rel_error_pct")),
            "sa_abs_error_median_mm": _median(_values(rows, "short_axis_abs_error_mm")),
            "volume_rel_error_median_pct": _median(_values(rows, "volume_rel_error_pct")),
            "seconds_median": _median(_values(rows, "seconds")),
            "clicks_mean": _mean(_values(rows, "clicks")),
            "leaks": sum(bool(r["leak"]) for r in rows)}


def _group_stats(rows: list[dict]) -> dict:
    return {"n": len(rows), "dice_mean": _mean(_values(rows, "dice")), "dice_median": _median(_values(rows, "dice"))}


def breakdowns(rows: list[dict], modes: list[str]) -> dict:
    """{breakdown: {group: {mode: {n, dice_mean, dice_median}}}} by kind and by the :data:`STRATA` of the GT."""
    result = {"kind": {}}
    for kind in sorted({r["kind"] for r in rows}):
        result["kind"][kind] = {m: _group_stats([r for r in rows if r["kind"] == kind and r["mode"] == m])
                                for m in modes}
    for name, key, threshold, below, above in STRATA:
        groups = {below: lambda v, t=threshold: v is not None and v < t,
                  above: lambda v, t=threshold: v is not None and v >= t}
        result[name] = {label: {m: _group_stats([r for r in rows if r["mode"] == m and test(r[key])])
                                for m in modes} for label, test in groups.items()}
    return result


def summarize(rows: list[dict], modes: Iterable[str]) -> dict:
    """Summary of evaluation rows: per-mode statistics, breakdowns, leaks, misses and stop reasons."""
    modes = [m for m in modes if any(r["mode"] == m for r in rows)]
    by_mode = {m: [r for r in rows if r["mode"] == m] for m in modes}
    return {"n_lesions": len({r["lesion_id"] for r in rows}),
            "modes": {m: mode_stats(by_mode[m]) for m in modes},
            "breakdowns": breakdowns(rows, modes),
            "leaks": [{k: r[k] for k in ("lesion_id", "mode", "gt_slices", "pred_slices")} for r in rows if r["leak"]],
            "not_found": [{k: r[k] for k in ("lesion_id", "mode", "status", "message")}
                          for r in rows if r["status"] != "ok"],
            "stop_reasons": {m: _stop_counts(by_mode[m]) for m in modes},
            "dice_by_click": dice_by_click(by_mode.get("point-edit", []))}


def dice_by_click(rows: list[dict]) -> list[dict]:
    """Mean and median Dice after 0, 1, ... edit clicks over point-edit rows (``dice_trace``); a lesion that
    stopped clicking early keeps its last Dice, a lesion not found counts as 0 throughout."""
    traces = [[float(v) for v in (r["dice_trace"] or "").split()] or [r["dice"]] for r in rows]
    if not traces:
        return []
    longest = max(len(t) for t in traces)
    table = []
    for clicks in range(longest):
        values = [t[min(clicks, len(t) - 1)] for t in traces]
        table.append({"clicks": clicks, "dice_mean": _mean(values), "dice_median": _median(values),
                      "n_clicked": sum(len(t) > clicks for t in traces)})
    return table


def _stop_counts(rows: list[dict]) -> dict[str, int]:
    """How often each propagation stop rule ended a direction ("+:hu_drift@25 -:empty@3" -> hu_drift, empty)."""
    return dict(Counter(stop.split("@")[0].split(":")[-1] for r in rows for stop in (r["stops"] or "").split()))


# ---- Markdown ---------------------------------------------------------------------------------------------
def _fmt(value, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _table(header: list[str], lines: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return out + ["| " + " | ".join(line) + " |" for line in lines]


def _main_table(summary: dict) -> list[str]:
    header = ["mode", "n", "found", "Dice mean", "Dice median", "Dice SD", "LA abs err median (mm)",
              "LA rel err median (%)", "SA abs err median (mm)", "vol rel err median (%)", "clicks mean",
              "time median (s)", "leaks", "paper Dice / LA mm / LA %"]
    lines = []
    for mode, s in summary["modes"].items():
        paper = PAPER.get(mode)
        lines.append([mode, str(s["n"]), str(s["n_found"]), _fmt(s["dice_mean"], 3), _fmt(s["dice_median"], 3),
                      _fmt(s["dice_sd"], 3), _fmt(s["la_abs_error_median_mm"], 1),
                      _fmt(s["la_rel_error_median_pct"], 1), _fmt(s["sa_abs_error_median_mm"], 1),
                      _fmt(s["volume_rel_error_median_pct"], 1), _fmt(s["clicks_mean"], 2),
                      _fmt(s["seconds_median"], 1), str(s["leaks"]),
                      "-" if paper is None else f"{paper[0]:.2f} / {paper[1]:.1f} / {paper[2]:.1f}"])
    return _table(header, lines)


def _breakdown_tables(summary: dict) -> list[str]:
    modes = list(summary["modes"])
    out = []
    for name, groups in summary["breakdowns"].items():
        header = [name] + [f"{m} (n, mean Dice)" for m in modes]
        lines = [[group] + [f"{g[m]['n']}, {_fmt(g[m]['dice_mean'], 3)}" for m in modes]
                 for group, g in groups.items()]
        out += [f"### Dice by {name}", ""] + _table(header, lines) + [""]
    return out


def _lesion_table(rows: list[dict], modes: list[str]) -> list[str]:
    by_lesion: dict[str, dict] = {}
    for r in rows:
        by_lesion.setdefault(r["lesion_id"], {})[r["mode"]] = r
    header = ["lesion", "kind", "GT LA (mm)", "GT vol (mL)", "GT slices"] + [f"{m} Dice / LA (mm)" for m in modes]
    lines = []
    for lesion_id in sorted(by_lesion):
        first = next(iter(by_lesion[lesion_id].values()))
        cells = [lesion_id, first["kind"], _fmt(first["gt_long_axis_mm"], 1), _fmt(first["gt_volume_ml"], 2),
                 str(first["gt_slices"])]
        for m in modes:
            r = by_lesion[lesion_id].get(m)
            cells.append("-" if r is None else f"{r['dice']:.3f} / {r['pred_long_axis_mm']:.1f}")
        lines.append(cells)
    return _table(header, lines)


def _issues(summary: dict) -> list[str]:
    out = ["## Leak check", "",
           "A prediction spanning more than twice the ground truth's slice count has leaked along z."]
    leaks = summary["leaks"]
    out += [""] + (_table(["lesion", "mode", "GT slices", "predicted slices"],
                          [[x["lesion_id"], x["mode"], str(x["gt_slices"]), str(x["pred_slices"])] for x in leaks])
                   if leaks else ["No lesion leaked."])
    out += ["", "## Lesions not found", ""]
    missing = summary["not_found"]
    out += (_table(["lesion", "mode", "status", "message"],
                   [[x["lesion_id"], x["mode"], x["status"], x["message"]] for x in missing])
            if missing else ["Every prompt gave a lesion."])
    if summary["dice_by_click"]:
        out += ["", "## Point-edit: Dice after each click", "",
                "A lesion whose errors became too small to click keeps its last Dice."]
        out += [""] + _table(["clicks", "lesions with >= this many clicks", "Dice mean", "Dice median"],
                             [[str(x["clicks"]), str(x["n_clicked"]), _fmt(x["dice_mean"], 3),
                               _fmt(x["dice_median"], 3)] for x in summary["dice_by_click"]])
    reasons = summary["stop_reasons"]
    out += ["", "## Propagation stop reasons (both directions)", ""]
    names = sorted({name for counts in reasons.values() for name in counts})
    out += _table(["mode"] + names, [[m] + [str(reasons[m].get(n, 0)) for n in names] for m in reasons])
    return out


def markdown(summary: dict, rows: list[dict], figures: list[str], title: str = "OncoPilot evaluation") -> str:
    """The report: main table vs the paper, breakdowns, leak check, misses, stop reasons, figures, per lesion."""
    modes = list(summary["modes"])
    lines = [f"# {title}", "", f"{summary['n_lesions']} lesions. Dice is 3D; LA / SA = RECIST long / short axis "
             "(axial, mm); errors are |prediction - ground truth|; a lesion not found counts with Dice 0 and "
             "predicted sizes 0.", "", "## Results per mode", ""]
    lines += _main_table(summary) + ["", "## Breakdowns (ground-truth strata)", ""] + _breakdown_tables(summary)
    lines += _issues(summary) + ["", "## Figures", ""] + [f"![{Path(f).stem}]({f})" for f in figures]
    lines += ["", "## Per lesion", ""] + _lesion_table(rows, modes) + [""]
    return "\n".join(lines)


# ---- figures ----------------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _by_mode(rows: list[dict], modes: list[str], key: str) -> list[list[float]]:
    return [_values([r for r in rows if r["mode"] == m], key) for m in modes]


def _box_with_points(axis, data: list[list[float]], modes: list[str], ylabel: str) -> None:
    import numpy as np

    axis.boxplot(data, showfliers=False)
    axis.set_xticks(range(1, len(modes) + 1), modes)
    jitter = np.random.default_rng(0)  # fixed jitter: figures are reproducible
    for n, values in enumerate(data, start=1):
        axis.scatter(n + jitter.uniform(-0.15, 0.15, len(values)), values, s=10, alpha=0.6)
    axis.set_ylabel(ylabel)


def _save(plt, figure, path: Path) -> None:
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_dice(rows: list[dict], modes: list[str], path: Path) -> None:
    """Dice distribution per mode (box plot with every lesion as a dot)."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(5, 4))
    _box_with_points(axis, _by_mode(rows, modes, "dice"), modes, "3D Dice")
    axis.set_ylim(-0.02, 1.02)
    axis.set_title("Dice per prompt mode")
    _save(plt, figure, path)


def plot_long_axis_error(rows: list[dict], modes: list[str], path: Path) -> None:
    """Long-axis absolute (mm) and relative (%) error box plots per mode."""
    plt = _pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(9, 4))
    _box_with_points(axes[0], _by_mode(rows, modes, "long_axis_abs_error_mm"), modes, "|LA pred - LA GT| (mm)")
    _box_with_points(axes[1], _by_mode(rows, modes, "long_axis_rel_error_pct"), modes, "relative LA error (%)")
    figure.suptitle("RECIST long-axis error")
    _save(plt, figure, path)


def plot_bland_altman(rows: list[dict], modes: list[str], path: Path) -> None:
    """Bland-Altman plot of the long axis per mode: difference (pred - GT) against the mean, bias +- 1.96 SD."""
    import numpy as np

    plt = _pyplot()
    figure, axes = plt.subplots(1, len(modes), figsize=(4.5 * len(modes), 4), squeeze=False)
    for axis, mode in zip(axes[0], modes):
        pairs = np.array([(r["pred_long_axis_mm"], r["gt_long_axis_mm"]) for r in rows if r["mode"] == mode])
        mean, difference = pairs.mean(axis=1), pairs[:, 0] - pairs[:, 1]
        bias, sd = difference.mean(), difference.std(ddof=1) if len(difference) > 1 else 0.0
        axis.scatter(mean, difference, s=12)
        for value, style in ((bias, "-"), (bias + 1.96 * sd, "--"), (bias - 1.96 * sd, "--")):
            axis.axhline(value, linestyle=style, color="grey")
        axis.set_title(f"{mode}: bias {bias:.1f} mm, LoA +-{1.96 * sd:.1f} mm")
        axis.set_xlabel("mean of predicted and GT long axis (mm)")
        axis.set_ylabel("predicted - GT long axis (mm)")
    _save(plt, figure, path)


def plot_dice_by_group(summary: dict, path: Path) -> None:
    """Mean Dice per breakdown group (kind, sphericity, long axis, volume) and mode, as bars."""
    import numpy as np

    plt = _pyplot()
    modes, groups = list(summary["modes"]), summary["breakdowns"]
    figure, axes = plt.subplots(1, len(groups), figsize=(4 * len(groups), 4), squeeze=False)
    for axis, (name, table) in zip(axes[0], groups.items()):
        labels = list(table)
        for n, mode in enumerate(modes):
            values = [table[g][mode]["dice_mean"] or 0.0 for g in labels]
            axis.bar(np.arange(len(labels)) + n * 0.8 / len(modes), values, 0.8 / len(modes), label=mode)
        axis.set_xticks(np.arange(len(labels)) + 0.4 - 0.4 / len(modes),
                        [f"{g[:24]}\n(n={table[g][modes[0]]['n']})" for g in labels], fontsize=7)
        axis.set_ylim(0, 1)
        axis.set_title(f"mean Dice by {name}")
    axes[0][0].legend(fontsize=7)
    _save(plt, figure, path)


def draw_figures(rows: list[dict], summary: dict, out_dir: Path) -> list[str]:
    """Write the PNG figures into ``out_dir``; returns their file names."""
    modes = list(summary["modes"])
    plot_dice(rows, modes, out_dir / FIGURES[0])
    plot_long_axis_error(rows, modes, out_dir / FIGURES[1])
    plot_bland_altman(rows, modes, out_dir / FIGURES[2])
    plot_dice_by_group(summary, out_dir / FIGURES[3])
    return list(FIGURES)


def write_report(out_dir, modes: Iterable[str], figures: bool = True) -> dict:
    """Read ``<out>/lesions.csv``; write ``summary.json``, ``report.md`` and (``figures``) the PNGs. Returns the
    summary dict."""
    out = Path(out_dir)
    rows = read_rows(out / "lesions.csv")
    summary = summarize(rows, modes)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    names = draw_figures(rows, summary, out) if figures and rows else []
    (out / "report.md").write_text(markdown(summary, rows, names))
    logger.info("report written to %s", out / "report.md")
    return summary
