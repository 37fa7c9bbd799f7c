"""``metake tune``: editing hyper-parameters found for a model on a development split.

Every method is tuned the same way, on zsRE records of a development split (``dev_records``)
that no reported evaluation may use (``metake bench --exclude`` leaves it out):

1. **Known facts** (the probe set): CounterFact prompts whose true answer the unedited model
   produces token by token under teacher forcing (the same as its greedy continuation starting
   with the answer). They locate the edit layers and check, after each candidate edit, that the
   model still knows them.
2. **Locate** (ROME's causal tracing): the indirect effect of restoring the MLP outputs at the
   subject's last token (a window of about a sixth of the layers around each, as ROME's 10 of
   48), per layer, over the known facts; ``e``, the last layer whose effect is at least a quarter
   of the peak's, anchors the edit windows.
3. **Stage I** (the planner every method shares): the smallest learning rate of a grid whose
   targets reach ``P(target) >= 0.5`` for at least 95% of the dev records, at the window ending at
   ``e`` (more steps when no rate reaches it).
4. **Windows and strengths**, per method: windows of ``window_size`` layers ending at ``e - 2``,
   ``e`` and ``e + 2``, then the solver's strength on a coarse grid at the best window (extended
   past its edge when the best value is its largest or smallest) and a finer one around the best
   value. MEMIT-family solvers (memit, alphaedit, rect, prune) re-solve Stage
   II from Stage I targets computed once per window on the unedited model (the targets do not
   depend on the solver; later batches' targets are therefore those of the unedited model, an
   approximation of sequential editing that only the search uses); ROME, BLUE and MetaKE run real
   edits on the first ``search_records`` dev records.
5. **One selection rule**, for every method: the highest Eff. + Gen. (mean over the batch sizes)
   among the candidates that edit (Eff. at least ``min_efficacy_gain`` points over the unedited
   model) with Spe. >= unedited - 1 point (Spe. always over every dev record's neighbour
   questions), held-out perplexity drift <= 2% and >= 95% of the known facts still known; when
   no candidate passes, a candidate that edits comes first, then the
   fewest broken guards, then the highest Eff. + Gen., flagged in the report. (Without the first
   condition a setting that changes nothing passes every guard: on SmolLM2 at 100 edits it was
   the only one that did, see docs/presets.md.)

The run folder holds ``rows.jsonl`` (every evaluated candidate; a rerun skips them: resumable),
``preset.json`` (``--preset`` for edit, bench and diagnose), ``report.md``/``report.json`` and
``search.png``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from metake.corpus import TextCorpus, load_corpus
from metake.editor import Editor
from metake.errors import MetakeError
from metake.evaluation.bench import held_out_texts, method_spec
from metake.evaluation.datasets import EvalRecord, in_ranges, load_dataset, parse_ranges
from metake.evaluation.evaluate import evaluate_records, mean_metrics, metric_names, specificity
from metake.evaluation.metrics import text_perplexity
from metake.files import try_lock, write_file_atomically
from metake.hparams import MemitHparams, find_preset, memit_hparams
from metake.methods import PLANNER_METHODS, parse_solver
from metake.models.adapters import get_adapter
from metake.planners.standard import TargetPlan, compute_targets, context_templates
from metake.probe import ProbeSpec, build_probe, checked_probe, probe_to_json, share_known
from metake.requests import EditRequest
from metake.solvers.prune import largest_singular_value
from metake.stats import StatsCache

log = logging.getLogger(__name__)

TUNABLE = (
    "rome",
    "memit",
    "prune",
    "rect",
    "alphaedit",
    "alphaedit_blue",
    "metake",
    "metake_exact",
)
LR_GRID = (0.1, 0.25, 0.5, 1.0)
#: held by the process tuning in a run folder: a second one is refused, not interleaved
LOCK_NAME = "tune.lock"
INVOCATIONS_FILE = "invocations.json"
"""Each `metake tune` invocation on a folder: start, threads, wall-clock seconds, completed."""
STRENGTH_GRIDS: dict[str, dict[str, list[Any]]] = {
    "memit": {"mom2_update_weight": [500.0, 2000.0, 8000.0, 32000.0]},
    "alphaedit": {
        "nullspace_threshold": [0.003, 0.01, 0.03, 0.1],
        "alphaedit_lambda": [10.0, 1.0, 100.0],
    },
    "alphaedit_blue": {"alphaedit_blue_lambda": [1.0, 10.0, 100.0]},
    "rect": {"rect_keep_fraction": [0.2, 0.4, 0.7]},
    "metake": {"metake_lr": [0.03, 0.1, 0.3], "metake_reg_weight": [1e-3, 1e-2]},
    "metake_exact": {"metake_lr": [0.03, 0.1, 0.3], "metake_reg_weight": [1e-3, 1e-2]},
}
"""Each method's strength grid, searched one key at a time in this order (the first key's grid
is refined around its best value, except for MetaKE, whose runs cost most); the first value of
every later key is where the search of the earlier keys holds it."""

REFERENCE_SCALE = 5.0
"""The median per-coordinate RMS of the Stage I targets that MetaKE's grid values are written
for (the grid was first searched on SmolLM2-135M; the report prints each run's RMS); see
:data:`SCALED_KEYS`."""

SCALED_KEYS = {"metake_lr": 1, "metake_reg_weight": -2}
"""MetaKE's grid values times ``(scale / REFERENCE_SCALE) ** power`` on a model whose targets
have median RMS ``scale``: the look-ahead's Adam steps are in the residual stream's units (an
absolute rate moves a model's targets the less, the larger its stream; Gemma3-270M's is far
larger than SmolLM2's) and its regulariser is a squared distance in them."""


BUILT_ON = {
    "rect": "memit",
    "prune": "memit",
    "memit_blue": "memit",
    "alphaedit_blue": "alphaedit",
    "metake": "alphaedit",
    "metake_exact": "alphaedit",
}
"""Methods that start from another tuned method's settings (window, strength) when that one is
tuned first, and search only their own grid: the variants share their base's located layers."""


@dataclass
class TuneConfig:
    """What a tuning run is asked (saved as ``config.json``)."""

    model: str
    data: str
    dev_records: str = "900:1000"
    probe_data: str = "../shared/data/counterfact/counterfact_10k.json"
    probe_records: str = "0:2000"
    eval_records: str | None = None  # the split you will report: must not overlap the dev split
    methods: list[str] = field(default_factory=lambda: list(TUNABLE[:7]))
    batch_sizes: list[int] = field(default_factory=lambda: [25, 100])
    search_records: int = 25  # dev records for the methods tuned by real edits
    finalists: int = 2  # searched at the smallest batch size; this many best at every size (0: all)
    window_size: int = 5
    max_probe_facts: int = 40
    trace_facts: int = 20
    drift_texts: int = 16
    preset: str | None = None  # where the search starts from (default: the model's preset)
    overrides: dict[str, Any] = field(default_factory=dict)  # fixed hyper-parameters (--set)
    min_known_facts: int = 5
    min_efficacy_gain: float = 10.0  # Eff. points over unedited a chosen setting must gain
    known_margin: float = 1.0  # nats every answer token leads by (robust known facts only)
    corpus: str | None = None
    device: str = "cpu"
    command: str = ""

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in TUNABLE]
        if unknown or not self.methods:
            raise MetakeError(
                f"tune: unknown method(s) {', '.join(unknown) or '(none given)'}; "
                f"tunable: {', '.join(TUNABLE)}"
            )
        dev = parse_ranges(self.dev_records, "--dev-records")
        if self.eval_records is not None:
            evaluated = parse_ranges(self.eval_records, "--eval-records")
            overlap = sorted({i for r in dev for i in r if in_ranges(i, evaluated)})
            if overlap:
                raise MetakeError(
                    f"tune: the dev split {self.dev_records} overlaps the evaluation "
                    f"split {self.eval_records} (e.g. record {overlap[0]}); tuning "
                    f"on evaluated records would leak them"
                )
        if Path(self.probe_data).resolve() == Path(self.data).resolve():
            probe = parse_ranges(self.probe_records, "--probe-records")
            if any(in_ranges(i, probe) for r in dev for i in r):
                raise MetakeError("tune: --probe-records overlaps --dev-records in the same file")
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise MetakeError("tune: --batch-sizes must be positive numbers")
        if self.finalists < 0:
            raise MetakeError(f"tune: --finalists must be 0 (all) or more, got {self.finalists}")
        if self.window_size < 1 or self.search_records < 1:
            raise MetakeError("tune: --window-size and --search-records must be at least 1")
        if not 0 <= self.min_efficacy_gain <= 100:
            raise MetakeError(
                f"tune: --min-efficacy-gain must be between 0 and 100 Eff. points, got "
                f"{self.min_efficacy_gain:g}"
            )
        if self.max_probe_facts < self.min_known_facts:
            raise MetakeError(
                f"tune: --max-probe-facts must be at least {self.min_known_facts} (the fewest "
                f"known facts a run needs), got {self.max_probe_facts}"
            )


@dataclass
class Baseline:
    """The unedited model on the dev split, and its known facts."""

    scores: dict[str, float]  # efficacy, generalization, specificity (percent), perplexity
    probe: list[EditRequest]  # facts it knows (target_new = the true answer)
    search_scores: dict[str, float] | None = None  # the same on the real-edit search records

    def on(self, records: int, dev_size: int) -> dict[str, float]:
        """The unedited scores on the first ``records`` of ``dev_size`` dev records: what a
        candidate scored on them is judged against (Eff. and Spe. vary with the records)."""
        if records < dev_size and self.search_scores is not None:
            return self.search_scores
        return self.scores


def edits(row: dict[str, Any], base: dict[str, float], min_gain: float = 10.0) -> bool:
    """Whether a candidate edits: Eff. at least ``min_gain`` points over the unedited model."""
    return row["efficacy"] - base["efficacy"] >= min_gain


def selection_key(
    row: dict[str, Any], base: dict[str, float], min_gain: float = 10.0
) -> tuple[bool, int, float]:
    """Sort key of the selection rule: a setting that edits first, then the fewest broken
    conditions, then the highest Eff. + Gen."""
    return (
        edits(row, base, min_gain),
        -len(violations(row, base, min_gain)),
        row["efficacy"] + row["generalization"],
    )


def violations(row: dict[str, Any], base: dict[str, float], min_gain: float = 10.0) -> list[str]:
    """Which of the rule's conditions a candidate breaks (empty: admissible)."""
    out = []
    if not edits(row, base, min_gain):
        gain = row["efficacy"] - base["efficacy"]
        out.append(f"does not edit (Eff. +{gain:.1f} < +{min_gain:g})")
    if row["specificity"] < base["specificity"] - 1.0:
        out.append(f"Spe. {row['specificity']:.2f} < {base['specificity'] - 1.0:.2f}")
    if row["perplexity"] > 1.02 * base["perplexity"]:
        out.append(f"perplexity {row['perplexity']:.2f} > {1.02 * base['perplexity']:.2f}")
    if row["probe_kept"] < 0.95:
        out.append(f"known facts kept {100 * row['probe_kept']:.0f}% < 95%")
    return out


class Tuner:
    """One tuning run folder over one model."""

    def __init__(
        self,
        config: TuneConfig,
        out: str | Path,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        corpus: TextCorpus | None = None,
        stats_cache: StatsCache | None = None,
    ) -> None:
        self.config = config
        self.out = Path(out)
        self.model = model
        self.tokenizer = tokenizer
        self.corpus = corpus if corpus is not None else load_corpus(config.corpus)
        self.stats_cache = stats_cache
        dataset = load_dataset("zsre", config.data, tokenizer=tokenizer)
        dev = parse_ranges(config.dev_records, "--dev-records")
        self.dev = [r for r in dataset.records if in_ranges(r.index, dev)]
        if not self.dev:
            raise MetakeError(
                f"tune: the dev split {config.dev_records} holds no valid record of {config.data}"
            )
        self.base_hparams = memit_hparams(model.config, config.preset, **config.overrides)
        self.num_layers = int(model.config.get_text_config().num_hidden_layers)
        self.drift = held_out_texts(self.corpus, config.drift_texts)
        self.rows: dict[str, dict[str, Any]] = {}
        self.contexts: list[str] | None = None
        self._targets: dict[tuple, torch.Tensor] = {}
        self._reached: dict[tuple, list[float]] = {}  # Stage I's P(target) per record
        self._v_init: dict[tuple, torch.Tensor] = {}  # Stage I's starting values [n, d]
        self.grid_scales: dict[str, dict[str, Any]] = {}  # MetaKE's scaled grids, for the report
        self._sigma_max: dict[int, float] = {}  # of each unedited edit-layer weight (PRUNE)
        self._clock = time.monotonic()  # this invocation's wall clock (the model is loaded)
        self.invocations: list[dict[str, Any]] = []  # earlier invocations', then this one

    # ----- folder ---------------------------------------------------------------------------
    def _prepare(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / "config.json"
        mine = asdict(self.config)
        if path.is_file():
            saved = json.loads(path.read_text(encoding="utf-8"))
            free = ("command", "methods", "min_efficacy_gain", "finalists")  # rows: no selection
            differ = sorted(k for k in mine if k not in free and saved.get(k) != mine[k])
            if differ:
                raise MetakeError(
                    f"{self.out} holds a tuning run with another configuration "
                    f"({', '.join(differ)}); use another --out"
                )
        path.write_text(json.dumps(mine, indent=1), encoding="utf-8")
        self._check_start()
        self._start_invocation()
        rows = self.out / "rows.jsonl"
        if rows.is_file():
            stale = 0
            for line in rows.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    row = json.loads(line)
                    if _spe_on_search_records(row):
                        stale += 1
                        continue
                    if row["phase"] == "search":  # ids written by older versions: re-keyed
                        row["id"] = search_row_id(row["method"], row["batch_size"], row["settings"])
                    self.rows[row["id"]] = row
            if stale:
                log.info("tune: %d real-edit row(s) scored Spe. on their own records only (older "
                         "versions): edited again", stale)  # fmt: skip

    def _check_start(self) -> None:
        """Keep the hyper-parameters the search starts from in ``start.json``; a rerun whose
        starting point differs (``--preset`` left out and the built-in preset changed since, e.g.
        by adopting a tune) is refused: its rows would mix two searches."""
        path = self.out / "start.json"
        if not path.is_file() and any(
            (self.out / name).is_file() for name in ("rows.jsonl", "baseline.json")
        ):  # a run of a version that kept no starting point: nothing to compare, nothing to write
            log.warning("%s keeps no start.json (an older run): its starting settings are not "
                        "checked", self.out)  # fmt: skip
            return
        if path.is_file():
            differ = self.base_hparams.differences(json.loads(path.read_text(encoding="utf-8")))
            if differ:
                raise MetakeError(
                    f"{self.out} started its search from other settings ({'; '.join(differ)}): "
                    "the preset changed since; give the preset it started from (--preset) or use "
                    "another --out"
                )
            return
        text = json.dumps(self.base_hparams.to_dict(), indent=1)
        write_file_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))

    def _record(self, row: dict[str, Any]) -> dict[str, Any]:
        self.rows[row["id"]] = row
        with (self.out / "rows.jsonl").open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        self._note_invocation()
        return row

    def _start_invocation(self) -> None:
        """Add this invocation to ``invocations.json`` (earlier ones are read back first)."""
        path = self.out / INVOCATIONS_FILE
        self.invocations = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else []
        started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.invocations.append({"started": started, "threads": torch.get_num_threads(),
                                 "seconds": 0.0, "completed": False})  # fmt: skip
        self._note_invocation()

    def _note_invocation(self, completed: bool = False) -> None:
        """Write this invocation's wall clock so far (a killed run keeps its last row's)."""
        if not self.invocations:
            return
        self.invocations[-1].update(seconds=round(time.monotonic() - self._clock, 1),
                                    completed=completed)  # fmt: skip
        text = json.dumps(self.invocations, indent=1)
        write_file_atomically(self.out / INVOCATIONS_FILE,
                              lambda tmp: tmp.write_text(text, encoding="utf-8"))  # fmt: skip

    # ----- measuring ------------------------------------------------------------------------
    def score(
        self, records: Sequence[EvalRecord], probe: Sequence[EditRequest]
    ) -> dict[str, float]:
        """Eff./Gen. (percent) on ``records``; Spe. on every dev record (its neighbour questions
        are unrelated to whichever records were edited, and a quarter of them would make one
        question worth several points); perplexity; share of ``probe`` still known."""
        per_record = evaluate_records(self.model, self.tokenizer, records, "zsre")
        means = mean_metrics(per_record, metric_names("zsre"))
        out = {name: float(means[name]) for name in ("efficacy", "generalization")}
        every = len(records) == len(self.dev)
        out["specificity"] = float(means["specificity"]) if every else specificity(
            self.model, self.tokenizer, self.dev
        )  # fmt: skip
        out["specificity_records"] = len(self.dev)
        out["perplexity"] = text_perplexity(self.model, self.tokenizer, self.drift)
        out["probe_kept"] = share_known(self.model, self.tokenizer, probe)
        return out

    def probe_spec(self) -> ProbeSpec:
        """How this run's known facts are built (stored beside them in ``baseline.json``)."""
        c = self.config
        return ProbeSpec(c.probe_data, c.probe_records, c.max_probe_facts, c.known_margin)

    def baseline(self) -> Baseline:
        """Unedited dev scores and the known facts (cached in ``baseline.json``; a stored probe
        built another way is refused, see :func:`~metake.probe.checked_probe`)."""
        path = self.out / "baseline.json"
        spec = self.probe_spec()
        if path.is_file():
            data = json.loads(path.read_text(encoding="utf-8"))
            stored = {"spec": data["probe_spec"], "facts": data["probe"]} if "probe_spec" in data \
                else data["probe"]  # fmt: skip
            probe = checked_probe(self.model, self.tokenizer, stored, spec, str(path))
            base = Baseline(data["scores"], probe, data.get("search_scores"))
            older = base.search_scores is None or "specificity_records" not in base.search_scores
            if older and self._search_subset():  # written before it existed / Spe. on all
                base.search_scores = self._unedited(self.dev[: self.config.search_records])
                self._write_baseline(path, base, spec)
            return base
        probe = build_probe(self.model, self.tokenizer, spec)
        if len(probe) < self.config.min_known_facts:
            raise MetakeError(
                f"tune: the model knows only {len(probe)} facts of --probe-records "
                f"{self.config.probe_records}; give a larger range"
            )
        base = Baseline(self._unedited(self.dev), probe)
        if self._search_subset():
            base.search_scores = self._unedited(self.dev[: self.config.search_records])
        self._write_baseline(path, base, spec)
        return base

    def _search_subset(self) -> bool:
        """Whether real-edit candidates score fewer records than the whole dev split."""
        return self.config.search_records < len(self.dev)

    def _unedited(self, records: Sequence[EvalRecord]) -> dict[str, float]:
        """The unedited model's scores on ``records`` (every known fact kept)."""
        return {**self.score(records, []), "probe_kept": 1.0}

    def _write_baseline(self, path: Path, base: Baseline, spec: ProbeSpec) -> None:
        stored = probe_to_json(spec, base.probe)
        data = {"scores": base.scores, "probe_spec": stored["spec"], "probe": stored["facts"]}
        if base.search_scores is not None:
            data["search_scores"] = base.search_scores
        text = json.dumps(data, indent=1)
        write_file_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))

    def locate(self, probe: Sequence[EditRequest]) -> dict[str, Any]:
        """Causal tracing over the known facts (cached in ``trace.json``)."""
        from metake.locate import causal_trace

        path = self.out / "trace.json"
        if path.is_file():
            return json.loads(path.read_text(encoding="utf-8"))
        window = max(1, round(self.num_layers / 6))  # ROME: 10 of GPT2-XL's 48 layers
        result = causal_trace(self.model, self.tokenizer, list(probe)[: self.config.trace_facts],
                              window=window, progress=True)  # fmt: skip
        data = {**result.to_dict(), "window": window}
        path.write_text(json.dumps(data, indent=1), encoding="utf-8")
        return data

    def windows(self, mean_ie: Sequence[float]) -> list[tuple[int, ...]]:
        """The candidate edit windows for this model (see :func:`edit_windows`)."""
        return edit_windows(mean_ie, self.config.window_size, self.num_layers)

    def _contexts(self) -> list[str]:
        if self.contexts is None:
            hp = self.base_hparams
            self.contexts = context_templates(
                self.model, self.tokenizer, hp.context_count, hp.context_length
            )
        return self.contexts

    @staticmethod
    def _target_key(hp: MemitHparams, records: Sequence[EvalRecord]) -> tuple:
        return (hp.layers[-1], hp.v_lr, hp.v_steps, tuple(r.index for r in records))

    def stage1_targets(
        self, hp: MemitHparams, records: Sequence[EvalRecord], timed: bool = True
    ) -> torch.Tensor:
        """Stage I targets ``[n, d]`` at ``hp.layers[-1]`` on the unedited model (cached).

        A computation is recorded as a ``targets`` row with its seconds (``timed``; Stage I's own
        search times its rows itself), so that the report's cost counts it.
        """
        key = self._target_key(hp, records)
        path = self._targets_path(hp, key)
        if not self._cached(hp, key) and not self._slice_of_dev(hp, records):
            start = time.perf_counter()
            size = min(self.config.batch_sizes)  # per-request targets: chunks only bound memory
            parts, starts, probs = [], [], []
            for first in range(0, len(records), size):
                targets, v_init, reached = self._chunk_targets(hp, records[first : first + size])
                parts.append(targets)
                starts.append(v_init)
                probs += reached
            self._targets[key] = torch.cat(parts)
            self._v_init[key] = torch.cat(starts)
            self._reached[key] = probs
            tensors = {
                "targets": self._targets[key].contiguous(),
                "v_init": self._v_init[key].contiguous(),
                "reached": torch.tensor(probs, dtype=torch.float64),
            }
            write_file_atomically(path, lambda tmp: save_file(tensors, str(tmp)))
            if timed:
                self._record(
                    {
                        "id": f"targets {path.stem} n={len(records)}",
                        "phase": "targets",
                        "layer": hp.layers[-1],
                        "records": len(records),
                        "seconds": time.perf_counter() - start,
                    }
                )
        return self._targets[key]

    def _chunk_targets(
        self, hp: MemitHparams, chunk: Sequence[EvalRecord]
    ) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
        """One chunk's targets ``[c, d]``, starting values ``[c, d]`` and P(target) each: from the
        cache when exactly this chunk was computed before (Stage I's lr search), else computed."""
        known = self._target_key(hp, chunk)
        if self._cached(hp, known) and known in self._v_init:
            return self._targets[known], self._v_init[known], self._reached[known]
        requests = [r.request for r in chunk]
        plan = compute_targets(self.model, self.tokenizer, requests, hp, self._contexts())
        return plan.v_target, plan.v_init, [math.exp(-nll) for nll in plan.final_nll]

    def _targets_path(self, hp: MemitHparams, key: tuple) -> Path:
        digest = hashlib.sha1(repr(key).encode()).hexdigest()[:12]
        name = f"L{hp.layers[-1]}-lr{hp.v_lr}-s{hp.v_steps}-{digest}.safetensors"
        return self.out / "targets" / name

    def _cached(self, hp: MemitHparams, key: tuple) -> bool:
        """Whether the targets of ``key`` are in memory, loading them from their file (an earlier,
        maybe interrupted, run's) when they are only on disk."""
        path = self._targets_path(hp, key)
        if key not in self._targets and path.is_file():
            saved = load_file(str(path))
            self._targets[key], self._reached[key] = saved["targets"], saved["reached"].tolist()
            if "v_init" in saved:  # written since Stage I plans are reused (stage1_plan)
                self._v_init[key] = saved["v_init"]
        return key in self._targets

    def _slice_of_dev(self, hp: MemitHparams, records: Sequence[EvalRecord]) -> bool:
        """Take the targets of ``records`` from the whole dev split's, when those are cached and
        ``records`` are its leading chunks (of the smallest batch size): the targets are computed
        chunk by chunk, so the slice is exactly what computing them again would give (the real-edit
        candidates' search records at a window whose targets the MEMIT family computed)."""
        size, n = min(self.config.batch_sizes), len(records)
        leading = [r.index for r in records] == [r.index for r in self.dev[:n]]
        if n >= len(self.dev) or n % size or not leading:
            return False
        whole = self._target_key(hp, self.dev)
        if not self._cached(hp, whole):
            return False
        key = self._target_key(hp, records)
        self._targets[key] = self._targets[whole][:n].clone()
        self._reached[key] = self._reached[whole][:n]
        if whole in self._v_init:
            self._v_init[key] = self._v_init[whole][:n].clone()
        return True

    def stage1_plan(self, hp: MemitHparams, records: Sequence[EvalRecord]) -> TargetPlan:
        """Stage I's plan at ``hp.layers[-1]`` for ``records`` as one batch on the unedited
        model, from the cache: what an edit of exactly these records computes first (handed to
        :meth:`Editor.edit` as ``stage1``, so that candidates differing only in their solver or
        look-ahead settings share one Stage I)."""
        targets = self.stage1_targets(hp, records)
        key = self._target_key(hp, records)
        if key not in self._v_init:  # a cache written before starting values were stored
            chunk = [r.request for r in records]
            once = hp.with_overrides(v_steps=1)  # one forward: the starting values only
            self._v_init[key] = compute_targets(
                self.model, self.tokenizer, chunk, once, self._contexts()
            ).v_init
        return TargetPlan(
            layer=hp.layers[-1],
            v_init=self._v_init[key],
            v_target=targets,
            steps_run=0,
            final_nll=[-math.log(max(p, 1e-300)) for p in self._reached[key]],
        )

    def tune_stage1(self, layers: tuple[int, ...]) -> dict[str, Any]:
        """The smallest learning rate (then more steps) whose targets reach >= 95% of the dev
        records (``P(target) >= 0.5`` with the target in place)."""
        records = self.dev[: self.config.search_records]
        tried = []
        for steps in (self.base_hparams.v_steps, 2 * self.base_hparams.v_steps):
            best_so_far = max(tried, key=lambda r: r["reached"], default=None)
            floor = best_so_far["v_lr"] if best_so_far else 0.0  # more steps: no smaller rate
            for lr in (lr for lr in LR_GRID if lr >= floor):
                row_id = f"stage1 layer={layers[-1]} lr={lr} steps={steps}"
                if row_id not in self.rows:
                    hp = self.base_hparams.with_overrides(
                        layers=list(layers), v_lr=lr, v_steps=steps
                    )
                    start = time.perf_counter()
                    self.stage1_targets(hp, records, timed=False)
                    probs = sorted(self._reached[self._target_key(hp, records)])
                    reached = sum(p >= 0.5 for p in probs) / len(probs)
                    self._record(
                        {
                            "id": row_id,
                            "phase": "stage1",
                            "v_lr": lr,
                            "v_steps": steps,
                            "reached": reached,
                            "median_p": probs[len(probs) // 2],
                            "seconds": time.perf_counter() - start,
                        }
                    )
                tried.append(self.rows[row_id])
                if self.rows[row_id]["reached"] >= 0.95:
                    return {"v_lr": lr, "v_steps": steps, "tried": tried}
        best = max(tried, key=lambda r: (r["reached"], -r["v_steps"]))
        log.warning("Stage I reached at most %.0f%% of the dev targets", 100 * best["reached"])
        return {"v_lr": best["v_lr"], "v_steps": best["v_steps"], "tried": tried}

    def evaluate(
        self, method: str, hp: MemitHparams, batch_size: int, probe: Sequence[EditRequest]
    ) -> dict[str, Any]:
        """Edit the dev records with ``method`` in batches of ``batch_size``, score, restore."""
        name, solver = method_spec(method, "alphaedit")
        spec = parse_solver(solver or name)
        fixed = name not in PLANNER_METHODS and spec.spreads_one_target
        records = self.dev if fixed else self.dev[: self.config.search_records]
        batch_size = min(batch_size, len(records))
        row_id = search_row_id(method, batch_size, _tuned_values(hp))
        if row_id in self.rows:
            return self.rows[row_id]
        row = {
            "id": row_id,
            "phase": "search",
            "method": method,
            "batch_size": batch_size,
            "records": len(records),
            "path": "fixed targets" if fixed else "real edits",
            "settings": _tuned_values(hp),
        }
        twin = self._unpruned_twin(method, batch_size, hp)
        if twin is not None and twin.get("edit_sigma_ratio", math.inf) < 1.0:
            return self._record({**row, **_scores_of(twin), "same_as": twin["id"], "seconds": 0.0})
        editor = Editor(
            self.model,
            self.tokenizer,
            name,
            solver=solver,
            hparams=hp,
            corpus=self.corpus,
            stats_cache=self.stats_cache,
            progress=False,
            contexts=self._contexts(),
        )
        targets = self.stage1_targets(hp, records) if fixed else None
        start = time.perf_counter()
        first = None if fixed else self._first_plan(editor, records, batch_size)
        try:
            for begin in range(0, len(records), batch_size):
                chunk = [r.request for r in records[begin : begin + batch_size]]
                if targets is None:
                    editor.edit(chunk, stage1=first if begin == 0 else None)
                else:
                    editor.apply_targets(chunk, targets[begin : begin + len(chunk)])
            restrained = editor.finalize()
            if twin is not None and not any(restrained.values()):  # PRUNE left MEMIT's weights
                row.update(_scores_of(twin), same_as=twin["id"])
            else:
                row.update(self.score(records, probe))
            if method == "memit":
                row["edit_sigma_ratio"] = self._edit_sigma_ratio(editor)
        finally:
            editor.restore()
        return self._record({**row, "seconds": time.perf_counter() - start})

    def _unpruned_twin(
        self, method: str, batch_size: int, hp: MemitHparams
    ) -> dict[str, Any] | None:
        """For a PRUNE candidate, MEMIT's row with the same settings and batch size, if scored:
        PRUNE edits as MEMIT does and only restrains, at the end, the singular values of each
        layer's accumulated edit at or above ``sigma_max`` of its original weight; where none
        is, its weights are MEMIT's bit for bit, and so are its scores."""
        if method != "prune":
            return None
        return self.rows.get(search_row_id("memit", batch_size, _tuned_values(hp)))

    def _edit_sigma_ratio(self, editor: Editor) -> float:
        """The largest ``sigma_1(W - W_original) / sigma_max(W_original)`` over the edited
        layers: below 1, PRUNE would restrain nothing of this edit."""
        adapter = get_adapter(self.model)
        layer_of = {adapter.mlp_out_name(i): i for i in editor.hparams.layers}
        ratios = []
        for name, delta in editor.accumulated_deltas().items():
            layer = layer_of[name]
            if layer not in self._sigma_max:  # of the unedited weight: W_now - delta
                original = adapter.weight(self.model, layer).detach().cpu().double() - delta
                self._sigma_max[layer] = largest_singular_value(original)
            ratios.append(largest_singular_value(delta) / self._sigma_max[layer])
        return max(ratios, default=0.0)

    def target_scale(self, hp: MemitHparams) -> float:
        """Median per-coordinate RMS of the search records' Stage I targets at
        ``hp.layers[-1]`` (the residual stream's scale there)."""
        targets = self.stage1_targets(hp, self.dev[: self.config.search_records])
        return float(targets.double().pow(2).mean(-1).sqrt().median())

    def strength_grid(self, method: str, hp: MemitHparams) -> dict[str, list[Any]]:
        """``method``'s grid at ``hp``'s window: MetaKE's scaled to the targets' size there
        (:data:`SCALED_KEYS`), every other one as written."""
        grid = STRENGTH_GRIDS.get(_grid_key(method), {})
        if method not in PLANNER_METHODS or not grid:
            return grid
        scale = self.target_scale(hp)
        factor = scale / REFERENCE_SCALE
        scaled = {
            key: [float(f"{v * factor ** SCALED_KEYS.get(key, 0):.3g}") for v in values]
            for key, values in grid.items()
        }
        log.info("tune %s: targets %.3g times the reference scale: grid %s", method, factor, scaled)
        self.grid_scales[method] = {"layer": hp.layers[-1], "target_rms": scale,
                                    "factor": factor, "grid": scaled}  # fmt: skip
        return scaled

    def _first_plan(
        self, editor: Editor, records: Sequence[EvalRecord], batch_size: int
    ) -> TargetPlan | None:
        """The cached Stage I plan of a real-edit candidate's only batch (BLUE: at its first
        layer), or ``None`` where the edit plans otherwise (ROME, or several batches)."""
        path = editor.stage2.edit_path
        if path == "one_by_one" or len(records) > min(batch_size, min(self.config.batch_sizes)):
            return None
        layer = editor.hparams.layers[0 if path == "per_layer_targets" else -1]
        return self.stage1_plan(editor.hparams.with_overrides(layers=[layer]), records)

    def candidate(
        self,
        method: str,
        hp: MemitHparams,
        probe: Sequence[EditRequest],
        base: Baseline,
        batch_sizes: Sequence[int] | None = None,
    ) -> dict[str, Any]:
        """A setting scored at ``batch_sizes`` (default: every configured one; mean over them)
        with its rule verdict against the unedited model on the same records (``unedited``);
        ``complete`` when scored at every configured batch size."""
        sizes = list(batch_sizes or self.config.batch_sizes)
        rows = list(
            {r["id"]: r for r in (self.evaluate(method, hp, b, probe) for b in sizes)}.values()
        )
        mean = {
            k: sum(r[k] for r in rows) / len(rows)
            for k in ("efficacy", "generalization", "specificity", "perplexity", "probe_kept")
        }
        out = {
            "method": method,
            "settings": _tuned_values(hp),
            **mean,
            "per_batch_size": {r["batch_size"]: r["id"] for r in rows},
            "complete": sorted(sizes) == sorted(self.config.batch_sizes),
            "unedited": base.on(rows[0]["records"], len(self.dev)),
        }
        out["violations"] = violations(out, out["unedited"], self.config.min_efficacy_gain)
        return out

    def search_sizes(self) -> list[int]:
        """The batch sizes a search candidate is scored at: the smallest when finalists are
        re-scored at every size, else all."""
        sizes = self.config.batch_sizes
        return [min(sizes)] if self.config.finalists else list(sizes)

    def finalists(
        self, method: str, results: Sequence[dict[str, Any]], probe: Sequence[EditRequest],
        base: Baseline,
    ) -> list[dict[str, Any]]:  # fmt: skip
        """The ``config.finalists`` best distinct settings of a search under the rule, scored at
        every batch size (candidates already complete are kept as they are)."""
        if not self.config.finalists:
            return []
        picked: list[dict[str, Any]] = []
        for c in self.ranked(results, base):
            if all(c["settings"] != f["settings"] for f in picked):
                picked.append(c)
            if len(picked) == self.config.finalists:
                break
        return [
            c if c.get("complete", True) else
            self.candidate(method, self.base_hparams.with_overrides(**c["settings"]), probe, base)
            for c in picked
        ]  # fmt: skip

    # ----- the search -------------------------------------------------------------------------
    def ranked(self, candidates: Sequence[dict[str, Any]], base: Baseline) -> list[dict[str, Any]]:
        """``candidates`` best first under the selection rule (:func:`selection_key`, each
        against the unedited model on its own records; ties keep their order)."""
        gain = self.config.min_efficacy_gain

        def key(c: dict[str, Any]) -> tuple[bool, int, float]:
            return selection_key(c, c.get("unedited") or base.scores, gain)

        return sorted(candidates, key=key, reverse=True)

    def best(self, candidates: Sequence[dict[str, Any]], base: Baseline) -> dict[str, Any]:
        """The candidate the selection rule picks among the complete ones (all when none is)."""
        complete = [c for c in candidates if c.get("complete", True)] or list(candidates)
        return self.ranked(complete, base)[0]

    def run(self) -> dict[str, Any]:
        """Run (or continue) the whole search and write the preset and the report."""
        self.out.mkdir(parents=True, exist_ok=True)
        lock = try_lock(self.out / LOCK_NAME)
        if lock is None:
            raise MetakeError(
                f"{self.out}: another `metake tune` process is running in this folder (it holds "
                f"{LOCK_NAME}); wait for it to finish, or give this run another --out"
            )
        try:
            return self._run()
        finally:
            lock.release()

    def _run(self) -> dict[str, Any]:
        from metake.tune_report import write_outputs

        self._prepare()
        methods = list(self.config.methods)
        bar = tqdm(total=3 + len(methods), desc="tune", unit="step")  # three shared steps first
        bar.set_postfix_str("unedited scores and known facts")
        base = self.baseline()
        bar.update()
        bar.set_postfix_str("causal trace")
        trace = self.locate(base.probe)
        bar.update()
        windows = self.windows(trace["mean_ie"])
        bar.set_postfix_str("Stage I lr/steps")
        stage1 = self.tune_stage1(windows[len(windows) // 2])
        bar.update()
        shared = {"v_lr": stage1["v_lr"], "v_steps": stage1["v_steps"]}
        chosen: dict[str, dict[str, Any]] = {}
        searched: dict[str, list[dict[str, Any]]] = {}
        for number, method in enumerate(methods, 1):
            bar.set_postfix_str(method)
            searched[method] = self._search_method(method, shared, windows, chosen, base)
            chosen[method] = self.best(searched[method], base)
            log.info("tune %s: %s", method, chosen[method]["settings"])
            self._note_invocation(completed=number == len(methods))
            report = write_outputs(self, base, trace, stage1, windows, searched, chosen)
            bar.update()
        bar.close()
        return report

    def _search_method(
        self,
        method: str,
        shared: dict[str, Any],
        windows: list[tuple[int, ...]],
        chosen: dict[str, dict[str, Any]],
        base: Baseline,
    ) -> list[dict[str, Any]]:
        """Windows at the default strength, then the strength grid and its refinement.

        A method built on a tuned one (:data:`BUILT_ON`: RECT and PRUNE on MEMIT, BLUE and MetaKE
        on AlphaEdit) starts from that method's chosen settings, window included, and searches
        only its own grid.
        """
        start = self.base_hparams.with_overrides(**shared)
        parent = BUILT_ON.get(method)
        if parent in chosen:
            start = start.with_overrides(**chosen[parent]["settings"])
        results = []

        def run(hp: MemitHparams) -> dict[str, Any]:
            results.append(self.candidate(method, hp, base.probe, base, self.search_sizes()))
            return results[-1]

        if parent in chosen:
            best_hp = start
        else:
            for window in windows:
                run(start.with_overrides(layers=list(window)))
            best = self.best(results, base)
            best_hp = start.with_overrides(layers=best["settings"]["layers"])
        grid = self.strength_grid(method, best_hp)
        refine = method not in PLANNER_METHODS  # MetaKE's runs are the dear ones
        hp = best_hp.with_overrides(**{k: v[0] for k, v in grid.items()})
        for number, (name, values) in enumerate(grid.items()):  # one coordinate at a time
            tried = [
                run(hp.with_overrides(**{name: v}))
                for v in values
                if number == 0 or v != getattr(hp, name)
            ]
            for _ in range(EXTEND_ROUNDS if number == 0 and name in UNBOUNDED_KEYS else 0):
                seen = sorted({c["settings"][name] for c in tried})
                beyond = _beyond_edge(seen, self.best(tried, base)["settings"][name])
                if beyond is None:
                    break
                tried.append(run(hp.with_overrides(**{name: beyond})))
            for _ in range(REFINE_ROUNDS if number == 0 and refine else 0):
                top = self.best(tried, base)
                seen = sorted({c["settings"][name] for c in tried})
                tried += [
                    run(hp.with_overrides(**{name: v}))
                    for v in _refine(seen, top["settings"][name])
                    if v not in seen
                ]
            top = self.best(
                [*tried, *[c for c in results if c["settings"] == _tuned_values(hp)]], base
            )
            hp = hp.with_overrides(**{name: top["settings"][name]})
        final = self.finalists(method, results, base.probe, base)
        return [*results, *(c for c in final if c not in results)]


def edit_windows(mean_ie: Sequence[float], size: int, num_layers: int) -> list[tuple[int, ...]]:
    """Windows of ``size`` layers ending at ``end - 2``, ``end``, ``end + 2`` (distinct, clipped).

    ``end`` is the last layer whose mean indirect effect is at least a quarter of the peak's
    (layer 0 never counts: it is not edited): the end of the region where the MLPs carry the
    facts, as MEMIT's windows end where that effect fades.
    """
    effects = list(mean_ie)
    peak = max(range(1, len(effects)), key=lambda i: effects[i])
    end = max(i for i in range(peak, len(effects)) if effects[i] >= 0.25 * effects[peak])
    out = []
    for last in (end - 2, end, end + 2):
        last = min(max(last, size), num_layers - 1)
        window = tuple(range(last - size + 1, last + 1))
        if window not in out:
            out.append(window)
    return out


def _spe_on_search_records(row: dict[str, Any]) -> bool:
    """Whether a real-edit row was written by a version that scored Spe. on the edited records
    alone (now every dev record's): such rows are edited again."""
    real = row.get("phase") == "search" and row.get("path") == "real edits"
    return real and "specificity_records" not in row


def _scores_of(row: dict[str, Any]) -> dict[str, float]:
    """A row's scores (what a candidate's verdict reads)."""
    keys = ("efficacy", "generalization", "specificity", "perplexity", "probe_kept")
    return {k: row[k] for k in keys}


def search_row_id(method: str, batch_size: int, settings: dict[str, Any]) -> str:
    """The id of one candidate's row at one batch size (what a rerun looks its result up by)."""
    values = " ".join(f"{k}={_id_value(v)}" for k, v in sorted(settings.items()))
    return f"{method} b={batch_size} {values}"


def _id_value(value: Any) -> str:
    """A setting as a row id writes it: ``2000`` and ``2000.0`` alike (one candidate, one row)."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _grid_key(method: str) -> str:
    """Which strength grid a method searches (prune: MEMIT's lambda)."""
    return {"prune": "memit"}.get(method, method)


REFINE_ROUNDS = 2

EXTEND_ROUNDS = 2
"""A first grid key whose best value is the largest or smallest tried gets up to this many
more values beyond it, one grid step each (the grid did not bracket the best setting)."""

UNBOUNDED_KEYS = frozenset({"mom2_update_weight", "nullspace_threshold", "alphaedit_lambda",
                            "alphaedit_blue_lambda", "metake_lr", "metake_reg_weight"})  # fmt: skip
"""Strength keys a search may extend past its grid (RECT's kept fraction is bounded by 1)."""


def _beyond_edge(values: Sequence[float], best: float) -> float | None:
    """One geometric grid step past ``best`` when it is the largest or the smallest of the
    ``values`` tried (at least two), else ``None``."""
    ordered = sorted(values)
    if len(ordered) < 2 or best not in (ordered[0], ordered[-1]):
        return None
    neighbour = ordered[-2] if best == ordered[-1] else ordered[1]
    return float(f"{best * best / neighbour:.3g}")


"""Rounds of geometric bisection around the best value of a method's first strength key."""


def _refine(values: Sequence[float], best: float) -> list[float]:
    """Geometric midpoints between ``best`` and its neighbours among the values tried."""
    ordered = sorted(values)
    i = ordered.index(best)
    out = []
    for j in (i - 1, i + 1):
        if 0 <= j < len(ordered):
            out.append(float(f"{math.sqrt(best * ordered[j]):.3g}"))
    return out


TUNED_FIELDS = (
    "layers",
    "v_lr",
    "v_steps",
    "mom2_update_weight",
    "nullspace_threshold",
    "nullspace_relative",
    "alphaedit_lambda",
    "alphaedit_blue_lambda",
    "rect_keep_fraction",
    "metake_lr",
    "metake_reg_weight",
)


def _tuned_values(hp: MemitHparams) -> dict[str, Any]:
    """The searched hyper-parameters of ``hp`` (what a tuned preset stores per method)."""
    values = hp.to_dict()
    return {k: values[k] for k in TUNED_FIELDS}


def preset_entry(model: nn.Module, tuner: Tuner, chosen: dict[str, dict[str, Any]]) -> dict:
    """The tuned preset: shared values at the top, each method's own in ``methods``."""
    config = model.config.get_text_config()
    name = find_preset(model.config)
    match = {
        "model_type": config.model_type,
        "num_hidden_layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
    }
    base = tuner.base_hparams.to_dict()
    top = {k: v for k, v in base.items() if k != "preset"}
    first = chosen.get("alphaedit") or next(iter(chosen.values()))
    top.update(first["settings"])
    methods = {
        m: {k: v for k, v in c["settings"].items() if top.get(k) != v} for m, c in chosen.items()
    }
    return {
        "match": match,
        **top,
        "methods": methods,
        "tuned": {
            "command": tuner.config.command,
            "from_preset": tuner.config.preset or name,  # where the search started
            "dev_records": tuner.config.dev_records,
            "probe_records": tuner.config.probe_records,
            "exclude_from_evaluation": tuner.config.dev_records,
        },
    }


def run_tune(
    config: TuneConfig,
    out: str | Path,
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    **options: Any,
) -> dict[str, Any]:
    """Run (or continue) a tuning run in ``out``; returns the report's content.

    The preset and report are rewritten after every method, so an interrupted run leaves the
    methods finished so far usable."""
    return Tuner(config, out, model, tokenizer, **options).run()
