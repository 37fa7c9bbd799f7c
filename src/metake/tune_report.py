"""What ``metake tune`` writes: the preset file, the report (JSON and Markdown) and its plot."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from metake.tune import Baseline, Tuner

PRESET_FILE = "preset.json"


def write_outputs(
    tuner: Tuner,
    base: Baseline,
    trace: dict[str, Any],
    stage1: dict[str, Any],
    windows: list[tuple[int, ...]],
    searched: dict[str, list[dict[str, Any]]],
    chosen: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """Write ``preset.json``, ``report.json``/``.md`` and ``search.png``; return the report."""
    from metake.tune import preset_entry

    out = tuner.out
    entry = preset_entry(tuner.model, tuner, chosen)
    name = f"{Path(tuner.config.model).stem}-tuned"
    preset = {
        "_doc": "Written by `metake tune` (report.md beside it says how); use it with "
        "--preset FILE. Leave the dev split out of evaluations: metake bench --exclude "
        f"{tuner.config.dev_records}.",
        name: entry,
    }
    (out / PRESET_FILE).write_text(json.dumps(preset, indent=1), encoding="utf-8")
    report = {
        "config": tuner.config.__dict__,
        "baseline": base.scores,
        "baseline_search": base.search_scores,
        "known_facts": len(base.probe),
        "trace": {k: trace.get(k) for k in ("mean_ie", "peak_layer", "window")},
        "stage1": stage1,
        "windows": [list(w) for w in windows],
        "searched": searched,
        "chosen": chosen,
        "seconds": sum(r.get("seconds", 0.0) for r in tuner.rows.values()),
        "cost": cost_table(tuner.rows.values()),
        "invocations": tuner.invocations,
        "grid_scales": tuner.grid_scales,
        "preset_file": str(out / PRESET_FILE),
    }
    (out / "report.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    (out / "report.md").write_text(_markdown(report), encoding="utf-8")
    _plot(out / "search.png", report)
    return report


def rule(min_gain: float, finalists: int = 0) -> str:
    """The selection rule in words, as the report states it."""
    text = (
        f"the highest Eff. + Gen. (mean over the batch sizes) among the settings that edit (Eff. "
        f">= unedited + {min_gain:g} points) with Spe. >= unedited - 1 point, held-out perplexity "
        "drift <= 2% and >= 95% of the known facts still known; when none passes, a setting that "
        "edits first, then the fewest broken conditions, then the highest Eff. + Gen. (flagged)"
    )
    if finalists:
        text += (
            f". The search scores candidates at the smallest batch size; the {finalists} best of "
            "each method by the same rule are scored at every batch size, and the choice is made "
            "among them"
        )
    return text


def cost_table(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Where the search time went, from the rows' own timings: Stage I's search, the targets
    of each window, each method's candidates (one row per candidate and batch size)."""
    labels = {"stage1": "Stage I lr/steps search", "targets": "Stage I targets (dev split)"}
    parts: dict[str, list[float]] = {}
    for row in rows:
        label = labels.get(row["phase"], row.get("method", row["phase"]))
        parts.setdefault(label, []).append(float(row.get("seconds", 0.0)))
    return [{"part": k, "rows": len(v), "seconds": sum(v)} for k, v in parts.items()]


def _cost_lines(cost: list[dict[str, Any]]) -> list[str]:
    total = sum(part["seconds"] for part in cost)
    lines = [
        "Seconds as each row measured them (summed; a run beside other jobs is slower). Targets "
        "computed before this accounting existed are not counted.",
        "",
        "| part | rows | minutes | share |",
        "|---|---:|---:|---:|",
    ]
    for part in cost:
        share = part["seconds"] / total if total else 0.0
        lines.append(f"| {part['part']} | {part['rows']} | {part['seconds'] / 60:.1f} | "
                     f"{100 * share:.0f}% |")  # fmt: skip
    rows = sum(part["rows"] for part in cost)
    lines.append(f"| total | {rows} | {total / 60:.1f} | 100% |")
    return lines


def _invocation_lines(invocations: list[dict[str, Any]]) -> list[str]:
    """The wall clock of every `metake tune` invocation on the folder (rows, baseline, trace,
    statistics and reports included; model loading not)."""
    if not invocations:
        return []
    total = sum(i["seconds"] for i in invocations)
    lines = [
        "",
        f"Wall clock of the {len(invocations)} invocation(s) on this folder, from the loaded model "
        "to the last row or report each wrote (unedited scores, tracing and statistics "
        f"included): **{total / 60:.1f} min**. An invocation cut short counts up to its last row.",
        "",
        "| started (UTC) | threads | minutes | completed |",
        "|---|---:|---:|---|",
    ]
    for run in invocations:
        done = "yes" if run["completed"] else "no"
        minutes = run["seconds"] / 60
        lines.append(f"| {run['started']} | {run['threads']} | {minutes:.1f} | {done} |")
    return lines


def _search_baseline(report: dict[str, Any], config: dict[str, Any]) -> str:
    """The sentence on the unedited scores that real-edit candidates are judged against."""
    search = report.get("baseline_search")
    if not search:
        return ""
    spe = (
        f"Spe. {search['specificity']:.2f} (every dev record's neighbour questions, as for "
        "every candidate)"
        if "specificity_records" in search
        else f"Spe. {search['specificity']:.2f}"
    )
    return (
        f" On the first {config['search_records']} dev records, which the methods tuned by "
        f"real edits (ROME, BLUE, MetaKE) are scored on and judged against: Eff. "
        f"{search['efficacy']:.2f}, Gen. {search['generalization']:.2f}, {spe}."
    )


def _markdown(report: dict[str, Any]) -> str:
    config, base = report["config"], report["baseline"]
    ie = report["trace"]["mean_ie"]
    lines = [
        f"# metake tune: {config['model']}",
        "",
        "```",
        config["command"] or "(run from the Python API)",
        "```",
        "",
        f"Dev split: zsRE records {config['dev_records']} of `{config['data']}` (leave them out of "
        f"every evaluation: `metake bench --exclude {config['dev_records']}`); batch sizes "
        f"{config['batch_sizes']}; known facts: {report['known_facts']} CounterFact prompts of "
        f"records {config['probe_records']} the unedited model answers. Total search time "
        f"{report['seconds'] / 60:.1f} min.",
        "",
        "**Selection rule (every method):** "
        f"{rule(config['min_efficacy_gain'], config.get('finalists', 0))}.",
        "",
        f"Unedited on the dev split: Eff. {base['efficacy']:.2f}, Gen. "
        f"{base['generalization']:.2f}, Spe. {base['specificity']:.2f}, perplexity "
        f"{base['perplexity']:.2f}.{_search_baseline(report, config)}",
        "",
        "## Locate (causal tracing)",
        "",
        "Mean indirect effect of restoring the MLP outputs (a window of "
        f"{report['trace']['window']} layers around each) at the subject's last token, by layer; "
        f"peak at layer {report['trace']['peak_layer']}. Windows searched (ending at the last "
        f"layer with at least a quarter of the peak's effect, and 2 layers either side): "
        f"{report['windows']}.",
        "",
        "| layer | " + " | ".join(str(i) for i in range(len(ie))) + " |",
        "|---|" + "---|" * len(ie),
        "| IE | " + " | ".join(f"{v:.3f}" for v in ie) + " |",
        "",
        "## Stage I",
        "",
        f"Chosen: v_lr {report['stage1']['v_lr']}, v_steps {report['stage1']['v_steps']} (the "
        "smallest rate whose targets reach P(target) >= 0.5 for >= 95% of the search records).",
        "",
        "| v_lr | v_steps | reached | median P(target) | s |",
        "|---|---|---|---|---|",
        *[
            f"| {r['v_lr']} | {r['v_steps']} | {100 * r['reached']:.0f}% | {r['median_p']:.3f} | "
            f"{r['seconds']:.0f} |"
            for r in report["stage1"]["tried"]
        ],
        "",
        "## Chosen settings",
        "",
        "| method | settings | Eff. | Gen. | Spe. | ppl | known kept | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method, row in report["chosen"].items():
        lines.append(_row(method, row))
    for method, grid in report.get("grid_scales", {}).items():
        lines += ["", f"{method}'s grid, scaled to the targets (median RMS "
                  f"{grid['target_rms']:.3g} at layer {grid['layer']}, {grid['factor']:.3g} times "
                  f"the reference): {grid['grid']}."]  # fmt: skip
    lines += ["", "## Cost", "", *_cost_lines(report["cost"])]
    lines += [*_invocation_lines(report.get("invocations", [])), "", "## Every candidate", ""]
    for method, rows in report["searched"].items():
        lines += [
            f"### {method}",
            "",
            "| method | settings | Eff. | Gen. | Spe. | ppl | known kept | verdict |",
            "|---|---|---|---|---|---|---|---|",
            *[_row(method, r) for r in rows],
            "",
        ]
    return "\n".join(lines) + "\n"


SHOWN = {
    "memit": ("mom2_update_weight",),
    "prune": ("mom2_update_weight",),
    "rect": ("mom2_update_weight", "rect_keep_fraction"),
    "rome": (),
    "alphaedit": ("nullspace_threshold", "nullspace_relative", "alphaedit_lambda"),
    "alphaedit_blue": ("nullspace_threshold", "nullspace_relative", "alphaedit_blue_lambda"),
    "metake": ("nullspace_threshold", "alphaedit_lambda", "metake_lr", "metake_reg_weight"),
    "metake_exact": ("nullspace_threshold", "alphaedit_lambda", "metake_lr", "metake_reg_weight"),
}
"""The settings a method reads, shown in the report (the preset file holds them all)."""


def _row(method: str, row: dict[str, Any]) -> str:
    names = ("layers", "v_lr", "v_steps", *SHOWN.get(method, tuple(row["settings"])))
    settings = ", ".join(f"{k} {row['settings'][k]}" for k in names)
    verdict = "; ".join(row["violations"]) or "passes"
    if not row.get("complete", True):
        sizes = ", ".join(str(b) for b in row["per_batch_size"])
        verdict += f" (searched at batch size {sizes} only)"
    return (
        f"| {method} | {settings} | {row['efficacy']:.2f} | {row['generalization']:.2f} | "
        f"{row['specificity']:.2f} | {row['perplexity']:.2f} | "
        f"{100 * row['probe_kept']:.0f}% | {verdict} |"
    )


def _plot(path: Path, report: dict[str, Any]) -> None:
    """Causal-tracing curve and, per method, Eff. + Gen. of every candidate (x: violations)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(report["searched"])
    fig, axes = plt.subplots(1, 1 + len(methods), figsize=(3.2 * (1 + len(methods)), 3.2))
    ie = report["trace"]["mean_ie"]
    axes[0].plot(range(len(ie)), ie, marker="o")
    axes[0].set(title="causal trace (MLP)", xlabel="layer", ylabel="mean indirect effect")
    for ax, method in zip(axes[1:], methods, strict=True):
        rows = report["searched"][method]
        score = [r["efficacy"] + r["generalization"] for r in rows]
        colors = ["tab:green" if not r["violations"] else "tab:red" for r in rows]
        ax.scatter(range(len(rows)), score, c=colors)
        best = rows.index(report["chosen"][method]) if report["chosen"][method] in rows else None
        if best is not None:
            ax.scatter([best], [score[best]], s=160, facecolors="none", edgecolors="black")
        ax.set(title=method, xlabel="candidate (search order)", ylabel="Eff. + Gen.")
    fig.suptitle("metake tune: green passes the rule, red breaks it, circled: chosen")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
