"""Bench results: ``results.json`` (everything), ``results.md`` (Table-1 shape), PNG plots.

Aggregates are in percent: for each seed the mean over its edited records, then mean and
standard deviation over seeds (sample standard deviation, ``n - 1``; 0 with one seed).
Perplexity (drift) and fluency are absolute numbers, aggregated the same way.
"""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from metake.checkpoint import CheckpointError, peek_checkpoint
from metake.evaluation.contention import contention_sentence, span_other_cores
from metake.evaluation.datasets import EvalDataset
from metake.evaluation.evaluate import (
    GENERATION_METRICS,
    MAIN_METRICS,
    mean_metrics,
    metric_names,
)
from metake.files import try_lock

LABELS = {
    "efficacy": "Eff.", "generalization": "Gen.", "specificity": "Spe.",
    "efficacy_exact": "Eff. (whole answer)", "efficacy_gen": "Eff. (generation)",
    "generalization_gen": "Gen. (generation)", "paraphrase_gen": "Para. (generation)",
    "efficacy_score": "Efficacy Score", "paraphrase_score": "Paraphrase Score",
    "neighborhood_score": "Neighborhood Score", "efficacy_magnitude": "Eff. magnitude",
    "paraphrase_magnitude": "Para. magnitude", "neighborhood_magnitude": "Neigh. magnitude",
    "fluency": "Fluency", "perplexity": "Perplexity", "seconds_per_edit": "s / edit",
    "known_facts_kept": "Known facts kept",
}  # fmt: skip


def mean_std(values: Sequence[float]) -> dict[str, float]:
    """``{"mean", "std", "n"}``; the sample standard deviation (0 for a single value)."""
    values = list(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": std, "n": len(values)}


def _seed_figures(scores: Mapping[str, Any], names: Sequence[str]) -> dict[str, float]:
    """One seed's figures: metric means (percent), perplexity, fluency, seconds per edit."""
    figures = mean_metrics(scores["per_record"], names)
    for key in ("known_facts_kept", "perplexity", "fluency", "seconds_per_edit"):
        if scores.get(key) is not None:
            figures[key] = scores[key]
    return figures


def aggregate(seeds: Mapping[int, Mapping[str, Any]], kind: str) -> dict[str, Any]:
    """``{"pre_edit": {metric: mean_std}, "methods": {method: {metric: mean_std}}}``."""
    names = metric_names(kind)
    per_seed_pre = [_seed_figures(run["pre_edit"], names) for run in seeds.values()]
    methods = list(next(iter(seeds.values()))["methods"])
    out: dict[str, Any] = {"pre_edit": _combine(per_seed_pre), "methods": {}}
    for method in methods:
        figures = [_seed_figures(run["methods"][method], names) for run in seeds.values()]
        out["methods"][method] = _combine(figures)
    return out


def _combine(per_seed: Sequence[Mapping[str, float]]) -> dict[str, dict[str, float]]:
    keys = [k for k in per_seed[0] if all(k in s for s in per_seed)]
    return {k: mean_std([s[k] for s in per_seed]) for k in keys}


def _cell(stat: Mapping[str, float] | None, digits: int = 2) -> str:
    if stat is None:
        return "–"
    if stat["n"] > 1:
        return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"
    return f"{stat['mean']:.{digits}f}"


def markdown_table(agg: Mapping[str, Any], kind: str) -> str:
    """Method rows (unedited model first), the Table 1 columns, then the other figures."""
    columns = [*MAIN_METRICS[kind], "fluency", "perplexity", "seconds_per_edit"]
    extra = [] if kind == "counterfact" else ["efficacy_exact"]
    rows_have = [agg["pre_edit"], *agg["methods"].values()]
    optional = [*GENERATION_METRICS[kind], "known_facts_kept"]
    extra += [n for n in optional if any(n in figures for figures in rows_have)]
    columns[3:3] = extra
    head = "| Method | " + " | ".join(LABELS[c] for c in columns) + " |"
    lines = [head, "|---|" + "---:|" * len(columns)]
    rows = [("unedited", agg["pre_edit"])] + list(agg["methods"].items())
    for name, figures in rows:
        cells = [_cell(figures.get(c), 1 if c == "seconds_per_edit" else 2) for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(
    out: Path,
    config,
    dataset: EvalDataset,
    seeds: Mapping[int, Mapping[str, Any]],
    versions: Mapping[str, str],
) -> dict[str, Any]:
    """Write ``results.json``, ``results.md`` and the plots; return the results dict."""
    agg = aggregate(seeds, config.dataset)
    results = {
        "config": config.to_dict(),
        "versions": dict(versions),
        "model": config.model,
        "dataset": {
            "kind": dataset.kind,
            "path": str(dataset.path),
            "valid_records": len(dataset.records),
            "skipped_records": len(dataset.skipped),
            "zsre_target": dataset.zsre_target if dataset.kind == "zsre" else None,
        },
        "seeds": config.seeds,
        "aggregate": agg["methods"],
        "pre_edit": agg["pre_edit"],
        "runs": {str(seed): run for seed, run in seeds.items()},
    }
    (out / "results.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    (out / "results.md").write_text(_markdown(results, agg, config), encoding="utf-8")
    write_plots(out, seeds, agg, config.dataset)
    return results


def _markdown(results: Mapping[str, Any], agg: Mapping[str, Any], config) -> str:
    kind = config.dataset
    target = f", edit target `{results['dataset']['zsre_target']}`" if kind == "zsre" else ""
    versions = results["versions"]
    seeds = ", ".join(map(str, config.seeds))
    lines = [
        f"# {kind} sequential editing on {config.model}",
        "",
        "```",
        config.command or "(run from the Python API)",
        "```",
        "",
        f"{config.edits} records per seed (seeds {seeds}) from `{results['dataset']['path']}`"
        f"{target}, edited in batches of {config.batch_size}; every edited record scored after "
        "the last batch. Metrics in percent, mean ± sample std over seeds; fluency is the "
        "n-gram entropy of greedy continuations, perplexity is on held-out Wikipedia intros "
        "(drift of general ability); s / edit is Stage I + II time." + _probe_sentence(config),
        "",
        markdown_table(agg, kind),
        "",
        *_curve_section(results, config),
        _timing_sentence(results),
        "",
        f"metake {versions['metake']}, torch {versions['torch']}, transformers "
        f"{versions['transformers']}, Python {versions['python']} ({versions['machine']}), "
        f"device {config.device}." + _versions_of_parts(results),
        "",
    ]
    return "\n".join(lines)


def _curve_section(results: Mapping[str, Any], config) -> list[str]:
    """results.md's lines of the curves (mean over seeds); none when no curve was recorded."""
    runs = list(results["runs"].values())
    methods = list(results["aggregate"])
    means = _common_prefix_means({m: [run["methods"][m]["curve"] for run in runs]
                                  for m in methods})  # fmt: skip
    tables = curve_tables(means)
    if not tables:
        return []
    return [f"After each batch (the curves, mean over seeds): a fixed sample of at most "
            f"{config.curve_records} of the records edited so far scored (`scored`), beside the "
            "known facts and perplexity at that point.", "", tables, ""]  # fmt: skip


def _versions_of_parts(results: Mapping[str, Any]) -> str:
    """Which package versions the parts ran with, where they differ from the report's own (a run
    resumed after an upgrade) or were not recorded (parts of older code); "" if all agree."""
    writer = results["versions"]
    parts = [part.get("versions") or [{}] for run in results["runs"].values()
             for part in run["methods"].values()]  # fmt: skip
    if all(ran == [writer] for ran in parts):
        return ""
    counts: dict[str, dict[str, int]] = {key: {} for key in writer}
    for ran in parts:
        for key in writer:
            for value in {v[key] for v in ran if key in v}:
                counts[key][value] = counts[key].get(value, 0) + 1
    varied = [
        f"{key} " + ", ".join(f"{value} ({n})" for value, n in sorted(counts[key].items()))
        for key in writer
        if set(counts[key]) - {writer[key]}
    ]
    counted = f"{len(parts)} part" + ("s" if len(parts) != 1 else "")
    clauses = []
    if varied:
        clauses.append(f"its {counted} ran with " + "; ".join(varied) + " (number of parts; a "
                       "part resumed across versions counts under each)")  # fmt: skip
    unrecorded = sum(1 for ran in parts if {} in ran)
    if unrecorded:
        clauses.append(f"{unrecorded} of its {counted} ran, in full or in part, on code that did "
                       "not record the versions")  # fmt: skip
    return " That is what wrote this report; " + ", and ".join(clauses) + "."


def _timing_sentence(results: Mapping[str, Any]) -> str:
    """How busy the machine was while the s / edit figures were measured, and on how many
    threads (from every part's batches)."""
    parts = [m for run in results["runs"].values() for m in run["methods"].values()]
    others = [span_other_cores(part["batches"]) for part in parts]
    threads = sorted({b["threads"] for part in parts for b in part["batches"] if "threads" in b})
    cores = next((b["cpu"]["cores"] for part in parts for b in part["batches"] if "cpu" in b),
                 os.cpu_count() or 1)  # fmt: skip
    sentence = "Timing: " + contention_sentence(others, cores)
    if threads:
        sentence += f" torch threads: {', '.join(map(str, threads))}."
    return sentence


def _probe_sentence(config) -> str:
    """What the known-facts column measures, when the run had a probe."""
    if getattr(config, "probe_data", None) is None:
        return ""
    return (f" Known facts kept: of up to {config.probe_facts} CounterFact facts (records "
            f"{config.probe_records} of `{config.probe_data}`, never edited) that the unedited "
            f"model answers, every answer token the argmax by at least {config.probe_margin} "
            "nats, the share still answered (teacher-forced).")  # fmt: skip


def write_plots(
    out: Path,
    seeds: Mapping[int, Mapping[str, Any]],
    agg: Mapping[str, Any],
    kind: str,
    prefix: str = "",
    unfinished: Mapping[str, Sequence[Sequence[Mapping[str, float]]]] | None = None,
) -> list[Path]:
    """``metrics_vs_edits.png`` (if the curve was recorded) and ``final_metrics.png``, each name
    after ``prefix``; ``unfinished`` (method -> its curve so far on each seed) adds dashed curves
    to the first plot only, and ``final_metrics.png`` is left out when no method finished."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in MAIN_METRICS[kind] if n in agg["pre_edit"]]  # those the data has
    names += [n for n in GENERATION_METRICS[kind] if n in agg["pre_edit"]]
    paths = []
    methods = list(agg["methods"])
    runs = list(seeds.values())
    partial = _common_prefix_means(unfinished or {})
    points = [p for run in runs for m in methods for p in run["methods"][m]["curve"]]
    points += [p for curve in partial.values() for p in curve]
    if all(run["methods"][m]["curve"] for run in runs for m in methods) and (methods or partial):
        wanted = [*names, "known_facts_kept", "perplexity"]
        plotted = [n for n in wanted if all(n in p for p in points)]  # older parts lack some
        columns = min(4, len(plotted))  # rows of at most four panels
        rows = -(-len(plotted) // columns)
        fig, grid = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.4 * rows), squeeze=False)
        axes = list(grid.flat)
        for ax in axes[len(plotted) :]:
            ax.set_visible(False)
        for ax, name in zip(axes, plotted, strict=False):
            for method in methods:
                curves = [run["methods"][method]["curve"] for run in runs]
                xs = [p["edits"] for p in curves[0]]
                ys = [statistics.fmean(c[i][name] for c in curves) for i in range(len(xs))]
                ax.plot(xs, ys, marker="o", label=method)
            for method, curve in partial.items():
                xs, ys = [p["edits"] for p in curve], [p[name] for p in curve]
                ax.plot(xs, ys, marker="o", linestyle="--", label=f"{method} (unfinished)")
            pre = agg["pre_edit"].get(name)
            if pre:
                ax.axhline(pre["mean"], color="grey", linestyle="--", label="unedited")
            ax.set_xlabel("edits so far")
            ax.set_title(LABELS[name])
            if name != "perplexity":  # a percentage; perplexity keeps its own scale
                ax.set_ylim(0, 100)
        for ax in grid[:, 0]:
            ax.set_ylabel("% (records edited so far)")
        axes[len(plotted) - 1].legend(fontsize=8)
        fig.tight_layout()
        paths.append(out / f"{prefix}metrics_vs_edits.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    if methods:
        paths.append(_final_metrics_plot(out / f"{prefix}final_metrics.png", agg, names))
    return paths


def _common_prefix_means(
    curves_by_method: Mapping[str, Sequence[Sequence[Mapping[str, float]]]],
) -> dict[str, list[dict[str, float]]]:
    """Per method, the mean over seeds of the curve points every seed has reached so far."""
    means = {}
    for method, curves in curves_by_method.items():
        length = min((len(c) for c in curves), default=0)
        if length == 0:
            continue
        keys = [k for k in curves[0][0] if all(k in c[i] for c in curves for i in range(length))]
        means[method] = [{k: statistics.fmean(c[i][k] for c in curves) for k in keys}
                         for i in range(length)]  # fmt: skip
    return means


def _final_metrics_plot(path: Path, agg: Mapping[str, Any], names: Sequence[str]) -> Path:
    """Bars of each metric after the last batch, one group per metric; returns ``path``."""
    import matplotlib.pyplot as plt

    methods = list(agg["methods"])
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(names) * (len(methods) + 1) / 3, 3.6))
    rows = [("unedited", agg["pre_edit"])] + list(agg["methods"].items())
    width = 0.8 / len(rows)
    for i, (label, figures) in enumerate(rows):
        xs = [j + i * width for j in range(len(names))]
        means = [figures[n]["mean"] if n in figures else 0 for n in names]
        stds = [figures[n]["std"] if n in figures else 0 for n in names]
        ax.bar(xs, means, width, yerr=stds, capsize=3, label=label)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(names))], [LABELS[n] for n in names])
    ax.set_ylabel("% after the last batch")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


@dataclass(frozen=True)
class PendingPart:
    """An unfinished (seed, method) part: whether it has a checkpoint, its curve up to that
    checkpoint (``[]``: none readable) and whether a process runs it now."""

    checkpointed: bool
    curve: list[dict[str, float]]
    running: bool


@dataclass
class SeedProgress:
    """What one started seed of a run folder holds: its unedited scores, the finished methods'
    part files and the unfinished methods' state."""

    pre_edit: dict[str, Any]
    finished: dict[str, dict[str, Any]] = field(default_factory=dict)
    pending: dict[str, PendingPart] = field(default_factory=dict)


def read_progress(out: Path) -> tuple[dict[str, Any], dict[int, SeedProgress | None]]:
    """A run folder's ``config.json`` and, per seed, what it holds so far (``None``: not
    started), each part file and checkpoint header read once. Works while a run is going."""
    config = _read_json(out / "config.json")
    seeds: dict[int, SeedProgress | None] = {}
    for seed in config["seeds"]:
        folder = out / "parts" / f"seed{seed}"
        pre = folder / "pre_edit.json"
        if not pre.is_file():
            seeds[seed] = None
            continue
        progress = SeedProgress(pre_edit=_read_json(pre))
        for method in config["methods"]:
            part = folder / f"{method}.json"
            if part.is_file():
                progress.finished[method] = _read_json(part)
                continue
            states = [folder / f"{method}.state.{ext}" for ext in ("safetensors", "pt")]
            progress.pending[method] = PendingPart(
                checkpointed=any(state.is_file() for state in states),
                curve=_curve_so_far(folder, method),
                running=_held(folder / f"{method}.lock"),
            )
        seeds[seed] = progress
    return config, seeds


def progress_table(out: Path) -> str:
    """What a run folder holds so far, seed by seed: finished methods' final figures, pending
    methods named, then the curves (those of unfinished methods up to their last checkpoint).

    Reads only part files and checkpoint headers, so it works while a run is going or after it
    stopped.
    """
    return _progress_markdown(*read_progress(out))


def _progress_markdown(config: Mapping[str, Any], seeds: Mapping[int, SeedProgress | None]) -> str:
    """:func:`progress_table` from what :func:`read_progress` read."""
    kind = config["dataset"]
    names = metric_names(kind)
    total = -(-config["edits"] // config["batch_size"])  # batches per method and seed
    sections = []
    for seed, progress in seeds.items():
        if progress is None:
            sections.append(f"seed {seed}: not started")
            continue
        rows = {"pre_edit": _one_seed_figures(progress.pre_edit, names), "methods": {}}
        pending, curves = [], {}
        for method in config["methods"]:
            if method in progress.finished:
                scores = progress.finished[method]
                rows["methods"][method] = _one_seed_figures(scores, names)
                curves[method] = scores.get("curve") or []
                continue
            part = progress.pending[method]
            status = "checkpointed" if part.checkpointed else "not started"
            if part.curve:
                curves[method] = part.curve
                status += f", {len(part.curve)} of {total} batches"
            if part.running:
                status = "running" + (f", {status}" if part.checkpointed else "")
            pending.append(f"{method} ({status})")
        table = markdown_table(rows, kind)
        todo = f"\npending: {', '.join(pending)}" if pending else ""
        after_each = curve_tables(curves)
        after_each = (f"\n\nAfter each batch (the curves; `scored`: the edited records of the "
                      "curve's fixed sample scored then; unfinished methods up to their last "
                      f"checkpoint):\n\n{after_each}" if after_each else "")  # fmt: skip
        sections.append(f"seed {seed}:\n{table}{todo}{after_each}")
    return "\n\n".join(sections)


def curve_tables(curves: Mapping[str, Sequence[Mapping[str, float]]]) -> str:
    """Markdown, one table per method: its curve, the figures after each batch (a row per
    point; columns the metrics every point has). Empty when no method has a curve."""
    sections = []
    for method, curve in curves.items():
        if not curve:
            continue
        columns = [c for c in LABELS if all(c in p for p in curve)]
        lines = [f"{method}:", "", "| edits | scored | "
                 + " | ".join(LABELS[c] for c in columns) + " |",
                 "|---:|---:|" + "---:|" * len(columns)]  # fmt: skip
        for point in curve:
            cells = [f"{point[c]:.2f}" for c in columns]
            scored = point.get("scored")
            scored = "–" if scored is None else f"{scored:g}"
            lines.append(f"| {point['edits']:g} | {scored} | " + " | ".join(cells) + " |")
        sections.append("\n".join(lines))
    return "\n\n".join(sections)


def _curve_so_far(folder: Path, method: str) -> list[dict[str, float]]:
    """An unfinished part's curve up to its last checkpoint (``[]`` without a readable one)."""
    state_path = folder / f"{method}.state.safetensors"
    if not state_path.is_file():
        return []
    try:
        return list(peek_checkpoint(state_path).get("curve") or [])
    except CheckpointError:  # being replaced right now, or damaged: the run itself will say
        return []


def write_progress(out: Path) -> list[Path]:
    """Write ``progress.md`` (:func:`progress_table`) into a run folder and, for the methods
    finished on every started seed, ``progress_metrics_vs_edits.png`` and
    ``progress_final_metrics.png`` (means over those seeds); methods checkpointed on every started
    seed but unfinished join the first as dashed curves up to the batch all seeds reached.
    Return the paths written.

    Lets a long run's finished methods be looked at, and committed, before the others end.
    """
    config, progress = read_progress(out)
    paths = [out / "progress.md"]
    paths[0].write_text(_progress_markdown(config, progress) + "\n", encoding="utf-8")
    started = {seed: p for seed, p in progress.items() if p is not None}
    if not started:
        return paths
    finished = [m for m in config["methods"] if all(m in p.finished for p in started.values())]
    unfinished = {}
    for method in config["methods"]:
        if method in finished:
            continue
        curves = [(p.finished[method].get("curve") or []) if method in p.finished
                  else p.pending[method].curve for p in started.values()]  # fmt: skip
        if all(curves):
            unfinished[method] = curves
    if not finished and not unfinished:
        return paths
    seeds = {seed: {"pre_edit": p.pre_edit, "methods": {m: p.finished[m] for m in finished}}
             for seed, p in started.items()}  # fmt: skip
    agg = aggregate(seeds, config["dataset"])
    return paths + write_plots(
        out, seeds, agg, config["dataset"], prefix="progress_", unfinished=unfinished
    )


def _read_json(path: Path) -> Any:
    """A part file's contents."""
    return json.loads(path.read_text(encoding="utf-8"))


def _held(lock_path: Path) -> bool:
    """Whether a process holds a part's lock (``metake bench`` running it) right now."""
    if not lock_path.is_file():
        return False
    lock = try_lock(lock_path)
    if lock is None:
        return True
    lock.release()
    return False


def _one_seed_figures(scores: Mapping[str, Any], names: Sequence[str]) -> dict[str, Any]:
    """One part's figures, in the shape :func:`markdown_table` reads (one seed: n = 1)."""
    return {k: mean_std([v]) for k, v in _seed_figures(scores, names).items()}
