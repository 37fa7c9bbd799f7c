"""Key statistics in float32 and with a bfloat16 forward: time, and how far C0 moves.

    python benchmarks/stats_speed.py --model smollm2-135m --layers 1-9 --texts 2000 \
        --timing-texts 200 --threads 2 --out benchmarks/results/stats_speed_smollm2

Issue 17 asks for the key statistics of every edit layer three times faster for the same
tokens, or equally good statistics from fewer tokens. This script measures both questions on
the built-in Wikipedia corpus (first ``--texts`` intros), without the cache:

- **time** of one pass over the first ``--timing-texts`` texts for every layer of ``--layers``,
  as ``metake stats`` runs it (float32 forward, float64 sums) and with
  ``mom2_autocast="bfloat16"`` (bfloat16 forward, each batch's k^T k in bfloat16, added in
  float64), best of ``--repeats``;
- **how far C0 moves** over all ``--texts`` texts: the relative Frobenius difference of the
  bfloat16 C0 from the float32 one, next to the yardstick of the corpus's own sampling noise
  (C0 of the first half of the texts against C0 of the second half, both float32) and the
  difference that halving the tokens makes (C0 of the first half against all);
- **what AlphaEdit sees**: the null-space rank at the model's preset threshold, and the
  distance between the null-space projectors, ``||P_a - P_b||_F / sqrt(2 rank)`` (0: the same
  space; 1: orthogonal spaces of equal rank).

Edit results with either statistics come from ``metake bench --set mom2_autocast=bfloat16``
(docs/statistics.md). Writes ``OUT.json`` and ``OUT.md``.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch
from common import command_line, script_parser, write_json, write_table

from metake.corpus import TextCorpus, load_corpus
from metake.hparams import memit_hparams
from metake.models.load import load_model
from metake.solvers.alphaedit import null_space
from metake.stats import compute_second_moments

MODES = {"float32": None, "bfloat16": "bfloat16"}
"""Label of each statistics mode -> the ``autocast`` it passes (``mom2_autocast``)."""


def moments(model, tokenizer, layers, texts, autocast) -> tuple[dict[int, torch.Tensor], float]:
    """``({layer: C0 [d_in, d_in]}, seconds)`` of one uncached pass over ``texts``."""
    corpus = TextCorpus.from_texts(texts, name="wikipedia slice")
    start = time.perf_counter()
    got = compute_second_moments(model, tokenizer, layers, corpus, num_samples=len(texts),
                                 autocast=autocast, progress=False)  # fmt: skip
    return {layer: m.mom2 for layer, m in got.items()}, time.perf_counter() - start


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b||_F / ||b||_F``."""
    return float((a - b).norm() / b.norm())


def projector_distance(a: torch.Tensor, b: torch.Tensor, threshold: float, relative_: bool):
    """Null-space ranks of ``a`` and ``b`` and ``||P_a - P_b||_F / sqrt(2 max rank)``."""
    na, nb = null_space(a, threshold, relative_), null_space(b, threshold, relative_)
    pa, pb = na.projector, nb.projector
    rank = max(na.rank, nb.rank, 1)
    return na.rank, nb.rank, float((pa - pb).norm() / math.sqrt(2 * rank))


def parse_layers(text: str) -> list[int]:
    """``"1-9"`` or ``"4,5,6"`` -> the layer numbers."""
    if "-" in text:
        low, high = (int(part) for part in text.split("-", 1))
        return list(range(low, high + 1))
    return [int(part) for part in text.split(",") if part.strip()]


def main() -> int:
    """Time both modes, compare the C0s, write the tables."""
    parser = script_parser(__doc__)
    parser.add_argument("--model", default="smollm2-135m",
                        help="built-in name, folder or .gguf (run on the CPU)")  # fmt: skip
    parser.add_argument("--layers", default="1-9",
                        help="layers whose statistics are computed: A-B (inclusive) or "
                             "comma-separated, e.g. 4,5,6")  # fmt: skip
    parser.add_argument("--texts", type=int, default=2000,
                        help="first Wikipedia intros the C0 comparison uses")  # fmt: skip
    parser.add_argument("--timing-texts", type=int, default=200,
                        help="texts of a timed pass (the first of --texts)")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=2, help="timed passes per mode (best)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--timing-only", action="store_true", help="skip the C0 comparison")
    parser.add_argument("--out", required=True, help="output stem (OUT.json, OUT.md)")
    args = parser.parse_args()
    if args.timing_texts > args.texts:
        parser.error(f"--timing-texts {args.timing_texts} exceeds --texts {args.texts}: the timed "
                     "pass reads the first of those texts")  # fmt: skip
    torch.set_num_threads(args.threads)
    layers = parse_layers(args.layers)
    model, tokenizer = load_model(args.model)
    hp = memit_hparams(model.config, method="alphaedit")
    texts = [t for _, t in zip(range(args.texts), load_corpus(None).iter_texts(), strict=False)]

    timing = {}
    for label, autocast in MODES.items():
        runs = [moments(model, tokenizer, layers, texts[: args.timing_texts], autocast)[1]
                for _ in range(args.repeats)]  # fmt: skip
        timing[label] = min(runs)
        print(f"{label}: {timing[label]:.1f} s for {args.timing_texts} texts", flush=True)

    if args.timing_only:
        result = {"command": command_line(), "model": args.model, "layers": layers,
                  "threads": args.threads, "timing_texts": args.timing_texts, "seconds": timing,
                  "speedup": timing["float32"] / timing["bfloat16"]}  # fmt: skip
        write_json(Path(args.out), result)
        write_table(Path(args.out), [
            f"# Key statistics, float32 vs bfloat16 forward: {args.model} (timing only)", "",
            f"`{result['command']}`", "",
            f"One uncached pass over {args.timing_texts} Wikipedia intros for layers {layers} on "
            f"{args.threads} thread(s), best of {args.repeats}: float32 {timing['float32']:.1f} "
            f"s, bfloat16 {timing['bfloat16']:.1f} s (**{result['speedup']:.2f}×**)."])  # fmt: skip
        return 0
    full, _ = moments(model, tokenizer, layers, texts, None)
    half_precision, _ = moments(model, tokenizer, layers, texts, "bfloat16")
    half = len(texts) // 2
    first, _ = moments(model, tokenizer, layers, texts[:half], None)
    second, _ = moments(model, tokenizer, layers, texts[half:], None)
    rows = []
    for layer in layers:
        ranks = projector_distance(half_precision[layer], full[layer], hp.nullspace_threshold,
                                   hp.nullspace_relative)  # fmt: skip
        halves = projector_distance(first[layer], second[layer], hp.nullspace_threshold,
                                    hp.nullspace_relative)  # fmt: skip
        rows.append({
            "layer": layer,
            "bf16_vs_float32": relative(half_precision[layer], full[layer]),
            "half_vs_other_half": relative(first[layer], second[layer]),
            "half_vs_all": relative(first[layer], full[layer]),
            "rank_float32": ranks[1], "rank_bf16": ranks[0], "projector_bf16_vs_float32": ranks[2],
            "rank_first_half": halves[0], "rank_second_half": halves[1],
            "projector_half_vs_half": halves[2],
        })  # fmt: skip
    result = {
        "command": command_line(),
        "model": args.model,
        "layers": layers,
        "threads": args.threads,
        "texts": len(texts),
        "timing_texts": args.timing_texts,
        "seconds": timing,
        "speedup": timing["float32"] / timing["bfloat16"],
        "nullspace_threshold": hp.nullspace_threshold,
        "nullspace_relative": hp.nullspace_relative,
        "layers_compared": rows,
    }
    out = Path(args.out)
    write_json(out, result)
    write_table(out, table(result))
    return 0


def table(result: dict) -> list[str]:
    """The Markdown report of ``result``."""
    t = result["seconds"]
    kind = "relative" if result["nullspace_relative"] else "absolute"
    lines = [
        f"# Key statistics, float32 vs bfloat16 forward: {result['model']}",
        "",
        f"`{result['command']}`",
        "",
        f"One uncached pass over {result['timing_texts']} Wikipedia intros for layers "
        f"{result['layers']} on {result['threads']} thread(s): float32 {t['float32']:.1f} s, "
        f"bfloat16 {t['bfloat16']:.1f} s (**{result['speedup']:.2f}×**).",
        "",
        f"C0 over {result['texts']} texts; relative Frobenius differences. Null-space ranks at "
        f"the preset's {kind} threshold {result['nullspace_threshold']:g}; projector distance "
        "||P_a − P_b||_F / sqrt(2 rank) (0 the same space, 1 orthogonal).",
        "",
        "| layer | bf16 vs f32 | half vs other half | half vs all | rank f32 | rank bf16 | "
        "projector bf16 vs f32 | ranks of the halves | projector half vs half |",
        "|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in result["layers_compared"]:
        lines.append(
            f"| {r['layer']} | {r['bf16_vs_float32']:.4f} | {r['half_vs_other_half']:.4f} | "
            f"{r['half_vs_all']:.4f} | {r['rank_float32']} | {r['rank_bf16']} | "
            f"{r['projector_bf16_vs_float32']:.4f} | {r['rank_first_half']} / "
            f"{r['rank_second_half']} | {r['projector_half_vs_half']:.4f} |"
        )
    return lines


if __name__ == "__main__":
    sys.exit(main())
