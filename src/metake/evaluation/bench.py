"""``metake bench``: the paper's sequential-editing protocol, resumable, with a run folder.

For every seed: sample ``edits`` records with the seed, score the unedited model on them
(``pre_edit``), then for every method edit them sequentially in batches of ``batch_size`` (one
:class:`~metake.editor.Editor` session), optionally score the records edited so far after each
batch (the curve), score all of them after the last batch, and restore the original weights
before the next method.

Run folder::

    config.json                 what was asked (a resumed run reads it back)
    bench.log                   the log
    parts/seed<S>/pre_edit.json the unedited model's scores
    parts/seed<S>/<method>.json one finished method (per-record metrics, curve, timings)
    parts/seed<S>/<method>.state.safetensors  checkpoint after the last finished batch (while
                                running; no pickle: :mod:`metake.checkpoint`)
    parts/seed<S>/<method>.lock held by the process running that part (several processes, or
                                machines sharing the folder, each take parts nobody holds)
    results.json, results.md, *.png  written by :mod:`metake.evaluation.report` at the end

After every batch the session's state (edited weights, AlphaEdit's key cache, context prefixes)
and the metrics so far are saved; ``resume`` continues from the last saved batch and ends with the
same numbers as an uninterrupted run (every edit call reseeds, and the weights are stored, not
re-added).

Each (seed, method) part is independent of the others, so parts can run in separate processes
or on separate machines that share the folder: ``only`` (``--only seed=1,method=alphaedit`` or
``--only part=3``) restricts a process to some parts, and a part another process holds is
skipped. Whichever process finds every part finished writes the report; ``--resume DIR`` on a
folder whose parts are all finished only writes it (docs/distributed.md).
"""

from __future__ import annotations

import collections
import json
import logging
import platform
import statistics
from collections.abc import Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock
from torch import nn
from tqdm import tqdm
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

import metake
from metake.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_legacy_checkpoint,
    save_checkpoint,
)
from metake.corpus import TextCorpus, load_corpus
from metake.editor import Editor
from metake.errors import MetakeError
from metake.evaluation.contention import CpuMeter, CpuUse
from metake.evaluation.datasets import (
    EvalRecord,
    in_ranges,
    load_dataset,
    parse_ranges,
    select_records,
)
from metake.evaluation.evaluate import (
    evaluate_records,
    generation_fluency,
    mean_metrics,
    metric_names,
)
from metake.evaluation.metrics import text_perplexity
from metake.files import try_lock, write_file_atomically
from metake.methods import PLANNER_METHODS, resolve_method
from metake.planners.standard import MAX_GROUP_ROWS
from metake.probe import ProbeSpec, build_probe, checked_probe, probe_to_json, share_known
from metake.requests import EditRequest
from metake.stats import StatsCache

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"


@dataclass
class BenchConfig:
    """Everything that defines a benchmark run (saved as ``config.json``)."""

    model: str
    dataset: str
    data: str
    methods: list[str]
    edits: int
    batch_size: int
    seeds: list[int] = field(default_factory=lambda: [0])
    solver: str = "alphaedit"  # the solver of a plain "metake"
    zsre_target: str = "answers"
    curve: bool = True  # score the records edited so far after every batch
    curve_records: int = 200  # at most this many of them per batch (a fixed sample): linear runs
    generation: bool = True  # also score by greedy generation (efficacy_gen, ...)
    fluency_records: int = 10  # records whose prompts are continued for the fluency score
    drift_texts: int = 32  # held-out Wikipedia intros for the perplexity drift
    overrides: dict[str, Any] = field(default_factory=dict)  # hyper-parameters, all methods
    preset: str | None = None
    corpus: str | None = None  # statistics (and held-out drift texts); None: built-in Wikipedia
    device: str = "cpu"
    dtype: str = "float32"  # the model's weights (changes results)
    device_map: str | None = None  # accelerate's placement over devices (--device-map)
    max_memory: str | None = None  # per device, with device_map
    records: str | None = None  # "A:B[,C:D]": edit these file positions in order, no sampling
    exclude: str | None = None  # "A:B[,C:D]": never sample these (e.g. a tuning split)
    probe_data: str | None = None  # CounterFact file of known facts to watch (None: no probe)
    probe_records: str = "0:2000"  # its records the probe facts come from (never edited)
    probe_facts: int = 200  # at most this many facts the unedited model knows
    probe_margin: float = 1.0  # nats each answer token must lead by to count as known
    group_rows: int = MAX_GROUP_ROWS  # planners' prompt rows per forward/backward (memory)
    command: str = ""

    def __post_init__(self) -> None:
        for spec in self.methods:
            method_spec(spec, self.solver)
        if self.edits < 1 or self.batch_size < 1:
            raise MetakeError("--edits and --batch-size must be at least 1")
        if self.curve_records < 1:
            raise MetakeError("--curve-records must be at least 1")
        if self.group_rows < 1:
            raise MetakeError("--group-rows must be at least 1")
        if not self.seeds:
            raise MetakeError("give at least one seed")
        for option in (self.records, self.exclude):
            if option is not None:
                parse_ranges(option)
        if len(set(self.methods)) != len(self.methods):
            raise MetakeError(f"a method is listed twice: {', '.join(self.methods)}")
        if self.probe_data is not None:
            self._check_probe()

    def _check_probe(self) -> None:
        """The probe's facts must be records this run never edits."""
        if self.probe_facts < 1:
            raise MetakeError("--probe-facts must be at least 1")
        probe = parse_ranges(self.probe_records, "--probe-records")
        if not Path(self.probe_data).is_file():
            raise MetakeError(f"--probe-data: no such file: {self.probe_data}")
        if Path(self.data).resolve() != Path(self.probe_data).resolve():
            return
        if self.records is not None:
            edited = parse_ranges(self.records)
            if any(in_ranges(i, probe) for r in edited for i in r):
                raise MetakeError("--probe-records overlaps --records in the same file")
        elif self.exclude is None or not all(
            in_ranges(i, parse_ranges(self.exclude)) for r in probe for i in r
        ):
            raise MetakeError("--probe-records must lie inside --exclude when the probe comes "
                              "from the edited file (its facts must never be edited)")  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict."""
        return asdict(self)


def method_spec(spec: str, default_solver: str) -> tuple[str, str | None]:
    """``"metake"`` → ``("metake", default_solver)``; ``"metake+memit"`` picks the solver.

    Any other spec is a solver name (``memit``, ``rect``, ``alphaedit_blue``, ...) and comes
    back as ``(spec, None)``; unknown names raise :class:`MetakeError`.
    """
    method, _, solver = spec.partition("+")
    if solver and method not in PLANNER_METHODS:
        raise MetakeError(f"{spec!r}: only metake methods take a solver (metake+SOLVER)")
    if method in PLANNER_METHODS:
        return method, resolve_method(method, solver or default_solver)[1]
    resolve_method(method)
    return method, None


@dataclass(frozen=True)
class PartFilter:
    """Which (seed, method) parts of a run a process takes: ``seed=S``, ``method=M`` and/or
    ``part=K`` (the K-th part, from 0, seeds outer and methods inner, as
    :meth:`BenchRun.parts` lists them); every given condition must hold."""

    seed: int | None = None
    method: str | None = None
    index: int | None = None

    @classmethod
    def parse(cls, text: str) -> PartFilter:
        """``"seed=1,method=alphaedit"`` or ``"part=3"`` -> a filter."""
        found: dict[str, Any] = {}
        for item in (part.strip() for part in text.split(",") if part.strip()):
            key, sep, value = item.partition("=")
            key, value = key.strip(), value.strip()
            if not sep or key not in ("seed", "method", "part") or not value:
                raise MetakeError(f"--only takes seed=S, method=M and/or part=K (comma-separated), "
                                  f"got {item!r}")  # fmt: skip
            if key in ("seed", "part"):
                if not value.isdigit():
                    raise MetakeError(f"--only {key}= takes a whole number, got {value!r}")
                value = int(value)
            found["index" if key == "part" else key] = value
        if not found:
            raise MetakeError("--only needs at least one of seed=S, method=M, part=K")
        return cls(**found)

    def check(self, parts: Sequence[tuple[int, str]]) -> None:
        """A clear error when the filter names a seed, method or part the run does not have."""
        if self.seed is not None and all(seed != self.seed for seed, _ in parts):
            raise MetakeError(f"--only seed={self.seed}: the run has seeds "
                              f"{sorted({seed for seed, _ in parts})}")  # fmt: skip
        if self.method is not None and all(spec != self.method for _, spec in parts):
            raise MetakeError(f"--only method={self.method}: the run has methods "
                              f"{list(dict.fromkeys(spec for _, spec in parts))}")  # fmt: skip
        if self.index is not None and self.index >= len(parts):
            raise MetakeError(f"--only part={self.index}: the run has parts 0..{len(parts) - 1}")

    def selects(self, index: int, seed: int, spec: str) -> bool:
        """Whether part number ``index`` (``seed``, ``spec``) is this process's."""
        return ((self.seed is None or seed == self.seed)
                and (self.method is None or spec == self.method)
                and (self.index is None or index == self.index))  # fmt: skip


def package_versions() -> dict[str, str]:
    """Versions that can change the numbers."""
    import transformers

    return {
        "metake": metake.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
    }


def versions_ran_with(
    earlier: list[dict[str, str]], now: dict[str, str], seed: int, spec: str
) -> list[dict[str, str]]:
    """The package versions a resumed part's batches ran with: ``earlier`` (``{}`` for batches
    of code that did not record them) and ``now`` if it is new; a change is logged."""
    if now in earlier:
        return earlier
    changed = sorted({k for before in earlier if before for k in now if before.get(k) != now[k]})
    if changed:
        before = ", ".join(f"{k} {b.get(k)}" for b in earlier if b for k in changed)
        log.warning("seed %d %s: resumed with %s; its earlier batches ran with %s", seed, spec,
                    ", ".join(f"{k} {now[k]}" for k in changed), before)  # fmt: skip
    return [*earlier, now]


def held_out_texts(corpus: TextCorpus, count: int) -> list[str]:
    """The last ``count`` texts of ``corpus`` (statistics read its first texts)."""
    if count <= 0:
        return []
    if corpus.num_texts == 0:  # a stream of unknown length (hf:NAME): it has no known end
        raise MetakeError(f"the perplexity drift reads the last texts of the corpus, and "
                          f"{corpus.name!r} is a stream of unknown length; pass --drift-texts 0 "
                          "or a local copy of the dataset (save_to_disk)")  # fmt: skip
    return list(collections.deque(corpus.iter_texts(), maxlen=count))


def _write_json(path: Path, data: Any) -> None:
    text = json.dumps(data, indent=1)
    write_file_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


class BenchRun:
    """One run folder: runs what is missing in it, then the report."""

    def __init__(
        self,
        config: BenchConfig,
        out: str | Path,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        stop_after_batches: int | None = None,
        corpus: TextCorpus | None = None,
        stats_cache: StatsCache | None = None,
        only: PartFilter | None = None,
    ) -> None:
        self.config = config
        self.only = only if only is not None else PartFilter()
        self.only.check(self.parts())
        self.corpus = corpus if corpus is not None else load_corpus(config.corpus)
        self.stats_cache = stats_cache
        self.out = Path(out)
        self.model = model
        self.tokenizer = tokenizer
        self.stop_after_batches = stop_after_batches  # tests: simulate an interruption
        self.dataset = load_dataset(config.dataset, config.data, config.zsre_target, tokenizer)
        self._drift_texts: list[str] | None = None
        self._probe: list[EditRequest] | None = None

    # ----- folder --------------------------------------------------------------------------
    @classmethod
    def read_config(cls, out: str | Path) -> BenchConfig:
        """The configuration saved in a run folder (for ``--resume``)."""
        path = Path(out) / CONFIG_FILE
        if not path.is_file():
            raise MetakeError(f"{out} is not a bench run folder (no {CONFIG_FILE})")
        return BenchConfig(**json.loads(path.read_text(encoding="utf-8")))

    def _prepare_folder(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / CONFIG_FILE
        mine = self.config.to_dict()
        if path.is_file():
            saved = json.loads(path.read_text(encoding="utf-8"))
            defaults = {f.name: f.default for f in fields(BenchConfig) if f.default is not MISSING}
            differ = sorted(
                k for k in mine if k != "command" and saved.get(k, defaults.get(k)) != mine[k]
            )  # a field older runs lack counts as its default
            if differ == ["methods"] and _extends(saved["methods"], mine["methods"]):
                added = mine["methods"][len(saved["methods"]) :]
                log.info("%s: methods %s added to the run (same records and settings; the "
                         "finished parts are kept)", self.out, ", ".join(added))  # fmt: skip
                _write_json(path, mine)
                return
            if differ:
                raise MetakeError(
                    f"{self.out} holds a run with another configuration ({', '.join(differ)}); "
                    "use --resume with that folder alone, or another --out"
                )
        else:
            _write_json(path, mine)

    def _part(self, seed: int, name: str) -> Path:
        folder = self.out / "parts" / f"seed{seed}"
        folder.mkdir(parents=True, exist_ok=True)
        return folder / name

    @property
    def drift_texts(self) -> list[str]:
        """Held-out texts for the perplexity drift (loaded once)."""
        if self._drift_texts is None:
            self._drift_texts = held_out_texts(self.corpus, self.config.drift_texts)
        return self._drift_texts

    @property
    def probe(self) -> list[EditRequest]:
        """Facts the unedited model knows (``probe.json`` in the run folder; empty: no probe).

        Computed once, on the unedited model, before the first edit of the run."""
        if self._probe is not None or self.config.probe_data is None:
            return self._probe or []
        path = self.out / "probe.json"
        c = self.config
        spec = ProbeSpec(c.probe_data, c.probe_records, c.probe_facts, c.probe_margin)
        if path.is_file():
            stored = json.loads(path.read_text("utf-8"))
            self._probe = checked_probe(self.model, self.tokenizer, stored, spec, str(path))
            return self._probe
        self._probe = build_probe(self.model, self.tokenizer, spec)
        if not self._probe:
            raise MetakeError(f"the model knows none of the facts in --probe-records "
                              f"{self.config.probe_records}; give a larger range")  # fmt: skip
        log.info("probe: %d facts the unedited model knows", len(self._probe))
        text = json.dumps(probe_to_json(spec, self._probe), indent=1)
        write_file_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
        return self._probe

    def known_facts_kept(self) -> float | None:
        """Share of :attr:`probe` facts the model as it is still answers (teacher-forced, every
        answer token the argmax), in [0, 1]; ``None`` without a probe."""
        return share_known(self.model, self.tokenizer, self.probe) if self.probe else None

    # ----- running ---------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Run every missing (seed, method), then write and return the results."""
        from metake.evaluation.report import write_report

        self._prepare_folder()
        handler = logging.FileHandler(self.out / "bench.log", encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root = logging.getLogger("metake")
        root.addHandler(handler)
        previous_level = root.level
        root.setLevel(min(previous_level or logging.INFO, logging.INFO))
        try:
            log.info("bench %s", json.dumps(self.config.to_dict()))
            log.info(
                "dataset %s: %d valid records, %d skipped",
                self.dataset.path,
                len(self.dataset.records),
                len(self.dataset.skipped),
            )
            self.probe  # noqa: B018  (on the unedited model, before any edit)
            self._check_finished_settings()
            for index, (seed, spec) in enumerate(self.parts()):
                if not self.only.selects(index, seed, spec) or self._finished(seed, spec):
                    continue
                if self._take_part(seed, spec) is None:
                    return {}  # interrupted on purpose (tests)
            pending = [f"seed={seed},method={spec}" for seed, spec in self.parts()
                       if not self._finished(seed, spec)]  # fmt: skip
            if pending:
                log.info("%d of %d parts finished; the report is written when all are (pending: "
                         "%s)", len(self.parts()) - len(pending), len(self.parts()),
                         "; ".join(pending))  # fmt: skip
                return {"pending": pending}
            seeds = {seed: self._collect_seed(seed) for seed in self.config.seeds}
            return write_report(self.out, self.config, self.dataset, seeds, package_versions())
        finally:
            root.removeHandler(handler)
            root.setLevel(previous_level)
            handler.close()

    def parts(self) -> list[tuple[int, str]]:
        """Every (seed, method) part of the run, seeds outer, in the configuration's order."""
        return [(seed, spec) for seed in self.config.seeds for spec in self.config.methods]

    def _check_finished_settings(self) -> None:
        """Refuse to continue a run whose finished parts were edited with other hyper-parameters
        than this code and preset give (a preset adopted or changed since): one table must not
        mix them."""
        for seed, spec in self.parts():
            if not self._finished(seed, spec):
                continue
            saved = json.loads(self._part(seed, f"{spec}.json").read_text(encoding="utf-8"))
            differ = self._new_editor(spec, seed).hparams.differences(saved.get("hparams", {}))
            if differ:
                raise MetakeError(
                    f"{self.out}: seed {seed} {spec} was edited with other hyper-parameters "
                    f"({'; '.join(differ)}); the preset changed since it ran: finish this run "
                    "with the code it started with, or start a new --out"
                )

    def _finished(self, seed: int, spec: str) -> bool:
        return (self.out / "parts" / f"seed{seed}" / f"{spec}.json").is_file()

    def _records(self, seed: int) -> list[EvalRecord]:
        return select_records(self.dataset.records, self.config.edits, seed,
                              self.config.records, self.config.exclude)  # fmt: skip

    def _take_part(self, seed: int, spec: str) -> dict[str, Any] | str | None:
        """Run one part unless another process holds it (``"elsewhere"``); ``None`` when
        interrupted on purpose (tests)."""
        records = self._records(seed)
        with FileLock(str(self._part(seed, "pre_edit.lock"))):  # one process scores, others wait
            self._pre_edit(seed, records)
        lock = try_lock(self._part(seed, f"{spec}.lock"))
        if lock is None:
            log.info("seed %d %s: another process is running it; skipped here", seed, spec)
            return "elsewhere"
        try:
            return self._run_method(seed, spec, records)
        finally:
            lock.release()

    def _collect_seed(self, seed: int) -> dict[str, Any]:
        """One seed's records, unedited scores and finished methods, read from its parts."""
        records = self._records(seed)
        methods = {spec: json.loads(self._part(seed, f"{spec}.json").read_text(encoding="utf-8"))
                   for spec in self.config.methods}  # fmt: skip
        return {"records": [r.index for r in records], "pre_edit": self._pre_edit(seed, records),
                "methods": methods}  # fmt: skip

    def _model_scores(self, records: Sequence[EvalRecord]) -> dict[str, Any]:
        """Per-record metrics and model-level figures of the model as it is now."""
        per_record = evaluate_records(self.model, self.tokenizer, records, self.config.dataset,
                                      generation=self.config.generation)  # fmt: skip
        scores: dict[str, Any] = {"per_record": per_record}
        if self.drift_texts:
            scores["perplexity"] = text_perplexity(self.model, self.tokenizer, self.drift_texts)
        kept = self.known_facts_kept()
        if kept is not None:
            scores["known_facts_kept"] = 100 * kept
        if self.config.fluency_records > 0:
            fluency = generation_fluency(
                self.model, self.tokenizer, records[: self.config.fluency_records]
            )
            scores["fluency"] = fluency["fluency"]
            scores["generations"] = fluency["texts"]
        return scores

    def _pre_edit(self, seed: int, records: Sequence[EvalRecord]) -> dict[str, Any]:
        path = self._part(seed, "pre_edit.json")
        if path.is_file():
            return json.loads(path.read_text(encoding="utf-8"))
        log.info("seed %d: scoring the unedited model on %d records", seed, len(records))
        scores = self._model_scores(records)
        _write_json(path, scores)
        return scores

    def _editor(self, spec: str, seed: int) -> Editor:
        """The session that edits one part, with its statistics loaded."""
        editor = self._new_editor(spec, seed)
        editor.load_statistics()
        return editor

    def _new_editor(self, spec: str, seed: int) -> Editor:
        """The session of one part, as configured (nothing computed yet)."""
        method, solver = method_spec(spec, self.config.solver)
        return Editor(
            self.model,
            self.tokenizer,
            method,
            solver=solver,
            preset=self.config.preset,
            model_id=self.config.model,
            corpus=self.corpus,
            stats_cache=self.stats_cache,
            seed=seed,
            progress=False,
            group_rows=self.config.group_rows,
            **self.config.overrides,
        )

    def _run_method(
        self, seed: int, spec: str, records: Sequence[EvalRecord]
    ) -> dict[str, Any] | None:
        done_path = self._part(seed, f"{spec}.json")
        if done_path.is_file():
            log.info("seed %d %s: already done", seed, spec)
            return json.loads(done_path.read_text(encoding="utf-8"))
        state_path = self._part(seed, f"{spec}.state.safetensors")
        legacy_path = self._part(seed, f"{spec}.state.pt")  # older runs (torch.save)
        editor = self._editor(spec, seed)
        batches: list[dict[str, Any]] = []
        curve: list[dict[str, Any]] = []
        state = None
        try:
            if state_path.is_file():
                state = load_checkpoint(state_path)
            elif legacy_path.is_file():
                state = load_legacy_checkpoint(legacy_path)
        except CheckpointError as err:
            log.warning("seed %d %s: %s; starting this method over", seed, spec, err)
            state = None
        ran_with = [package_versions()]
        if state is not None:
            editor.load_state_dict(state["editor"])
            batches, curve = state["batches"], state["curve"]
            log.info("seed %d %s: resuming after batch %d", seed, spec, len(batches))
            ran_with = versions_ran_with(state.get("versions", [{}]), ran_with[0], seed, spec)
        size = self.config.batch_size
        starts = list(range(0, len(records), size))
        names = metric_names(self.config.dataset)
        try:
            bar = tqdm(starts, desc=f"seed {seed} {spec}", unit="batch", initial=len(batches))
            for number, start in enumerate(starts):
                if number < len(batches):
                    continue
                if self.stop_after_batches is not None and number >= self.stop_after_batches:
                    return None
                chunk = records[start : start + size]
                meter = CpuMeter()
                report = editor.edit([r.request for r in chunk]).report
                editor.finalize()  # PRUNE: evaluate the restrained edit; the next batch goes on raw
                batches.append(_batch_summary(report, meter.stop(), len(chunk)))
                if self.config.curve:
                    edited = start + len(chunk)
                    sample = curve_sample(records, edited, self.config.curve_records, seed)
                    scores = evaluate_records(self.model, self.tokenizer, sample,
                                              self.config.dataset,
                                              generation=self.config.generation)  # fmt: skip
                    point = {"edits": edited, "scored": len(sample), **mean_metrics(scores, names)}
                    if self.drift_texts:  # general ability as the edits accumulate
                        point["perplexity"] = text_perplexity(
                            self.model, self.tokenizer, self.drift_texts
                        )
                    kept = self.known_facts_kept()
                    if kept is not None:
                        point["known_facts_kept"] = 100 * kept
                    curve.append(point)
                state = {"editor": editor.state_dict(), "batches": batches, "curve": curve,
                         "versions": ran_with}  # fmt: skip
                save_checkpoint(state_path, state)
                bar.update(1)
                bar.set_postfix_str(f"{batches[-1]['seconds'] / len(chunk):.1f} s/edit")
            bar.close()
            scores = self._model_scores(records)
        finally:
            editor.restore()
        seconds = sum(b["seconds"] for b in batches)
        result = {
            "method": editor.method,
            "solver": editor.solver,
            "hparams": editor.hparams.to_dict(),
            **scores,
            "curve": curve,
            "batches": batches,
            "seconds_edit": seconds,
            "seconds_per_edit": seconds / len(records),
            "versions": ran_with,
        }
        _write_json(done_path, result)
        state_path.unlink(missing_ok=True)
        legacy_path.unlink(missing_ok=True)
        return result


def curve_sample(
    records: Sequence[EvalRecord], edited: int, limit: int, seed: int
) -> list[EvalRecord]:
    """The records a curve point scores after ``edited`` edits: all of them up to ``limit``, else
    the first ``limit`` edited ones in one seeded order of the run's records (the same order at
    every point), so that a point costs at most ``limit`` records and a long run stays linear in
    its length. The final scores cover every record.
    """
    if edited <= limit:
        return list(records[:edited])
    import random

    order = random.Random(f"curve-{seed}").sample(range(len(records)), len(records))
    return [records[i] for i in order if i < edited][:limit]


def _batch_summary(report, cpu: CpuUse, size: int) -> dict[str, Any]:
    """What one batch took (``seconds``: Stage I + II; ``seconds_wall`` adds the first batch's
    context prefixes; ``cpu``: how busy the rest of the machine was meanwhile, ``threads``:
    torch's), and how far Stage I / MetaKE's look-ahead got."""
    return {
        "size": size,
        "seconds": report.seconds,
        "seconds_wall": cpu.seconds,
        "cpu": cpu.to_dict(),
        "threads": torch.get_num_threads(),
        "seconds_stage1": report.seconds_stage1,
        "seconds_lookahead": report.seconds_lookahead,
        "seconds_stage2": report.seconds_stage2,
        "stage1_target_prob": statistics.median(report.stage1_target_prob),
        "lookahead_first": report.lookahead_history[0] if report.lookahead_history else None,
        "lookahead_last": report.lookahead_history[-1] if report.lookahead_history else None,
    }


def run_bench(
    config: BenchConfig,
    out: str | Path,
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    **options: Any,
) -> dict[str, Any]:
    """Run (or continue) a benchmark in ``out`` and return ``results.json``'s content.

    ``options``: ``corpus`` (a :class:`TextCorpus`), ``stats_cache``, ``stop_after_batches``.
    """
    return BenchRun(config, out, model, tokenizer, **options).run()


def _extends(saved: list[str], methods: list[str]) -> bool:
    """Whether ``methods`` is the saved run's list with more methods after it (a run may grow)."""
    return len(methods) > len(saved) and methods[: len(saved)] == saved
