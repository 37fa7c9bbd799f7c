"""Two finished `metake bench` runs side by side: the scores of each method, and what changed.

    python benchmarks/compare_runs.py benchmarks/results/table1_zsre_smollm2 \
        benchmarks/results/table1_zsre_smollm2_tuned --labels hand,tuned \
        --out benchmarks/results/table1_zsre_smollm2_hand_vs_tuned

For every method of either run: mean ± std over seeds of each metric in both runs, the
difference of the means, and the hyper-parameters whose values differ between the two runs
(seed 0's, or the first seed the run has). The run settings that differ (records left out,
probe, seeds ...) are listed above the table, since they change what a difference means.
Reads each run's ``results.json``; writes ``OUT.json`` and ``OUT.md``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from common import command_line, script_parser, write_json, write_table

METRICS = {
    "efficacy": "Eff.",
    "generalization": "Gen.",
    "specificity": "Spe.",
    "efficacy_exact": "Eff. (whole answer)",
    "known_facts_kept": "Facts kept",
}
IGNORED_CONFIG = {"command", "methods", "device"}


def load_run(folder: Path) -> dict[str, Any]:
    """The ``results.json`` of a finished bench run folder, or exit with what is missing."""
    path = folder / "results.json"
    if not path.is_file():
        sys.exit(f"compare_runs: {path} does not exist: is the run in {folder} finished?")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        sys.exit(f"compare_runs: {path} is not valid JSON ({err})")


def method_hparams(run: dict[str, Any], method: str) -> dict[str, Any]:
    """The hyper-parameters ``method`` ran with in the run's first seed ({} if it did not run)."""
    for seed_run in run["runs"].values():
        if method in seed_run["methods"]:
            return seed_run["methods"][method]["hparams"]
    return {}


def changed(old: dict[str, Any], new: dict[str, Any]) -> dict[str, list[Any]]:
    """Keys both flat dicts hold with different values: ``{key: [old, new]}``."""
    keys = sorted(set(old) & set(new))
    return {k: [old[k], new[k]] for k in keys if old[k] != new[k]}


def recorded_only(old: dict[str, Any], new: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Keys only one side records (e.g. a field added to the code between the runs)."""
    return {
        "old": {k: old[k] for k in sorted(set(old) - set(new))},
        "new": {k: new[k] for k in sorted(set(new) - set(old))},
    }


def compare(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """Per method and metric: both runs' mean/std/n and the difference of the means (new − old)."""
    methods = list(dict.fromkeys(["unedited", *old["aggregate"], *new["aggregate"]]))
    rows = {}
    for method in methods:
        scores = {}
        for metric in METRICS:
            pair = [_stat(run, method, metric) for run in (old, new)]
            if pair == [None, None]:
                continue
            diff = None if None in pair else pair[1]["mean"] - pair[0]["mean"]
            scores[metric] = {"old": pair[0], "new": pair[1], "difference": diff}
        old_hparams, new_hparams = method_hparams(old, method), method_hparams(new, method)
        both = bool(old_hparams and new_hparams)
        ran_in = [side for side, h in (("old", old_hparams), ("new", new_hparams)) if h]
        rows[method] = {
            "scores": scores,
            "hparams_changed": changed(old_hparams, new_hparams) if both else {},
            "hparams_recorded_only": recorded_only(old_hparams, new_hparams) if both else {},
            "ran_in": ran_in,
        }
    old_settings, new_settings = _settings(old), _settings(new)
    return {
        "methods": rows,
        "settings_changed": changed(old_settings, new_settings),
        "settings_recorded_only": recorded_only(old_settings, new_settings),
    }


def _settings(run: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in run["config"].items() if k not in IGNORED_CONFIG}


def _stat(run: dict[str, Any], method: str, metric: str) -> dict[str, float] | None:
    block = run["pre_edit"] if method == "unedited" else run["aggregate"].get(method)
    value = (block or {}).get(metric)
    return value if isinstance(value, dict) and "mean" in value else None


def table(result: dict[str, Any], labels: tuple[str, str]) -> list[str]:
    """The comparison as Markdown: settings that differ, the score table, the changed settings."""
    old_label, new_label = labels
    differ = result["settings_changed"] or any(result["settings_recorded_only"].values())
    lines = ["Run settings that differ:" if differ else "Same run settings."]
    for key, (a, b) in result["settings_changed"].items():
        lines.append(f"- `{key}`: {old_label} {a!r}, {new_label} {b!r}")
    for side, label in (("old", old_label), ("new", new_label)):
        only = result["settings_recorded_only"][side]
        if only:
            lines.append(f"- recorded only by {label}: {_pairs(only, '`')}")
    metrics = [m for m in METRICS if any(m in r["scores"] for r in result["methods"].values())]
    head = [f"{METRICS[m]} {lab}" for m in metrics for lab in (*labels, "Δ")]
    lines += ["", "| Method | " + " | ".join(head) + " |", "|---|" + "---:|" * len(head)]
    for method, row in result["methods"].items():
        cells = []
        for metric in metrics:
            score = row["scores"].get(metric, {"old": None, "new": None, "difference": None})
            cells += [_fmt(score["old"]), _fmt(score["new"]), _signed(score["difference"])]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += ["", "Hyper-parameters that differ (first seed of each run):", ""]
    for method, row in result["methods"].items():
        if method != "unedited" and len(row["ran_in"]) == 1:
            side = labels[0] if row["ran_in"] == ["old"] else labels[1]
            lines.append(f"- {method}: ran only in {side}")
            continue
        parts = [f"{k} {a!r} → {b!r}" for k, (a, b) in row["hparams_changed"].items()]
        for side, label in (("old", old_label), ("new", new_label)):
            only = row.get("hparams_recorded_only", {}).get(side)
            if only:
                parts.append(f"recorded only by {label} ({_pairs(only)})")
        if parts:
            lines.append(f"- {method}: " + ", ".join(parts))
    if any(result["settings_recorded_only"].values()) or any(
        any(r.get("hparams_recorded_only", {}).values()) for r in result["methods"].values()
    ):
        lines += [
            "",
            "A setting recorded by one run only is one the code did not record (or have) when "
            "the other ran; the other ran with that setting's behaviour of its time.",
        ]
    return lines


def _pairs(values: dict[str, Any], quote: str = "") -> str:
    return ", ".join(f"{quote}{k}{quote} {v!r}" for k, v in values.items())


def _fmt(stat: dict[str, float] | None) -> str:
    if stat is None:
        return "–"
    return (
        f"{stat['mean']:.2f} ± {stat['std']:.2f}" if stat.get("n", 1) > 1 else f"{stat['mean']:.2f}"
    )


def _signed(value: float | None) -> str:
    return "–" if value is None else f"{value:+.2f}"


def main() -> None:
    """Read both runs, compare them, write OUT.json and OUT.md."""
    parser = script_parser(__doc__)
    parser.add_argument("old", type=Path, help="the first (earlier) bench run folder")
    parser.add_argument("new", type=Path, help="the second bench run folder")
    parser.add_argument(
        "--labels", default="old,new", help="names of the two runs, comma-separated"
    )
    parser.add_argument("--out", type=Path, required=True, help="writes OUT.json and OUT.md")
    args = parser.parse_args()
    labels = tuple(s.strip() for s in args.labels.split(","))
    if len(labels) != 2 or not all(labels):
        parser.error(f"--labels takes two names separated by a comma, got {args.labels!r}")
    result = compare(load_run(args.old), load_run(args.new))
    lines = [
        f"# {labels[0]} ({args.old}) against {labels[1]} ({args.new})",
        "",
        f"```\n{command_line()}\n```",
        "",
        "Metrics in percent, mean ± sample std over each run's seeds; Δ = "
        f"{labels[1]} − {labels[0]} of the means.",
        "",
        *table(result, labels),
    ]
    write_json(args.out, {"command": command_line(), "labels": list(labels), **result})
    write_table(args.out, lines)


if __name__ == "__main__":
    main()
