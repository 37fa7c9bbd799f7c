"""Stage I, the standard planner: optimise each edit's target value at the last edit layer.

For each request, a residual vector delta is added to the output of decoder layer ``L`` at the
subject's last token; MEMIT's loss is minimised with Adam
(``v_steps`` loss evaluations and ``v_steps - 1`` updates, as MEMIT's ``compute_z`` counts):

    loss_i = mean over context prefixes of NLL(target tokens)
           + kl_factor * KL(edited || original) of the next-token distribution after
             "{subject} is a" (at the subject's last token; the "essence" term)
           + v_weight_decay * ||delta_i|| / ||v_init_i||^2

(the decay term is MEMIT's as implemented in its ``compute_z``: the norm of delta, not its
square, over the squared norm of v_init)
with ``||delta_i|| <= clamp_norm_factor * ||v_init_i||`` after each step and a per-request early
stop once ``loss_i < v_loss_threshold``. All requests of a batch and all their prompts go through
one padded forward/backward per step; each request has its own delta, and Adam's element-wise
update keeps them independent. The target is ``v* = v_init + delta``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial

import torch
from torch import nn
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from metake.finite import require_finite
from metake.hparams import MemitHparams
from metake.models.adapters import ArchAdapter, get_adapter, input_device
from metake.planners.prefix import PrefixCachedBatch
from metake.precision import planner_precision
from metake.requests import EditRequest
from metake.tokens import (
    EncodedPrompt,
    PromptBatch,
    document_start,
    encode_request,
    length_groups,
    pad_batch,
)
from metake.trace import LowerLayers, add_at_positions, cache_lower_layers, capture

log = logging.getLogger(__name__)

CONTEXT_SEEDS = ("The", "Therefore", "Because", "I", "You")


@torch.no_grad()
def context_templates(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, count: int = 5, length: int = 10
) -> list[str]:
    """Context prefixes: ``""`` plus ``count`` greedy continuations of MEMIT's seed words.

    Greedy decoding (one prompt at a time, so no padding is involved) makes them deterministic;
    generation starts from a document-start token (see :func:`metake.tokens.document_start`).
    Each prefix ends with ". " and is prepended to the filled prompt.
    """
    device = input_device(model)
    start = document_start(tokenizer)
    prefixes = [""]
    for word in CONTEXT_SEEDS[:count]:
        ids = torch.tensor([start + tokenizer(word, add_special_tokens=False)["input_ids"]])
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=torch.ones_like(ids).to(device),
            max_new_tokens=length,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        text = tokenizer.decode(out[0, len(start) :], skip_special_tokens=True)
        text = re.sub(r"\s+", " ", text.replace("{", " ").replace("}", " ")).strip()
        prefixes.append(f"{text}. ")
    return prefixes


def base_hidden(model: nn.Module, batch: PromptBatch) -> torch.Tensor:
    """Final-normed last hidden states ``[B, S, d]`` of the model's base (no LM head)."""
    out = model.base_model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
    )
    return out[0]


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32, or float64 when it already is (half-precision models still get float32)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def target_log_probs(
    model: nn.Module, adapter: ArchAdapter, hidden: torch.Tensor, batch: PromptBatch
) -> torch.Tensor:
    """Log-probabilities ``[T]`` of every target token, from logits at target positions only."""
    h = hidden[batch.target_rows, batch.target_positions]
    logp = torch.log_softmax(at_least_float32(adapter.logits(model, h)), dim=-1)
    return logp.gather(-1, batch.target_ids[:, None]).squeeze(-1)


def mean_per_row(values: torch.Tensor, rows: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Mean of ``values [T]`` grouped by ``rows [T]`` into ``[num_rows]``."""
    total = torch.zeros(num_rows, dtype=values.dtype, device=values.device)
    count = torch.zeros(num_rows, dtype=values.dtype, device=values.device)
    total.index_add_(0, rows, values)
    count.index_add_(0, rows, torch.ones_like(values))
    return total / count.clamp_min(1)


@dataclass
class TargetPlan:
    """Stage I output: ``v_init`` and ``v_target`` (``[n, d]``) at layer ``layer``, and a log."""

    layer: int
    v_init: torch.Tensor
    v_target: torch.Tensor
    steps_run: int
    history: list[dict[str, float]] = field(default_factory=list)
    final_nll: list[float] = field(default_factory=list)  # per request, with the target in place
    rows_run: int = 0  # prompt rows run over all steps (the work done)


@dataclass
class PlannerBatch:
    """All prompts of one batch: rewriting prompts (every request x context) then KL prompts."""

    batch: PromptBatch
    request_of_row: torch.Tensor  # [rewriting + KL rows]
    num_requests: int
    num_contexts: int

    @property
    def num_rewrite_rows(self) -> int:
        """Rows holding the rewriting prompts (they come first)."""
        return self.num_requests * self.num_contexts

    def plain_rows(self) -> torch.Tensor:
        """Row of each request's prompt without context (context 0 is ``""``): ``[n]``."""
        return torch.arange(self.num_requests) * self.num_contexts

    def kl_rows(self) -> torch.Tensor:
        """Row of each request's KL prompt: ``[n]``."""
        return torch.arange(self.num_requests) + self.num_rewrite_rows


def build_planner_batch(
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest],
    contexts: Sequence[str],
    kl_prompt: str,
    extra: Sequence[EncodedPrompt] = (),
) -> PlannerBatch:
    """Encode every (request, context) prompt with its target, every KL prompt, then ``extra``.

    ``request_of_row`` covers the rewriting and KL rows only; ``extra`` rows come after them.
    """
    if contexts[0] != "":
        raise ValueError("the first context prefix must be the empty one")
    encoded = [encode_request(tokenizer, r, c) for r in requests for c in contexts]
    encoded += [
        encode_request(tokenizer, r, with_target=False, prompt_template=kl_prompt) for r in requests
    ]
    encoded += list(extra)
    rows = [i for i in range(len(requests)) for _ in contexts] + list(range(len(requests)))
    return PlannerBatch(
        batch=pad_batch(encoded, tokenizer.pad_token_id),
        request_of_row=torch.tensor(rows, dtype=torch.long),
        num_requests=len(requests),
        num_contexts=len(contexts),
    )


@dataclass
class RowGroup:
    """Rows ``rows`` (``[R]``, global indices) of a batch run together: ``batch`` is their view
    (in the runner's coordinates) and ``run()`` gives its final hidden states ``[R, S, d]``."""

    rows: torch.Tensor
    batch: PromptBatch
    run: Callable[[], torch.Tensor]
    skip: LowerLayers | None = None  # see enter_at_layer
    prefix: PrefixCachedBatch | None = None  # the runner's prefix cache, if it has one

    def forward(self) -> torch.Tensor:
        """``run()``, with the layers below the entry layer replayed from their cached output;
        on the rows' device (the last layers of a model spread over devices may be elsewhere)."""
        if self.skip is None:
            return self.run().to(self.rows.device)
        with self.skip.replay():
            return self.run().to(self.rows.device)


@torch.no_grad()
def enter_at_layer(
    model: nn.Module, adapter: ArchAdapter, groups: Sequence[RowGroup], layer: int
) -> None:
    """Run every group once up to layer ``layer - 1`` and let later forwards start at ``layer``.

    Planners change nothing below the last edit layer, so the residual stream entering it is the
    same at every optimisation step; caching it saves ``layer`` of the model's layers per step.
    """
    if layer == 0:
        return
    name = adapter.layer_name(layer - 1)
    lower = adapter.layers_below(model, layer)
    for group in groups:
        group.skip = cache_lower_layers(model, lower, name, group.run)
        if group.prefix is not None:  # replayed layers never read their prefix keys again
            group.prefix.release_layers_below(layer)


MAX_GROUP_ROWS = 32
"""Rows one forward/backward of a planner holds at most: each group's graph is freed after its
backward, so a planner's memory grows with this, not with the batch (100 edits x 6 contexts)."""


def row_groups(
    model: nn.Module,
    full: PromptBatch,
    pad_id: int,
    prefix_cache: bool,
    max_groups: int,
    max_rows: int = MAX_GROUP_ROWS,
) -> list[RowGroup]:
    """Split ``full`` into groups of similar length (each of at most ``max_rows`` rows), each
    with its runner.

    With ``prefix_cache`` the tokens before each subject's last token run once per group
    (:class:`~metake.planners.prefix.PrefixCachedBatch`) and rows are grouped by the length of
    the rest; otherwise whole prompts run and are grouped by their length.
    """
    use_prefix = prefix_cache and PrefixCachedBatch.supports(model, full)
    lengths = full.attention_mask.sum(1)
    second = None
    if use_prefix:  # the suffix runs at every step; the prefix once, but its cache stays
        lengths, second = lengths - full.subject_last, full.subject_last.tolist()
    groups = []
    pieces = [
        members[start : start + max_rows]
        for members in length_groups(lengths.tolist(), max_groups, second)
        for start in range(0, len(members), max_rows)
    ]
    for members in pieces:
        rows = torch.tensor(members, dtype=torch.long, device=full.input_ids.device)
        sub = full.select(rows)
        if use_prefix:
            split = PrefixCachedBatch(model, sub, pad_id)
            groups.append(RowGroup(rows, split.suffix, split.hidden, prefix=split))
        else:
            groups.append(RowGroup(rows, sub, partial(base_hidden, model, sub)))
    return groups


def compute_targets(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest],
    hparams: MemitHparams,
    contexts: Sequence[str],
    prefix_cache: bool = True,
    max_groups: int = 4,
    skip_lower: bool = True,
    max_rows: int = MAX_GROUP_ROWS,
    drop_finished: bool = True,
) -> TargetPlan:
    """Stage I for a batch: the target value ``v*`` (``[n, d]``) at the last edit layer.

    With ``prefix_cache`` (default) the tokens before each subject's last token run once
    (:class:`~metake.planners.prefix.PrefixCachedBatch`); ``False`` runs whole prompts at every
    step (the same result up to float rounding, slower). Prompts run in up to ``max_groups``
    groups of similar length so that little compute goes to padding, each cut into pieces of at
    most ``max_rows`` rows whose graphs live one at a time (peak memory; results equal up to
    float rounding). With ``drop_finished`` the prompts of requests that met the early stop are
    left out of later steps (their delta, NLL and KL no longer change: the same result, less
    work); ``TargetPlan.rows_run`` counts the prompt rows run over all steps. The steps' forwards
    and backwards run under ``hparams.planner_autocast`` (:mod:`metake.precision`); the starting
    values ``v_init`` are read at full precision, as Stage II reads them.
    """
    adapter = get_adapter(model)
    layer = hparams.layers[-1]
    device = input_device(model)
    pb = build_planner_batch(tokenizer, requests, contexts, hparams.kl_prompt)
    full = pb.batch.to(device)

    def groups_of(rows: torch.Tensor | None) -> list[RowGroup]:
        """Length groups of the batch's ``rows`` (global numbers; ``None``: all rows)."""
        part = full if rows is None else full.select(rows)
        made = row_groups(model, part, tokenizer.pad_token_id, prefix_cache, max_groups, max_rows)
        if rows is not None:
            made = [replace(g, rows=rows[g.rows]) for g in made]
        if skip_lower:
            enter_at_layer(model, adapter, made, layer)
        return made

    groups = groups_of(None)
    n, num_rows = pb.num_requests, full.input_ids.shape[0]
    plain = pb.plain_rows().to(device)
    request_of_row = pb.request_of_row.to(device)

    layer_name = adapter.layer_name(layer)
    v_rows = []
    for group in groups:
        with (torch.no_grad(),
              capture(model, [layer_name], inputs=False, stop_after=layer_name) as tr):  # fmt: skip
            group.forward()
        local = torch.arange(len(group.rows), device=device)
        v_rows.append(at_least_float32(tr.outputs[layer_name][local, group.batch.subject_last]))
    v_all = scatter_rows(groups, v_rows, num_rows)  # [rows, d]
    v_init = v_all[plain]  # [n, d]
    init_norm2 = v_init.norm(dim=-1) ** 2
    max_norm = hparams.clamp_norm_factor * v_init.norm(dim=-1)

    delta = torch.zeros_like(v_init, requires_grad=True)
    optimizer = torch.optim.Adam([delta], lr=hparams.v_lr)
    active = torch.ones(n, dtype=torch.bool, device=device)
    terms = _Stage1Terms(model, adapter, adapter.layer_module(model, layer), groups, pb,
                         request_of_row, hparams.kl_factor, groups_of)  # fmt: skip
    history: list[dict[str, float]] = []
    step = 0
    with planner_precision(model, hparams.planner_autocast):  # entered once: one cast
        for step in range(hparams.v_steps):
            last_step = step == hparams.v_steps - 1
            optimizer.zero_grad()
            nll, kl = terms(delta, backward=not last_step)  # [n] each; gradients in delta.grad
            decay = hparams.v_weight_decay * delta.norm(dim=-1) / init_norm2
            loss = nll + hparams.kl_factor * kl + decay.detach()  # [n]
            require_finite(loss, "Stage I (target optimisation)", layer=layer, requests=requests,
                           per_request=True)  # fmt: skip
            history.append(
                {
                    "step": step,
                    "nll": nll.mean().item(),
                    "kl": kl.mean().item(),
                    "weight_decay": decay.mean().item(),
                    "loss": loss.mean().item(),
                    "active": int(active.sum()),
                }
            )
            log.debug("stage I step %d: %s", step, history[-1])
            active = active & (loss >= hparams.v_loss_threshold)
            if last_step or not active.any():
                break
            if drop_finished:
                terms.keep_only(active)
            decay.sum().backward()
            with torch.no_grad():  # loss_i depends on delta_i alone: masking the gradient
                delta.grad[~active] = 0  # afterwards equals the gradient of the masked sum
            before = delta.detach().clone()
            optimizer.step()
            with torch.no_grad():
                delta[~active] = before[~active]  # finished requests keep their delta
                scale = (max_norm / delta.norm(dim=-1).clamp_min(1e-12)).clamp(max=1.0)
                delta.mul_(scale[:, None])
    v_target = (v_init + delta).detach()
    require_finite(v_target, "Stage I (targets)", layer=layer, requests=requests,
                   per_request=True)  # fmt: skip
    return TargetPlan(
        layer=layer,
        v_init=v_init.detach(),
        v_target=v_target,
        steps_run=step,
        history=history,
        final_nll=nll.tolist(),
        rows_run=terms.rows_run,
    )


def scatter_rows(groups: Sequence[RowGroup], parts: Sequence[torch.Tensor], num_rows: int):
    """Per-group row tensors ``[R_g, ...]`` put back in global row order ``[num_rows, ...]``."""
    rows = torch.cat([g.rows for g in groups])
    stacked = torch.cat(list(parts))
    return stacked.new_zeros((num_rows, *stacked.shape[1:])).index_put((rows,), stacked)


class _Stage1Terms:
    """Stage I's NLL and KL terms per request at one step, one row group at a time.

    Each group's forward is followed by its backward (when asked), so only one group's graph is
    alive at a time: memory grows with the group size, not with the batch. The terms are sums
    over rows (a request's NLL is the mean over its context rows; its KL is read at its KL
    row), so the accumulated gradient equals that of the whole batch's loss. Requests left out
    by :meth:`keep_only` keep their last terms (their delta no longer changes, nor does the
    model: the terms would come out the same).
    """

    def __init__(
        self,
        model: nn.Module,
        adapter: ArchAdapter,
        layer_module: nn.Module,
        groups: Sequence[RowGroup],
        planner: PlannerBatch,
        request_of_row: torch.Tensor,
        kl_factor: float,
        groups_of: Callable[[torch.Tensor], list[RowGroup]],
    ) -> None:
        self.model, self.adapter, self.layer_module = model, adapter, layer_module
        self.groups, self.planner, self.kl_factor = list(groups), planner, kl_factor
        self.request_of_row = request_of_row  # [rows]
        self.groups_of = groups_of
        n = planner.num_requests
        self.covered = torch.ones(n, dtype=torch.bool, device=request_of_row.device)
        self.last: tuple[torch.Tensor, torch.Tensor] | None = None  # NLL, KL [n] each
        self.kl_init: torch.Tensor | None = None  # original KL log-probs per request [n, V]
        self.rows_run = 0

    def keep_only(self, active: torch.Tensor) -> None:
        """Run only the rows of the ``active`` requests (``[n]`` bool) from now on; regroups
        once a quarter of the rows run so far would be idle."""
        rows = active[self.request_of_row].nonzero().squeeze(1)
        running = sum(len(g.rows) for g in self.groups)
        if len(rows) <= 0.75 * running:
            self.groups = self.groups_of(rows)
            self.covered = active.clone()

    def __call__(self, delta: torch.Tensor, backward: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-request NLL and KL (``[n]`` each, detached) with ``delta`` (``[n, d]``) added;
        with ``backward`` their sum's gradient is accumulated into ``delta.grad``."""
        n = self.planner.num_requests
        nll = torch.zeros(n, dtype=delta.dtype, device=delta.device)
        kl = torch.zeros_like(nll)
        for group in self.groups:
            with torch.set_grad_enabled(backward):
                part_nll, part_kl = self._group_terms(group, delta)
                total = (part_nll + self.kl_factor * part_kl).sum()
            if backward and total.requires_grad:
                total.backward()
            nll += part_nll.detach()
            kl += part_kl.detach()
            self.rows_run += len(group.rows)
        if self.last is not None:  # requests no longer run keep their terms
            nll = torch.where(self.covered, nll, self.last[0])
            kl = torch.where(self.covered, kl, self.last[1])
        self.last = (nll, kl)
        return nll, kl

    def _group_terms(self, group: RowGroup, delta: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """One group's share of every request's NLL and KL (``[n]`` each, with graph)."""
        n, contexts = self.planner.num_requests, self.planner.num_contexts
        local = torch.arange(len(group.rows), device=group.rows.device)
        owner = self.request_of_row[group.rows]  # [R_g]
        subject_last = group.batch.subject_last
        with add_at_positions(self.layer_module, local, subject_last, delta[owner]):
            hidden = group.forward()
        logp = target_log_probs(self.model, self.adapter, hidden, group.batch)
        row_nll = -mean_per_row(logp, group.batch.target_rows, len(group.rows))  # [R_g]
        rewrite = group.rows < self.planner.num_rewrite_rows
        zeros = torch.zeros(n, dtype=delta.dtype, device=delta.device)
        row_nll = row_nll.to(device=delta.device, dtype=delta.dtype)  # the LM head's device
        part_nll = zeros.index_add(0, owner[rewrite], row_nll[rewrite] / contexts)
        kl_local = (~rewrite).nonzero().squeeze(1)
        if len(kl_local) == 0:
            return part_nll, zeros
        h = hidden[kl_local, subject_last[kl_local]]
        kl_logp = torch.log_softmax(at_least_float32(self.adapter.logits(self.model, h)), dim=-1)
        kl_owner = owner[kl_local]
        if self.kl_init is None:  # the first step runs every row with delta = 0: the original
            self.kl_init = kl_logp.new_zeros((n, kl_logp.shape[-1]))
        if self.last is None:
            self.kl_init[kl_owner] = kl_logp.detach()
        init = self.kl_init[kl_owner]
        kl_rows = (kl_logp.exp() * (kl_logp - init)).sum(-1)  # KL(edited || original), [R_kl]
        return part_nll, zeros.index_add(0, kl_owner, kl_rows.to(delta.device, delta.dtype))
