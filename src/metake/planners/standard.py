"""Stage I, the standard planner: optimise each edit's target value at the last edit layer.

For each request, a residual vector delta is added to the output of decoder layer ``L`` at the
subject's last token; MEMIT's loss is minimised with Adam:

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
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from metake.hparams import MemitHparams
from metake.models.adapters import ArchAdapter, get_adapter
from metake.planners.prefix import PrefixCachedBatch
from metake.requests import EditRequest
from metake.tokens import (
    EncodedPrompt,
    PromptBatch,
    document_start,
    encode_request,
    pad_batch,
)
from metake.trace import add_at_positions, capture

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
    device = next(model.parameters()).device
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


def target_log_probs(
    model: nn.Module, adapter: ArchAdapter, hidden: torch.Tensor, batch: PromptBatch
) -> torch.Tensor:
    """Log-probabilities ``[T]`` of every target token, from logits at target positions only."""
    h = hidden[batch.target_rows, batch.target_positions]
    logp = torch.log_softmax(adapter.logits(model, h).float(), dim=-1)
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


def compute_targets(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest],
    hparams: MemitHparams,
    contexts: Sequence[str],
    prefix_cache: bool = True,
) -> TargetPlan:
    """Stage I for a batch: the target value ``v*`` (``[n, d]``) at the last edit layer.

    With ``prefix_cache`` (default) the tokens before each subject's last token run once
    (:class:`~metake.planners.prefix.PrefixCachedBatch`); ``False`` runs whole prompts at every
    step (the same result up to float rounding, slower).
    """
    adapter = get_adapter(model)
    layer = hparams.layers[-1]
    device = next(model.parameters()).device
    pb = build_planner_batch(tokenizer, requests, contexts, hparams.kl_prompt)
    full = pb.batch.to(device)
    if prefix_cache and PrefixCachedBatch.supports(model, full):
        split = PrefixCachedBatch(model, full, tokenizer.pad_token_id)
        batch, run = split.suffix, split.hidden
    else:
        batch, run = full, partial(base_hidden, model, full)
    n = pb.num_requests
    all_rows = torch.arange(batch.input_ids.shape[0], device=device)
    plain, kl_rows = pb.plain_rows().to(device), pb.kl_rows().to(device)
    request_of_row = pb.request_of_row.to(device)

    layer_name = adapter.layer_name(layer)
    with torch.no_grad(), capture(model, [layer_name], inputs=False, stop_after=layer_name) as tr:
        run()
    v_init = tr.outputs[layer_name][plain, batch.subject_last[plain]].float()  # [n, d]
    init_norm2 = v_init.norm(dim=-1) ** 2
    max_norm = hparams.clamp_norm_factor * v_init.norm(dim=-1)

    delta = torch.zeros_like(v_init, requires_grad=True)
    optimizer = torch.optim.Adam([delta], lr=hparams.v_lr)
    active = torch.ones(n, dtype=torch.bool, device=device)
    kl_init: torch.Tensor | None = None
    history: list[dict[str, float]] = []
    layer_module = adapter.layer_module(model, layer)
    step = 0
    for step in range(hparams.v_steps + 1):
        with add_at_positions(layer_module, all_rows, batch.subject_last, delta[request_of_row]):
            hidden = run()
        logp = target_log_probs(model, adapter, hidden, batch)
        row_nll = -mean_per_row(logp, batch.target_rows, batch.input_ids.shape[0])
        nll = mean_per_row(
            row_nll[: pb.num_rewrite_rows], request_of_row[: pb.num_rewrite_rows], n
        )  # [n]
        kl_logp = torch.log_softmax(
            adapter.logits(model, hidden[kl_rows, batch.subject_last[kl_rows]]).float(), dim=-1
        )
        if kl_init is None:
            kl_init = kl_logp.detach()
        kl = (kl_logp.exp() * (kl_logp - kl_init)).sum(-1)  # KL(edited || original), [n]
        decay = hparams.v_weight_decay * delta.norm(dim=-1) / init_norm2
        loss = nll + hparams.kl_factor * kl + decay  # [n]
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
        active = active & (loss.detach() >= hparams.v_loss_threshold)
        if step == hparams.v_steps or not active.any():
            break
        optimizer.zero_grad()
        (loss * active).sum().backward()
        before = delta.detach().clone()
        optimizer.step()
        with torch.no_grad():
            delta[~active] = before[~active]  # finished requests keep their delta
            scale = (max_norm / delta.norm(dim=-1).clamp_min(1e-12)).clamp(max=1.0)
            delta.mul_(scale[:, None])
    return TargetPlan(
        layer=layer,
        v_init=v_init.detach(),
        v_target=(v_init + delta).detach(),
        steps_run=step,
        history=history,
        final_nll=nll.detach().tolist(),
    )
