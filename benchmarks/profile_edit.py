"""Where one batch's time goes, by operator: the profile behind issue 17's speed goals.

Runs one batch of zsRE requests (records START..START+EDITS) through one method under
``torch.profiler``, counts its FLOPs, and writes:

- the share of the edit's CPU time per operator (self time, top ``--top``);
- the matrix products' achieved GFLOP/s beside this CPU's measured float32 matmul peak (a
  large square product on the same threads, measured in the same process just before);
- Stage I / look-ahead / Stage II seconds from the edit report.

If the products take most of the time at a large share of the peak, the edit is compute-bound:
only less arithmetic (fewer rows, steps or layers) or cheaper arithmetic (bfloat16 products,
``planner_autocast``) makes it faster. ::

    python benchmarks/profile_edit.py --method alphaedit --edits 25 --set v_steps=5 \\
        --threads 1 --out benchmarks/results/profile_alphaedit_smollm2

Writes ``OUT.json`` and ``OUT.md``. Timings are only comparable between runs made alone on
the machine; the report says which environment variables were set. The edit runs twice: once
under the profiler (times) and once under ``FlopCounterMode`` (FLOPs per operator). The
profiler keeps every operator event in memory: a batch of 25 with all 25 Stage I steps grew
past 8 GB here, so profile a few steps (``--set v_steps=5``): each step is alike.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import command_line, one_batch_parser, write_json, write_table  # noqa: E402
from speed import allocator_environment, key_value, matmul_peak  # noqa: E402

PRODUCTS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


def profile_batch(args: Any) -> dict[str, Any]:
    """One edit of the batch under the profiler; operator rows and the stage seconds."""
    from torch.profiler import ProfilerActivity, profile
    from torch.utils.flop_counter import FlopCounterMode

    from metake import Editor, load_model
    from metake.evaluation.datasets import load_dataset

    peak = matmul_peak(args.threads)
    model, tok = load_model(args.model, device=args.device)
    dataset = load_dataset("zsre", args.data, tokenizer=tok)
    records = dataset.records[args.start : args.start + args.edits]
    method, _, solver = args.method.partition("+")
    editor = Editor(model, tok, method, solver=solver or None, model_id=args.model,
                    progress=False, **dict(args.overrides))  # fmt: skip
    editor.load_statistics()
    editor.contexts  # noqa: B018  (context prefixes: once per session, not per batch)
    requests = [r.request for r in records]
    with profile(activities=[ProfilerActivity.CPU]) as prof:  # no shapes: memory stays small
        start = time.perf_counter()
        report = editor.edit(requests).report
        wall = time.perf_counter() - start
    editor.restore()
    with FlopCounterMode(display=False) as counter:  # the same edit again, counting FLOPs
        editor.edit(requests)
    editor.restore()
    flops = {".".join(str(op).split(".")[:2]).replace(".", "::"): n  # aten.mm -> aten::mm
             for op, n in counter.get_flop_counts()["Global"].items()}  # fmt: skip
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) / 1e6
    operators = sorted(
        ({"name": e.key, "self_seconds": e.self_cpu_time_total / 1e6, "calls": e.count,
          "flops": int(flops.get(e.key, 0))} for e in events),
        key=lambda row: -row["self_seconds"],
    )  # fmt: skip
    products = [op for op in operators if op["name"] in PRODUCTS]
    product_seconds = sum(op["self_seconds"] for op in products)
    product_flops = sum(op["flops"] for op in products)
    lookahead = getattr(report, "seconds_lookahead", 0.0) or 0.0
    return {
        "command": command_line(),
        "model": args.model,
        "method": args.method,
        "records": [args.start, args.start + args.edits],
        "threads": args.threads,
        "overrides": dict(args.overrides),
        "environment": allocator_environment(),
        "matmul_peak_gflops": peak,
        "seconds_wall": wall,
        "seconds_stage1": report.seconds_stage1 - lookahead,
        "seconds_lookahead": lookahead,
        "seconds_stage2": report.seconds_stage2,
        "profiled_cpu_seconds": total,
        "product_seconds": product_seconds,
        "product_gflop": product_flops / 1e9,
        "product_gflops": product_flops / 1e9 / max(product_seconds, 1e-9),
        "operators": operators[: args.top],
    }


def table(result: dict[str, Any]) -> list[str]:
    """The Markdown report."""
    n = result["records"][1] - result["records"][0]
    total = result["profiled_cpu_seconds"]
    share = 100 * result["product_seconds"] / total
    lines = [
        f"# Profile of one batch of {n} edits: {result['method']} on {result['model']}",
        "",
        f"`{result['command']}`",
        "",
        f"{result['threads']} threads; settings changed: {result['overrides'] or 'none'}; "
        f"environment: {result['environment'] or 'none set'}.",
        "",
        f"- Wall: {result['seconds_wall']:.1f} s ({result['seconds_wall'] / n:.2f} s/edit): "
        f"Stage I {result['seconds_stage1']:.1f} s, look-ahead "
        f"{result['seconds_lookahead']:.1f} s, Stage II {result['seconds_stage2']:.1f} s.",
        f"- Matrix products ({', '.join(PRODUCTS)}): {result['product_seconds']:.1f} s of "
        f"{total:.1f} s profiled CPU time ({share:.0f} %), {result['product_gflop']:.0f} GFLOP at "
        f"{result['product_gflops']:.0f} GFLOP/s, against a measured float32 matmul peak of "
        f"{result['matmul_peak_gflops']:.0f} GFLOP/s "
        f"({100 * result['product_gflops'] / result['matmul_peak_gflops']:.0f} %).",
        "",
        "| operator | self seconds | share | calls | GFLOP |",
        "|---|---:|---:|---:|---:|",
    ]
    for op in result["operators"]:
        lines.append(
            f"| `{op['name']}` | {op['self_seconds']:.2f} | "
            f"{100 * op['self_seconds'] / total:.1f} % | {op['calls']} | "
            f"{op['flops'] / 1e9:.1f} |"
        )
    return lines


def main() -> None:
    """Profile one batch and write the report."""
    parser = one_batch_parser(__doc__, "benchmarks/results/profile_smollm2")
    parser.add_argument("--method", default="alphaedit", help="a method, or metake+SOLVER")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--top", type=int, default=20, help="operators listed")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], type=key_value,
        metavar="KEY=VALUE", help="hyper-parameter, e.g. v_steps=5 for a quick look",
    )  # fmt: skip
    args = parser.parse_args()
    result = profile_batch(args)
    out = Path(args.out)
    write_json(out, result)
    write_table(out, table(result))


if __name__ == "__main__":
    main()
