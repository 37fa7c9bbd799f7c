"""Stage I with and without the prefix key/value cache on one batch: seconds and agreement.

    python benchmarks/stage1_speed.py --model smollm2-135m \\
        --data ../shared/data/zsre/zsre_1k.json --start 500 --edits 10 \\
        --out benchmarks/results/stage1_speed_smollm2

Runs the standard planner twice on the same requests (whole prompts at every step, then the
prefix-cached run), and reports each one's seconds, steps and the largest difference of the
resulting targets. Writes ``OUT.json`` and ``OUT.md``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from common import command_line, one_batch_parser, write_json, write_table

from metake import Editor, load_model, load_requests
from metake.planners.standard import compute_targets


def main() -> int:
    """Time both runs and write the results."""
    parser = one_batch_parser(__doc__, "benchmarks/results/stage1_speed_smollm2")
    args = parser.parse_args()
    model, tok = load_model(args.model, device=args.device)
    requests = load_requests(args.data)[args.start : args.start + args.edits]
    editor = Editor(model, tok, model_id=args.model, progress=False)
    contexts = editor.contexts
    runs = {}
    for cached in (False, True):
        start = time.perf_counter()
        plan = compute_targets(model, tok, requests, editor.hparams, contexts, prefix_cache=cached)
        runs[cached] = (time.perf_counter() - start, plan)
        print(f"prefix_cache={cached}: {runs[cached][0]:.1f} s", file=sys.stderr)
    (whole_s, whole), (cached_s, cached) = runs[False], runs[True]
    diff = float((whole.v_target - cached.v_target).norm(dim=-1).max())
    scale = float(whole.v_target.norm(dim=-1).min())
    command = command_line()
    result = {
        "command": command,
        "model": args.model,
        "records": [args.start, args.start + args.edits],
        "torch_threads": torch.get_num_threads(),
        "whole_prompts": {"seconds": whole_s, "steps": whole.steps_run},
        "prefix_cached": {"seconds": cached_s, "steps": cached.steps_run},
        "max_target_difference": diff,
        "min_target_norm": scale,
    }
    out = Path(args.out)
    write_json(out, result)
    lines = [
        f"# Stage I with and without the prefix cache on {args.model}",
        "",
        f"`{command}`",
        "",
        f"zsRE records {args.start}–{args.start + args.edits - 1}, one batch, "
        f"{torch.get_num_threads()} threads.",
        "",
        "| Stage I | seconds | steps |",
        "|---|---|---|",
        f"| whole prompts every step | {whole_s:.1f} | {whole.steps_run} |",
        f"| prefix cached | {cached_s:.1f} | {cached.steps_run} |",
        "",
        f"Speed-up {whole_s / cached_s:.1f}×; largest difference between the two runs' targets "
        f"{diff:.2g} (target norms ≥ {scale:.0f}).",
    ]
    write_table(out, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
