"""Key-statistics throughput (tokens/s) of one process and of N processes under torchrun.

    python benchmarks/stats_throughput.py --model smollm2-135m --layers 5,6,7,8,9 --samples 400 \
        --processes 1,2 --cores 2 --out benchmarks/results/stats_throughput_smollm2

Each setting runs ``metake stats --no-stats-cache --export`` on the first ``--samples``
Wikipedia intros as its own command: one process with ``--cores`` threads, or ``torchrun
--standalone --nproc-per-node N`` with ``--cores / N`` threads per process (the same cores in all
settings); the exports are compared with the first setting's (the same C0, whatever the number
of processes).
The wall-clock time covers the whole command (start-up, model load, the pass, the
eigen-decompositions of the summary); the throughput is the tokens over the statistics
seconds that ``metake stats`` prints (the pass alone). Writes ``OUT.json`` and ``OUT.md``;
run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from common import command_line, script_parser, write_json, write_table
from safetensors import safe_open


def run_setting(args: argparse.Namespace, processes: int, export: Path) -> dict:
    """Run ``metake stats`` with ``processes`` processes (writing ``--export export``); its
    tokens, seconds and command."""
    threads = max(1, args.cores // processes)
    stats = ["stats", "--model", args.model, "--layers", args.layers, "--samples",
             str(args.samples), "--device", "cpu", "--no-stats-cache",
             "--export", str(export)]  # fmt: skip
    if processes == 1:
        command = [sys.executable, "-m", "metake", *stats]
    else:
        command = ["torchrun", "--standalone", "--nproc-per-node", str(processes), "-m", "metake",
                   *stats]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    tokens = int(re.search(r"over (\d+) tokens", done.stdout).group(1))
    seconds = float(re.search(r"statistics ([\d.]+) s", done.stdout).group(1))
    return {"processes": processes, "threads_per_process": threads, "tokens": tokens,
            "seconds": seconds, "wall_seconds": wall, "tokens_per_second": tokens / seconds,
            "command": " ".join(command)}  # fmt: skip


def max_relative_difference(a: Path, b: Path) -> float:
    """The largest ``max |A - B| / max |B|`` over the layers of two ``--export`` files."""
    worst = 0.0
    with safe_open(str(a), framework="pt") as fa, safe_open(str(b), framework="pt") as fb:
        for name in fb.keys():  # noqa: SIM118
            x, y = fa.get_tensor(name), fb.get_tensor(name)
            worst = max(worst, float((x - y).abs().max() / y.abs().max()))
    return worst


def main() -> int:
    """Run every setting and write the table."""
    parser = script_parser(__doc__)
    parser.add_argument("--model", default="smollm2-135m", help="built-in name, folder or .gguf")
    parser.add_argument("--layers", default="5,6,7,8,9",
                        help="comma-separated layers whose statistics are computed")  # fmt: skip
    parser.add_argument("--samples", type=int, default=400,
                        help="first Wikipedia intros of the statistics pass")  # fmt: skip
    parser.add_argument("--processes", default="1,2",
                        help="comma-separated process counts, one setting each (more than 1: "
                             "under torchrun); the first one's C0 is the reference")  # fmt: skip
    parser.add_argument("--cores", type=int, default=2,
                        help="threads in all, per setting (split over its processes)")  # fmt: skip
    parser.add_argument("--out", required=True,
                        help="output stem (OUT.json, OUT.md; OUT.Nproc.safetensors while it "
                             "runs)")  # fmt: skip
    args = parser.parse_args()
    out = Path(args.out)
    exports = {int(n): out.parent / f"{out.name}.{n}proc.safetensors"
               for n in args.processes.split(",")}  # fmt: skip
    uneven = [n for n in exports if n < 1 or args.cores % n]
    if uneven:
        parser.error(f"--cores {args.cores} does not split evenly over {uneven} process(es): "
                     "every setting must use the same cores in all")  # fmt: skip
    rows = [run_setting(args, n, path) for n, path in exports.items()]
    first = next(iter(exports))
    for row in rows:  # the same statistics, however many processes computed them
        row["max_relative_difference"] = max_relative_difference(exports[row["processes"]],
                                                                 exports[first])  # fmt: skip
    for path in exports.values():
        path.unlink()
    result = {"command": command_line(), "model": args.model, "layers": args.layers,
              "samples": args.samples, "cores": args.cores, "rows": rows}  # fmt: skip
    write_json(out, result)
    lines = [
        f"# Key-statistics throughput: {args.model}",
        "",
        f"`{result['command']}`",
        "",
        f"Layers {args.layers}, the first {args.samples} Wikipedia intros, {args.cores} cores in "
        "all; `seconds`: the statistics pass as `metake stats` prints it, `wall`: the whole "
        "command.",
        "",
        f"The last column compares each setting's `--export` with that of {first} process(es): "
        "the largest |difference| over the largest |entry|, layer by layer.",
        "",
        "| processes | threads each | tokens | seconds | tokens/s | wall s | C₀ difference |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [f"| {r['processes']} | {r['threads_per_process']} | {r['tokens']} | "
              f"{r['seconds']:.1f} | {r['tokens_per_second']:.0f} | {r['wall_seconds']:.1f} | "
              f"{r['max_relative_difference']:.1e} |" for r in rows]  # fmt: skip
    write_table(out, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
