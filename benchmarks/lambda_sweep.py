"""Sweep MEMIT's lambda on a batch of edits: efficacy against drift on held-out text.

Stage I runs once (targets do not depend on lambda); for each lambda the MEMIT solve is applied,
measured and undone. Measured per lambda: how many greedy completions start with their target,
the median target probability, the fraction of the requested change realised at the last edit
layer (||z_after - v_init|| / ||v* - v_init||), and the mean KL(original || edited) of next-token
distributions over held-out Wikipedia intros (texts the statistics did not use).

    python benchmarks/lambda_sweep.py --model smollm2-135m --requests examples/ten_edits.json \
        --lambdas 15000,5000,2000,1000 --out benchmarks/results/lambda_sweep_smollm2

Writes ``OUT.json`` (config and numbers) and ``OUT.md`` (a table with the command above it).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from common import (
    add_heldout_options,
    command_line,
    heldout_texts,
    script_parser,
    write_json,
    write_table,
)

from metake import Editor, load_model, load_requests
from metake.planners.standard import compute_targets
from metake.probe import greedy_completion, mean_kl, next_token_log_probs, target_probability
from metake.solvers.memit import apply_memit, keys_and_values


def main() -> int:
    """Run the sweep and write the results."""
    parser = script_parser(__doc__)
    parser.add_argument("--model", default="smollm2-135m", help="built-in name, folder or .gguf")
    parser.add_argument("--requests", default="examples/ten_edits.json",
                        help="requests file (JSON or JSONL), edited as one batch")  # fmt: skip
    parser.add_argument("--lambdas", default="15000,5000,2000,1000",
                        help="comma-separated lambdas to try (MEMIT's weight on C0)")  # fmt: skip
    add_heldout_options(parser)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, auto, ...")
    parser.add_argument("--out", default="benchmarks/results/lambda_sweep_smollm2",
                        help="output stem (OUT.json, OUT.md)")  # fmt: skip
    args = parser.parse_args()
    lambdas = [float(x) for x in args.lambdas.split(",")]

    model, tok = load_model(args.model, device=args.device)
    requests = load_requests(args.requests)
    editor = Editor(model, tok, model_id=args.model, progress=False)
    hp = editor.hparams
    texts = heldout_texts(parser, hp.mom2_samples, args.heldout_start, args.heldout_texts)
    editor.load_statistics()
    start = time.perf_counter()
    plan = compute_targets(model, tok, requests, hp, editor.contexts)
    stage1_seconds = time.perf_counter() - start
    base_logp, mask = next_token_log_probs(model, tok, texts, 64)
    originals = {layer: editor.adapter.weight(model, layer).detach().clone() for layer in hp.layers}
    rows = []
    for lam in lambdas:
        apply_memit(model, tok, requests, plan.v_target, hp.layers, editor.second_moment, lam,
                    editor.contexts)  # fmt: skip
        _, values = keys_and_values(model, tok, requests, editor.contexts, hp.layers[-1],
                                    hp.layers[-1])  # fmt: skip
        wanted = (plan.v_target - plan.v_init).norm(dim=-1)
        realised = ((values - plan.v_init).norm(dim=-1) / wanted).median().item()
        probs = [target_probability(model, tok, r) for r in requests]
        hits = sum(
            greedy_completion(model, tok, r.filled_prompt, 4).strip().startswith(r.target_new)
            for r in requests
        )
        logp, _ = next_token_log_probs(model, tok, texts, 64)
        kl = mean_kl(base_logp, logp, mask)
        rows.append(
            {
                "lambda": lam,
                "hits": hits,
                "median_p_target": float(torch.tensor(probs).median()),
                "median_realised_fraction": realised,
                "heldout_kl": kl,
            }
        )
        for layer, weight in originals.items():
            editor.adapter.set_weight(model, layer, weight)
        print(json.dumps(rows[-1]), file=sys.stderr)

    command = command_line()
    out = Path(args.out)
    result = {
        "command": command,
        "model": args.model,
        "requests": args.requests,
        "num_requests": len(requests),
        "hparams": hp.to_dict(),
        "stage1_seconds": stage1_seconds,
        "stage1_target_prob": [float(torch.exp(torch.tensor(-x))) for x in plan.final_nll],
        "heldout": {"start": args.heldout_start, "texts": args.heldout_texts, "max_length": 64},
        "rows": rows,
    }
    write_json(out, result)
    lines = [
        f"# MEMIT lambda sweep on {args.model}",
        "",
        f"`{command}`",
        "",
        f"Settings: model {args.model}, requests {args.requests}, lambdas {args.lambdas}, "
        f"layers {list(hp.layers)}, device {args.device}.",
        "",
        f"{len(requests)} edits in one batch; Stage I once ({stage1_seconds:.0f} s, median "
        f"P(target) at v* {torch.tensor(result['stage1_target_prob']).median():.3f}); "
        f"held-out KL over {args.heldout_texts} Wikipedia intros (from index "
        f"{args.heldout_start}, 64 tokens each).",
        "",
        "| λ | completions with target | median P(target) | median realised fraction | "
        "held-out KL (nats/token) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['lambda']:g} | {r['hits']}/{len(requests)} | {r['median_p_target']:.3f} | "
            f"{r['median_realised_fraction']:.2f} | {r['heldout_kl']:.4f} |"
        )
    write_table(out, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
