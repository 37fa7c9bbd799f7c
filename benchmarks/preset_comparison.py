"""Tuned presets beside the hand-chosen ones: one seed of the 100-edit zsRE protocol, both
presets on identical records (issue 15's "first evidence").

Two ordinary ``metake bench`` runs, one per preset, with the same seed and the same ``--exclude``
(the dev split ``metake tune`` used), so that they edit the same records; then one table.

    python benchmarks/preset_comparison.py --model smollm2-135m \
        --out benchmarks/results/preset_comparison_smollm2

``--probe-data``/``--probe-records`` name the known facts both runs watch (CounterFact records
2000:5000 by default, outside the 0:2000 the tune chose against). ``--tuned`` is the tuned
preset (default: the built-in one of the model, which ``metake tune`` found; or a
``preset.json`` of a tuning run), ``--hand`` the preset it replaced (default
``benchmarks/presets/MODEL-hand.json``). Each run folder is resumable: run the same command
again; ``--only hand`` (or ``tuned``) runs one side now and the same command without it later.
Writes ``OUT/comparison.json`` and ``OUT/comparison.md``. s/edit is only comparable between runs
made alone on the machine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from common import command_line, script_parser, write_json, write_table

from metake.evaluation.bench import BenchConfig, BenchRun
from metake.hparams import find_preset
from metake.models import load_model

METRICS = (
    "efficacy",
    "generalization",
    "specificity",
    "efficacy_exact",
    "perplexity",
    "known_facts_kept",
)
HEADERS = ("Eff.", "Gen.", "Spe.", "Eff. (whole)", "Perplexity", "Known facts kept")


def main() -> None:
    """Run (or resume) both bench runs and write the comparison table."""
    parser = script_parser(__doc__)
    parser.add_argument(
        "--model", default="smollm2-135m",
        help="built-in name, folder or .gguf (the preset its config matches gives the --tuned "
             "and --hand defaults)",
    )  # fmt: skip
    parser.add_argument("--data", default="../shared/data/zsre/zsre_1k.json", help="zsRE file")
    parser.add_argument("--seed", type=int, default=0, help="seed of the record draw")
    parser.add_argument("--edits", type=int, default=100, help="records edited with each preset")
    parser.add_argument("--batch-size", type=int, default=25, help="requests per edit batch")
    parser.add_argument(
        "--exclude", default="900:1000",
        help="records never edited, A:B[,C:D] (the dev split the tune used)",
    )  # fmt: skip
    parser.add_argument(
        "--tuned", default=None,
        help="tuned preset: a shipped name or a tuning run's preset.json (none: the model's "
             "built-in)",
    )  # fmt: skip
    parser.add_argument(
        "--hand", default=None,
        help="hand-chosen preset file (none: benchmarks/presets/MODEL-hand.json)",
    )  # fmt: skip
    parser.add_argument(
        "--methods", default="memit,alphaedit,metake,metake_exact",
        help="comma-separated methods run with the tuned preset",
    )  # fmt: skip
    parser.add_argument(
        "--hand-methods", default="memit,alphaedit,metake",
        help="comma-separated methods run with the hand-chosen preset",
    )  # fmt: skip
    parser.add_argument(
        "--probe-data", default="../shared/data/counterfact/counterfact_10k.json",
        help="CounterFact file of known facts to watch ('' for none)",
    )  # fmt: skip
    parser.add_argument(
        "--probe-records", default="2000:5000",
        help="--probe-data records the known facts come from, A:B[,C:D] (outside the tune's "
             "0:2000)",
    )  # fmt: skip
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, auto, ...")
    parser.add_argument(
        "--only", choices=("tuned", "hand"), default=None,
        help="run one of the two presets now (the other later: same command without --only)",
    )  # fmt: skip
    parser.add_argument(
        "--out", default="benchmarks/results/preset_comparison_smollm2",
        help="folder of both runs (OUT/tuned, OUT/hand) and of OUT/comparison.json/.md",
    )  # fmt: skip
    args = parser.parse_args()
    out = Path(args.out)
    model, tokenizer = load_model(args.model, device=args.device)
    builtin = find_preset(model.config)  # by the config, so a local copy finds its preset too
    if builtin is None and (args.tuned is None or args.hand is None):
        parser.error(f"{args.model} has no built-in preset: give --tuned and --hand files")
    hand = args.hand or f"benchmarks/presets/{builtin}-hand.json"
    if not Path(hand).is_file():
        parser.error(f"hand-chosen preset {hand} does not exist (give --hand FILE)")
    presets = {
        "tuned": (args.tuned or builtin, args.methods),
        "hand": (hand, args.hand_methods),
    }
    results = {}
    for label, (preset, methods) in presets.items():
        if args.only is not None and label != args.only:
            continue
        config = BenchConfig(
            model=args.model,
            dataset="zsre",
            data=args.data,
            methods=methods.split(","),
            edits=args.edits,
            batch_size=args.batch_size,
            seeds=[args.seed],
            exclude=args.exclude,
            curve=False,  # final scores only: the curve costs a scoring pass per batch
            fluency_records=0,
            preset=preset,
            probe_data=args.probe_data or None,
            probe_records=args.probe_records,
            device=args.device,
            command=f"{command_line()} ({label} preset)",
        )
        results[label] = BenchRun(config, out / label, model, tokenizer).run()
    if args.only is not None:
        print(f"{out / args.only}: done; run again without --only for the comparison")
        return
    records = {label: r["runs"][str(args.seed)]["records"] for label, r in results.items()}
    if records["tuned"] != records["hand"]:
        raise SystemExit("the two runs edited different records; use fresh --out folders")
    rows = _rows(results, presets)
    lines = [
        f"# Tuned vs hand-chosen preset: {args.model}, zsRE, {args.edits} edits in batches of "
        f"{args.batch_size}, seed {args.seed}",
        "",
        f"Command: `{command_line()}`",
        "",
        f"Both presets edit the same {len(records['tuned'])} records (sampled with seed "
        f"{args.seed} outside {args.exclude}, the split the tuned preset was found on). Tuned: "
        f"`{presets['tuned'][0]}`; hand: `{presets['hand'][0]}`. Metrics in percent; "
        "perplexity on held-out Wikipedia intros; known facts kept: share of the CounterFact "
        f"facts of records {args.probe_records} the unedited model knows (a 1-nat margin) "
        "still known after the edits (`-` without a probe); s/edit is Stage I + II.",
        "",
        "| method | preset | " + " | ".join(HEADERS) + " | s / edit |",
        "|---|---|" + "---:|" * (len(HEADERS) + 1),
        *(_line(row) for row in rows),
    ]
    write_json(out / "comparison", {"command": command_line(), "presets": presets, "rows": rows})
    write_table(out / "comparison", lines)


def _rows(results: dict[str, dict], presets: dict[str, tuple[str, str]]) -> list[dict[str, Any]]:
    """One row per (method, preset), the unedited model first."""
    rows = [{"method": "unedited", "preset": "", **_scores(results["tuned"]["pre_edit"])}]
    methods = list(dict.fromkeys(m for _, ms in presets.values() for m in ms.split(",")))
    for method in methods:
        for label in presets:
            aggregate = results[label]["aggregate"].get(method)
            if aggregate is not None:
                rows.append({"method": method, "preset": label, **_scores(aggregate)})
    return rows


def _scores(aggregate: dict) -> dict[str, float]:
    """Mean of each metric (and s/edit where present) from a bench aggregate."""
    keys = (*METRICS, "seconds_per_edit")
    return {k: _mean(aggregate[k]) for k in keys if k in aggregate}


def _mean(value: Any) -> float:
    return float(value["mean"]) if isinstance(value, dict) else float(value)


def _line(row: dict[str, Any]) -> str:
    cells = [f"{row[m]:.2f}" if m in row else "–" for m in METRICS]
    seconds = row.get("seconds_per_edit")
    cells.append(f"{seconds:.1f}" if seconds is not None else "–")
    return f"| {row['method']} | {row['preset']} | " + " | ".join(cells) + " |"


if __name__ == "__main__":
    main()
