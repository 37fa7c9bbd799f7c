"""What editing a model with metake needs, computed from its config: memory per part, devices.

    python benchmarks/capacity.py --model-config benchmarks/configs/llama3-8b.json \
        --model-config benchmarks/configs/gpt-j-6b.json \
        --model-config benchmarks/configs/gpt2-xl.json --out benchmarks/results/capacity

Nothing is downloaded and no weight is allocated: the model is built on PyTorch's ``meta``
device from the config (any ``config.json`` of the hub, or the architecture files in
``benchmarks/configs/``), its parameters are counted, and metake's own architecture adapter
gives the edited projection's key size ``d_in``. From these, for the settings given:

- **weights**: parameters x bytes of ``--dtype``;
- **per edit layer, float64 ``[d_in, d_in]`` matrices**: C0 (the statistics), AlphaEdit's
  null-space projector P and its key cache of earlier batches (``sum K K^T``); the solve builds
  one more such matrix and factorises it (counted as two, transient, one layer at a time);
- **the statistics pass**: the running sums (float64) of every edit layer, and a batch's keys;
- **Stage I of a batch**: the prefix key/value cache of every prompt row (requests x contexts
  + the KL prompts), one row group's autograd activations (``--group-rows`` rows of
  ``--suffix-tokens`` tokens through the layers from the last edit layer up, in ``--dtype``),
  and the logits of the group's target positions (float32);
- **two placements**: everything on the device, or (as metake does: C0, P and the key cache
  live on the CPU and each layer's solve moves what it needs to the device) the d_in² matrices
  on the CPU and four of them on the device during one layer's solve;
- **the paper's protocol**: (seeds x methods x datasets) independent parts
  (``metake bench --only``, docs/distributed.md), the devices of ``--device-memory`` GiB one
  part needs, and so how many such devices run the whole protocol at once (in both placements).

The activation estimate counts what a decoder layer keeps for its backward (the inputs of its
projections, its norms and the MLP's hidden states: ``4 d + 2 d + 3 d_ff`` values per token, the
attention probabilities ignored for short suffixes). It is an estimate to size hardware, not a
measurement: ``benchmarks/speed.py`` measures peaks on a model you have. Writes ``OUT.json``
and ``OUT.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from common import command_line, script_parser, write_json, write_table
from transformers import AutoConfig, AutoModelForCausalLM

from metake.models.adapters import get_adapter

GIB = 2**30
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}


def load_config(path: Path):
    """A transformers config from a ``config.json`` (keys starting with ``_`` ignored)."""
    fields = {k: v for k, v in json.loads(path.read_text(encoding="utf-8")).items()
              if not k.startswith("_")}  # fmt: skip
    if "model_type" not in fields:
        raise SystemExit(f"{path}: a config needs its model_type")
    return AutoConfig.for_model(**fields)


def sizes(config) -> dict:
    """Parameter count, layers, widths and the edited projection's key size, from a meta model."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    adapter = get_adapter(model)
    d_out, d_in = adapter.weight(model, 0).shape
    text = config.get_text_config()
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "layers": text.num_hidden_layers,
        "hidden": int(d_out),
        "d_in": int(d_in),
        "kv_width": int(kv_heads * head_dim),
        "vocab": text.vocab_size,
    }


def estimate(s: dict, args: argparse.Namespace) -> dict:
    """Memory (GiB) of each part of an edit, and the devices the protocol needs."""
    w = BYTES[args.dtype]
    square = s["d_in"] ** 2 * 8 / GIB  # one float64 [d_in, d_in]
    rows = args.batch * (args.contexts + 1)  # every request x context, plus its KL prompt
    upper = s["layers"] - args.last_edit_layer  # Stage I enters at the last edit layer
    group_tokens = args.group_rows * args.suffix_tokens
    per_token_layer = 6 * s["hidden"] + 3 * s["d_in"]  # values kept for the backward
    out = {
        "weights": s["parameters"] * w / GIB,
        "float64_square_per_layer": square,
        "stats_C0_all_edit_layers": args.edit_layers * square,
        "alphaedit_P_and_key_cache": args.edit_layers * 2 * square,
        "solve_transient": 2 * square,
        "stats_pass": args.edit_layers * square
        + args.stats_batch * args.stats_tokens * s["d_in"] * 8 * args.edit_layers / GIB,
        "stage1_prefix_cache": rows
        * args.prompt_tokens
        * s["layers"]
        * 2
        * s["kv_width"]
        * w
        / GIB,
        "stage1_group_activations": group_tokens * upper * per_token_layer * w / GIB,
        "stage1_group_logits": args.group_rows * args.target_tokens * s["vocab"] * 4 * 2 / GIB,
    }
    out["edit_peak_all_on_device"] = (
        out["weights"] + out["stats_C0_all_edit_layers"] + out["alphaedit_P_and_key_cache"]
        + max(out["solve_transient"], out["stage1_prefix_cache"] + out["stage1_group_activations"]
              + out["stage1_group_logits"])
    )  # fmt: skip
    out["edit_peak_matrices_on_cpu"] = out["weights"] + max(
        4 * square,  # one layer's solve on the device: P, the key cache, system, factorisation
        out["stage1_prefix_cache"] + out["stage1_group_activations"] + out["stage1_group_logits"],
    )
    out["host_memory_matrices_on_cpu"] = (
        out["stats_C0_all_edit_layers"] + out["alphaedit_P_and_key_cache"] + out["solve_transient"]
    )
    parts = args.seeds * args.methods * args.datasets
    per_part = math.ceil(out["edit_peak_all_on_device"] / (args.device_memory * 0.9))
    per_part_cpu = math.ceil(out["edit_peak_matrices_on_cpu"] / (args.device_memory * 0.9))
    out.update(parts=parts, devices_per_part=per_part,
               devices_per_part_matrices_on_cpu=per_part_cpu,
               devices_whole_protocol_at_once=parts * per_part,
               devices_whole_protocol_matrices_on_cpu=parts * per_part_cpu)  # fmt: skip
    return out


def main() -> int:
    """Estimate every ``--model-config`` and write the tables."""
    parser = script_parser(__doc__)
    parser.add_argument("--model-config", action="append", required=True, type=Path,
                        help="a model's config.json (from the hub or benchmarks/configs/); "
                             "repeatable, one column each")  # fmt: skip
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(BYTES),
                        help="dtype of the weights and activations (bytes per value)")  # fmt: skip
    parser.add_argument("--edit-layers", type=int, default=5,
                        help="edit layers (float64 d_in x d_in matrices each)")  # fmt: skip
    parser.add_argument("--last-edit-layer", type=int, default=8,
                        help="index of the last edit layer: Stage I runs from here up "
                             "(reference: layers 4-8)")  # fmt: skip
    parser.add_argument("--batch", type=int, default=100, help="edits per batch")
    parser.add_argument("--contexts", type=int, default=6,
                        help="prompts per request (a KL prompt is added to each)")  # fmt: skip
    parser.add_argument("--prompt-tokens", type=int, default=25,
                        help="prefix tokens per row (kept in the key/value cache)")  # fmt: skip
    parser.add_argument("--suffix-tokens", type=int, default=12,
                        help="tokens per row run (with autograd) in Stage I")  # fmt: skip
    parser.add_argument("--target-tokens", type=int, default=4,
                        help="target tokens per row whose logits are kept")  # fmt: skip
    parser.add_argument("--group-rows", type=int, default=32,
                        help="prompt rows per Stage I forward/backward group")  # fmt: skip
    parser.add_argument("--stats-batch", type=int, default=8,
                        help="texts per batch of the statistics pass")  # fmt: skip
    parser.add_argument("--stats-tokens", type=int, default=256,
                        help="tokens per text in the statistics pass")  # fmt: skip
    parser.add_argument("--device-memory", type=float, default=80.0,
                        help="GiB per device (90%% counted as usable)")  # fmt: skip
    parser.add_argument("--seeds", type=int, default=3, help="seeds in the paper's protocol")
    parser.add_argument("--methods", type=int, default=7,
                        help="methods in the protocol (Table 1's rows)")  # fmt: skip
    parser.add_argument("--datasets", type=int, default=2,
                        help="datasets in the protocol (zsRE and CounterFact)")  # fmt: skip
    parser.add_argument("--out", required=True, help="output stem (OUT.json, OUT.md)")
    args = parser.parse_args()

    models = {}
    for path in args.model_config:
        s = sizes(load_config(path))
        models[path.stem] = {"sizes": s, "gib": estimate(s, args)}
    settings = {k: v for k, v in vars(args).items() if k not in ("model_config", "out")}
    result = {"command": command_line(), "settings": settings, "models": models}
    out = Path(args.out)
    write_json(out, result)
    write_table(out, table(result))
    return 0


ROWS = [
    ("weights", "weights ({dtype})"),
    ("float64_square_per_layer", "one float64 d_in × d_in matrix"),
    ("stats_C0_all_edit_layers", "C₀ of the {edit_layers} edit layers"),
    ("alphaedit_P_and_key_cache", "AlphaEdit: P and the key cache, {edit_layers} layers"),
    ("solve_transient", "a layer's solve (system + factorisation)"),
    ("stats_pass", "the statistics pass (sums + a batch's keys)"),
    ("stage1_prefix_cache", "Stage I: prefix key/value cache of the batch"),
    ("stage1_group_activations", "Stage I: one row group's activations"),
    ("stage1_group_logits", "Stage I: one row group's target logits"),
    ("edit_peak_all_on_device", "**peak of an edit, everything on the device**"),
    ("edit_peak_matrices_on_cpu", "**peak on the device, d_in² matrices kept on the CPU**"),
    ("host_memory_matrices_on_cpu", "CPU memory for those matrices"),
]


def table(result: dict) -> list[str]:
    """The Markdown report of ``result``."""
    st = result["settings"]
    names = list(result["models"])
    lines = [
        "# What an edit needs, from the model's config",
        "",
        f"`{result['command']}`",
        "",
        f"Batches of {st['batch']} edits × {st['contexts']} prompts + a KL prompt each, "
        f"{st['edit_layers']} edit layers (Stage I from layer {st['last_edit_layer']} up), "
        f"row groups of {st['group_rows']}, weights in {st['dtype']}; the float64 matrices as "
        "metake keeps them. GiB; estimates from sizes, not measurements (see the script's doc).",
        "",
        "| | " + " | ".join(names) + " |",
        "|---|" + "---:|" * len(names),
    ]
    fmt = {"dtype": st["dtype"], "edit_layers": st["edit_layers"]}
    s_rows = [("parameters", "parameters (billions)", 1e9), ("d_in", "key size d_in", 1),
              ("layers", "layers", 1)]  # fmt: skip
    for key, label, scale in s_rows:
        values = [result["models"][n]["sizes"][key] / scale if scale > 1
                  else result["models"][n]["sizes"][key] for n in names]  # fmt: skip
        lines.append(f"| {label} | " + " | ".join(f"{v:,.2f}" if scale > 1 else f"{v:,}"
                                                 for v in values) + " |")  # fmt: skip
    for key, label in ROWS:
        values = [result["models"][n]["gib"][key] for n in names]
        lines.append(f"| {label.format(**fmt)} | " + " | ".join(f"{v:.2f}" for v in values) + " |")
    for key, label in [
        ("parts", f"parts of the protocol ({st['seeds']} seeds × {st['methods']} methods × "
                  f"{st['datasets']} datasets)"),
        ("devices_per_part", f"{st['device_memory']:g} GiB devices per part (90% usable)"),
        ("devices_per_part_matrices_on_cpu", "… with the d_in² matrices on the CPU"),
        ("devices_whole_protocol_at_once", "devices to run every part at once"),
        ("devices_whole_protocol_matrices_on_cpu", "… with the d_in² matrices on the CPU"),
    ]:  # fmt: skip
        values = [result["models"][n]["gib"][key] for n in names]
        lines.append(f"| {label} | " + " | ".join(str(v) for v in values) + " |")
    return lines


if __name__ == "__main__":
    sys.exit(main())
