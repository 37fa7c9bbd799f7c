"""What bfloat16 buys on this machine, kernel by kernel: matmul and attention, float32 vs bf16.

    python benchmarks/bf16_kernels.py --threads 1 --out benchmarks/results/bf16_kernels

Times (best of ``--repeats``) a matrix product of SmolLM2's MLP shape (tokens x 576 by
576 x 1536) and PyTorch's fused attention (``scaled_dot_product_attention``, forward and
backward; 9 heads of 64, causal) in float32 and in bfloat16, on ``--threads`` threads. This is
why ``planner_autocast`` runs the attention in its eager form on the CPU (docs/scaling.md).
Writes ``OUT.json`` and ``OUT.md``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F  # noqa: N812
from common import command_line, script_parser, write_json, write_table


def best_seconds(run: Callable[[], object], repeats: int) -> float:
    """The fastest of ``repeats`` timed calls of ``run`` (after one warm-up call)."""
    run()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def matmul_gflops(dtype: torch.dtype, tokens: int, repeats: int) -> float:
    """GFLOP/s of ``[tokens, 576] @ [576, 1536]`` in ``dtype``."""
    x, w = torch.randn(tokens, 576, dtype=dtype), torch.randn(1536, 576, dtype=dtype)
    seconds = best_seconds(lambda: F.linear(x, w), repeats)
    return 2 * tokens * 576 * 1536 / seconds / 1e9


def attention_seconds(dtype: torch.dtype, batch: int, length: int, repeats: int) -> dict:
    """Seconds of causal fused attention forward and forward+backward in ``dtype``."""
    shape = (batch, 9, length, 64)
    q, k, v = (torch.randn(shape, dtype=dtype, requires_grad=True) for _ in range(3))

    def forward() -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def both() -> None:
        forward().float().sum().backward()

    with torch.no_grad():
        fwd = best_seconds(forward, repeats)
    return {"forward": fwd, "forward_backward": best_seconds(both, repeats)}


def main() -> int:
    """Measure both kernels in both dtypes and write the tables."""
    parser = script_parser(__doc__)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--tokens", type=int, default=2048,
                        help="rows of the matmul (the attention's shape is fixed: 70 x 9 heads "
                             "x 20 tokens)")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=10,
                        help="timed calls per kernel and dtype after a warm-up (best)")  # fmt: skip
    parser.add_argument("--out", default="benchmarks/results/bf16_kernels",
                        help="output stem (OUT.json, OUT.md)")  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    result = {
        "command": command_line(),
        "threads": args.threads,
        "tokens": args.tokens,
        "repeats": args.repeats,
        "matmul_gflops": {
            n: matmul_gflops(d, args.tokens, args.repeats) for n, d in dtypes.items()
        },  # fmt: skip
        "attention_seconds": {
            n: attention_seconds(d, 70, 20, args.repeats) for n, d in dtypes.items()
        },  # fmt: skip
    }
    lines = [
        "# float32 against bfloat16, kernel by kernel",
        "",
        f"`{result['command']}`",
        "",
        f"{args.threads} thread(s).",
        "",
        "| kernel | float32 | bfloat16 |",
        "|---|---:|---:|",
        f"| matmul [{args.tokens}, 576] x [576, 1536], GFLOP/s | "
        f"{result['matmul_gflops']['float32']:.0f} | {result['matmul_gflops']['bfloat16']:.0f} |",
    ]
    for part in ("forward", "forward_backward"):
        times = {n: 1e3 * result["attention_seconds"][n][part] for n in dtypes}
        lines.append(f"| fused attention (70 x 9 heads x 20 tokens) {part.replace('_', '+')}, ms "
                     f"| {times['float32']:.1f} | {times['bfloat16']:.1f} |")  # fmt: skip
    out = Path(args.out)
    write_json(out, result)
    write_table(out, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
