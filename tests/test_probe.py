"""Scoring helpers of probe.py against per-request hand computations."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_model, tiny_tokenizer

from metake.errors import MetakeError
from metake.probe import (
    ProbeSpec,
    answer_margins,
    checked_probe,
    generation_success,
    greedy_completion,
    greedy_continuations,
    probe_to_json,
    target_probability,
    token_accuracy,
)
from metake.requests import EditRequest
from metake.tokens import encode_request

FACTS = [
    EditRequest("{} lives in", "Anna Berg", "Oslo"),
    EditRequest("{} is", "Eva", "ab"),
    EditRequest("The home town of {} is", "Karl", "Stockholm city"),
]


def _answer_logits(model, tok, fact: EditRequest) -> list[tuple[torch.Tensor, int]]:
    """One request alone (no padding): the logits row and answer id of each answer token."""
    enc = encode_request(tok, fact)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([enc.input_ids])).logits[0].float()
    return [(logits[p], t) for p, t in zip(enc.target_positions, enc.target_ids, strict=True)]


def test_answer_margins_against_a_hand_computation():
    """Margin = min over answer tokens of logit(answer) - max other logit, teacher-forced."""
    model, tok = tiny_model("llama"), tiny_tokenizer()
    got = answer_margins(model, tok, FACTS, batch_size=2)  # padding and two chunks
    for fact, margin in zip(FACTS, got, strict=True):
        gaps = []
        for row, tid in _answer_logits(model, tok, fact):
            others = torch.cat([row[:tid], row[tid + 1 :]])
            gaps.append(float(row[tid] - others.max()))  # log-softmax cancels in a difference
        assert margin == pytest.approx(min(gaps), abs=1e-4)
        assert (margin > 0) == all(g > 0 for g in gaps)


def test_token_accuracy_against_a_hand_computation():
    """Accuracy = fraction of answer tokens that are the argmax, batched with padding."""
    model, tok = tiny_model("llama"), tiny_tokenizer()
    facts = [*FACTS, _greedy_fact(model, tok, FACTS[0])]
    got = token_accuracy(model, tok, facts, batch_size=2)
    for fact, score in zip(facts, got, strict=True):
        rows = _answer_logits(model, tok, fact)
        assert score == pytest.approx(sum(int(r.argmax()) == t for r, t in rows) / len(rows))
    assert got[-1] > 0.5  # the model's own continuation: the check can tell hits from misses


def _greedy_fact(model, tok, fact: EditRequest) -> EditRequest:
    """``fact`` with the model's greedy three-character continuation as its answer."""
    ids = tok(fact.prompt.format(fact.subject) + " ")["input_ids"]
    for _ in range(3):
        with torch.no_grad():
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    answer = "".join(tok.convert_ids_to_tokens(ids[-3:]))
    return EditRequest(fact.prompt, fact.subject, answer)


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "gemma3_text"])
def test_batched_greedy_continuations_equal_one_prompt_at_a_time(model_type):
    """Left padding changes nothing: each batched continuation is the prompt's own greedy one."""
    model, tok = tiny_model(model_type), tiny_tokenizer()
    prompts = ["Anna Berg lives in", "Eva is", "The home town of Karl is a place", "x"]
    budgets = [3, 5, 2, 4]
    got = greedy_continuations(model, tok, prompts, budgets, batch_size=3)
    for prompt, budget, text in zip(prompts, budgets, got, strict=True):
        assert text == greedy_completion(model, tok, prompt, budget)


def test_generation_success_reads_the_greedy_text():
    """True when the continuation starts with the whole answer, False for a longer answer, and
    for an answer that only teacher forcing would credit in part."""
    model, tok = tiny_model("llama"), tiny_tokenizer()
    prompt = "Anna Berg lives in"
    text = greedy_completion(model, tok, prompt, 6)
    words = text.split()
    assert words, "the tiny model continued with nothing"
    first = words[0]
    pairs = [(prompt, first), (prompt, " " + first + " "), (prompt, first + "zzq"), (prompt, "zzq")]
    assert generation_success(model, tok, pairs, batch_size=2) == [True, True, False, False]


def test_checked_probe_keeps_only_a_probe_built_by_the_same_spec(monkeypatch):
    """A stored probe comes back only when built by the same spec and every fact still leads by
    the margin on the model; otherwise a one-line error names the file and the difference."""
    import metake.probe as probe

    model, tok = tiny_model("llama"), tiny_tokenizer()
    margins = {fact.subject: m for fact, m in zip(FACTS, (2.0, 1.5, 3.0), strict=True)}

    def known_this_well(model, tok, facts, batch_size=16):
        return [margins[f.subject] for f in facts]

    monkeypatch.setattr(probe, "answer_margins", known_this_well)
    spec = ProbeSpec("dir/cf.json", "0:10", 5, 1.0)
    stored = probe_to_json(spec, FACTS)
    assert checked_probe(model, tok, stored, spec, "probe.json") == FACTS
    moved = ProbeSpec("elsewhere/cf.json", "0:10", 5, 1.0)  # the same file from another folder
    assert checked_probe(model, tok, stored, moved, "probe.json") == FACTS
    with pytest.raises(MetakeError, match=r"probe.json: .*other settings \(margin 1.0 \(now 0.5\)"):
        checked_probe(model, tok, stored, ProbeSpec("dir/cf.json", "0:10", 5, 0.5), "probe.json")
    with pytest.raises(MetakeError, match=r"other settings \(records '0:10' \(now '0:20'\)"):
        checked_probe(model, tok, stored, ProbeSpec("dir/cf.json", "0:20", 5, 1.0), "probe.json")
    stricter = ProbeSpec(
        "dir/cf.json", "0:10", 5, 1.8
    )  # a bare list (older versions) is re-checked
    with pytest.raises(MetakeError, match=r"probe.json: 1 of its 3 known facts .* by 1.500"):
        checked_probe(model, tok, stored["facts"], stricter, "probe.json")
    assert checked_probe(model, tok, stored["facts"], spec, "probe.json") == FACTS


@torch.no_grad()
def test_target_probability_equals_full_logits():
    model, tok = tiny_model("gemma3_text"), tiny_tokenizer()
    fact = EditRequest("{} lives in", "Anna", "the city of Oslo")
    enc = encode_request(tok, fact)
    logits = model(input_ids=torch.tensor([enc.input_ids])).logits[0, enc.target_positions]
    logp = torch.log_softmax(logits.float(), -1)
    expected = float(logp.gather(-1, torch.tensor(enc.target_ids)[:, None]).sum().exp())
    assert target_probability(model, tok, fact) == pytest.approx(expected, rel=1e-5)
