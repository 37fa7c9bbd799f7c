"""Reproduction check: our AlphaEdit and MEMIT in the official AlphaEdit settings, beside the
official code's figures on the same model and records.

The official AlphaEdit code (its ``evaluate.py``) was run on SmolLM2-135M on zsRE records 0-99 of
``zsre_1k.json`` (``answers[0]`` as target), in file order, 4 sequential batches of 25, CPU, with
layers 3-7, null-space threshold 2e-2 (absolute, on the eigenvalues of C0), lambda_2 10, target lr
0.5, 25 steps, clamp 0.75, KL factor 0.0625, weight decay 0.5 and statistics from 2,000 Wikipedia
intros. It scored Eff./Gen./Spe. 92.3/65.7/25.1 (unedited 18.9/17.8/25.3); those figures are
constants below, quoted from issue 15 (they cannot be recomputed here: the official code is not
part of this project). MEMIT runs with the same planner settings and MEMIT's Llama3 lambda 15000.

    python benchmarks/reference_check.py --out benchmarks/results/reference_check_smollm2

The run folder is an ordinary ``metake bench`` folder (resumable: run the same command again);
``reference_check.json``/``.md`` inside it compare the figures. Target: our AlphaEdit within 2
points of the official Eff. and Gen.
"""

from __future__ import annotations

from pathlib import Path

from common import command_line, script_parser, write_json, write_table

from metake.evaluation.bench import BenchConfig, BenchRun
from metake.models import load_model

OFFICIAL_SETTINGS = {
    "layers": [3, 4, 5, 6, 7],
    "nullspace_threshold": 0.02,
    "nullspace_relative": False,
    "alphaedit_lambda": 10.0,
    "v_lr": 0.5,
    "v_steps": 25,
    "clamp_norm_factor": 0.75,
    "kl_factor": 0.0625,
    "v_weight_decay": 0.5,
    "mom2_samples": 2000,
    "mom2_update_weight": 15000.0,
}
OFFICIAL_SCORES = {  # the official AlphaEdit code on SmolLM2-135M, zsRE records 0-99, 4 x 25
    "pre_edit": {"efficacy": 18.9, "generalization": 17.8, "specificity": 25.3},
    "alphaedit": {"efficacy": 92.3, "generalization": 65.7, "specificity": 25.1},
}
METRICS = ("efficacy", "generalization", "specificity")


def main() -> None:
    """Run (or resume) the check and write the comparison."""
    parser = script_parser(__doc__)
    parser.add_argument("--model", default="smollm2-135m",
                        help="built-in name, folder or .gguf (the official figures are "
                             "SmolLM2-135M's)")  # fmt: skip
    parser.add_argument("--data", default="../shared/data/zsre/zsre_1k.json",
                        help="zsRE file (records 0-99 edited, 4 batches of 25)")  # fmt: skip
    parser.add_argument("--methods", default="alphaedit,memit",
                        help="comma-separated methods run in the official settings")  # fmt: skip
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, auto, ...")
    parser.add_argument("--out", default="benchmarks/results/reference_check_smollm2",
                        help="bench run folder; OUT/reference_check.json/.md hold the "
                             "comparison")  # fmt: skip
    args = parser.parse_args()
    if args.model != "smollm2-135m":
        parser.error(f"--model {args.model}: the official figures this compares with were "
                     "measured on smollm2-135m only")  # fmt: skip
    out = Path(args.out)
    config = BenchConfig(
        model=args.model,
        dataset="zsre",
        data=args.data,
        methods=args.methods.split(","),
        edits=100,
        batch_size=25,
        records="0:100",
        curve=False,
        fluency_records=0,
        overrides=dict(OFFICIAL_SETTINGS),
        device=args.device,
        command=command_line(),
    )
    model, tokenizer = load_model(config.model, device=config.device)
    results = BenchRun(config, out, model, tokenizer).run()
    ours = {"pre_edit": _percent(results["pre_edit"])}
    ours.update({m: _percent(a) for m, a in results["aggregate"].items()})
    rows, verdict = [], {}
    for name, scores in ours.items():
        official = OFFICIAL_SCORES.get(name)
        cells = [f"{scores[m]:.2f}" for m in METRICS]
        if official:
            cells += [f"{official[m]:.1f}" for m in METRICS]
            gaps = {m: scores[m] - official[m] for m in METRICS}
            cells += [" / ".join(f"{gaps[m]:+.2f}" for m in METRICS)]
            if name == "alphaedit":
                verdict = {m: abs(gaps[m]) <= 2.0 for m in ("efficacy", "generalization")}
        else:
            cells += ["", "", "", ""]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    lines = [
        "# Reproduction check: official AlphaEdit settings on SmolLM2-135M",
        "",
        f"Command: `{command_line()}`",
        "",
        "zsRE records 0-99 in file order, 4 sequential batches of 25, `answers[0]` as target; "
        "settings: " + ", ".join(f"{k}={v}" for k, v in OFFICIAL_SETTINGS.items()) + ".",
        "Official: the official AlphaEdit code on the same model and records (issue 15).",
        "",
        "| method | Eff. | Gen. | Spe. | official Eff. | official Gen. | official Spe. "
        "| ours − official |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "AlphaEdit within 2 points of the official Eff. and Gen.: "
        + (", ".join(f"{m} {'yes' if ok else 'no'}" for m, ok in verdict.items()) or "n/a"),
    ]
    write_json(
        out / "reference_check",
        {
            "command": command_line(),
            "settings": OFFICIAL_SETTINGS,
            "official": OFFICIAL_SCORES,
            "ours": ours,
            "within_2_points": verdict,
        },
    )
    write_table(out / "reference_check", lines)


def _percent(aggregate: dict) -> dict[str, float]:
    """Eff./Gen./Spe. (percent) from a bench aggregate (mean over seeds)."""
    return {m: _mean(aggregate[m]) for m in METRICS}


def _mean(value) -> float:
    return float(value["mean"]) if isinstance(value, dict) else float(value)


if __name__ == "__main__":
    main()
