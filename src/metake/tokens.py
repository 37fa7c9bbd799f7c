"""Tokenisation of edit prompts: subject positions, target tokens and padded batches.

The subject's last token is found from character offsets (fast tokenizers) so that tokenizers
with or without a BOS token and with or without a leading-space convention all work; slow
tokenizers fall back to tokenising the text up to the subject's end (MEMIT's rule).
Target tokens are what the tokenizer produces for ``prompt + " " + target`` after the prompt's
own tokens, so that a target is tokenised as the continuation it is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from metake.errors import InvalidRequestError
from metake.requests import PLACEHOLDER, EditRequest


def special_prefix(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Tokens the tokenizer puts before any text (e.g. ``[BOS]``; empty for GPT-2 style)."""
    with_special = tokenizer("x", add_special_tokens=True)["input_ids"]
    plain = tokenizer("x", add_special_tokens=False)["input_ids"]
    for start in range(len(with_special) - len(plain) + 1):
        if with_special[start : start + len(plain)] == plain:
            return list(with_special[:start])
    return []


def document_start(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Tokens that open a document: the tokenizer's own prefix, else its end-of-text token.

    Tokenizers without a BOS (GPT-2 style, SmolLM2) were trained on documents separated by an
    end-of-text token; generating from a bare one-word prompt without it can give degenerate
    text ("The-the-world-is-a-world" on SmolLM2), with it the continuation is ordinary prose.
    """
    prefix = special_prefix(tokenizer)
    if prefix:
        return prefix
    vocab = tokenizer.get_vocab()
    if "<|endoftext|>" in vocab:
        return [vocab["<|endoftext|>"]]
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


def _plain_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _overlapping_tokens(
    tokenizer: PreTrainedTokenizerBase, text: str, start: int, end: int
) -> list[int] | None:
    """Indices of the tokens overlapping ``text[start:end]`` by character offsets (fast
    tokenizers), or ``None`` when the tokenizer gives no offsets or none overlap."""
    if not getattr(tokenizer, "is_fast", False):
        return None
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    hits = [i for i, (s, e) in enumerate(enc["offset_mapping"]) if s < end and e > start]
    return hits or None


def _shared_prefix(tokenizer: PreTrainedTokenizerBase, text: str, cut_at: int) -> tuple[int, int]:
    """``(common, len(cut))``: how many leading tokens ``text`` shares with ``text[:cut_at]``,
    and that prefix's length; equal when ``cut_at`` falls on a token boundary."""
    full, cut = _plain_ids(tokenizer, text), _plain_ids(tokenizer, text[:cut_at])
    common = 0
    while common < min(len(full), len(cut)) and full[common] == cut[common]:
        common += 1
    return common, len(cut)


def last_token_of_span(tokenizer: PreTrainedTokenizerBase, text: str, start: int, end: int) -> int:
    """Index (no special tokens counted) of the last token overlapping ``text[start:end]``."""
    hits = _overlapping_tokens(tokenizer, text, start, end)
    if hits:
        return hits[-1]
    common, cut = _shared_prefix(tokenizer, text, end)
    # cut is a prefix of full: the span ends on a token boundary; otherwise the first token
    # where they differ runs across the span's end (it merged with what follows)
    return cut - 1 if common == cut else common


def first_token_of_span(tokenizer: PreTrainedTokenizerBase, text: str, start: int, end: int) -> int:
    """Index (no special tokens counted) of the first token overlapping ``text[start:end]``."""
    hits = _overlapping_tokens(tokenizer, text, start, end)
    if hits:
        return hits[0]
    common, cut = _shared_prefix(tokenizer, text, start)
    # text[:start] ends on a token boundary: the span starts at the next token; otherwise the
    # token where the two differ runs across the span's start
    return cut if common == cut else common


@dataclass(frozen=True)
class EncodedPrompt:
    """Token ids of ``context + filled prompt (+ target without its last token)``."""

    input_ids: list[int]
    subject_last: int  # position of the subject's last token in input_ids
    target_ids: list[int] = field(default_factory=list)
    target_positions: list[int] = field(default_factory=list)  # logits here predict target_ids


def encode_request(
    tokenizer: PreTrainedTokenizerBase,
    request: EditRequest,
    context: str = "",
    with_target: bool = True,
    prompt_template: str | None = None,
) -> EncodedPrompt:
    """Encode ``context + prompt`` (subject filled), optionally followed by the target tokens."""
    template = request.prompt if prompt_template is None else prompt_template
    before, after = template.split(PLACEHOLDER, 1)
    before = context + before
    prompt_text = before + request.subject + after
    prefix = special_prefix(tokenizer)
    prompt_ids = _plain_ids(tokenizer, prompt_text)
    subject_last = len(prefix) + last_token_of_span(
        tokenizer, prompt_text, len(before), len(before) + len(request.subject)
    )
    if not prompt_ids or subject_last >= len(prefix) + len(prompt_ids):
        raise InvalidRequestError(f"cannot locate subject {request.subject!r} in {prompt_text!r}")
    if not with_target:
        return EncodedPrompt(prefix + prompt_ids, subject_last)
    target_ids = target_token_ids(tokenizer, prompt_text, request.target_new)
    start = len(prefix) + len(prompt_ids) - 1
    return EncodedPrompt(
        input_ids=prefix + prompt_ids + target_ids[:-1],
        subject_last=subject_last,
        target_ids=target_ids,
        target_positions=list(range(start, start + len(target_ids))),
    )


def target_token_ids(
    tokenizer: PreTrainedTokenizerBase, prompt_text: str, target: str
) -> list[int]:
    """Token ids of ``target`` as the continuation of ``prompt_text`` (space-separated)."""
    sep = "" if prompt_text[-1:].isspace() else " "
    prompt_ids = _plain_ids(tokenizer, prompt_text)
    full_ids = _plain_ids(tokenizer, prompt_text + sep + target)
    if full_ids[: len(prompt_ids)] == prompt_ids and len(full_ids) > len(prompt_ids):
        ids = full_ids[len(prompt_ids) :]
    else:  # the boundary merged into one token: tokenise the target on its own
        ids = _plain_ids(tokenizer, sep + target)
    if not ids:
        raise InvalidRequestError(f"target {target!r} produces no tokens")
    return ids


@dataclass
class PromptBatch:
    """A right-padded batch of encoded prompts.

    ``input_ids``/``attention_mask``: ``[B, S]``; ``subject_last``: ``[B]``;
    target entries are flattened over all rows: ``target_rows``, ``target_positions``,
    ``target_ids``: ``[T]``.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    subject_last: torch.Tensor
    target_rows: torch.Tensor
    target_positions: torch.Tensor
    target_ids: torch.Tensor

    def to(self, device: torch.device | str) -> PromptBatch:
        """The same batch on ``device``."""
        return PromptBatch(*(t.to(device) for t in vars(self).values()))

    def select(self, rows: torch.Tensor) -> PromptBatch:
        """The rows ``rows`` (``[R]``, in that order), trimmed to their own longest length."""
        rows = rows.to(self.input_ids.device)
        mask = self.attention_mask[rows]
        width = int(mask.sum(1).max())
        new_index = torch.full((self.input_ids.shape[0],), -1, dtype=torch.long,
                               device=rows.device)  # fmt: skip
        new_index[rows] = torch.arange(len(rows), device=rows.device)
        keep = new_index[self.target_rows] >= 0
        return PromptBatch(
            input_ids=self.input_ids[rows, :width],
            attention_mask=mask[:, :width],
            subject_last=self.subject_last[rows],
            target_rows=new_index[self.target_rows[keep]],
            target_positions=self.target_positions[keep],
            target_ids=self.target_ids[keep],
        )


def length_groups(
    lengths: Sequence[int], max_groups: int = 4, second: Sequence[int] | None = None
) -> list[list[int]]:
    """Split row indices into at most ``max_groups`` groups of similar ``lengths``.

    Rows are sorted by length and cut where the padded area (rows x longest length, summed over
    groups) is smallest (exact dynamic programme), so batched forwards waste little on padding.
    Rows of equal length are ordered by ``second`` (e.g. a second padded part's length), so
    that consecutive slices of a group are alike in both.
    """
    tie = second if second is not None else [0] * len(lengths)
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], tie[i], i))
    sizes = [lengths[i] for i in order]
    n, groups = len(sizes), max(1, min(max_groups, len(sizes)))
    inf = float("inf")
    # best[g][j]: least padded area covering the first j sorted rows with g groups
    best = [[inf] * (n + 1) for _ in range(groups + 1)]
    cut = [[0] * (n + 1) for _ in range(groups + 1)]
    best[0][0] = 0
    for g in range(1, groups + 1):
        for j in range(1, n + 1):
            for i in range(g - 1, j):
                area = best[g - 1][i] + (j - i) * sizes[j - 1]
                if area < best[g][j]:
                    best[g][j], cut[g][j] = area, i
    g = min(range(1, groups + 1), key=lambda k: (best[k][n], k))
    bounds, j = [], n
    while g > 0:
        bounds.append((cut[g][j], j))
        j, g = cut[g][j], g - 1
    return [order[a:b] for a, b in reversed(bounds) if b > a]


def padding_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id used for padding: the pad token, else EOS, else UNK, else 0. Padded positions are
    masked out, so any id works."""
    for attr in ("pad_token_id", "eos_token_id", "unk_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            return value
        if isinstance(value, (list, tuple)) and value and isinstance(value[0], int):
            return value[0]
    return 0


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token rows (for generation): ``(input_ids [B, S], attention_mask [B, S])``."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r) :] = torch.tensor(list(r), dtype=torch.long)
            mask[i, width - len(r) :] = 1
    return ids, mask


def right_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token rows: ``(input_ids [B, S], attention_mask [B, S])``."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(list(r), dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


def pad_batch(encoded: Sequence[EncodedPrompt], pad_id: int) -> PromptBatch:
    """Right-pad encoded prompts into one :class:`PromptBatch`."""
    ids, mask = right_pad([e.input_ids for e in encoded], pad_id)
    rows, positions, targets = [], [], []
    for row, e in enumerate(encoded):
        rows += [row] * len(e.target_ids)
        positions += e.target_positions
        targets += e.target_ids
    return PromptBatch(
        input_ids=ids,
        attention_mask=mask,
        subject_last=torch.tensor([e.subject_last for e in encoded], dtype=torch.long),
        target_rows=torch.tensor(rows, dtype=torch.long),
        target_positions=torch.tensor(positions, dtype=torch.long),
        target_ids=torch.tensor(targets, dtype=torch.long),
    )
