"""Editing metrics, as the MEMIT/AlphaEdit evaluation defines them.

Pure functions on logits and log-probabilities (tested on hand-built numbers), and
:func:`score_pairs`, which runs a model teacher-forced over ``(prompt, answer)`` pairs.

* zsRE (token accuracy): the share of answer tokens that are the argmax next token given the
  prompt and the answer tokens before them. Efficacy reads the edit prompt and ``target_new``,
  Generalisation the paraphrase, Specificity the unrelated ``loc`` prompt and *its* answer.
* CounterFact (probability comparison): per prompt, the mean per-token NLL of ``target_new`` and
  of ``target_true``; a prompt scores 1 when the new answer is the more likely one (for
  Efficacy/Paraphrase) or the true one is (Neighbourhood). Magnitudes are
  ``exp(-NLL_new) - exp(-NLL_true)`` (reversed for Neighbourhood).
* Fluency: ROME's weighted n-gram entropy of generated text (2- and 3-grams, weights 2/3, 4/3).
* Drift: perplexity of a fixed text sample.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from metake.models.adapters import input_device
from metake.tokens import (
    EncodedPrompt,
    PromptBatch,
    pad_batch,
    padding_id,
    special_prefix,
    target_token_ids,
)


def token_hits(logits: torch.Tensor, target_ids: torch.Tensor) -> torch.Tensor:
    """Whether each target token is the argmax: ``logits [T, V]``, ``target_ids [T]`` → ``[T]``."""
    return logits.argmax(-1) == target_ids


def token_accuracy_of(hits: Sequence[bool]) -> float:
    """Teacher-forced token accuracy of one answer: the share of its tokens predicted."""
    if not hits:
        raise ValueError("an answer has at least one token")
    return sum(bool(h) for h in hits) / len(hits)


def mean_nll(token_log_probs: Sequence[float]) -> float:
    """Mean negative log-likelihood per token of one answer (MEMIT's CounterFact quantity)."""
    if not token_log_probs:
        raise ValueError("an answer has at least one token")
    return -sum(token_log_probs) / len(token_log_probs)


def compare_answers(nll_first: float, nll_second: float) -> tuple[float, float]:
    """``(score, magnitude)`` of "the first answer is the likelier": score 1.0 when its mean NLL
    is strictly lower, else 0.0; magnitude ``exp(-nll_first) - exp(-nll_second)``."""
    return float(nll_second > nll_first), math.exp(-nll_first) - math.exp(-nll_second)


_WORD = re.compile(r"\w+|[^\w\s]")


def ngram_entropy(text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)):
    """ROME's fluency score of one text: mean over n of ``weight_n * H(n-gram frequencies)`` (bits).

    Words and punctuation marks are tokens (a regex split; ROME uses NLTK's tokenizer, which
    differs only on contractions and similar). A text with fewer than n tokens has H = 0 for n.
    """
    tokens = _WORD.findall(text)
    values = []
    for n, weight in zip(ns, weights, strict=True):
        counts = Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
        total = sum(counts.values())
        entropy = -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0
        values.append(weight * entropy)
    return sum(values) / len(values)


def perplexity_of(nll_sum: float, num_tokens: int) -> float:
    """``exp(total NLL / tokens)``."""
    if num_tokens <= 0:
        raise ValueError("perplexity needs at least one token")
    return math.exp(nll_sum / num_tokens)


@dataclass(frozen=True)
class AnswerScore:
    """Teacher-forced view of one answer: per token, argmax hit and log-probability."""

    hits: tuple[bool, ...]
    log_probs: tuple[float, ...]

    @property
    def accuracy(self) -> float:
        """Token accuracy (zsRE's metric)."""
        return token_accuracy_of(self.hits)

    @property
    def nll(self) -> float:
        """Mean NLL per token (CounterFact's quantity)."""
        return mean_nll(self.log_probs)


def encode_pair(tokenizer: PreTrainedTokenizerBase, prompt: str, answer: str) -> EncodedPrompt:
    """``prompt`` followed by ``answer``'s tokens (space-separated), teacher-forced."""
    prefix = special_prefix(tokenizer)
    prompt_ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    answer_ids = target_token_ids(tokenizer, prompt, answer)
    start = len(prefix) + len(prompt_ids) - 1
    return EncodedPrompt(
        input_ids=prefix + prompt_ids + answer_ids[:-1],
        subject_last=len(prefix),
        target_ids=answer_ids,
        target_positions=list(range(start, start + len(answer_ids))),
    )


@torch.no_grad()
def score_pairs(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[tuple[str, str]],
    batch_size: int = 32,
) -> list[AnswerScore]:
    """Teacher-forced scores of ``(prompt, answer)`` pairs, batched (one forward per batch)."""
    device = input_device(model)
    pad = padding_id(tokenizer)
    encoded = [encode_pair(tokenizer, p, a) for p, a in pairs]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].input_ids))
    scores: list[AnswerScore | None] = [None] * len(encoded)
    for start in range(0, len(order), batch_size):
        members = order[start : start + batch_size]
        batch = pad_batch([encoded[i] for i in members], pad).to(device)
        picked = target_logits(model, batch).float()
        hits = token_hits(picked, batch.target_ids).tolist()
        logp = torch.log_softmax(picked, -1).gather(-1, batch.target_ids[:, None])[:, 0].tolist()
        rows = batch.target_rows.tolist()
        for local, index in enumerate(members):
            mine = [j for j, r in enumerate(rows) if r == local]
            scores[index] = AnswerScore(tuple(hits[j] for j in mine), tuple(logp[j] for j in mine))
    return scores  # type: ignore[return-value]


def target_logits(model: nn.Module, batch: PromptBatch) -> torch.Tensor:
    """Logits ``[T, V]`` at the batch's target positions (``target_rows``/``target_positions``,
    ``T`` of them). The LM head runs only on the positions that hold a target in some row
    (``logits_to_keep``), not on all ``B x L``: on Gemma3, whose 262k-word head costs more than
    its layers, that is most of a teacher-forced forward."""
    keep = torch.unique(batch.target_positions.cpu())  # sorted positions [K]
    logits = model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, logits_to_keep=keep
    ).logits  # [B, K, V]
    column = torch.searchsorted(keep, batch.target_positions.cpu()).to(logits.device)
    return logits[batch.target_rows.to(logits.device), column]


def context_size(model: nn.Module) -> int | None:
    """The most positions the model accepts (``None`` when its config does not say)."""
    config = model.config.get_text_config()
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


@torch.no_grad()
def text_perplexity(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    max_length: int = 128,
    batch_size: int = 8,
) -> float:
    """Perplexity of ``texts`` (each truncated to ``max_length`` tokens, and to the model's
    context size), pooled over tokens."""
    device = input_device(model)
    limit = context_size(model)
    max_length = min(max_length, limit) if limit else max_length
    prefix = special_prefix(tokenizer)
    rows = [(prefix + list(tokenizer(t, add_special_tokens=False)["input_ids"]))[:max_length]
            for t in texts]  # fmt: skip
    nll_sum, count = 0.0, 0
    pad = padding_id(tokenizer)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        width = max(len(r) for r in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, r in enumerate(chunk):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        ids, mask = ids.to(device), mask.to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        logp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]
        valid = mask[:, 1:].bool()
        nll_sum += float(-logp[valid].sum())
        count += int(valid.sum())
    return perplexity_of(nll_sum, count)
