"""The standard planner (Stage I): the prefix-cached run equals the whole-prompt run."""

from __future__ import annotations

import pytest
import torch
from tiny_models import MODEL_TYPES, tiny_model, tiny_tokenizer

from metake.hparams import MemitHparams
from metake.planners.prefix import PrefixCachedBatch
from metake.planners.standard import base_hidden, build_planner_batch, compute_targets
from metake.requests import parse_requests
from metake.tokens import length_groups

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


@pytest.mark.parametrize("model_type", MODEL_TYPES)
@pytest.mark.parametrize("prefix_cache", [True, False])
def test_starting_at_the_edit_layer_equals_the_full_forward(model_type, prefix_cache):
    """Replaying the cached residual stream below layer L changes nothing but the cost."""
    model, tok = tiny_model(model_type), tiny_tokenizer()
    hp = MemitHparams(layers=(1,), v_steps=4)  # the layer above keeps a gradient path
    full = compute_targets(model, tok, REQUESTS, hp, CONTEXTS, prefix_cache, skip_lower=False)
    skip = compute_targets(model, tok, REQUESTS, hp, CONTEXTS, prefix_cache, skip_lower=True)
    torch.testing.assert_close(skip.v_init, full.v_init, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(skip.v_target, full.v_target, rtol=1e-5, atol=1e-6)
    for module in model.modules():  # no patched forward left behind
        assert "forward" not in vars(module)


@pytest.mark.parametrize("max_groups", [1, 2, 5])
def test_length_groups_give_the_same_targets(max_groups):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    hp = MemitHparams(layers=(1,), v_steps=4)
    one = compute_targets(model, tok, REQUESTS, hp, CONTEXTS, max_groups=1)
    many = compute_targets(model, tok, REQUESTS, hp, CONTEXTS, max_groups=max_groups)
    torch.testing.assert_close(many.v_target, one.v_target, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("max_rows", [1, 2, 5])
@pytest.mark.parametrize("prefix_cache", [True, False])
def test_row_pieces_with_their_own_backward_give_the_same_targets(max_rows, prefix_cache):
    """Cutting the batch into pieces whose graphs are freed after each backward (the memory
    bound) accumulates the gradient of the whole batch: the targets of one joint group."""
    model, tok = tiny_model("llama"), tiny_tokenizer()
    hp = MemitHparams(layers=(1,), v_steps=6, v_lr=0.5)
    joint = compute_targets(model, tok, REQUESTS, hp, CONTEXTS, prefix_cache=prefix_cache,
                            max_groups=1, max_rows=100)  # fmt: skip
    pieces = compute_targets(model, tok, REQUESTS, hp, CONTEXTS, prefix_cache=prefix_cache,
                             max_rows=max_rows)  # fmt: skip
    assert not torch.equal(joint.v_target, joint.v_init)  # the targets moved
    torch.testing.assert_close(pieces.v_target, joint.v_target, rtol=1e-5, atol=1e-6)
    assert [h["active"] for h in pieces.history] == [h["active"] for h in joint.history]


@pytest.mark.parametrize("prefix_cache", [True, False])
def test_leaving_out_finished_requests_gives_the_same_targets_for_less_work(prefix_cache):
    """Requests that met the early stop drop out of later steps: same targets, history and
    final NLL as running every row to the end, fewer rows run."""
    model, tok = tiny_model("llama"), tiny_tokenizer()
    requests = REQUESTS + parse_requests([{"prompt": "{} works at", "subject": "Ola Nord",
                                           "target_new": "the mill"}])  # fmt: skip
    first = MemitHparams(layers=(1,), v_steps=1)  # each request's loss before any step
    start = sorted(compute_targets(model, tok, requests, first, CONTEXTS).final_nll)
    # a threshold that two requests meet at once and the others not (yet)
    hp = MemitHparams(layers=(1,), v_steps=12, v_lr=0.5, v_loss_threshold=sum(start[1:3]) / 2)
    every = compute_targets(model, tok, requests, hp, CONTEXTS, prefix_cache=prefix_cache,
                            drop_finished=False, max_rows=2)  # fmt: skip
    dropped = compute_targets(model, tok, requests, hp, CONTEXTS, prefix_cache=prefix_cache,
                              drop_finished=True, max_rows=2)  # fmt: skip
    actives = [h["active"] for h in every.history]
    assert actives[0] > actives[-1] > 0  # some requests finished early
    torch.testing.assert_close(dropped.v_target, every.v_target, rtol=1e-5, atol=1e-6)
    assert [h["active"] for h in dropped.history] == actives
    for a, b in zip(dropped.history, every.history, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert dropped.final_nll == pytest.approx(every.final_nll, rel=1e-5)
    assert dropped.rows_run < every.rows_run


def test_length_groups_cover_every_row_once_with_least_padding():
    lengths = [5, 3, 9, 9, 2, 14, 3]
    groups = length_groups(lengths, 3)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    area = sum(len(g) * max(lengths[i] for i in g) for g in groups)
    ordered = sorted(lengths)  # brute force over every cut of the sorted rows into 3 groups
    best = min(
        a * ordered[a - 1] + (b - a) * ordered[b - 1] + (len(ordered) - b) * ordered[-1]
        for a in range(1, len(ordered) - 1)
        for b in range(a + 1, len(ordered))
    )
    assert area == best == 3 * 3 + 3 * 9 + 14
    assert length_groups([4, 4, 4], 4) == [[0, 1, 2]]  # no gain from splitting equal rows


def test_prompt_batch_select_trims_and_renumbers():
    tok = tiny_tokenizer()
    batch = build_planner_batch(tok, REQUESTS, CONTEXTS, "{} is a").batch
    rows = torch.tensor([4, 1])
    sub = batch.select(rows)
    width = int(batch.attention_mask[rows].sum(1).max())
    assert sub.input_ids.shape == (2, width)
    assert torch.equal(sub.input_ids, batch.input_ids[rows, :width])
    for local, row in enumerate(rows.tolist()):
        mine = batch.target_ids[batch.target_rows == row]
        assert torch.equal(sub.target_ids[sub.target_rows == local], mine)


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "qwen2"])
def test_replayed_layers_release_their_prefix_cache_and_the_hidden_states_stay(model_type):
    """After entering at layer L the prefix keys/values of layers below L take no memory, and
    the suffix's hidden states are those of the untouched cache."""
    from metake.models.adapters import get_adapter
    from metake.planners.standard import enter_at_layer, row_groups

    model, tok = tiny_model(model_type), tiny_tokenizer()
    full = build_planner_batch(tok, REQUESTS, CONTEXTS, "{} is a").batch
    groups = row_groups(model, full, tok.pad_token_id, True, max_groups=2)
    assert all(g.prefix is not None for g in groups)
    with torch.no_grad():
        before = [g.forward() for g in groups]
    held = [g.prefix.cached_bytes() for g in groups]
    layers = model.config.num_hidden_layers
    enter_at_layer(model, get_adapter(model), groups, 1)
    with torch.no_grad():
        after = [g.forward() for g in groups]
    for group, old, new, bytes_before in zip(groups, before, after, held, strict=True):
        torch.testing.assert_close(new, old, rtol=1e-6, atol=1e-6)
        kept = group.prefix.cached_bytes()
        assert kept < bytes_before
        assert kept == pytest.approx(bytes_before * (layers - 1) / layers, rel=0.05)


def test_rows_of_equal_length_are_ordered_by_the_second_length():
    groups = length_groups([3, 3, 3, 5], max_groups=1, second=[9, 1, 5, 0])
    assert groups == [[1, 2, 0, 3]]
    assert length_groups([3, 3, 3, 5], max_groups=1) == [[0, 1, 2, 3]]
