"""The editing session: validate, plan (Stage I), solve (Stage II), apply atomically, undo, save.

Everything that persists across sequential ``edit()`` calls of one session lives on the
:class:`Editor` instance (original weights, context prefixes, statistics); nothing is global, so
two sessions never share state.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from metake.checkpoint import load_checkpoint, save_checkpoint
from metake.corpus import TextCorpus, load_corpus
from metake.errors import MetakeError
from metake.files import write_folder_atomically
from metake.finite import require_finite
from metake.hparams import MemitHparams, memit_hparams
from metake.methods import (
    BASE_SOLVERS,
    METHOD_DESCRIPTIONS,
    METHODS,
    PLANNER_METHODS,
    resolve_method,
)
from metake.models.adapters import get_adapter, require_in_memory
from metake.models.modes import frozen
from metake.planners.hypergradient import Channel, ProxyChannel, SpreadChannel
from metake.planners.metake import LOCALITY_PROMPTS, RefinedPlan, lookahead_targets
from metake.planners.standard import (
    MAX_GROUP_ROWS,
    TargetPlan,
    compute_targets,
    context_templates,
)
from metake.requests import EditRequest, parse_requests
from metake.solvers.alphaedit import NullSpace
from metake.solvers.memit import LayerSolve, apply_spread, layer_residuals, subject_activations
from metake.solvers.options import ComposedSolver
from metake.solvers.registry import build_solver, solver_layers
from metake.stats import StatsCache, get_second_moments
from metake.tokens import encode_request

log = logging.getLogger(__name__)

SOLVERS = BASE_SOLVERS
__all__ = ["METHODS", "METHOD_DESCRIPTIONS", "SOLVERS", "Editor", "resolve_method"]
DELTA_FILE = "metake_deltas.safetensors"
EDITS_FILE = "metake_edits.json"
SESSION_FILE = "metake_session.safetensors"  # what Editor.load needs to continue (no pickle)
_StageOutput = tuple[
    list[TargetPlan], list[RefinedPlan], dict[int, torch.Tensor], tuple[float, float]
]
"""What an editing path returns: Stage I plans, look-ahead refinements, updates, seconds."""


@dataclass
class EditReport:
    """What one ``edit()`` call did: timings, Stage I log, per-layer update norms."""

    method: str
    solver: str
    preset: str
    layers: list[int]
    num_requests: int
    seconds: float  # Stage I + Stage II (statistics and context prefixes not included)
    seconds_statistics: float  # loading/computing C0 and the context prefixes (first edit)
    seconds_stage1: float  # standard planner (and, for metake, its look-ahead)
    seconds_stage2: float
    stage1_steps: int
    stage1_history: list[dict[str, float]]
    stage1_target_prob: list[float]  # per request: P(target) with v* in place (Stage I's view)
    delta_norms: dict[int, float]
    seconds_lookahead: float = 0.0  # metake: the look-ahead part of seconds_stage1
    lookahead_history: list[dict[str, float]] = field(default_factory=list)  # metake, per step
    lookahead_target_prob: list[float] = field(default_factory=list)  # under virtual weights
    statistics_tokens: dict[int, int] = field(default_factory=dict)  # corpus tokens behind C0
    null_space_rank: dict[int, int] = field(default_factory=dict)  # AlphaEdit's P, per layer
    hparams: dict[str, Any] = field(default_factory=dict)
    stage1_rows_run: int = 0  # prompt rows Stage I ran over all its steps (the work it did)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict."""
        d = asdict(self)
        d["delta_norms"] = {str(k): v for k, v in self.delta_norms.items()}
        d["statistics_tokens"] = {str(k): v for k, v in self.statistics_tokens.items()}
        d["null_space_rank"] = {str(k): v for k, v in self.null_space_rank.items()}
        return d


@dataclass
class EditResult:
    """The weight changes of one ``edit()`` call (``{module name: Delta [d_out, d_in]}``)."""

    deltas: dict[str, torch.Tensor]
    report: EditReport
    requests: list[EditRequest]


class Editor:
    """An editing session over one model: ``Editor(model, tokenizer).edit(requests)``.

    ``method`` is a solver name or ``"metake"``. Solvers are the registered base solvers
    (:mod:`metake.solvers.registry`: ``"memit"``, ``"alphaedit"`` — MEMIT's loop with AlphaEdit's
    null-space projected update and its cache of earlier batches' keys, kept by this session
    only —, ``"rome"`` — one rank-one update per request at the last edit layer, in order —, and
    ``"emmet"``), each optionally with ``_rect`` (RECT: every batch's update kept on its top
    entries by relative change), ``_prune`` (PRUNE: the accumulated edit's large singular values
    restrained by :meth:`finalize`) and ``_blue`` (BLUE: only the first and last edit layers, each
    towards its own target); ``"rect"`` and ``"prune"`` are ``memit_rect`` and ``memit_prune``
    (see :mod:`metake.methods`). ``"metake"`` refines the standard planner's targets by MetaKE's
    look-ahead through the closed form of ``solver`` (any solver, default ``"alphaedit"``), which
    then executes them; ``"metake_exact"`` differentiates that look-ahead exactly through the
    whole multi-layer solver instead of the last-layer proxy. ``locality_prompts`` replaces
    MetaKE's generic locality prompts; ``contexts`` gives the context prefixes (``""`` first)
    instead of generating them from the model. ``group_rows`` bounds the prompt rows that the
    planners run (and back-propagate) together: their memory grows with it, not with the batch;
    results equal up to float rounding, so a GPU with memory to spare may raise it for speed.
    Hyper-parameters come from the model's preset (or the fallback), then ``hparams`` (a full
    :class:`MemitHparams`) or keyword ``overrides`` such as ``layers=[4, 5]``, ``v_lr=0.5``.
    The model may be spread over devices by accelerate (``load_model(..., device_map=...)``);
    layers other than the edit layers may even be offloaded to disk.
    Statistics (C0 per edit layer) are computed once over ``corpus`` (default: the built-in
    Wikipedia intros) and cached on disk. The session asks its solver object (``stage2``, built
    by :func:`~metake.solvers.registry.build_solver`) for gates, updates and state, never a name.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        method: str = "memit",
        *,
        solver: str | None = None,
        hparams: MemitHparams | None = None,
        preset: str | None = None,
        model_id: str | None = None,
        corpus: TextCorpus | str | Path | None = None,
        stats_cache: StatsCache | None = None,
        use_stats_cache: bool = True,
        seed: int = 0,
        progress: bool = True,
        locality_prompts: Iterable[str] | None = None,
        contexts: Iterable[str] | None = None,
        group_rows: int = MAX_GROUP_ROWS,
        **overrides: Any,
    ) -> None:
        self.method, self.solver = resolve_method(method, solver)
        if not isinstance(group_rows, int) or group_rows < 1:
            raise ValueError(f"group_rows must be a positive whole number, got {group_rows!r}")
        self.group_rows = group_rows  # prompt rows per forward/backward of the planners
        if self.method == "metake_exact":
            if overrides.get("metake_hypergradient", "exact") != "exact":
                raise MetakeError("method metake_exact differentiates exactly; drop "
                                  "metake_hypergradient or use method metake")  # fmt: skip
            overrides["metake_hypergradient"] = "exact"
        self.model = model
        self.tokenizer = tokenizer
        self.locality_prompts = tuple(LOCALITY_PROMPTS if locality_prompts is None
                                      else locality_prompts)  # fmt: skip
        self.adapter = get_adapter(model)
        if hparams is None:
            hparams = memit_hparams(model.config, preset, self.method, self.solver, **overrides)
        elif overrides:
            hparams = hparams.with_overrides(**overrides)
        layers = solver_layers(self.solver, hparams)
        if layers != list(hparams.layers):
            log.info("%s edits layer(s) %s of %s", self.solver, layers, list(hparams.layers))
            hparams = hparams.with_overrides(layers=layers)
        for layer in hparams.layers:
            self.adapter.mlp_out(model, layer)  # raises for a layer out of range
        require_in_memory(model, hparams.layers)  # a device map must not offload edit layers
        self.hparams = hparams
        self.model_id = model_id or getattr(model.config, "name_or_path", "") or "model"
        self._corpus_spec = corpus
        self.stats_cache = stats_cache
        self.use_stats_cache = use_stats_cache
        self.seed = seed
        self.progress = progress
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self._originals: dict[int, torch.Tensor] = {}
        self._mom2: dict[int, torch.Tensor] = {}
        self.stats_tokens: dict[int, int] = {}
        self._contexts: list[str] | None = None if contexts is None else list(contexts)
        self.stage2: ComposedSolver = build_solver(self.solver, hparams, self.second_moment)
        self._raw_weights: dict[int, torch.Tensor] | None = None  # PRUNE: set while finalised
        self.history: list[EditRequest] = []
        self._stage1_given: TargetPlan | None = None  # edit(stage1=...): used by the first _plan

    # ----- lazily computed, once per session -----------------------------------------------
    @property
    def contexts(self) -> list[str]:
        """Context prefixes (computed once from the model as it was at the first edit)."""
        if self._contexts is None:
            with frozen(self.model):  # generated without dropout
                self._contexts = context_templates(self.model, self.tokenizer,
                                                   self.hparams.context_count,
                                                   self.hparams.context_length)  # fmt: skip
            log.info("context prefixes: %s", self._contexts)
        return self._contexts

    def second_moment(self, layer: int) -> torch.Tensor:
        """C0 = E[k k^T] of layer ``layer`` (``[d_in, d_in]``, float64)."""
        if layer not in self._mom2:
            self.load_statistics([layer])
        return self._mom2[layer]

    def null_space(self, layer: int) -> NullSpace:
        """AlphaEdit's projector for ``layer`` (from C0 and the null-space threshold)."""
        null_space = getattr(self.stage2.base, "null_space", None)
        if null_space is None:
            raise MetakeError(f"the {self.solver} solver has no null space")
        return null_space(layer)

    def load_statistics(self, layers: Iterable[int] | None = None) -> None:
        """Load or compute C0 for ``layers`` (default: all edit layers) in one corpus pass."""
        missing = [i for i in (layers or self.hparams.layers) if i not in self._mom2]
        if not missing:
            return
        if self._originals:
            raise MetakeError(
                "statistics must come from the unedited model: call load_statistics() before "
                "the first edit, or restore() first"
            )
        corpus = self._corpus_spec
        if not isinstance(corpus, TextCorpus):
            corpus = load_corpus(corpus)
        hp = self.hparams
        moments = get_second_moments(
            self.model,
            self.tokenizer,
            missing,
            corpus,
            model_id=self.model_id,
            num_samples=hp.mom2_samples,
            max_length=hp.mom2_max_length,
            batch_size=hp.mom2_batch_size,
            accum_dtype=getattr(torch, hp.mom2_dtype),
            autocast=hp.mom2_autocast,
            cache=self.stats_cache,
            use_cache=self.use_stats_cache,
            progress=self.progress,
        )
        for layer, moment in moments.items():
            self._mom2[layer] = moment.mom2
            self.stats_tokens[layer] = moment.num_tokens

    # ----- editing ---------------------------------------------------------------------------
    def prepare(self, requests: Iterable[Mapping[str, Any] | EditRequest]) -> list[EditRequest]:
        """Parse and validate requests, including tokenisation; raises before any change."""
        parsed = parse_requests(requests)
        for request in parsed:
            encode_request(self.tokenizer, request)
            encode_request(self.tokenizer, request, with_target=False,
                           prompt_template=self.hparams.kl_prompt)  # fmt: skip
        return parsed

    def edit(
        self,
        requests: Iterable[Mapping[str, Any] | EditRequest],
        stage1: TargetPlan | None = None,
    ) -> EditResult:
        """Edit all ``requests`` as one batch; the batch applies completely or not at all.

        ``stage1``: Stage I's plan for exactly these requests, computed before on the model as
        it is now (e.g. cached by ``metake tune``); the edit's first Stage I is skipped and this
        one used (MEMIT, AlphaEdit, MetaKE: at the last edit layer; BLUE: at its first layer,
        the later one runs on the model the batch changed). Not for ROME (a plan per request).
        """
        if stage1 is not None and self.stage2.edit_path == "one_by_one":
            raise MetakeError(f"{self.solver} plans one request at a time: it takes no stage1 plan")
        parsed = self.prepare(requests)
        hp = self.hparams
        torch.manual_seed(self.seed)
        stats_start = time.perf_counter()
        self.load_statistics()
        contexts = self.contexts
        start = time.perf_counter()
        run = {
            "one_by_one": self._edit_one_by_one,
            "per_layer_targets": self._edit_blue,
            "spread": self._edit_spread,
        }[self.stage2.edit_path]
        self._stage1_given = stage1
        try:
            plans, refined, deltas, timing = self._atomic(parsed, contexts, run)
        finally:
            self._stage1_given = None
        end = time.perf_counter()
        stage1_seconds, lookahead_seconds = timing
        report = EditReport(
            method=self.method,
            solver=self.solver,
            preset=hp.preset,
            layers=list(hp.layers),
            num_requests=len(parsed),
            seconds=end - start,
            seconds_statistics=start - stats_start,
            seconds_stage1=stage1_seconds,
            seconds_stage2=end - start - stage1_seconds,
            stage1_steps=sum(plan.steps_run for plan in plans),
            stage1_rows_run=sum(plan.rows_run for plan in plans),
            stage1_history=[h for plan in plans for h in plan.history],
            stage1_target_prob=[math.exp(-nll) for plan in plans for nll in plan.final_nll],
            seconds_lookahead=lookahead_seconds,
            lookahead_history=[h for r in refined for h in r.history],
            lookahead_target_prob=[math.exp(-nll) for r in refined for nll in r.final_nll],
            delta_norms={layer: float(d.norm()) for layer, d in deltas.items()},
            statistics_tokens={layer: self.stats_tokens[layer] for layer in hp.layers},
            null_space_rank=self.stage2.report().get("null_space_rank", {}),
            hparams=hp.to_dict(),
        )
        log.info("edited %d requests in %.1fs", len(parsed), report.seconds)
        named = {self.adapter.mlp_out_name(layer): d for layer, d in deltas.items()}
        return EditResult(deltas=named, report=report, requests=parsed)

    def apply_targets(
        self, requests: Iterable[Mapping[str, Any] | EditRequest], targets: torch.Tensor
    ) -> dict[int, torch.Tensor]:
        """Stage II alone as a session edit: write ``targets`` (``[n, d]`` at the last edit layer).

        For your own Stage I (or a study of it, like ``metake diagnose``): the batch applies
        atomically, with the solver's RECT mask, AlphaEdit key cache and history, exactly as
        :meth:`edit` would with these targets. Returns ``{layer: Delta [d_out, d_in]}``.
        """
        parsed = self.prepare(requests)
        last = self.hparams.layers[-1]
        width = self.adapter.weight(self.model, last).shape[0]
        if tuple(targets.shape) != (len(parsed), width):
            raise MetakeError(f"targets must be [{len(parsed)}, {width}] (one row per request at "
                              f"layer {last}), got {list(targets.shape)}")  # fmt: skip
        self.load_statistics()

        def run(parsed: list[EditRequest], contexts: list[str]) -> _StageOutput:
            return [], [], self.solve_targets(parsed, targets, contexts), (0.0, 0.0)

        return self._atomic(parsed, self.contexts, run)[2]

    def _atomic(
        self,
        parsed: list[EditRequest],
        contexts: list[str],
        run: Callable[[list[EditRequest], list[str]], _StageOutput],
    ) -> _StageOutput:
        """``run(parsed, contexts)`` (edits the model in place) as one session edit, all or
        nothing: then RECT's mask, AlphaEdit's key cache, the originals and the history."""
        snapshot = self._layer_weights()  # as the caller sees the model (maybe finalised)
        before = self._raw_weights or snapshot  # the weights editing continues from
        try:
            self._set_layer_weights(before)
            with frozen(self.model):  # no weight gradients, no dropout; the user's modes kept
                plans, refined, deltas, timing = run(parsed, contexts)
                deltas = self._apply_rect(before) or deltas
                for layer in before:
                    require_finite(self.adapter.weight(self.model, layer), "the edited weights",
                                   layer=layer, requests=parsed)  # fmt: skip
                solver_state = self._next_solver_state(parsed, contexts)
        except BaseException:
            self._set_layer_weights(snapshot)
            log.error("edit failed; the batch was rolled back")
            raise
        for layer, weight in before.items():
            self._originals.setdefault(layer, weight)
        self._raw_weights = None
        self.stage2.load_state_dict(solver_state)
        self.history.extend(parsed)
        return plans, refined, deltas, timing

    def _edit_spread(self, requests: list[EditRequest], contexts: list[str]) -> _StageOutput:
        """MEMIT/AlphaEdit: one Stage I (and look-ahead) at the last layer, spread over all."""
        plan, refinement, timing = self._plan(requests, contexts)
        targets = refinement.v_target if refinement else plan.v_target
        deltas = self.solve_targets(requests, targets, contexts)
        return [plan], [refinement] if refinement else [], deltas, timing

    def solve_targets(
        self, requests: list[EditRequest], targets: torch.Tensor, contexts: list[str]
    ) -> dict[int, torch.Tensor]:
        """Stage II alone, in place: write ``targets`` (``[n, d]`` at the last edit layer).

        For scripts that study Stage I (e.g. ``benchmarks/metake_sweep.py``): the session's
        MEMIT/AlphaEdit layer loop runs on the model as it is, with no rollback, RECT mask,
        history or key cache update; the caller restores the weights. Returns
        ``{layer: Delta [d_out, d_in]}``.
        """
        if self.stage2.edit_path != "spread":
            raise MetakeError(f"solve_targets spreads one target over the edit layers; "
                              f"{self.solver} does not")  # fmt: skip
        return apply_spread(self.model, self.tokenizer, requests, targets, self.hparams.layers,
                            contexts, self.layer_solve(requests))  # fmt: skip

    def layer_solve(self, requests: list[EditRequest] | None = None) -> LayerSolve:
        """The session solver's per-layer closed form for :func:`apply_spread`; a non-finite
        update raises :class:`~metake.errors.NonFiniteError` naming the layer and ``requests``."""
        delta_of = self.stage2.delta

        def solve(layer: int, keys: torch.Tensor, resid: torch.Tensor) -> torch.Tensor:
            delta = delta_of(layer, keys, resid)
            require_finite(delta, f"Stage II ({self.solver} solve)", layer=layer,
                           requests=requests)  # fmt: skip
            return delta

        return solve

    def _plan(
        self, requests: list[EditRequest], contexts: list[str], layer: int | None = None
    ) -> tuple[TargetPlan, RefinedPlan | None, tuple[float, float]]:
        """Stage I at ``layer`` (default: the last edit layer), and MetaKE's look-ahead there.

        Returns the plans and the (planner, look-ahead) seconds.
        """
        start = time.perf_counter()
        hp = self.hparams if layer is None else self.hparams.with_overrides(layers=[layer])
        given, self._stage1_given = self._stage1_given, None  # only the edit's first Stage I
        if given is None:
            plan = compute_targets(self.model, self.tokenizer, requests, hp, contexts,
                                   max_rows=self.group_rows)  # fmt: skip
        elif given.layer != hp.layers[-1] or given.v_target.shape[0] != len(requests):
            raise MetakeError(f"the stage1 plan is for {given.v_target.shape[0]} requests at "
                              f"layer {given.layer}; this edit plans {len(requests)} at layer "
                              f"{hp.layers[-1]} first")  # fmt: skip
        else:
            plan = given
        if self.method not in PLANNER_METHODS:
            return plan, None, (time.perf_counter() - start, 0.0)
        middle = time.perf_counter()
        channel = self.channel(requests, contexts, plan, hp.layers)
        refined = lookahead_targets(self.model, self.tokenizer, requests, plan, channel,
                                    self.hparams, contexts, self.locality_prompts,
                                    max_rows=self.group_rows)  # fmt: skip
        end = time.perf_counter()
        return plan, refined, (end - start, end - middle)

    def channel(
        self,
        requests: list[EditRequest],
        contexts: list[str],
        plan: TargetPlan,
        layers: Iterable[int] | None = None,
        hypergradient: str | None = None,
    ) -> Channel:
        """How MetaKE's look-ahead sees this session's solver for ``requests``.

        ``"proxy"``: the gate ``M`` at ``plan.layer`` (Eq. 7); ``"exact"``: the whole solver over
        ``layers`` (default: the edit layers), replayed differentiably; ``"direct"``: the same
        replay, differentiated only through each layer's own residual (keys, gates and values
        as constants: no backward through the replay). Default: the hparams'
        ``metake_hypergradient``; ``metake_replay_every`` > 1 replays only every k-th step
        (:class:`SpreadChannel`). All use the session's C0, projector and key cache.
        """
        hypergradient = hypergradient or self.hparams.metake_hypergradient
        if hypergradient in ("exact", "direct"):
            layers = list(self.hparams.layers if layers is None else layers)
            return SpreadChannel(self.model, self.tokenizer, requests, layers, contexts,
                                 self.gate, self.key_average,
                                 direct_only=hypergradient == "direct",
                                 replay_every=self.hparams.metake_replay_every)  # fmt: skip
        acts = subject_activations(self.model, self.tokenizer, requests, contexts, [plan.layer],
                                   plan.layer, key_average=self.key_average)  # fmt: skip
        keys = acts.keys[plan.layer]
        module = self.adapter.mlp_out(self.model, plan.layer)
        current = plan.v_init.to(keys.device, torch.promote_types(keys.dtype, torch.float32))
        to_projection = None
        if self.adapter.mlp_out_norm(self.model, plan.layer) is not None:
            to_projection = partial(self.adapter.residual_to_projection, self.model, plan.layer,
                                    outputs=acts.projections[plan.layer])  # fmt: skip
        gate = self.gate(plan.layer, keys, acts.bare_keys[plan.layer])
        return ProxyChannel(module, plan.layer, gate, current, to_projection)

    @property
    def key_average(self) -> str:
        """How this session's solver averages keys over contexts: ROME's plain mean, or MEMIT's
        per-type one (see :func:`~metake.solvers.memit.context_type_mean`)."""
        return self.stage2.key_average

    def gate(
        self, layer: int, keys: torch.Tensor, bare_keys: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The solver's linear map ``M`` (``[n, d_in]``) at ``layer``: its update is ``R^T M``.

        ``keys`` are the batch's context-averaged keys at ``layer`` (``[n, d_in]``), ``bare_keys``
        the bare prompts' ones (ROME's scale; default ``keys``); uses the session's C0, and for
        AlphaEdit its projector and accumulated key cache, exactly as the solver will.
        """
        return self.stage2.gate(layer, keys, bare_keys)

    def _edit_one_by_one(self, requests: list[EditRequest], contexts: list[str]) -> _StageOutput:
        """ROME's path: plan and apply one update per request at the last edit layer, in order;
        edits in place."""
        layer = self.hparams.layers[-1]
        plans, refined, total, seconds = [], [], None, (0.0, 0.0)
        for request in requests:
            plan, refinement, timing = self._plan([request], contexts)
            seconds = (seconds[0] + timing[0], seconds[1] + timing[1])
            target = refinement.v_target if refinement else plan.v_target
            acts = subject_activations(self.model, self.tokenizer, [request], contexts, [layer],
                                       layer, key_average=self.key_average)  # fmt: skip
            resid = layer_residuals(self.model, acts, layer, target, 1)
            delta = self.stage2.delta(layer, acts.keys[layer], resid, acts.bare_keys[layer])
            require_finite(delta, f"Stage II ({self.solver} solve)", layer=layer,
                           requests=[request])  # fmt: skip
            self.adapter.add_to_weight(self.model, layer, delta)
            total = delta.float().cpu() if total is None else total + delta.float().cpu()
            plans.append(plan)
            refined += [refinement] if refinement else []
        return plans, refined, {layer: total}, seconds

    def _edit_blue(self, requests: list[EditRequest], contexts: list[str]) -> _StageOutput:
        """BLUE: per edit layer, ascending, a target at that layer's own output (on the model as
        the earlier layer's update left it) and the solver's update towards it with the full
        residual; edits in place."""
        plans, refined, deltas, seconds = [], [], {}, (0.0, 0.0)
        for layer in self.hparams.layers:
            plan, refinement, timing = self._plan(requests, contexts, layer)
            seconds = (seconds[0] + timing[0], seconds[1] + timing[1])
            targets = refinement.v_target if refinement else plan.v_target
            deltas.update(apply_spread(self.model, self.tokenizer, requests, targets, [layer],
                                       contexts, self.layer_solve(requests)))  # fmt: skip
            plans.append(plan)
            refined += [refinement] if refinement else []
        return plans, refined, deltas, seconds

    def _apply_rect(self, before: Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor] | None:
        """RECT (when the solver has it): keep each layer's batch update on its top entries.

        ``before`` holds the weights before this batch (``[d_out, d_in]`` per layer); the
        update is what the solver applied since. Returns the kept updates, or ``None``.
        """
        kept = self.stage2.sparsify(before, self._layer_weights())
        if kept is None:
            return None
        for layer, delta in kept.items():
            self.adapter.set_weight(self.model, layer, before[layer].float() + delta)
        return {layer: delta.cpu() for layer, delta in kept.items()}

    def _next_solver_state(
        self, requests: list[EditRequest], contexts: list[str]
    ) -> dict[str, Any]:
        """The solver's state after this batch (AlphaEdit: ``C_prev + K K^T`` per layer, keys
        recomputed on the edited model); committed by :meth:`_atomic` only on success."""
        if not self.stage2.base.wants_batch_keys:
            return self.stage2.state_dict()
        layers = self.hparams.layers
        keys = subject_activations(self.model, self.tokenizer, requests, contexts, layers,
                                   layers[-1]).keys  # fmt: skip
        return self.stage2.next_state(keys)

    def key_cache(self, layer: int) -> torch.Tensor:
        """AlphaEdit's ``C_prev`` of ``layer``: earlier batches' keys, ``[d_in, d_in]`` float64."""
        cache = getattr(self.stage2.base, "key_cache", None)
        if cache is None:
            raise MetakeError(f"the {self.solver} solver keeps no key cache")
        return cache(layer, self.adapter.weight(self.model, layer).shape[1])

    def _layer_weights(self) -> dict[int, torch.Tensor]:
        """Copies of the edit layers' current weights (``[d_out, d_in]`` each)."""
        return {layer: self.adapter.weight(self.model, layer).detach().clone()
                for layer in self.hparams.layers}  # fmt: skip

    def _set_layer_weights(self, weights: Mapping[int, torch.Tensor]) -> None:
        """Put ``{layer: weight [d_out, d_in]}`` into the model (no-op when already there)."""
        for layer, weight in weights.items():
            self.adapter.set_weight(self.model, layer, weight)

    # ----- finalising (PRUNE) ------------------------------------------------------------------
    @property
    def finalized(self) -> bool:
        """Whether the model holds :meth:`finalize`'s weights (PRUNE's restrained edit)."""
        return self._raw_weights is not None

    def finalize(self) -> dict[int, int]:
        """Make the model ready for use: PRUNE restrains each layer's accumulated edit.

        For ``*_prune`` methods the accumulated edit ``Delta W = W - W_original`` of each edited
        layer gets its singular values above ``sigma_max(W_original)`` mapped to
        ``ln(s) + sigma_max - ln(sigma_max)``; other methods are left as they are. The raw
        weights are kept: the next :meth:`edit` continues from them (as PRUNE's reference
        protocol does), :meth:`restore` undoes everything. Calling it twice changes nothing.
        Returns ``{layer: number of singular values restrained}``.
        """
        if not self._originals or self.finalized:
            return {}
        raw = self._layer_weights()
        restrained = self.stage2.restrain(self._originals, raw)
        if restrained is None:
            return {}
        for layer, (weight, _) in restrained.items():
            require_finite(weight, "PRUNE (finalize)", layer=layer, requests=self.history,
                           consequence="the raw edited weights were kept")  # fmt: skip
        for layer, (weight, _) in restrained.items():
            self.adapter.set_weight(self.model, layer, weight)
        self._raw_weights = raw
        return {layer: count for layer, (_, count) in restrained.items()}

    # ----- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """What a later session needs to continue exactly where this one is.

        The edited layers' current weights (``[d_out, d_in]``, not differences, so reloading is
        bit-identical), the solver's state (AlphaEdit's key cache), the context prefixes and
        the edit history.
        """
        return {
            "method": self.method,
            "solver": self.solver,
            "layers": list(self.hparams.layers),
            "hparams": self.hparams.to_dict(),
            "weights": {
                layer: weight.detach().cpu().clone()
                for layer, weight in (self._raw_weights or self._layer_weights()).items()
                if layer in self._originals
            },  # fmt: skip
            "finalized": self.finalized,
            **self.stage2.state_dict(),
            "contexts": list(self._contexts) if self._contexts is not None else None,
            "history": [r.to_dict() for r in self.history],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue a session saved by :meth:`state_dict` on this (unedited) model."""
        if self._originals:
            raise MetakeError("load_state_dict needs an unedited session: call restore() first")
        if (state["method"], state["solver"]) != (self.method, self.solver):
            raise MetakeError(
                f"checkpoint is for {state['method']}/{state['solver']}, this session is "
                f"{self.method}/{self.solver}"
            )
        if list(state["layers"]) != list(self.hparams.layers):
            raise MetakeError(f"checkpoint edits layers {state['layers']}, this session "
                              f"{list(self.hparams.layers)}")  # fmt: skip
        differ = self.hparams.differences(state.get("hparams", {}))  # older checkpoints: none
        if differ:
            raise MetakeError(
                f"checkpoint was made with other hyper-parameters ({'; '.join(differ)}): "
                "a preset or override changed since"
            )
        self.load_statistics()  # C0 must come from the unedited weights, read before loading
        for layer, weight in state["weights"].items():
            current = self.adapter.weight(self.model, int(layer))
            self._originals[int(layer)] = current.detach().clone()
            self.adapter.set_weight(self.model, int(layer), weight.to(current.device))
        self.stage2.load_state_dict(state)
        if state["contexts"] is not None:
            self._contexts = list(state["contexts"])
        self.history = parse_requests(state["history"]) if state["history"] else []
        if state.get("finalized"):
            self.finalize()

    # ----- undo and save ---------------------------------------------------------------------
    def accumulated_deltas(self) -> dict[str, torch.Tensor]:
        """``{module name: W_now - W_original}`` (``[d_out, d_in]``) over every edit so far."""
        return {
            self.adapter.mlp_out_name(layer): (self.adapter.weight(self.model, layer) - orig)
            .detach()
            .float()
            .cpu()
            .contiguous()
            for layer, orig in self._originals.items()
        }

    def restore(self) -> None:
        """Put the original weights back (bit-identical) and forget the edit history."""
        for layer, weight in self._originals.items():
            self.adapter.set_weight(self.model, layer, weight)
        self._originals.clear()
        self.stage2.reset()
        self._raw_weights = None
        self.history.clear()

    def save(self, path: str | Path) -> Path:
        """Write the edited model (safetensors), its tokenizer, the deltas and the edit list.

        The session is finalised first (:meth:`finalize`: PRUNE's restraint), so the files hold
        the model as it is meant to be used. The folder appears whole or not at all: everything is
        written into a temporary sibling, flushed to disk and renamed (an existing ``path`` is
        replaced only once the new one is complete).
        """
        path = Path(path)
        self.finalize()
        if getattr(self.model, "hf_quantizer", None) is not None:
            raise MetakeError("a quantised model cannot be saved; load it de-quantised")
        deltas = self.accumulated_deltas()
        for name, delta in deltas.items():
            require_finite(delta, f"the edit of {name}", consequence="nothing was saved")
        edits = {
            "method": self.method,
            "solver": self.solver,
            "model_id": self.model_id,
            "hparams": self.hparams.to_dict(),
            "requests": [r.to_dict() for r in self.history],
        }
        meta = {"method": self.method, "solver": self.solver, "model_id": self.model_id}
        session = {
            "state": self.state_dict(),
            "originals": {layer: w.detach().cpu().clone() for layer, w in self._originals.items()},
        }

        def write(folder: Path) -> None:
            self.model.save_pretrained(folder)
            self.tokenizer.save_pretrained(folder)
            save_file(deltas, str(folder / DELTA_FILE), metadata=meta)
            save_checkpoint(folder / SESSION_FILE, session)
            (folder / EDITS_FILE).write_text(json.dumps(edits, indent=2), encoding="utf-8")

        return write_folder_atomically(path, write)

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        device: str = "cpu",
        corpus: TextCorpus | str | Path | None = None,
        stats_cache: StatsCache | None = None,
        use_stats_cache: bool = True,
        seed: int = 0,
        progress: bool = True,
    ) -> Editor:
        """Reopen a session :meth:`save` wrote, to go on editing where it stopped.

        Loads the edited model from ``path`` and the session beside it (method, solver and
        hyper-parameters, context prefixes, AlphaEdit's key cache, the edit log, the original
        weights of the edited layers). Statistics are read (or computed) with the original
        weights in place, as the first session did. Editing A, saving, loading and editing B gives
        the weights of editing A then B in one session; :meth:`restore` gives the original model.
        """
        from metake.models import load_model

        path = Path(path)
        if not (path / SESSION_FILE).is_file() or not (path / EDITS_FILE).is_file():
            raise MetakeError(
                f"{path} holds no saved metake session ({SESSION_FILE} and {EDITS_FILE}); save "
                "one with Editor.save or metake edit --save"
            )
        info = json.loads((path / EDITS_FILE).read_text(encoding="utf-8"))
        session = load_checkpoint(path / SESSION_FILE)
        model, tokenizer = load_model(str(path), device=device)
        hp = dict(info["hparams"])
        hparams = MemitHparams(layers=tuple(hp.pop("layers"))).with_overrides(**hp)
        state = session["state"]
        editor = cls(model, tokenizer, info["method"], solver=info["solver"], hparams=hparams,
                     model_id=info["model_id"], corpus=corpus, stats_cache=stats_cache,
                     use_stats_cache=use_stats_cache, seed=seed, progress=progress,
                     contexts=state["contexts"])  # fmt: skip
        for layer, weight in session["originals"].items():  # the unedited model: statistics are
            editor.adapter.set_weight(model, layer, weight)  # read on it, originals kept from it
        editor.load_state_dict(state)  # then the edited weights, key cache, history go back in
        return editor
