"""The standard planner (Stage I): the prefix-cached run equals the whole-prompt run."""

from __future__ import annotations

import pytest
import torch
from tiny_models import MODEL_TYPES, tiny_model, tiny_tokenizer

from metake.hparams import MemitHparams
from metake.planners.prefix import PrefixCachedBatch
from metake.planners.standard import base_hidden, build_planner_batch, compute_targets
from metake.requests import parse_requests

REQUESTS = parse_requests(
    [
        {"prompt": "{} lives in", "subject": "Anna Berg", "target_new": "Oslo"},
        {"prompt": "The home of {} is", "subject": "Carl Dunn", "target_new": "Lima Peru"},
        {"prompt": "{} is here", "subject": "Anna", "target_new": "now"},
    ]
)
CONTEXTS = ["", "Some words here. ", "X. "]


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_prefix_cached_stage_one_equals_whole_prompts(model_type):
    model, tok = tiny_model(model_type), tiny_tokenizer()
    hp = MemitHparams(layers=(1,), v_steps=5)
    whole = compute_targets(model, tok, REQUESTS, hp, CONTEXTS, prefix_cache=False)
    cached = compute_targets(model, tok, REQUESTS, hp, CONTEXTS, prefix_cache=True)
    torch.testing.assert_close(cached.v_init, whole.v_init, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cached.v_target, whole.v_target, rtol=1e-4, atol=1e-5)
    assert cached.steps_run == whole.steps_run
    for a, b in zip(cached.history, whole.history, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "qwen2"])
def test_suffix_hidden_states_match_the_whole_prompts(model_type):
    """Suffix rows of the split batch reproduce the right-padded batch's states at those tokens."""
    model, tok = tiny_model(model_type), tiny_tokenizer()
    batch = build_planner_batch(tok, REQUESTS, CONTEXTS, "{} is a").batch
    split = PrefixCachedBatch(model, batch, tok.pad_token_id)
    with torch.no_grad():
        whole = base_hidden(model, batch)
        part = split.hidden()
    for row in range(batch.input_ids.shape[0]):
        start, end = int(batch.subject_last[row]), int(batch.attention_mask[row].sum())
        torch.testing.assert_close(part[row, : end - start], whole[row, start:end],
                                   rtol=1e-5, atol=1e-5)  # fmt: skip
    suffix = split.suffix
    at_targets = suffix.input_ids[suffix.target_rows, suffix.target_positions]
    assert torch.equal(batch.input_ids[batch.target_rows, batch.target_positions], at_targets)


def test_sliding_window_shorter_than_the_prompts_runs_whole_prompts():
    model = tiny_model("gemma3_text")  # its tiny sliding window is 4 tokens
    batch = build_planner_batch(tiny_tokenizer(), REQUESTS, CONTEXTS, "{} is a").batch
    assert not PrefixCachedBatch.supports(model, batch)
    assert PrefixCachedBatch.supports(tiny_model("llama"), batch)
