"""Where one batch's time and memory go, this checkout beside a baseline checkout, per method.

    python benchmarks/speed.py --model smollm2-135m --data ../shared/data/zsre/zsre_1k.json \\
        --start 500 --edits 100 --methods memit,alphaedit,metake,metake_exact \\
        --baseline 15efe91 --out benchmarks/results/speed_smollm2

For every method and each checkout (this one; ``--baseline REF``, a commit checked out into a
temporary git worktree, is the code path as it was before) one child process loads the model,
edits zsRE records START..START+EDITS as one batch and scores them (``--variant
LABEL:KEY=VALUE`` adds a run of this checkout with other settings, e.g. bfloat16 planners). Each
child reports seconds per edit by stage (Stage I, MetaKE's look-ahead, Stage II, evaluation),
its peak resident memory (``ru_maxrss``: the whole process, model included), Stage I's rows run
where the code counts them, and Eff./Gen./Spe. of the edited batch (quality must not move with
the speed-ups). With ``--count-flops`` a second child per run counts the floating-point
operations of the edit (``torch.utils.flop_counter``; matmuls and convolutions, forward and
backward) so the table can give the achieved FLOP/s against this CPU's matmul peak, measured
here first (float32, the thread count of the children). Writes ``OUT.json`` and ``OUT.md``.

Run it on an otherwise idle machine: every figure is a wall-clock time.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import command_line, one_batch_parser, write_json, write_table  # noqa: E402


def matmul_peak(threads: int, size: int = 2048, repeats: int = 8) -> float:
    """Float32 GFLOP/s of a ``size``-square matmul on ``threads`` threads (best of ``repeats``)."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


class PeakMemory:
    """Resident memory of this process sampled every 20 ms: the peak since :meth:`reset`."""

    def __init__(self) -> None:
        self.peak = self.now()
        threading.Thread(target=self._sample, daemon=True).start()

    @staticmethod
    def now() -> float:
        """Resident memory now, GiB."""
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30

    def _sample(self) -> None:
        while True:
            self.peak = max(self.peak, self.now())
            time.sleep(0.02)

    def reset(self) -> float:
        """The peak so far; the next one starts from now."""
        peak, self.peak = max(self.peak, self.now()), self.now()
        return peak


def this_checkouts_contention() -> ModuleType:
    """``metake.evaluation.contention`` of this checkout (it imports nothing of metake), loaded
    from its file, so that a child running a baseline checkout measures the same way."""
    path = ROOT / "src" / "metake" / "evaluation" / "contention.py"
    spec = importlib.util.spec_from_file_location("metake_contention_of_this_checkout", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def child(args: Any) -> dict[str, Any]:
    """One edit of one batch in this process (imports whatever ``metake`` PYTHONPATH gives)."""
    import torch

    import metake.editor
    from metake import Editor, load_model
    from metake.evaluation.datasets import load_dataset
    from metake.evaluation.evaluate import evaluate_records, mean_metrics

    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model, device=args.device)
    dataset = load_dataset("zsre", args.data, tokenizer=tok)
    records = dataset.records[args.start : args.start + args.edits]
    method, _, solver = args.method.partition("+")
    options = {"group_rows": int(args.group_rows)} if args.group_rows else {}
    editor = Editor(model, tok, method, solver=solver or None, model_id=args.model,
                    progress=False, **options, **dict(args.overrides))  # fmt: skip
    editor.load_statistics()
    editor.contexts  # noqa: B018  (context prefixes: once per session, not per batch)
    requests = [r.request for r in records]
    if args.count_flops:
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            editor.edit(requests)
        editor.restore()
        return {"flops": counter.get_total_flops()}
    memory = PeakMemory()
    loaded = memory.reset()
    peaks = {}
    planner = metake.editor.compute_targets

    def stage1(*a: Any, **k: Any) -> Any:  # the peak of Stage I alone
        memory.reset()
        try:
            return planner(*a, **k)
        finally:
            peaks["stage1"] = max(peaks.get("stage1", 0.0), memory.reset())

    metake.editor.compute_targets = stage1
    meter = this_checkouts_contention().CpuMeter()  # also in a baseline without the module
    report = editor.edit(requests).report
    cpu = meter.stop()
    wall = cpu.seconds
    peaks["rest"] = memory.reset()
    start = time.perf_counter()
    scores = mean_metrics(evaluate_records(model, tok, records, "zsre"),
                          ("efficacy", "generalization", "specificity"))  # fmt: skip
    evaluation = time.perf_counter() - start
    editor.restore()
    lookahead = getattr(report, "seconds_lookahead", 0.0) or 0.0
    return {
        "seconds_wall": wall,
        "seconds_stage1": report.seconds_stage1 - lookahead,
        "seconds_lookahead": lookahead,
        "seconds_stage2": report.seconds_stage2,
        "seconds_evaluation": evaluation,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "rss_loaded_gib": loaded,
        "peak_stage1_gib": peaks["stage1"],
        "peak_after_stage1_gib": peaks["rest"],
        "stage1_rows_run": getattr(report, "stage1_rows_run", None),
        "other_cores": cpu.other_cores,
        **scores,
    }


def run_child(
    args: Any,
    src: Path,
    method: str,
    count_flops: bool,
    group_rows: int | None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """:func:`child` in a fresh process on the checkout whose sources are ``src`` (``extra``:
    settings on top of ``--set``)."""
    command = [sys.executable, __file__, "--child", "--method", method, "--model", args.model,
               "--data", args.data, "--start", str(args.start), "--edits", str(args.edits),
               "--device", args.device, "--threads", str(args.threads)]  # fmt: skip
    for key, value in [*args.overrides, *(extra or {}).items()]:
        command += ["--set", f"{key}={json.dumps(value)}"]
    if group_rows:
        command += ["--group-rows", str(group_rows)]
    if count_flops:
        command.append("--count-flops")
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": str(args.threads)}
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{method} on {src}: child failed\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def key_value(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with a JSON value (a plain string otherwise)."""
    key, _, value = text.partition("=")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def variants(
    checkouts: dict[str, Path], group_rows: str | None, extra: list[str] | None = None
) -> list[tuple[str, Path, Any, dict[str, Any]]]:
    """(label, sources, group_rows, settings) of every run: the baseline once, this checkout per
    group size and once more per ``--variant LABEL:KEY=VALUE[,KEY=VALUE]``."""
    out = []
    for label, src in checkouts.items():
        sizes = (
            [int(v) for v in group_rows.split(",")] if group_rows and label == "current" else [None]
        )
        for size in sizes:
            out.append((label if size is None else f"{label}, groups of {size}", src, size, {}))
    for text in extra or []:
        name, _, settings = text.partition(":")
        pairs = dict(key_value(part) for part in settings.split(",") if part)
        if not name or not pairs:
            raise SystemExit(f"--variant {text!r}: expected LABEL:KEY=VALUE[,KEY=VALUE]")
        out.append((f"current, {name}", checkouts["current"], None, pairs))
    return out


def baseline_checkout(ref: str) -> tuple[Path, Path]:
    """A temporary git worktree of ``ref``: (its folder, its ``src``)."""
    folder = Path(tempfile.mkdtemp(prefix="metake-baseline-"))
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-f", str(folder),
                    ref], check=True, capture_output=True)  # fmt: skip
    return folder, folder / "src"


def main() -> int:
    """Measure every (checkout, method) and write the tables."""
    parser = one_batch_parser(__doc__, "benchmarks/results/speed_smollm2")
    parser.set_defaults(edits=100)
    parser.add_argument("--methods", default="memit,alphaedit,metake,metake_exact",
                        help="comma-separated methods, one child process each")  # fmt: skip
    parser.add_argument("--baseline", default=None, help="commit to compare with (a worktree)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="torch threads of every child")  # fmt: skip
    parser.add_argument("--count-flops", action="store_true", help="a second child counts FLOPs")
    parser.add_argument(
        "--group-rows",
        default=None,
        help="comma-separated group sizes to run this checkout with (Editor's group_rows; "
        "None: the library's own)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        type=key_value,
        metavar="KEY=VALUE",
        help="hyper-parameter for every run, e.g. v_steps=2 for a quick memory check",
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="LABEL:KEY=VALUE[,KEY=VALUE]",
        help="one more run of this checkout with these settings, e.g. "
        "bf16:planner_autocast=bfloat16",
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return 0
    peak = matmul_peak(args.threads)
    checkouts = {"current": ROOT / "src"}
    worktree = None
    if args.baseline:
        worktree, checkouts["baseline"] = baseline_checkout(args.baseline)
    runs: dict[str, dict[str, Any]] = {}
    try:
        for method in args.methods.split(","):
            for label, src, rows, extra in variants(checkouts, args.group_rows, args.variant):
                print(f"{method} ({label}) ...", file=sys.stderr, flush=True)
                row = run_child(args, src, method, False, rows, extra)
                if args.count_flops:
                    row.update(run_child(args, src, method, True, rows, extra))
                runs[f"{method} {label}"] = {"method": method, "checkout": label, **row}
    finally:
        if worktree is not None:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force",
                            str(worktree)], check=False)  # fmt: skip
    result = {"command": command_line(), "model": args.model, "threads": args.threads,
              "records": [args.start, args.start + args.edits], "baseline": args.baseline,
              "matmul_peak_gflops": peak, "overrides": dict(args.overrides),
              "environment": allocator_environment(), "runs": runs}  # fmt: skip
    out = Path(args.out)
    write_json(out, result)
    write_table(out, table(result))
    return 0


def allocator_environment() -> dict[str, str]:
    """The environment variables that change threads or glibc's allocator (the children inherit
    them): they move the memory figures, so a report names them."""
    return {k: v for k, v in sorted(os.environ.items())
            if k.startswith("MALLOC_") or k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}  # fmt: skip


def _cores(other: float | None) -> str:
    return "not recorded" if other is None else f"{other:.1f}"


def table(result: dict[str, Any]) -> list[str]:
    """The Markdown report of a result."""
    n = result["records"][1] - result["records"][0]
    lines = [
        f"# One batch of {n} edits on {result['model']}: time and memory by stage",
        "",
        f"`{result['command']}`",
        "",
        f"{result['threads']} threads; float32 matmul peak {result['matmul_peak_gflops']:.0f} "
        f"GFLOP/s; baseline: {result['baseline'] or '(none)'}; settings changed: "
        f"{result['overrides'] or 'none'}; environment: "
        f"{result.get('environment') or 'none set'}. Seconds per edit.",
        "",
        "Other cores busy: the average number of cores that other processes used during the "
        "edit (0: an idle machine).",
        "",
        "Memory: the process's resident set (model and statistics included: *loaded*), its "
        "peak during Stage I and after it (look-ahead, Stage II), GiB.",
        "",
        "| method | code | Stage I | look-ahead | Stage II | evaluation | total | loaded | "
        "peak Stage I | peak after | GFLOP/s (% of peak) | other cores busy | Eff. | Gen. | "
        "Spe. |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["runs"].values():
        total = row["seconds_stage1"] + row["seconds_lookahead"] + row["seconds_stage2"]
        rate = "–"
        if "flops" in row:
            gflops = row["flops"] / 1e9 / max(total, 1e-9)
            rate = f"{gflops:.1f} ({100 * gflops / result['matmul_peak_gflops']:.0f}%)"
        lines.append(
            f"| {row['method']} | {row['checkout']} | {row['seconds_stage1'] / n:.2f} | "
            f"{row['seconds_lookahead'] / n:.2f} | {row['seconds_stage2'] / n:.2f} | "
            f"{row['seconds_evaluation'] / n:.2f} | {total / n:.2f} | {row['rss_loaded_gib']:.2f} "
            f"| {row['peak_stage1_gib']:.2f} | {row['peak_after_stage1_gib']:.2f} | "
            f"{rate} | {_cores(row.get('other_cores'))} | {row['efficacy']:.2f} | "
            f"{row['generalization']:.2f} | {row['specificity']:.2f} |"
        )
    return lines


if __name__ == "__main__":
    sys.exit(main())
