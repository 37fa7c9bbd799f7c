"""Looking at a model's behaviour on a request: greedy completions and target probabilities."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from metake.errors import MetakeError
from metake.evaluation.datasets import EvalRecord, in_ranges, load_dataset, parse_ranges
from metake.evaluation.metrics import target_logits
from metake.models.adapters import input_device
from metake.planners.standard import mean_per_row
from metake.requests import EditRequest
from metake.tokens import encode_request, left_pad, pad_batch, padding_id


@torch.no_grad()
def greedy_completion(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, text: str, max_new_tokens: int = 8
) -> str:
    """The greedy continuation of ``text`` (``max_new_tokens`` tokens, special tokens dropped)."""
    device = input_device(model)
    ids = tokenizer(text, return_tensors="pt").to(device)
    out = model.generate(
        **ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
    )
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


@torch.no_grad()
def greedy_continuations(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: Sequence[int],
    batch_size: int = 32,
) -> list[str]:
    """Greedy continuations of ``prompts`` (prompt ``i`` for ``max_new_tokens[i]`` tokens), in
    left-padded batches; each equals :func:`greedy_completion` of its prompt alone."""
    device = input_device(model)
    pad = padding_id(tokenizer)
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    out: list[str] = [""] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: (max_new_tokens[i], len(encoded[i])))
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        ids, mask = left_pad([encoded[i] for i in rows], pad)
        width = ids.shape[1]
        generated = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max(max_new_tokens[i] for i in rows),
            do_sample=False,
            pad_token_id=pad,
        )[:, width:]
        for row, i in zip(generated, rows, strict=True):
            out[i] = tokenizer.decode(row[: max_new_tokens[i]], skip_special_tokens=True)
    return out


def generation_success(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[tuple[str, str]],
    batch_size: int = 32,
) -> list[bool]:
    """Per ``(prompt, answer)``: does the greedy continuation of the prompt start with the whole
    answer (leading whitespace ignored, case kept)? Generation is allowed two tokens more than the
    answer's own tokenisation, so that another segmentation of the same text still counts."""
    budgets = [len(tokenizer(" " + a.strip(), add_special_tokens=False)["input_ids"]) + 2
               for _, a in pairs]  # fmt: skip
    texts = greedy_continuations(model, tokenizer, [p for p, _ in pairs], budgets, batch_size)
    return [t.lstrip().startswith(a.strip()) for t, (_, a) in zip(texts, pairs, strict=True)]


@torch.no_grad()
def target_probability(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, request: EditRequest, target: str = ""
) -> float:
    """P(target tokens | filled prompt): the product over the target's tokens (teacher-forced)."""
    if target:
        request = EditRequest(request.prompt, request.subject, target)
    batch = pad_batch([encode_request(tokenizer, request)], padding_id(tokenizer))
    batch = batch.to(input_device(model))
    logp = torch.log_softmax(target_logits(model, batch).float(), dim=-1)
    return float(logp.gather(-1, batch.target_ids[:, None].to(logp.device)).sum().exp())


def _answer_logits(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest],
    batch_size: int,
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Teacher-forced logits at each answer token, batched: yields ``(n, logits [T, V],
    answer ids [T], request row [T])`` per chunk of ``n`` requests."""
    device = input_device(model)
    for start in range(0, len(requests), batch_size):
        chunk = [encode_request(tokenizer, r) for r in requests[start : start + batch_size]]
        batch = pad_batch(chunk, tokenizer.pad_token_id or 0).to(device)
        yield (
            len(chunk),
            target_logits(model, batch).float(),
            batch.target_ids,
            batch.target_rows,
        )


@torch.no_grad()
def token_accuracy(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest],
    batch_size: int = 16,
) -> list[float]:
    """Teacher-forced target-token accuracy per request (``[n]`` floats in [0, 1]).

    The fraction of ``target_new``'s tokens that are the argmax next token, each given the
    filled prompt and the target tokens before it: zsRE's Efficacy/Generalisation metric.
    """
    scores: list[float] = []
    for n, logits, answer, rows in _answer_logits(model, tokenizer, requests, batch_size):
        hits = logits.argmax(-1) == answer
        scores += mean_per_row(hits.float(), rows, n).tolist()
    return scores


@torch.no_grad()
def answer_margins(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest],
    batch_size: int = 16,
) -> list[float]:
    """Per request, the smallest over its answer tokens of ``log p(answer) - max log p(other)``
    (teacher-forced; positive iff every answer token is the argmax): ``[n]`` floats."""
    out: list[float] = []
    for n, logits, answer, rows in _answer_logits(model, tokenizer, requests, batch_size):
        logp = torch.log_softmax(logits, -1)
        gap = (
            logp.gather(-1, answer[:, None]).squeeze(-1)
            - logp.scatter(-1, answer[:, None], float("-inf")).max(-1).values
        )  # [T]
        worst = torch.full((n,), float("inf"), device=logits.device)
        out += worst.scatter_reduce(0, rows, gap, reduce="amin").tolist()
    return out


@torch.no_grad()
def next_token_log_probs(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, texts: list[str], max_length: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token log-probabilities ``[B, S, V]`` of ``texts`` and their mask ``[B, S]``."""
    enc = tokenizer(texts, truncation=True, max_length=max_length, padding=True,
                    return_tensors="pt").to(input_device(model))  # fmt: skip
    logits = model(**enc).logits.float()
    return torch.log_softmax(logits, -1), enc["attention_mask"].bool()


def mean_kl(reference: torch.Tensor, other: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean KL(reference || other) over the masked positions of ``[B, S, V]`` log-probs."""
    return float((reference.exp() * (reference - other)).sum(-1)[mask].mean())


def known_facts(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[EvalRecord],
    limit: int,
    margin: float = 0.0,
) -> list[EditRequest]:
    """Up to ``limit`` records' true facts the model answers exactly (teacher-forced argmax),
    each answer token by at least ``margin`` nats over the runner-up (fragile facts flip under
    any edit and would measure noise, not damage)."""
    facts = [
        EditRequest(r.request.prompt, r.request.subject, r.request.target_true)
        for r in records
        if r.request.target_true
    ]
    margins = answer_margins(model, tokenizer, facts)
    return [f for f, m in zip(facts, margins, strict=True) if m > 0 and m >= margin][:limit]


@dataclass(frozen=True)
class ProbeSpec:
    """How a known-facts probe is built: at most ``limit`` facts of the CounterFact file ``data``
    at positions ``records`` whose every answer token leads the runner-up by ``margin`` nats."""

    data: str
    records: str
    limit: int
    margin: float

    def differences(self, other: dict[str, Any]) -> list[str]:
        """The fields of a stored spec (``asdict`` form) that differ from this one (the file by
        name only: a run may be resumed from another working directory)."""
        mine = asdict(self)
        out = [f"{k} {other.get(k)!r} (now {mine[k]!r})" for k in ("records", "limit", "margin")
               if other.get(k) != mine[k]]  # fmt: skip
        if Path(str(other.get("data"))).name != Path(self.data).name:
            out.append(f"data {other.get('data')!r} (now {self.data!r})")
        return out


def known_facts_of_file(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    path: str | Path,
    records: str,
    limit: int,
    margin: float = 0.0,
) -> list[EditRequest]:
    """:func:`known_facts` among the records at file positions ``records`` (``"A:B[,C:D]"``)
    of the CounterFact file ``path``."""
    source = load_dataset("counterfact", path, tokenizer=tokenizer)
    ranges = parse_ranges(records, "--probe-records")
    candidates = [r for r in source.records if in_ranges(r.index, ranges)]
    return known_facts(model, tokenizer, candidates, limit, margin)


def build_probe(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, spec: ProbeSpec
) -> list[EditRequest]:
    """The known facts ``spec`` describes, on the model as it is (call it unedited)."""
    return known_facts_of_file(model, tokenizer, spec.data, spec.records, spec.limit, spec.margin)


def probe_to_json(spec: ProbeSpec, facts: Sequence[EditRequest]) -> dict[str, Any]:
    """A stored probe: how it was built and its facts (read back by :func:`checked_probe`)."""
    return {"spec": asdict(spec), "facts": [asdict(f) for f in facts]}


MARGIN_TOLERANCE = 1e-3
"""Nats a stored fact's margin may fall below the spec's on re-checking (batching rounding)."""


def checked_probe(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    stored: dict[str, Any] | list[dict[str, Any]],
    spec: ProbeSpec,
    where: str,
) -> list[EditRequest]:
    """The facts of a stored probe (:func:`probe_to_json`, or a bare list of facts as older
    versions wrote), refused with a :class:`MetakeError` naming ``where`` unless it was built
    by ``spec`` and every fact still leads by ``spec.margin`` on the (unedited) model: measurements
    made on another probe are not comparable with this run's."""
    if isinstance(stored, dict):
        differ = spec.differences(stored.get("spec") or {})
        if differ:
            raise MetakeError(f"{where}: its known facts were built with other settings "
                              f"({'; '.join(differ)}); what was measured on them is not "
                              "comparable: use another output folder")  # fmt: skip
        stored = stored.get("facts", [])
    facts = [EditRequest(**f) for f in stored]
    margins = answer_margins(model, tokenizer, facts) if facts else []
    weak = [(f, m) for f, m in zip(facts, margins, strict=True)
            if m < spec.margin - MARGIN_TOLERANCE or m <= 0]  # fmt: skip
    if weak:
        fact, margin = min(weak, key=lambda fm: fm[1])
        raise MetakeError(
            f"{where}: {len(weak)} of its {len(facts)} known facts lead by less than "
            f"{spec.margin:g} nats on this model (e.g. {fact.prompt.format(fact.subject)!r} -> "
            f"{fact.target_new!r} by {margin:.3f}): they were built another way (another margin, "
            "model or code), so what was measured on them is not comparable: use another "
            "output folder"
        )
    return facts


def share_known(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, facts: Sequence[EditRequest]
) -> float:
    """Share in [0, 1] of ``facts`` the model answers exactly (teacher-forced, every answer
    token the argmax); 0 for no facts."""
    kept = token_accuracy(model, tokenizer, list(facts)) if facts else []
    return sum(k == 1.0 for k in kept) / max(len(kept), 1)
