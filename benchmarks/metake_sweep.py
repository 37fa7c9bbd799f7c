"""Sweep MetaKE's look-ahead learning rate (and steps) on one batch of edits, Stage I run once.

For a batch of zsRE records (by default a *development* slice, records 500-509, disjoint from
the records the comparison in ``zsre_sequential.py`` evaluates), Stage I runs once; then for the
solver alone and for each look-ahead setting the refined targets are executed by the solver,
measured and undone. Measured: the look-ahead's edit NLL under the virtual weights (first and
last step), Efficacy (teacher-forced target-token accuracy on ``src``), the mean P(target), the
norm of ``V* - V_plan``, and the mean KL(original || edited) over held-out Wikipedia intros.

    python benchmarks/metake_sweep.py --model smollm2-135m --solver alphaedit \\
        --data ../shared/data/zsre/zsre_1k.json --start 500 --edits 10 \\
        --lrs 0.005,0.05,0.2,0.5 --out benchmarks/results/metake_sweep_smollm2

Writes ``OUT.json`` and ``OUT.md`` (a table with the command above it).
"""

from __future__ import annotations

import itertools
import json
import logging
import statistics
import sys
import time
from pathlib import Path

from common import (
    add_heldout_options,
    command_line,
    heldout_texts,
    script_parser,
    write_json,
    write_table,
)

from metake import Editor, load_model, load_requests
from metake.cli import parse_key_value
from metake.planners.metake import lookahead_targets
from metake.planners.standard import compute_targets
from metake.probe import mean_kl, next_token_log_probs, target_probability, token_accuracy
from metake.solvers.memit import keys_and_values


def main() -> int:
    """Run the sweep and write the results."""
    parser = script_parser(__doc__)
    parser.add_argument("--model", default="smollm2-135m", help="built-in name, folder or .gguf")
    parser.add_argument("--solver", default="alphaedit", choices=["memit", "alphaedit"],
                        help="the solver that executes the targets (Stage II)")  # fmt: skip
    parser.add_argument("--data", default="../shared/data/zsre/zsre_1k.json", help="zsRE file")
    parser.add_argument("--start", type=int, default=500,
                        help="first record of the batch (500 on: a development slice)")  # fmt: skip
    parser.add_argument("--edits", type=int, default=10, help="records edited as one batch")
    parser.add_argument("--lrs", default="0.005,0.05,0.2,0.5",
                        help="comma-separated look-ahead learning rates to try")  # fmt: skip
    parser.add_argument("--steps", default="15",
                        help="comma-separated look-ahead step counts to try (each with every "
                             "--lrs)")  # fmt: skip
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="hyper-parameter override (VALUE read as JSON when it parses); "
                             "repeatable")  # fmt: skip
    add_heldout_options(parser)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, auto, ...")
    parser.add_argument("--out", default="benchmarks/results/metake_sweep_smollm2",
                        help="output stem (OUT.json, OUT.md)")  # fmt: skip
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    overrides = dict(parse_key_value(x) for x in args.set)

    model, tok = load_model(args.model, device=args.device)
    requests = load_requests(args.data)[args.start : args.start + args.edits]
    editor = Editor(model, tok, "metake", solver=args.solver, model_id=args.model,
                    progress=False, **overrides)  # fmt: skip
    hp = editor.hparams
    texts = heldout_texts(parser, hp.mom2_samples, args.heldout_start, args.heldout_texts)
    editor.load_statistics()
    contexts = editor.contexts
    base_logp, mask = next_token_log_probs(model, tok, texts)
    start = time.perf_counter()
    plan = compute_targets(model, tok, requests, hp, contexts)
    stage1_seconds = time.perf_counter() - start
    keys, _ = keys_and_values(model, tok, requests, contexts, plan.layer, plan.layer)
    gate = editor.gate(plan.layer, keys)
    originals = {layer: editor.adapter.weight(model, layer).detach().clone() for layer in hp.layers}

    settings = [(None, 0)] + [
        (float(lr), int(steps))
        for lr, steps in itertools.product(args.lrs.split(","), args.steps.split(","))
    ]
    rows = []
    for lr, steps in settings:
        begin = time.perf_counter()
        row: dict = {"lr": lr, "steps": steps}
        targets = plan.v_target
        if lr is not None:
            setting = hp.with_overrides(metake_lr=lr, metake_steps=steps)
            refined = lookahead_targets(model, tok, requests, plan, gate, setting, contexts,
                                        editor.locality_prompts)  # fmt: skip
            targets = refined.v_target
            row["lookahead_first"] = refined.history[0]
            row["lookahead_last"] = refined.history[-1]
        row["lookahead_seconds"] = time.perf_counter() - begin
        row["target_shift"] = float((targets - plan.v_target).norm(dim=-1).mean())
        editor.solve_targets(requests, targets, contexts)  # Stage II in place; undone below
        row["efficacy"] = 100 * statistics.mean(token_accuracy(model, tok, requests))
        row["mean_p_target"] = statistics.mean(target_probability(model, tok, r) for r in requests)
        row["heldout_kl"] = mean_kl(base_logp, next_token_log_probs(model, tok, texts)[0], mask)
        for layer, weight in originals.items():
            editor.adapter.set_weight(model, layer, weight)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)

    command = command_line()
    out = Path(args.out)
    result = {
        "command": command,
        "model": args.model,
        "solver": args.solver,
        "data": args.data,
        "records": [args.start, args.start + args.edits],
        "hparams": hp.to_dict(),
        "stage1_seconds": stage1_seconds,
        "rows": rows,
    }
    write_json(out, result)
    lines = [
        f"# MetaKE look-ahead sweep on {args.model} ({args.solver} solver)",
        "",
        f"`{command}`",
        "",
        f"zsRE records {args.start}–{args.start + args.edits - 1} (target `answers[0]`) edited as "
        f"one batch into the unedited model; Stage I once ({stage1_seconds:.0f} s); held-out KL "
        f"over {args.heldout_texts} Wikipedia intros from index {args.heldout_start}. NLL: the "
        "look-ahead's edit loss under the one-layer virtual weights, first → last step.",
        "",
        "| look-ahead | NLL (virtual) | ‖V*−V_plan‖ | Eff. (%) | mean P(target) | "
        "held-out KL | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        name = "none (solver alone)" if r["lr"] is None else f"lr {r['lr']:g}, {r['steps']} steps"
        nll = (f"{r['lookahead_first']['edit_nll']:.2f} → {r['lookahead_last']['edit_nll']:.2f}"
               if r["lr"] is not None else "–")  # fmt: skip
        lines.append(
            f"| {name} | {nll} | {r['target_shift']:.2f} | {r['efficacy']:.1f} | "
            f"{r['mean_p_target']:.3f} | {r['heldout_kl']:.4f} | {r['lookahead_seconds']:.0f} |"
        )
    write_table(out, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
