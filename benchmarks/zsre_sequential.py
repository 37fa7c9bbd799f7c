"""Sequential zsRE editing, a first look: Efficacy and time per edit for several methods.

Takes ``--edits`` consecutive zsRE records (from ``--start``), edits them into the model in
batches of ``--batch-size`` one after another with each method (restoring the original weights
between methods), then measures Efficacy on every edited record: teacher-forced accuracy of the
target tokens (``answers[0]``, the paper's protocol) given the question ``src``. Pre-edit
Efficacy is measured too. The full harness (Generalisation, Specificity, seeds) is
``metake bench`` (issue 5); this script is the quick comparison.

    python benchmarks/zsre_sequential.py --model smollm2-135m \\
        --data ../shared/data/zsre/zsre_1k.json --edits 50 --batch-size 10 \\
        --methods memit,alphaedit,metake --solver alphaedit \\
        --out benchmarks/results/zsre_sequential_smollm2

Writes ``OUT.json`` (config, per-record scores, per-batch timings, MetaKE's look-ahead log)
after every method, and ``OUT.md`` (a table with the command above it) at the end.
"""

from __future__ import annotations

import logging
import statistics
import sys
import time
from pathlib import Path

import torch
from common import command_line, script_parser, write_json, write_table
from tqdm import tqdm

import metake
from metake import Editor, load_model, load_requests
from metake.cli import parse_key_value
from metake.probe import token_accuracy


def parse_method(spec: str) -> tuple[str, dict]:
    """``"metake:metake_lr=0.1:metake_reg_weight=0"`` → ``("metake", {overrides})``."""
    name, *settings = spec.split(":")
    return name, dict(parse_key_value(x) for x in settings)


def run_method(model, tok, requests, spec: str, args, overrides) -> dict:
    """Edit ``requests`` in batches with ``spec``; Efficacy afterwards; restores the model."""
    method, own = parse_method(spec)
    overrides = {**overrides, **own}
    solver = args.solver if method == "metake" else None
    editor = Editor(model, tok, method, solver=solver, model_id=args.model, progress=False,
                    seed=args.seed, **overrides)  # fmt: skip
    editor.load_statistics()
    batches, seconds = [], 0.0
    steps = range(0, len(requests), args.batch_size)
    for start in tqdm(steps, desc=f"{method} batches", unit="batch"):
        begin = time.perf_counter()
        result = editor.edit(requests[start : start + args.batch_size])
        seconds += time.perf_counter() - begin
        report = result.report
        history = report.lookahead_history
        batches.append(
            {
                "seconds": report.seconds,
                "seconds_stage1": report.seconds_stage1,
                "seconds_lookahead": report.seconds_lookahead,
                "stage1_target_prob": report.stage1_target_prob,
                "lookahead_first": history[0] if history else None,
                "lookahead_last": history[-1] if history else None,
            }
        )
    scores = token_accuracy(model, tok, requests)
    editor.restore()
    return {
        "method": method,
        "spec": spec,
        "method_overrides": own,
        "solver": editor.solver,
        "hparams": editor.hparams.to_dict(),
        "efficacy": 100 * statistics.mean(scores),
        "efficacy_per_record": scores,
        "seconds_total": seconds,  # edit() wall time (statistics were loaded before)
        "seconds_per_edit": seconds / len(requests),
        "batches": batches,
    }


def main() -> int:
    """Run every method and write the results."""
    parser = script_parser(__doc__)
    parser.add_argument("--model", default="smollm2-135m", help="built-in name, folder or .gguf")
    parser.add_argument("--data", default="../shared/data/zsre/zsre_1k.json",
                        help="zsRE file (a JSON list)")  # fmt: skip
    parser.add_argument("--start", type=int, default=0, help="index of the first record")
    parser.add_argument("--edits", type=int, default=50, help="consecutive records edited")
    parser.add_argument("--batch-size", type=int, default=10,
                        help="requests per edit batch (applied one after another)")  # fmt: skip
    parser.add_argument(
        "--methods", default="memit,alphaedit,metake",
        help="comma list; a method may carry its own settings: metake:metake_lr=0.1",
    )  # fmt: skip
    parser.add_argument("--solver", default="alphaedit", help="the solver under 'metake'")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="hyper-parameter override for every method (repeatable)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="torch seed set before each batch")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, auto, ...")
    parser.add_argument("--out", default="benchmarks/results/zsre_sequential_smollm2",
                        help="output stem (OUT.json after each method, OUT.md at the "
                             "end)")  # fmt: skip
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    overrides = dict(parse_key_value(x) for x in args.set)
    every_request = load_requests(args.data)  # JSON or JSONL, validated
    requests = every_request[args.start : args.start + args.edits]
    if len(requests) < args.edits:
        parser.error(f"{args.data} has only {len(every_request)} records")
    model, tok = load_model(args.model, device=args.device)
    command = command_line()
    out = Path(args.out)
    result = {
        "command": command,
        "metake_version": metake.__version__,
        "torch_version": torch.__version__,
        "model": args.model,
        "data": args.data,
        "target_field": "answers[0]",
        "records": [args.start, args.start + args.edits],
        "batch_size": args.batch_size,
        "overrides": overrides,
        "pre_edit_efficacy": 100 * statistics.mean(token_accuracy(model, tok, requests)),
        "methods": [],
    }
    for spec in args.methods.split(","):
        result["methods"].append(run_method(model, tok, requests, spec, args, overrides))
        write_json(out, result)
        row = result["methods"][-1]
        print(f"{spec}: efficacy {row['efficacy']:.1f}%, {row['seconds_per_edit']:.1f} s/edit",
              file=sys.stderr)  # fmt: skip
    lines = [
        f"# Sequential zsRE editing on {args.model}: a first look",
        "",
        f"`{command}`",
        "",
        f"zsRE records {args.start}–{args.start + args.edits - 1} of {args.data} (target "
        f"`answers[0]`), edited in batches of {args.batch_size} one after another; Efficacy "
        "(teacher-forced target-token accuracy on `src`) of all edited records after the last "
        f"batch; device {args.device}, torch {torch.__version__}, metake {metake.__version__}.",
        "",
        "| method | Eff. (%) | seconds per edit |",
        "|---|---|---|",
        f"| (unedited) | {result['pre_edit_efficacy']:.1f} | – |",
    ]
    for row in result["methods"]:
        name = row["method"] + (f" + {row['solver']}" if row["method"] == "metake" else "")
        if row["method_overrides"]:
            name += " (" + ", ".join(f"{k}={v}" for k, v in row["method_overrides"].items()) + ")"
        lines.append(f"| {name} | {row['efficacy']:.1f} | {row['seconds_per_edit']:.1f} |")
    write_table(out, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
