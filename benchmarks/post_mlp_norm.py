"""How far a norm after the MLP is from "a change of the projection's output adds to the residual".

For a model whose adapter names a norm after the MLP (Gemma3's ``post_feedforward_layernorm``,
``y = g * x / rms(x)``), a change of the projection's output ``x`` moves the residual stream by
about ``g / rms(x)`` times as much, per coordinate. This script measures that factor at the
subjects' last tokens of zsRE records (plain prompts) for each edit layer of the preset and
writes its quantiles (JSON and a table): the factor a Llama-shaped adapter, which adds the
residual to ``x`` as it is, gets wrong.

    python benchmarks/post_mlp_norm.py --model gemma3-270m \
        --out benchmarks/results/post_mlp_norm_gemma3
"""

from __future__ import annotations

from pathlib import Path

import torch
from common import command_line, one_batch_parser, write_json, write_table

from metake.editor import Editor
from metake.evaluation.datasets import load_dataset
from metake.models.adapters import rms_norm_eps
from metake.models.load import load_model
from metake.solvers.memit import subject_activations

QUANTILES = (0.1, 0.5, 0.9, 0.99, 1.0)


def main() -> None:
    """Measure ``g / rms(x)`` per edit layer and write the report."""
    parser = one_batch_parser(__doc__, "benchmarks/results/post_mlp_norm_gemma3")
    parser.set_defaults(model="gemma3-270m", edits=25)
    args = parser.parse_args()
    model, tokenizer = load_model(args.model, device=args.device)
    editor = Editor(model, tokenizer, "memit", model_id=args.model)
    adapter, layers = editor.adapter, list(editor.hparams.layers)
    if adapter.mlp_out_norm(model, layers[0]) is None:
        raise SystemExit(f"{args.model}: no norm after the MLP, the factor is 1 everywhere")
    records = load_dataset("zsre", args.data, tokenizer=tokenizer).records
    requests = [r.request for r in records[args.start : args.start + args.edits]]
    acts = subject_activations(model, tokenizer, requests, [""], layers, layers[-1])
    rows, result = [], {"command": command_line(), "model": args.model, "layers": {}}
    for layer in layers:
        x = acts.projections[layer].double()
        gain = adapter.mlp_out_gain(model, layer).to(x.device)
        eps = rms_norm_eps(adapter.mlp_out_norm(model, layer))
        rms = (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()
        factor = (gain.abs() / rms).flatten()
        q = torch.quantile(factor, torch.tensor(QUANTILES, dtype=torch.float64)).tolist()
        result["layers"][str(layer)] = {
            "quantiles": dict(zip(map(str, QUANTILES), q, strict=True)),
            "median_rms_x": float(rms.median()),
            "gain_zero": int((gain == 0).sum()),
        }
        rows.append(f"| {layer} | {float(rms.median()):.3f} | " + " | ".join(f"{v:,.1f}" for v in q)
                    + f" | {int((gain == 0).sum())} |")  # fmt: skip
    out = Path(args.out)
    write_json(out, result)
    write_table(out, [
        f"`{result['command']}` ({len(requests)} zsRE subjects, plain prompts)",
        "",
        "| layer | median rms(x) | g/rms(x) p10 | p50 | p90 | p99 | max | zero gains |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
    ])  # fmt: skip


if __name__ == "__main__":
    main()
