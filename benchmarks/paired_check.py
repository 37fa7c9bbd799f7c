"""One setting against the preset's own on the 100-edit protocol: paired differences per method,
over several seeds, and whether they stay within issue 17's one point.

Two ordinary ``metake bench`` runs on identical records (same seeds, same ``--exclude``): the
preset as it is (``base``) and the preset with ``--variant LABEL:KEY=VALUE[,KEY=VALUE]`` (default
``bfloat16:planner_autocast=bfloat16``, the planners in bfloat16). Then per method and metric the
mean paired difference (variant minus base, per record, over every seed) with its standard error,
and a verdict: "within 1 point" when ``|mean| + 2 * se <= 1`` for Eff., Gen. and Spe., "differs"
when ``|mean| - 2 * se > 1``, else "undecided" (more seeds or records needed).

    python benchmarks/paired_check.py --model smollm2-135m --seeds 0,1,2 \
        --out benchmarks/results/bfloat16_check_smollm2
    python benchmarks/paired_check.py --variant bare:metake_edit_contexts=0 \
        --methods metake,metake_exact --out benchmarks/results/bare_edit_check_smollm2

Each run folder is resumable (run the same command again); ``--only base`` (or the variant's
label) runs one side now. ``--base-from DIR`` takes the base side from a finished ``metake
bench`` folder instead (e.g. a Table 1 run with the same preset), after checking that it edited
the same records of every seed with the same hyper-parameters as the variant run, bar the keys
the variant sets. Writes ``OUT/comparison.json`` and ``OUT/comparison.md``. ``--finished`` runs
nothing and compares, from the finished parts, the methods done on every seed on both sides so
far (``OUT/comparison_partial.*``), while the runs go on. s/edit is only
comparable between runs made alone on the machine.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from common import command_line, script_parser, write_json, write_table

from metake.evaluation.bench import BenchConfig, BenchRun
from metake.models import load_model

BASE = "base"
METRICS = ("efficacy", "generalization", "specificity")
TOLERANCE = 1.0  # points (issue 17: quality within 1 point of today's code)


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    """``LABEL:KEY=VALUE[,KEY=VALUE]`` into its label and settings (values as written)."""
    label, _, settings = text.partition(":")
    pairs = [item.partition("=") for item in settings.split(",") if item]
    if not label or label == BASE or not pairs or any(not k or not sep for k, sep, _ in pairs):
        raise SystemExit(f"--variant: expected LABEL:KEY=VALUE[,KEY=VALUE] (label not "
                         f"{BASE!r}), got {text!r}")  # fmt: skip
    return label, {k: v for k, _, v in pairs}


def paired_difference(base: list[dict], other: list[dict], metric: str) -> tuple[float, float]:
    """Mean and standard error (points) of ``other - base`` over records matched by seed and
    index (seeds draw overlapping records, each edited in its own sequence)."""
    by_index = {(r.get("seed"), r["index"]): r[metric] for r in base}
    if len(by_index) != len(base) or len(other) != len(base):
        raise SystemExit("paired records: each side needs every (seed, record) exactly once")
    diffs = [100 * (r[metric] - by_index[r.get("seed"), r["index"]]) for r in other]
    n = len(diffs)
    mean = sum(diffs) / n
    var = sum((d - mean) ** 2 for d in diffs) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(var / n)


def verdict(mean: float, se: float, tolerance: float = TOLERANCE) -> str:
    """Whether a paired difference is within ``tolerance`` points, beyond it, or undecided."""
    if abs(mean) + 2 * se <= tolerance:
        return "within"
    if abs(mean) - 2 * se > tolerance:
        return "differs"
    return "undecided"


def main() -> None:
    """Run (or resume) both bench runs and write the comparison table."""
    parser = script_parser(__doc__)
    parser.add_argument("--model", default="smollm2-135m", help="built-in name, folder or .gguf")
    parser.add_argument("--data", default="../shared/data/zsre/zsre_1k.json", help="zsRE file")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (record draws)")
    parser.add_argument("--edits", type=int, default=100, help="records edited per seed")
    parser.add_argument("--batch-size", type=int, default=25, help="requests per edit batch")
    parser.add_argument("--exclude", default="900:1000", help="records never edited (dev split)")
    parser.add_argument("--methods", default="alphaedit,metake,metake_exact",
                        help="comma-separated methods compared on both sides")  # fmt: skip
    parser.add_argument("--preset", default=None, help="preset file (none: the model's built-in)")
    parser.add_argument("--variant", default="bfloat16:planner_autocast=bfloat16",
                        help="LABEL:KEY=VALUE[,KEY=VALUE], the setting compared with the "
                             "preset's; the default runs the planners in bfloat16")  # fmt: skip
    parser.add_argument("--device", default="cpu", help="cpu, cuda, auto, ...")
    parser.add_argument("--only", default=None,
                        help=f"run one side now ({BASE!r} or the variant's label; the other "
                             "later: same command without --only)")  # fmt: skip
    parser.add_argument("--base-from", default=None,
                        help="finished bench folder for the base side (checked)")  # fmt: skip
    parser.add_argument(
        "--out", default=None, help="run folder (none: benchmarks/results/LABEL_check_MODEL)"
    )
    parser.add_argument("--finished", action="store_true",
                        help="run nothing: compare the methods whose parts have finished on "
                             "every seed on both sides so far (runs still going)")  # fmt: skip
    args = parser.parse_args()
    label, settings = parse_variant(args.variant)
    sides = {BASE: {}, label: settings}
    if args.only is not None and args.only not in sides:
        raise SystemExit(f"--only: {args.only!r} is neither {BASE!r} nor {label!r}")
    out = Path(args.out or f"benchmarks/results/{label}_check_{args.model}")
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = args.methods.split(",")
    if args.finished:
        results, methods = finished_sides(out, label, args.base_from, methods, seeds, settings)
        _write_comparison(out, results, methods, seeds, label, args, partial=True)
        return
    model, tokenizer = load_model(args.model, device=args.device)
    results = {}
    for side, overrides in sides.items():
        if (args.only is not None and side != args.only) or (side == BASE and args.base_from):
            continue
        config = BenchConfig(
            model=args.model, dataset="zsre", data=args.data, methods=methods,
            edits=args.edits, batch_size=args.batch_size, seeds=seeds, exclude=args.exclude,
            curve=False, fluency_records=0, preset=args.preset, overrides=dict(overrides),
            device=args.device, command=f"{command_line()} ({side})",
        )  # fmt: skip
        results[side] = BenchRun(config, out / side, model, tokenizer).run()
    if args.only is not None:
        print(f"{out / args.only}: done; run again without --only for the comparison")
        return
    if args.base_from:
        results[BASE] = borrowed_base(
            Path(args.base_from), results[label], methods, seeds, set(settings)
        )
    _write_comparison(out, results, methods, seeds, label, args, partial=False)


def _write_comparison(
    out: Path,
    results: dict[str, dict],
    methods: list[str],
    seeds: list[int],
    label: str,
    args: argparse.Namespace,
    partial: bool,
) -> None:
    """``OUT/comparison.json`` and ``.md`` (``comparison_partial.*`` for ``--finished``)."""
    rows = _rows(results, methods, seeds, label)
    name = "comparison_partial" if partial else "comparison"
    lines = [
        f"# {label} ({args.variant.partition(':')[2]}) vs the preset's settings: {args.model}, "
        f"zsRE, {args.edits} edits in batches of {args.batch_size}, seeds {args.seeds}",
        "",
        *(
            [
                f"**Partial:** only the methods finished on every seed on both sides so far "
                f"({', '.join(methods)}).",
                "",
            ]
            if partial
            else []
        ),  # fmt: skip
        f"Command: `{command_line()}`",
        "",
        "Both sides edit the same records per seed. Difference: variant minus base per record, "
        "mean over every record of every seed ± its standard error, in points; verdict per "
        f"metric: within {TOLERANCE:g} point (|mean| + 2 se ≤ {TOLERANCE:g}), differs (|mean| − "
        f"2 se > {TOLERANCE:g}), else undecided. s/edit: Stage I + II, comparable only between "
        "runs made alone on the machine.",
        "",
        f"| method | Eff. base | Eff. {label} | Δ Eff. | Gen. base | Gen. {label} | Δ Gen. | "
        f"Spe. base | Spe. {label} | Δ Spe. | s/edit base | s/edit {label} | verdict |",
        "|---|" + "---:|" * 11 + "---|",
        *(_line(row, label) for row in rows),
    ]
    write_json(out / name, {"command": command_line(), "variant": args.variant,
                            "partial": partial, "rows": rows})  # fmt: skip
    write_table(out / name, lines)


def finished_sides(
    out: Path,
    label: str,
    base_from: str | None,
    methods: list[str],
    seeds: list[int],
    settings: dict[str, str],
) -> tuple[dict[str, dict], list[str]]:
    """Both sides read from their finished parts (runs may still be going), checked as
    :func:`borrowed_base` checks, and the methods finished on every seed of both."""
    base_folder = Path(base_from) if base_from else out / BASE
    sides = {BASE: side_from_parts(base_folder, seeds), label: side_from_parts(out / label, seeds)}
    runs = [run for side in sides.values() for run in side["runs"].values()]
    done = [m for m in methods if all(m in run["methods"] for run in runs)]
    if not done:
        raise SystemExit(f"--finished: no method of {', '.join(methods)} has finished on every "
                         f"seed on both sides yet")  # fmt: skip
    check_base(sides[BASE], base_folder, sides[label], done, seeds, set(settings))
    return sides, done


def side_from_parts(folder: Path, seeds: list[int]) -> dict[str, Any]:
    """What :func:`_rows` reads of one side, from the finished parts of a bench folder: per seed
    the records (those of the unedited scores) and the finished methods' parts."""
    runs, seconds = {}, {}
    for seed in seeds:
        parts = folder / "parts" / f"seed{seed}"
        if not (parts / "pre_edit.json").is_file():
            raise SystemExit(f"--finished: {folder} has not started seed {seed}")
        pre = json.loads((parts / "pre_edit.json").read_text(encoding="utf-8"))
        methods = {path.stem: json.loads(path.read_text(encoding="utf-8"))
                   for path in sorted(parts.glob("*.json")) if path.stem != "pre_edit"}  # fmt: skip
        runs[str(seed)] = {"records": [r["index"] for r in pre["per_record"]], "methods": methods}
        for method, part in methods.items():
            seconds.setdefault(method, []).append(part["seconds_per_edit"])
    aggregate = {m: {"seconds_per_edit": {"mean": sum(s) / len(s)}} for m, s in seconds.items()}
    return {"runs": runs, "aggregate": aggregate}


def borrowed_base(
    folder: Path, variant: dict[str, Any], methods: list[str], seeds: list[int], keys: set[str]
) -> dict[str, Any]:
    """The results of the finished bench run in ``folder``, refused (SystemExit naming the
    difference) unless every (seed, method) of ``variant`` is there with the same records and
    the same hyper-parameters bar ``keys`` (those the variant sets)."""
    path = folder / "results.json"
    if not path.is_file():
        raise SystemExit(f"--base-from: {path} does not exist (is that run finished?)")
    borrowed = json.loads(path.read_text(encoding="utf-8"))
    check_base(borrowed, folder, variant, methods, seeds, keys)
    return borrowed


def check_base(
    borrowed: dict[str, Any],
    folder: Path,
    variant: dict[str, Any],
    methods: list[str],
    seeds: list[int],
    keys: set[str],
) -> None:
    """Refuse (SystemExit naming the difference) a base side that lacks a (seed, method) of the
    variant, edited other records, or ran with other hyper-parameters bar ``keys``."""
    for seed in map(str, seeds):
        theirs, ours = borrowed["runs"].get(seed), variant["runs"][seed]
        if theirs is None:
            raise SystemExit(f"--base-from: {folder} has no seed {seed}")
        if theirs["records"] != ours["records"]:
            raise SystemExit(f"--base-from: seed {seed} edited other records in {folder}")
        for method in methods:
            if method not in theirs["methods"]:
                raise SystemExit(f"--base-from: {folder} has no {method} for seed {seed}")
            differ = _hparam_differences(theirs["methods"][method]["hparams"],
                                         ours["methods"][method]["hparams"], keys)  # fmt: skip
            if differ:
                raise SystemExit(f"--base-from: {method} in {folder} ran with other "
                                 f"hyper-parameters: {', '.join(differ)}")  # fmt: skip


def _hparam_differences(base: dict[str, Any], variant: dict[str, Any], keys: set[str]) -> list[str]:
    """Names of the hyper-parameters (bar ``keys``) whose values differ."""
    return sorted(k for k in (set(base) | set(variant)) - keys if base.get(k) != variant.get(k))


def _rows(
    results: dict[str, dict], methods: list[str], seeds: list[int], label: str
) -> list[dict[str, Any]]:
    """Per method: each side's means, the paired differences and the verdicts."""
    rows = []
    for method in methods:
        per = {side: [{**r, "seed": s} for s in seeds
                      for r in results[side]["runs"][str(s)]["methods"][method]["per_record"]]
               for side in (BASE, label)}  # fmt: skip
        row: dict[str, Any] = {"method": method}
        for metric in METRICS:
            for side in (BASE, label):
                row[f"{metric}_{side}"] = 100 * sum(r[metric] for r in per[side]) / len(per[side])
            mean, se = paired_difference(per[BASE], per[label], metric)
            row[f"{metric}_diff"], row[f"{metric}_se"] = mean, se
            row[f"{metric}_verdict"] = verdict(mean, se)
        for side in (BASE, label):
            row[f"seconds_{side}"] = results[side]["aggregate"][method]["seconds_per_edit"]
        rows.append(row)
    return rows


def _line(row: dict[str, Any], label: str) -> str:
    cells = []
    for metric in METRICS:
        cells += [f"{row[f'{metric}_{BASE}']:.2f}", f"{row[f'{metric}_{label}']:.2f}",
                  f"{row[f'{metric}_diff']:+.2f} ± {row[f'{metric}_se']:.2f}"]  # fmt: skip
    for side in (BASE, label):
        seconds = row[f"seconds_{side}"]
        cells.append(f"{seconds['mean'] if isinstance(seconds, dict) else seconds:.1f}")
    verdicts = {row[f"{m}_verdict"] for m in METRICS}
    overall = "differs" if "differs" in verdicts else verdicts.pop() if len(verdicts) == 1 else (
        "undecided")  # fmt: skip
    return f"| {row['method']} | " + " | ".join(cells) + f" | {overall} |"


if __name__ == "__main__":
    main()
