"""The planners in bfloat16 against float32 on the 100-edit protocol: paired differences per
method, over several seeds, and whether they stay within issue 17's one point.

Two ordinary ``metake bench`` runs on identical records (same seeds, same ``--exclude``), one
with ``--set planner_autocast=bfloat16``; then per method and metric the mean paired difference
(bfloat16 minus float32, per record, over every seed) with its standard error, and a verdict:
"within 1 point" when ``|mean| + 2 * se <= 1`` for Eff., Gen. and Spe., "differs" when
``|mean| - 2 * se > 1``, else "undecided" (more seeds or records needed).

    python benchmarks/precision_check.py --model smollm2-135m --seeds 0,1,2 \
        --out benchmarks/results/precision_check_smollm2

Each run folder is resumable (run the same command again); ``--only float32`` (or
``bfloat16``) runs one side now. ``--float32-from DIR`` takes the float32 side from a finished
``metake bench`` folder instead (e.g. the tuned side of ``preset_comparison.py``), after
checking that it edited the same records of every seed with the same hyper-parameters as the
bfloat16 run, bar ``planner_autocast``. Writes ``OUT/comparison.json`` and ``OUT/comparison.md``.
s/edit is only comparable between runs made alone on the machine.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from common import command_line, write_json, write_table

from metake.evaluation.bench import BenchConfig, BenchRun
from metake.models import load_model

VARIANTS = {"float32": {}, "bfloat16": {"planner_autocast": "bfloat16"}}
METRICS = ("efficacy", "generalization", "specificity")
TOLERANCE = 1.0  # points (issue 17: quality within 1 point of the float32 code)


def paired_difference(base: list[dict], other: list[dict], metric: str) -> tuple[float, float]:
    """Mean and standard error (points) of ``other - base`` over records matched by index."""
    by_index = {r["index"]: r[metric] for r in base}
    diffs = [100 * (r[metric] - by_index[r["index"]]) for r in other]
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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default="../shared/data/zsre/zsre_1k.json")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--edits", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=25)
    parser.add_argument("--exclude", default="900:1000", help="records never edited (dev split)")
    parser.add_argument("--methods", default="alphaedit,metake,metake_exact")
    parser.add_argument("--preset", default=None, help="preset (default: the model's built-in)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--only", choices=tuple(VARIANTS), default=None,
                        help="run one precision now (the other later: same command without "
                             "--only)")  # fmt: skip
    parser.add_argument(
        "--float32-from", default=None, help="finished bench folder for the float32 side (checked)"
    )
    parser.add_argument("--out", default="benchmarks/results/precision_check_smollm2")
    args = parser.parse_args()
    out = Path(args.out)
    seeds = [int(s) for s in args.seeds.split(",")]
    model, tokenizer = load_model(args.model, device=args.device)
    results = {}
    for label, overrides in VARIANTS.items():
        if args.only is not None and label != args.only:
            continue
        if label == "float32" and args.float32_from:
            continue
        config = BenchConfig(
            model=args.model, dataset="zsre", data=args.data, methods=args.methods.split(","),
            edits=args.edits, batch_size=args.batch_size, seeds=seeds, exclude=args.exclude,
            curve=False, fluency_records=0, preset=args.preset, overrides=dict(overrides),
            device=args.device, command=f"{command_line()} ({label})",
        )  # fmt: skip
        results[label] = BenchRun(config, out / label, model, tokenizer).run()
    if args.only is not None:
        print(f"{out / args.only}: done; run again without --only for the comparison")
        return
    if args.float32_from:
        results["float32"] = borrowed_float32(
            Path(args.float32_from), results["bfloat16"], args.methods.split(","), seeds
        )
    rows = _rows(results, args.methods.split(","), seeds)
    lines = [
        f"# Planners in bfloat16 vs float32: {args.model}, zsRE, {args.edits} edits in batches "
        f"of {args.batch_size}, seeds {args.seeds}",
        "",
        f"Command: `{command_line()}`",
        "",
        "Both precisions edit the same records per seed. Difference: bfloat16 minus float32 per "
        f"record, mean over every record of every seed ± its standard error, in points; "
        f"verdict per metric: within {TOLERANCE:g} point (|mean| + 2 se ≤ {TOLERANCE:g}), "
        f"differs (|mean| − 2 se > {TOLERANCE:g}), else undecided. s/edit: Stage I + II, "
        "comparable only between runs made alone on the machine.",
        "",
        "| method | Eff. fp32 | Eff. bf16 | Δ Eff. | Gen. fp32 | Gen. bf16 | Δ Gen. | Spe. fp32 "
        "| Spe. bf16 | Δ Spe. | s/edit fp32 | s/edit bf16 | verdict |",
        "|---|" + "---:|" * 11 + "---|",
        *(_line(row) for row in rows),
    ]
    write_json(out / "comparison", {"command": command_line(), "rows": rows})
    write_table(out / "comparison", lines)


def borrowed_float32(
    folder: Path, bf16: dict[str, Any], methods: list[str], seeds: list[int]
) -> dict[str, Any]:
    """The results of the finished bench run in ``folder``, refused (SystemExit naming the
    difference) unless every (seed, method) of ``bf16`` is there with the same records and the
    same hyper-parameters bar ``planner_autocast``."""
    path = folder / "results.json"
    if not path.is_file():
        raise SystemExit(f"--float32-from: {path} does not exist (is that run finished?)")
    borrowed = json.loads(path.read_text(encoding="utf-8"))
    for seed in map(str, seeds):
        theirs, ours = borrowed["runs"].get(seed), bf16["runs"][seed]
        if theirs is None:
            raise SystemExit(f"--float32-from: {folder} has no seed {seed}")
        if theirs["records"] != ours["records"]:
            raise SystemExit(f"--float32-from: seed {seed} edited other records in {folder}")
        for method in methods:
            if method not in theirs["methods"]:
                raise SystemExit(f"--float32-from: {folder} has no {method} for seed {seed}")
            differ = _hparam_differences(theirs["methods"][method]["hparams"],
                                         ours["methods"][method]["hparams"])  # fmt: skip
            if differ:
                raise SystemExit(f"--float32-from: {method} in {folder} ran with other "
                                 f"hyper-parameters: {', '.join(differ)}")  # fmt: skip
    return borrowed


def _hparam_differences(float32: dict[str, Any], bfloat16: dict[str, Any]) -> list[str]:
    """Names of the hyper-parameters (bar ``planner_autocast``) whose values differ."""
    keys = (set(float32) | set(bfloat16)) - {"planner_autocast"}
    return sorted(k for k in keys if float32.get(k) != bfloat16.get(k))


def _rows(results: dict[str, dict], methods: list[str], seeds: list[int]) -> list[dict[str, Any]]:
    """Per method: each precision's means, the paired differences and the verdicts."""
    rows = []
    for method in methods:
        per = {label: [r for s in seeds
                       for r in results[label]["runs"][str(s)]["methods"][method]["per_record"]]
               for label in VARIANTS}  # fmt: skip
        row: dict[str, Any] = {"method": method}
        for metric in METRICS:
            for label in VARIANTS:
                row[f"{metric}_{label}"] = (
                    100 * sum(r[metric] for r in per[label]) / len(per[label])
                )
            mean, se = paired_difference(per["float32"], per["bfloat16"], metric)
            row[f"{metric}_diff"], row[f"{metric}_se"] = mean, se
            row[f"{metric}_verdict"] = verdict(mean, se)
        for label in VARIANTS:
            row[f"seconds_{label}"] = results[label]["aggregate"][method]["seconds_per_edit"]
        rows.append(row)
    return rows


def _line(row: dict[str, Any]) -> str:
    cells = []
    for metric in METRICS:
        cells += [f"{row[f'{metric}_float32']:.2f}", f"{row[f'{metric}_bfloat16']:.2f}",
                  f"{row[f'{metric}_diff']:+.2f} ± {row[f'{metric}_se']:.2f}"]  # fmt: skip
    for label in VARIANTS:
        seconds = row[f"seconds_{label}"]
        cells.append(f"{seconds['mean'] if isinstance(seconds, dict) else seconds:.1f}")
    verdicts = {row[f"{m}_verdict"] for m in METRICS}
    overall = "differs" if "differs" in verdicts else verdicts.pop() if len(verdicts) == 1 else (
        "undecided")  # fmt: skip
    return f"| {row['method']} | " + " | ".join(cells) + f" | {overall} |"


if __name__ == "__main__":
    main()
