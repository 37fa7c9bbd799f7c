"""Tokenisation of edit prompts: subject positions, target tokens, padding, document starts.

Runs on the char-level ``tiny_tokenizer()`` (no BOS, no leading-space convention) and on small
fast tokenizers trained offline with ``tokenizers`` that behave like real ones:

* ``metaspace_bos``: BPE + Metaspace pre-tokenizer (``▁word`` pieces, SentencePiece style) and a
  TemplateProcessing post-processor that prepends ``<bos>`` (like Llama / Gemma);
* ``bytelevel``: BPE + ByteLevel pre-tokenizer (``Ġword`` pieces, GPT-2 style), no BOS, with an
  ``<|endoftext|>`` token.
"""

from __future__ import annotations

import string
from collections.abc import Sequence

import pytest
import torch
from tiny_models import tiny_tokenizer
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from metake.errors import InvalidRequestError
from metake.requests import EditRequest
from metake.tokens import (
    EncodedPrompt,
    PromptBatch,
    document_start,
    encode_request,
    last_token_of_span,
    left_pad,
    pad_batch,
    padding_id,
    right_pad,
    special_prefix,
    target_token_ids,
)

CORPUS = [
    "Michael Jordan plays the sport of basketball",
    "The city where the Eiffel Tower stands is Paris",
    "What is the product made by UniFirst? uniform",
    "The best player of all time is Michael Jordan",
    "Fact: sports are popular. Michael Jordan is famous.",
]
ALPHABET = sorted(set(string.ascii_letters + string.digits + " .,:;?!'\"-()"))


def _metaspace_bos_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<pad>", "<bos>", "<eos>", "<unk>"],
        initial_alphabet=[*ALPHABET, "▁"],
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 3, trainer)
    bos = tok.token_to_id("<bos>")
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
    )


def _bytelevel_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 3, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>"
    )


def _wordlevel_tokenizer(words: Sequence[str], post: str | None = None, **special):
    """A whitespace word-level tokenizer over ``words`` (+ ``[UNK]``); ``post``: a template."""
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if post is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=post, special_tokens=[(w, vocab[w]) for w in ("<s>", "</s>") if w in vocab]
        )
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", **special)


TOKENIZERS = {
    "char": tiny_tokenizer,
    "metaspace_bos": _metaspace_bos_tokenizer,
    "bytelevel": _bytelevel_tokenizer,
}


@pytest.fixture(scope="module", params=list(TOKENIZERS))
def tok(request):
    return TOKENIZERS[request.param]()


def text_of(tokenizer, ids: Sequence[int]) -> str:
    """The text of ``ids`` (special tokens dropped)."""
    if tokenizer.backend_tokenizer.decoder is None:  # the char tokenizer: a token is a char
        return "".join(tokenizer.convert_ids_to_tokens(list(ids)))
    return tokenizer.decode(list(ids), skip_special_tokens=True)


START = EditRequest("{} plays the sport of", "Michael Jordan", "cricket")
MIDDLE = EditRequest("The city where the {} stands is", "Eiffel Tower", "Rome")
END = EditRequest("The best player of all time is {}", "Michael Jordan", "Wayne Gretzky")
# the subject runs into punctuation: Metaspace makes "▁UniFirst?" one token
ADJACENT = EditRequest("What is the product made by {}?", "UniFirst", "uniform")
REQUESTS = {"start": START, "middle": MIDDLE, "end": END, "adjacent": ADJACENT}
CONTEXTS = {"no-context": "", "context": "Fact: sports are popular. "}


def _subject_span(request: EditRequest, context: str) -> tuple[str, int, int]:
    before = context + request.prompt.split("{}")[0]
    return context + request.filled_prompt, len(before), len(before) + len(request.subject)


def _check_subject_last(tokenizer, enc: EncodedPrompt, text: str, end: int) -> None:
    """``enc.subject_last`` is the token that holds ``text[end - 1]``, checked by decoding."""
    p = len(special_prefix(tokenizer))
    assert p <= enc.subject_last < len(enc.input_ids)
    through = text_of(tokenizer, enc.input_ids[p : enc.subject_last + 1])
    before = text_of(tokenizer, enc.input_ids[p : enc.subject_last])
    assert text.startswith(through)
    assert len(before) < end <= len(through), (before, through, text[:end])
    assert text[end - 1] in text_of(tokenizer, [enc.input_ids[enc.subject_last]])


# ---------------------------------------------------------------------------------------------
# special_prefix and document_start


def test_special_prefix(tok):
    if "<bos>" in tok.get_vocab():
        assert special_prefix(tok) == [tok.bos_token_id]
        assert tok("Michael Jordan")["input_ids"][0] == tok.bos_token_id
    else:
        assert special_prefix(tok) == []


def test_special_prefix_char_tokenizer_is_empty():
    assert special_prefix(tiny_tokenizer()) == []
    assert special_prefix(tiny_tokenizer(with_pad=False)) == []


def test_special_prefix_ignores_a_trailing_eos():
    tok = _wordlevel_tokenizer(["<s>", "</s>", "x"], post="<s> $A </s>")
    assert tok("x")["input_ids"] == [1, 3, 2]
    assert special_prefix(tok) == [1]


def test_document_start_bos_tokenizer():
    tok = _metaspace_bos_tokenizer()
    assert document_start(tok) == special_prefix(tok) == [tok.convert_tokens_to_ids("<bos>")]


def test_document_start_char_tokenizer_is_eos():
    tok = tiny_tokenizer()
    assert tok.eos_token_id is not None
    assert document_start(tok) == [tok.eos_token_id] == [tok.convert_tokens_to_ids("[EOS]")]


def test_document_start_endoftext():
    tok = _bytelevel_tokenizer()
    assert special_prefix(tok) == []
    assert document_start(tok) == [tok.get_vocab()["<|endoftext|>"]]


def test_document_start_prefers_endoftext_over_eos():
    tok = _wordlevel_tokenizer(["x", "<|endoftext|>", "</s>"], eos_token="</s>")
    assert document_start(tok) == [2]


def test_document_start_without_eos_is_empty():
    tok = _wordlevel_tokenizer(["x"])
    assert tok.eos_token_id is None
    assert document_start(tok) == []


# ---------------------------------------------------------------------------------------------
# encode_request: subject position


@pytest.mark.parametrize("context", list(CONTEXTS.values()), ids=list(CONTEXTS))
@pytest.mark.parametrize("request_", list(REQUESTS.values()), ids=list(REQUESTS))
def test_subject_last_points_at_subject_last_token(tok, request_, context):
    text, _, end = _subject_span(request_, context)
    for with_target in (False, True):
        enc = encode_request(tok, request_, context=context, with_target=with_target)
        _check_subject_last(tok, enc, text, end)


def test_subject_last_char_tokenizer_exact():
    tok = tiny_tokenizer()
    for request_ in REQUESTS.values():
        for context in CONTEXTS.values():
            _, _, end = _subject_span(request_, context)
            enc = encode_request(tok, request_, context=context)
            assert enc.subject_last == end - 1  # one token per character, no prefix
            last = tok.convert_ids_to_tokens(enc.input_ids[enc.subject_last])
            assert last == request_.subject[-1]


def test_subject_last_metaspace_whole_words():
    tok = _metaspace_bos_tokenizer()
    enc = encode_request(tok, START)
    assert enc.input_ids[0] == tok.bos_token_id
    assert tok.convert_ids_to_tokens(enc.input_ids[enc.subject_last]) == "▁Jordan"
    enc = encode_request(tok, ADJACENT)
    # the token holding the subject's last character also holds the "?" after it
    assert tok.convert_ids_to_tokens(enc.input_ids[enc.subject_last]) == "▁UniFirst?"
    assert enc.subject_last == enc.target_positions[0]


def test_subject_last_for_subject_at_end_is_the_last_prompt_token(tok):
    enc = encode_request(tok, END)
    assert enc.subject_last == enc.target_positions[0]
    enc_ctx = encode_request(tok, END, context=CONTEXTS["context"])
    assert enc_ctx.subject_last == enc_ctx.target_positions[0]


def test_context_shifts_subject_position(tok):
    context = CONTEXTS["context"]
    plain = encode_request(tok, START)
    with_ctx = encode_request(tok, START, context=context)
    n_context = len(tok(context.rstrip(), add_special_tokens=False)["input_ids"])
    assert with_ctx.subject_last > plain.subject_last
    assert with_ctx.subject_last - plain.subject_last >= n_context - 1
    # the token it points at is the subject's last one in the prefixed text, checked by decoding
    text = context + START.prompt.format(START.subject)
    _check_subject_last(tok, with_ctx, text, len(context) + len(START.subject))


def test_prompt_template_override(tok):
    enc = encode_request(tok, START, prompt_template="Yesterday {} was playing")
    text = "Yesterday Michael Jordan was playing"
    p = len(special_prefix(tok))
    assert text_of(tok, enc.input_ids[p : enc.target_positions[0] + 1]) == text
    _check_subject_last(tok, enc, text, len("Yesterday Michael Jordan"))


def test_last_token_of_span_direct(tok):
    text = "Michael Jordan plays the sport of basketball"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    for start, end in [(0, 7), (0, 14), (8, 14), (15, 20), (34, 44)]:
        i = last_token_of_span(tok, text, start, end)
        assert 0 <= i < len(ids)
        through = text_of(tok, ids[: i + 1])
        assert len(text_of(tok, ids[:i])) < end <= len(through)
        assert text[end - 1] in text_of(tok, [ids[i]])


# ---------------------------------------------------------------------------------------------
# slow-tokenizer fallback


SLOW_AGREES = ["start", "middle", "end"]


@pytest.mark.parametrize("context", list(CONTEXTS.values()), ids=list(CONTEXTS))
@pytest.mark.parametrize("name", SLOW_AGREES)
def test_slow_fallback_agrees_with_offsets(tok, name, context, monkeypatch):
    request_ = REQUESTS[name]
    text, start, end = _subject_span(request_, context)
    fast_index = last_token_of_span(tok, text, start, end)
    fast_enc = encode_request(tok, request_, context=context)
    calls = []
    original_call = type(tok).__call__

    def no_offsets(self, *args, **kwargs):
        calls.append(kwargs.get("return_offsets_mapping", False))
        return original_call(self, *args, **kwargs)

    monkeypatch.setattr(type(tok), "is_fast", False)
    monkeypatch.setattr(type(tok), "__call__", no_offsets)
    assert not tok.is_fast
    assert last_token_of_span(tok, text, start, end) == fast_index
    assert encode_request(tok, request_, context=context) == fast_enc
    assert calls and not any(calls)  # the fallback never asks for offsets


def test_slow_fallback_char_tokenizer_on_adjacent_punctuation(monkeypatch):
    tok = tiny_tokenizer()
    text, start, end = _subject_span(ADJACENT, "")
    fast_index = last_token_of_span(tok, text, start, end)
    monkeypatch.setattr(type(tok), "is_fast", False)
    assert last_token_of_span(tok, text, start, end) == fast_index == end - 1


def _punctuation_merging_tokenizer() -> PreTrainedTokenizerFast:
    """BPE whose vocabulary has ``UniFirst?`` but not ``UniFirst`` (as SentencePiece-style
    vocabularies, which do not split punctuation off, can have ``word?`` pieces)."""
    chars = sorted(set("by UniFirst? made"))
    vocab = {"[UNK]": 0, **{c: i + 1 for i, c in enumerate(chars)}}
    merges = [("U", "n"), ("Un", "i"), ("F", "i"), ("r", "s"), ("Fi", "rs"), ("t", "?"),
              ("Firs", "t?"), ("Uni", "First?")]  # fmt: skip
    for a, b in merges:
        vocab[a + b] = len(vocab)
    model = models.BPE(vocab=vocab, merges=merges, unk_token="[UNK]")
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(model), unk_token="[UNK]")


def test_offsets_find_a_token_that_runs_past_the_subject():
    tok = _punctuation_merging_tokenizer()
    text = "by UniFirst?"
    assert tok.convert_ids_to_tokens(tok(text)["input_ids"]) == ["b", "y", " ", "UniFirst?"]
    assert last_token_of_span(tok, text, 3, 11) == 3
    enc = encode_request(tok, EditRequest("by {}?", "UniFirst", "made"))
    assert enc.subject_last == 3 == enc.target_positions[0]


def test_slow_fallback_when_the_subject_merges_with_following_punctuation(monkeypatch):
    tok = _punctuation_merging_tokenizer()
    monkeypatch.setattr(type(tok), "is_fast", False)
    assert last_token_of_span(tok, "by UniFirst?", 3, 11) == 3


# ---------------------------------------------------------------------------------------------
# encode_request: target tokens


@pytest.mark.parametrize("context", list(CONTEXTS.values()), ids=list(CONTEXTS))
@pytest.mark.parametrize("request_", list(REQUESTS.values()), ids=list(REQUESTS))
def test_target_positions_and_ids_are_consistent(tok, request_, context):
    enc = encode_request(tok, request_, context=context)
    prompt_text = context + request_.filled_prompt
    prompt_ids = tok(prompt_text)["input_ids"]  # with the special prefix
    n = len(prompt_ids)
    t = len(enc.target_ids)
    assert t >= 1
    assert len(enc.target_positions) == t
    assert enc.input_ids[:n] == prompt_ids
    assert len(enc.input_ids) == n + t - 1
    # the first target token is predicted at the last prompt token
    assert enc.target_positions[0] == n - 1
    assert enc.input_ids[enc.target_positions[0]] == prompt_ids[-1]
    assert enc.target_positions == list(range(n - 1, n - 1 + t))
    for j in range(t - 1):
        assert enc.input_ids[enc.target_positions[j] + 1] == enc.target_ids[j]
    # the target tokens decode back to the target (modulo the leading space)
    assert text_of(tok, enc.target_ids).strip() == request_.target_new
    # prompt + target tokens are exactly the tokenisation of "prompt target"
    p = len(special_prefix(tok))
    whole = text_of(tok, enc.input_ids[p:] + enc.target_ids[-1:])
    assert whole == prompt_text + " " + request_.target_new


def test_multi_token_targets_exist(tok):
    # "cricket" is not in the training corpus: it is split into several tokens everywhere
    assert len(encode_request(tok, START).target_ids) > 1


def test_without_target(tok):
    enc = encode_request(tok, MIDDLE, with_target=False)
    assert enc.input_ids == tok(MIDDLE.filled_prompt)["input_ids"]
    assert enc.target_ids == [] and enc.target_positions == []


def test_target_token_ids_adds_one_space():
    tok = tiny_tokenizer()
    ids = target_token_ids(tok, "The sport of", "golf")
    assert ids == tok(" golf", add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == [" ", "g", "o", "l", "f"]


def test_target_token_ids_after_trailing_space():
    tok = tiny_tokenizer()
    ids = target_token_ids(tok, "The sport of ", "golf")
    assert ids == tok("golf", add_special_tokens=False)["input_ids"]


def test_target_token_ids_boundary_merge_falls_back_to_target_alone():
    vocab = {"[UNK]": 0, "o": 1, "f": 2, " ": 3, "g": 4, "l": 5, "f ": 6}
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.BPE(vocab=vocab, merges=[("f", " ")], unk_token="[UNK]")),
        unk_token="[UNK]",
    )
    assert tok("of golf", add_special_tokens=False)["input_ids"][:2] == [1, 6]  # merged "f "
    ids = target_token_ids(tok, "of", "golf")
    assert ids == tok(" golf", add_special_tokens=False)["input_ids"] == [3, 4, 1, 5, 2]


def test_target_without_tokens_is_an_error():
    tok = _wordlevel_tokenizer(["a", "b"])
    with pytest.raises(InvalidRequestError, match="produces no tokens"):
        target_token_ids(tok, "a b", "   ")


def test_unlocatable_subject_is_an_error():
    tok = _wordlevel_tokenizer(["a", "b"])
    with pytest.raises(InvalidRequestError, match="cannot locate subject"):
        encode_request(tok, EditRequest("{}", " ", "a"))


# ---------------------------------------------------------------------------------------------
# right_pad and pad_batch


def test_right_pad():
    ids, mask = right_pad([[5, 6, 7], [8], (9, 10)], pad_id=0)
    assert ids.dtype == mask.dtype == torch.long
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0], [9, 10, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]


def test_right_pad_equal_lengths_and_odd_pad_id():
    ids, mask = right_pad([[1, 2], [3, 4]], pad_id=99)
    assert ids.tolist() == [[1, 2], [3, 4]]
    assert bool(mask.all())
    ids, mask = right_pad([[1], [2, 3, 4]], pad_id=99)
    assert ids.tolist() == [[1, 99, 99], [2, 3, 4]]
    assert mask.sum(1).tolist() == [1, 3]


def test_pad_batch(tok):
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    encoded = [
        encode_request(tok, START),
        encode_request(tok, MIDDLE, context=CONTEXTS["context"]),
        encode_request(tok, END),
    ]
    batch = pad_batch(encoded, pad_id)
    assert isinstance(batch, PromptBatch)
    lengths = [len(e.input_ids) for e in encoded]
    n_targets = sum(len(e.target_ids) for e in encoded)
    assert batch.input_ids.shape == batch.attention_mask.shape == (3, max(lengths))
    assert batch.attention_mask.sum(1).tolist() == lengths
    assert batch.subject_last.shape == (3,)
    assert batch.subject_last.tolist() == [e.subject_last for e in encoded]
    for t in (batch.target_rows, batch.target_positions, batch.target_ids):
        assert t.shape == (n_targets,) and t.dtype == torch.long
    for row, e in enumerate(encoded):
        n = len(e.input_ids)
        assert batch.input_ids[row, :n].tolist() == e.input_ids
        assert (batch.input_ids[row, n:] == pad_id).all()
        assert (batch.attention_mask[row, n:] == 0).all()
        assert batch.attention_mask[row, e.subject_last] == 1
    assert batch.target_rows.tolist() == sum(
        ([row] * len(e.target_ids) for row, e in enumerate(encoded)), []
    )
    assert batch.target_positions.tolist() == sum((e.target_positions for e in encoded), [])
    assert batch.target_ids.tolist() == sum((e.target_ids for e in encoded), [])
    # every target is predicted at a real (unpadded) token
    assert (batch.attention_mask[batch.target_rows, batch.target_positions] == 1).all()
    # and teacher-forced: the next input token is the target, except each row's last target
    nxt = batch.target_positions + 1
    inside = nxt < batch.attention_mask.sum(1)[batch.target_rows]
    assert inside.sum() == n_targets - 3
    assert torch.equal(
        batch.input_ids[batch.target_rows[inside], nxt[inside]], batch.target_ids[inside]
    )


def test_pad_batch_without_targets():
    tok = tiny_tokenizer()
    encoded = [encode_request(tok, r, with_target=False) for r in (START, ADJACENT)]
    batch = pad_batch(encoded, tok.pad_token_id)
    assert batch.input_ids.shape == (2, max(len(e.input_ids) for e in encoded))
    assert batch.target_rows.shape == batch.target_positions.shape == (0,)
    assert batch.target_ids.shape == (0,)
    assert batch.target_ids.dtype == torch.long


def test_prompt_batch_to():
    tok = tiny_tokenizer()
    batch = pad_batch([encode_request(tok, START)], tok.pad_token_id)
    moved = batch.to("cpu")
    assert isinstance(moved, PromptBatch)
    for name, value in vars(batch).items():
        assert torch.equal(getattr(moved, name), value)


def test_left_pad_puts_real_tokens_last_and_padding_id_falls_back():
    ids, mask = left_pad([[5, 6, 7], [8], []], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8], [0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0]]

    class NoPad:
        pad_token_id = None
        eos_token_id = [2, 3]

    assert padding_id(NoPad()) == 2
