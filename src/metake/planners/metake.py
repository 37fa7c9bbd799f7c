"""MetaKE's look-ahead planner: refine Stage I's targets through the solver's own closed form.

The paper (Sec. 4, Algorithm 1) treats the target ``V*`` (``[n, d]``, one row per request, at the
last edit layer ``L``) as a meta-parameter. Every solver of metake computes, at one layer, an
update that is *linear* in the residual ``R = V* - Z`` (``Z``: the layer's current output at
the subject's last token):

    Delta_L = R^T M        with the gate M ([n, d_in]) of the chosen solver:
    MEMIT      M = K^T (lambda C0 + K K^T)^-1
    AlphaEdit  M = ((P (K K^T + C_prev) + lambda_2 I)^-1 P K)^T
    ROME       row i = (C0^-1 k_i)^T / (k_i^T C0^-1 k_i)

(``K``: keys at layer ``L``, ``[n, d_in]``; see :mod:`metake.solvers`). The look-ahead applies
the virtual weights ``W_L + Delta_L`` functionally (a forward hook adds ``(k M^T) R`` to the MLP
output projection's output at every position of every prompt; the model's weights are never
written) and minimises, with Adam for ``metake_steps`` steps,

    L_meta = w_edit * NLL(targets | virtual weights)      (rewrite prompts with context prefixes)
           + w_loc  * KL(P_original || P_virtual)         (locality prompts, see below)
           + w_reg  * ||V* - V_plan||^2                   (V_plan: Stage I's target)

Because ``Delta_L`` is linear in ``V*``, autograd through the hook gives exactly the paper's
proxy gradient ``(dL/dDelta_L) M^T`` (task signal times structural gate), Eq. 8. Passing a
:class:`~metake.planners.hypergradient.SpreadChannel` instead of the gate makes the virtual edit
the whole multi-layer solve, and the gradient the exact hypergradient (``metake_exact``). The
locality set never uses evaluation data: it is each request's ``"{subject} is a"`` prompt (KL at
the positions from the subject's last token on) and :data:`LOCALITY_PROMPTS`, generic sentences
shipped with the package (KL at every position). The chosen solver then executes with the
refined ``V*``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from metake.finite import require_finite
from metake.hparams import MemitHparams
from metake.models.adapters import ArchAdapter, get_adapter, input_device
from metake.planners.hypergradient import (
    Channel,
    ProxyChannel,
    backward_into_updates,
    detached_updates,
)
from metake.planners.standard import (
    MAX_GROUP_ROWS,
    PlannerBatch,
    RowGroup,
    TargetPlan,
    at_least_float32,
    build_planner_batch,
    enter_at_layer,
    mean_per_row,
    row_groups,
    scatter_rows,
    target_log_probs,
)
from metake.precision import planner_precision
from metake.requests import EditRequest
from metake.tokens import EncodedPrompt, special_prefix

log = logging.getLogger(__name__)

LOCALITY_PROMPTS = (
    "The weather this morning was",
    "My favourite thing to cook is",
    "The meeting will start at",
    "Once upon a time, there was a",
    "The best way to learn a language is",
    "After school, the children went to the",
    "The results of the experiment showed that",
    "She opened the door and saw",
    "A healthy breakfast usually includes",
    "The train to the city leaves every",
    "Music can make people feel",
    "He wrote a long letter to his",
    "The price of the new phone is",
    "In the evening we like to",
    "The old bridge over the river was",
    "To make a cup of tea, first",
)
"""Generic locality prompts (not taken from any evaluation set), used by every MetaKE edit."""


@dataclass
class RefinedPlan:
    """MetaKE's output: refined targets ``v_target`` (``[n, d]``) and the look-ahead log."""

    v_target: torch.Tensor
    history: list[dict[str, float]] = field(default_factory=list)
    final_nll: list[float] = field(default_factory=list)  # per request, under virtual weights


@dataclass
class LocalityBatch:
    """Where the locality KL is read: ``rows``/``positions`` (``[P]``) into the joint batch."""

    rows: torch.Tensor
    positions: torch.Tensor
    prompt_of_position: torch.Tensor  # [P], 0..num_prompts-1
    num_prompts: int

    def to(self, device: torch.device | str) -> LocalityBatch:
        """The same index tensors on ``device``."""
        return LocalityBatch(self.rows.to(device), self.positions.to(device),
                             self.prompt_of_position.to(device), self.num_prompts)  # fmt: skip


def _joint_batch(
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest],
    contexts: Sequence[str],
    kl_prompt: str,
    locality_prompts: Sequence[str],
) -> tuple[PlannerBatch, LocalityBatch]:
    """Rewrite prompts, then ``kl_prompt`` per request, then the generic prompts: one batch."""
    prefix = special_prefix(tokenizer)
    generic = [prefix + list(tokenizer(p, add_special_tokens=False)["input_ids"])
               for p in locality_prompts]  # fmt: skip
    extra = [EncodedPrompt(ids, len(ids) - 1) for ids in generic]
    planner = build_planner_batch(tokenizer, requests, contexts, kl_prompt, extra)
    lengths = planner.batch.attention_mask.sum(1).tolist()
    starts = planner.batch.subject_last.tolist()
    locality_rows = planner.kl_rows().tolist()
    locality_rows += list(range(locality_rows[-1] + 1, len(lengths)))
    rows, positions, owner = [], [], []
    for j, row in enumerate(locality_rows):
        start = starts[row] if j < planner.num_requests else 0  # subject prompts: from subject
        rows += [row] * (lengths[row] - start)
        positions += list(range(start, lengths[row]))
        owner += [j] * (lengths[row] - start)
    locality = LocalityBatch(
        rows=torch.tensor(rows, dtype=torch.long),
        positions=torch.tensor(positions, dtype=torch.long),
        prompt_of_position=torch.tensor(owner, dtype=torch.long),
        num_prompts=len(locality_rows),
    )
    return planner, locality


@dataclass
class _GroupedLocality:
    """The locality positions of each row group, in the group's own row numbering."""

    entries: list[torch.Tensor]  # per group: indices into the locality positions [P_g]
    local_rows: list[torch.Tensor]  # per group: [P_g]
    positions: list[torch.Tensor]  # per group: [P_g]
    order: torch.Tensor  # [P]: concatenated group entries -> locality order

    @classmethod
    def build(cls, groups: Sequence[RowGroup], locality: LocalityBatch, num_rows: int):
        """Assign every locality position to the group holding its row."""
        entries, local_rows, positions = [], [], []
        for group in groups:
            local_of = torch.full((num_rows,), -1, dtype=torch.long, device=group.rows.device)
            local_of[group.rows] = torch.arange(len(group.rows), device=group.rows.device)
            mine = (local_of[locality.rows] >= 0).nonzero().squeeze(1)
            entries.append(mine)
            local_rows.append(local_of[locality.rows[mine]])
            positions.append(locality.positions[mine])
        return cls(entries, local_rows, positions, torch.argsort(torch.cat(entries)))


def _run_groups(
    model: nn.Module,
    adapter: ArchAdapter,
    groups: Sequence[RowGroup],
    where: _GroupedLocality,
    num_rows: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's mean target NLL ``[rows]`` and the locality log-probs ``[P, vocab]``."""
    nll_parts, locality_parts = [], []
    for number, group in enumerate(groups):
        row_nll, locality_logp = _group_outputs(model, adapter, group, where, number)
        nll_parts.append(row_nll)
        locality_parts.append(locality_logp)
    row_nll = scatter_rows(groups, nll_parts, num_rows)
    return row_nll, torch.cat(locality_parts)[where.order]


def _group_outputs(
    model: nn.Module, adapter: ArchAdapter, group: RowGroup, where: _GroupedLocality, number: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One group's forward: its rows' mean target NLL ``[R_g]`` and the log-probs at its
    locality positions ``[P_g, vocab]`` (group ``number`` of ``where``)."""
    hidden = group.forward()
    logp = target_log_probs(model, adapter, hidden, group.batch)
    row_nll = -mean_per_row(logp, group.batch.target_rows, len(group.rows))
    at = where.local_rows[number], where.positions[number]
    logits = at_least_float32(adapter.logits(model, hidden[at]))
    return row_nll, torch.log_softmax(logits, dim=-1)


class MetaObjective:
    """The meta-loss of Eq. 6 for one batch, evaluated under any virtual edit (a channel).

    Built once per batch: the joint prompt batch, its length groups, the locality positions and
    the original model's log-probs there. ``entry_layer``: the lowest layer any channel will
    change; forwards start there from the cached residual stream (``None``: full forwards).
    ``v_plan`` (``[n, d]``) is Stage I's target, the anchor of the meta-regulariser.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        requests: Sequence[EditRequest],
        v_plan: torch.Tensor,
        hparams: MemitHparams,
        contexts: Sequence[str],
        locality_prompts: Sequence[str] = LOCALITY_PROMPTS,
        max_groups: int = 4,
        entry_layer: int | None = None,
        max_rows: int = MAX_GROUP_ROWS,
    ) -> None:
        self.model = model
        self.hparams = hparams
        self.adapter = get_adapter(model)
        device = input_device(model)
        planner, locality = _joint_batch(tokenizer, requests, contexts, hparams.kl_prompt,
                                         locality_prompts)  # fmt: skip
        batch = planner.batch.to(device)
        self.locality = locality.to(device)
        self.num_rows = batch.input_ids.shape[0]
        self.groups = row_groups(model, batch, tokenizer.pad_token_id, False, max_groups,
                                 max_rows)  # fmt: skip
        if entry_layer is not None:
            enter_at_layer(model, self.adapter, self.groups, entry_layer)
        self.where = _GroupedLocality.build(self.groups, self.locality, self.num_rows)
        self.num_requests = planner.num_requests
        self.rewrite_rows = planner.num_rewrite_rows
        self.request_of_row = planner.request_of_row[: self.rewrite_rows].to(device)
        self.v_plan = v_plan.to(device)
        with torch.no_grad():
            _, self.original = _run_groups(model, self.adapter, self.groups, self.where,
                                           self.num_rows)  # fmt: skip

    def terms(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Under the model as it currently acts: target NLL per request ``[n]``, locality KL."""
        row_nll, edited = _run_groups(self.model, self.adapter, self.groups, self.where,
                                      self.num_rows)  # fmt: skip
        nll = mean_per_row(row_nll[: self.rewrite_rows], self.request_of_row, self.num_requests)
        kl_pos = (self.original.exp() * (self.original - edited)).sum(-1)  # [P]
        kl = mean_per_row(kl_pos, self.locality.prompt_of_position, self.locality.num_prompts)
        return nll, kl.mean()

    def task_loss(self, nll: torch.Tensor, kl: torch.Tensor) -> torch.Tensor:
        """The part of the meta-loss that reaches ``v*`` through the solver: edit + locality."""
        hp = self.hparams
        return hp.metake_edit_weight * nll.mean() + hp.metake_locality_weight * kl

    def regulariser(self, v_star: torch.Tensor) -> torch.Tensor:
        """``||v* - v_plan||^2``, averaged over requests (unweighted)."""
        return ((v_star - self.v_plan.to(v_star.dtype)) ** 2).sum(-1).mean()

    def evaluate(
        self, v_star: torch.Tensor, channel: Channel, backward: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        """Meta-loss of ``v_star`` (``[n, d]``, a leaf) under ``channel``, one row group's graph
        at a time: with ``backward`` each group's share is back-propagated at once (its graph then
        freed) into detached copies of the channel's updates, and their summed gradient goes
        through the channel's graph (the solver's replay, for the exact one) once, accumulating
        the whole loss's gradient into ``v_star.grad``. Returns (loss, NLL ``[n]``, terms),
        detached.

        The edit NLL and the locality KL are means over rows and positions, so the groups'
        shares add up to the loss of :meth:`__call__`; memory grows with the group size, not
        with the batch.
        """
        hp = self.hparams
        n, locality = self.num_requests, self.locality
        rows_of_request = torch.bincount(self.request_of_row, minlength=n)  # [n]
        positions_of_prompt = torch.bincount(locality.prompt_of_position,
                                             minlength=locality.num_prompts)  # fmt: skip
        nll = torch.zeros(n, dtype=v_star.dtype, device=v_star.device)
        kl = torch.zeros((), dtype=v_star.dtype, device=v_star.device)
        with torch.set_grad_enabled(backward):
            updates = channel.updates(v_star)
        leaves = detached_updates(updates, backward)
        with torch.set_grad_enabled(backward), channel.apply(leaves):
            for number, group in enumerate(self.groups):
                row_nll, edited = _group_outputs(self.model, self.adapter, group, self.where,
                                                 number)  # [R_g], [P_g, V]  # fmt: skip
                row_nll = row_nll.to(nll.device)  # from the LM head's device
                rewrite = group.rows < self.rewrite_rows
                owner = self.request_of_row[group.rows[rewrite]]
                part_nll = torch.zeros_like(nll).index_add(
                    0, owner, (row_nll[rewrite] / rows_of_request[owner]).to(nll.dtype)
                )
                entries = self.where.entries[number]
                original = self.original[entries]
                kl_pos = (original.exp() * (original - edited)).sum(-1)  # [P_g]
                prompts = locality.prompt_of_position[entries]
                part_kl = (kl_pos / positions_of_prompt[prompts]).sum() / locality.num_prompts
                part_kl = part_kl.to(kl.device)
                share = hp.metake_edit_weight * part_nll.sum() / n
                share = share + hp.metake_locality_weight * part_kl.to(share.dtype)
                if backward and share.requires_grad:
                    share.backward()
                nll += part_nll.detach()
                kl += part_kl.detach().to(kl.dtype)
        with torch.set_grad_enabled(backward):
            if backward:
                backward_into_updates(updates, leaves)
            reg = self.regulariser(v_star)
            if backward:
                (hp.metake_reg_weight * reg).backward()
        task = hp.metake_edit_weight * nll.mean() + hp.metake_locality_weight * kl
        loss = task + hp.metake_reg_weight * reg.detach()
        terms = {"edit_nll": nll.mean().item(), "locality_kl": kl.item(), "reg": reg.item(),
                 "loss": loss.item()}  # fmt: skip
        return loss, nll, terms

    def __call__(
        self, v_star: torch.Tensor, channel: Callable[[torch.Tensor], AbstractContextManager]
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        """Meta-loss of ``v_star`` (``[n, d]``) under ``channel``: (loss, NLL ``[n]``, terms)."""
        with channel(v_star):
            nll, kl = self.terms()
        reg = self.regulariser(v_star)
        loss = self.task_loss(nll, kl) + self.hparams.metake_reg_weight * reg
        terms = {"edit_nll": nll.mean().item(), "locality_kl": kl.item(), "reg": reg.item(),
                 "loss": loss.item()}  # fmt: skip
        return loss, nll, terms


def edit_contexts(contexts: Sequence[str], hparams: MemitHparams) -> list[str]:
    """The context prefixes (``""`` first) whose prompts the meta-loss's edit term reads: all of
    Stage I's, or the first ``metake_edit_contexts`` besides the bare prompt (the solver's keys
    always average over all of them)."""
    keep = hparams.metake_edit_contexts
    return list(contexts) if keep is None else list(contexts[: 1 + keep])


StepObserver = Callable[[int, torch.Tensor], None]
"""Called at every look-ahead step with ``(step, v* [n, d])``, before its update (diagnostics)."""


def lookahead_targets(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest],
    plan: TargetPlan,
    gate: torch.Tensor | Channel,
    hparams: MemitHparams,
    contexts: Sequence[str],
    locality_prompts: Sequence[str] = LOCALITY_PROMPTS,
    max_groups: int = 4,
    skip_lower: bool = True,
    observer: StepObserver | None = None,
    max_rows: int = MAX_GROUP_ROWS,
) -> RefinedPlan:
    """Refine ``plan.v_target`` (``[n, d]``) through the solver: its gate or a channel.

    ``gate`` is the solver's ``M`` (``[n, d_in]``) at ``plan.layer`` (the structural proxy) or a
    :mod:`~metake.planners.hypergradient` channel (:class:`SpreadChannel`: the exact
    hypergradient through the whole multi-layer solver). ``plan.v_init`` is the layer's current
    output ``Z`` at the subject's last token; the model is left exactly as it was (virtual
    weights only). Returns the refined targets and, per step, the meta-loss and its three terms
    (step 0 is the Stage I target itself). Prompts run in up to ``max_groups`` groups of similar
    length (little compute spent on padding); with ``skip_lower`` every step starts at the
    channel's lowest changed layer from the cached residual stream below it. Its forwards and
    backwards run under ``hparams.planner_autocast`` (:mod:`metake.precision`).
    """
    device = input_device(model)
    work_dtype = torch.promote_types(next(model.parameters()).dtype, torch.float32)
    current = plan.v_init.to(device=device, dtype=work_dtype)  # Z, [n, d]
    if isinstance(gate, torch.Tensor):
        module = get_adapter(model).mlp_out(model, plan.layer)
        gate = ProxyChannel(module, plan.layer, gate, current)
    v_plan = plan.v_target.to(device=device, dtype=work_dtype)
    v_star = v_plan.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([v_star], lr=hparams.metake_lr)
    history: list[dict[str, float]] = []
    nll = torch.zeros(len(requests))
    with planner_precision(model, hparams.planner_autocast):  # entered once: one weight cast
        # the original log-probs at the precision of the edited ones
        objective = MetaObjective(model, tokenizer, requests, v_plan, hparams,
                                  edit_contexts(contexts, hparams), locality_prompts, max_groups,
                                  gate.entry_layer if skip_lower else None, max_rows)  # fmt: skip
        for step in range(hparams.metake_steps + 1):
            if observer is not None:
                observer(step, v_star.detach())
            last_step = step == hparams.metake_steps
            optimizer.zero_grad()
            loss, nll, terms = objective.evaluate(v_star, gate, backward=not last_step)
            require_finite(nll, "MetaKE look-ahead (meta-loss)", layer=plan.layer,
                           requests=requests, per_request=True)  # fmt: skip
            require_finite(loss, "MetaKE look-ahead (meta-loss)", layer=plan.layer,
                           requests=requests)  # fmt: skip
            history.append({"step": step, **terms})
            log.debug("metake look-ahead step %d: %s", step, history[-1])
            if last_step:
                break
            optimizer.step()
    require_finite(v_star, "MetaKE look-ahead (targets)", layer=plan.layer, requests=requests,
                   per_request=True)  # fmt: skip
    return RefinedPlan(
        v_target=v_star.detach(), history=history, final_nll=nll.detach().cpu().tolist()
    )
