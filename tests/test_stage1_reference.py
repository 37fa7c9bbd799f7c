"""Stage I (``compute_targets``) against an independent, hand-written MEMIT loss and Adam loop.

The reference here shares no code with the planner: prompts are encoded character by character
(the tiny tokenizer is char-level), each prompt runs alone through the plain model with its own
forward hook on decoder layer ``L``, and every term of the loss is written out:

    loss_i = mean_c [ mean_t -log p(target_t | context_c + prompt_i + target_<t) ]
           + kl_factor * sum_x p_edit(x) (log p_edit(x) - log p_orig(x))   (at the subject's last
             token of "{subject} is a")
           + v_weight_decay * ||delta_i|| / ||v_init_i||^2

Each request is optimised on its own with ``torch.optim.Adam(lr=v_lr)`` for ``v_steps - 1``
updates (``v_steps`` loss evaluations), and the planner must reproduce the trajectory, the
targets and the logged history. Wrong variants of each term (flipped KL, squared decay, summed
NLL, KL at the prompt's last token) are shown to give values the planner's log does not match.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import pytest
import torch
from tiny_models import tiny_model, tiny_tokenizer
from tokenizers.processors import TemplateProcessing
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook
from transformers import PreTrainedTokenizerFast

from metake.hparams import MemitHparams
from metake.planners.standard import compute_targets
from metake.requests import EditRequest, parse_requests
from metake.tokens import encode_request

LAYER = 1
LAYER_PATHS = {"llama": "model.layers", "gpt2": "transformer.h"}
FINAL_NORMS = {"llama": "model.norm", "gpt2": "transformer.ln_f"}
# The random tiny models predict nearly uniform distributions, where KL(p||q) and KL(q||p) agree
# to third order; scaling the final norm sharpens them so that the wrong variants stand apart.
SHARPEN = 6.0
BOS_ID = 2  # the tiny tokenizer's "[EOS]", used as the document start of the BOS variant
REQUESTS = parse_requests(
    [
        {"prompt": "{} lives in", "subject": "Anna Berg", "target_new": "Oslo town"},
        {"prompt": "The home of {} is", "subject": "Carl Dunn", "target_new": "Lima Peru"},
    ]
)
CONTEXTS = ["", "Some context. "]
HPARAMS = MemitHparams(
    layers=(0, LAYER),
    v_lr=0.5,
    v_steps=3,
    v_loss_threshold=0.0,  # no early stop
    clamp_norm_factor=1e6,  # no clamping
    kl_factor=0.5,
    v_weight_decay=0.3,
)
TOLERANCE = {torch.float64: dict(rtol=1e-9, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=1e-5)}
TERMS = ("nll", "kl", "weight_decay", "loss")

# (model type, tokenizer with a BOS, dtype, planner options)
CASES = [
    ("llama", True, torch.float64, {}),
    ("gpt2", False, torch.float64, {}),
    ("llama", True, torch.float32, {}),
    ("gpt2", False, torch.float32, {}),
    ("llama", False, torch.float64, dict(prefix_cache=False, skip_lower=False, max_groups=1)),
]
CASE_IDS = ["llama-bos-f64", "gpt2-f64", "llama-bos-f32", "gpt2-f32", "llama-whole-f64"]


def make_tokenizer(bos: bool) -> PreTrainedTokenizerFast:
    """The char-level tiny tokenizer, optionally prepending a BOS token like Llama's."""
    tok = tiny_tokenizer()
    if bos:
        tok.backend_tokenizer.post_processor = TemplateProcessing(
            single="[EOS] $A", special_tokens=[("[EOS]", BOS_ID)]
        )
    return tok


def make_model(model_type: str, dtype: torch.dtype) -> nn.Module:
    """A tiny random model of ``model_type`` in ``dtype``, its final norm scaled by SHARPEN."""
    model = tiny_model(model_type).to(dtype)
    with torch.no_grad():
        for p in model.get_submodule(FINAL_NORMS[model_type]).parameters():
            p.mul_(SHARPEN)
    return model


def char_ids(tok: PreTrainedTokenizerFast, text: str) -> list[int]:
    """Token ids of ``text`` for the char-level tokenizer: one token per character."""
    ids = tok.convert_tokens_to_ids(list(text))
    assert tok.unk_token_id not in ids
    return ids


@dataclass
class HandPrompt:
    """One prompt encoded by hand: its ids, the subject's last token and the target tokens."""

    ids: list[int]
    subject_last: int
    target_ids: list[int]
    first_target_pos: int  # the logits here predict target_ids[0]


def hand_prompt(
    tok: PreTrainedTokenizerFast,
    bos: bool,
    request: EditRequest,
    context: str = "",
    template: str | None = None,
    with_target: bool = True,
) -> HandPrompt:
    """``[BOS] + context + filled prompt + " " + target`` (minus the target's last token)."""
    before, after = (template or request.prompt).split("{}")
    start = [BOS_ID] if bos else []
    text = context + before + request.subject + after
    subject_last = len(start) + len(context + before + request.subject) - 1
    target = char_ids(tok, " " + request.target_new) if with_target else []
    ids = start + char_ids(tok, text) + target[:-1]
    return HandPrompt(ids, subject_last, target, len(start) + len(text) - 1)


def decoder_layer(model: nn.Module, model_type: str) -> nn.Module:
    """Decoder layer ``LAYER`` of the model, found by its module path."""
    return model.get_submodule(LAYER_PATHS[model_type])[LAYER]


@contextmanager
def add_delta(layer: nn.Module, position: int, delta: torch.Tensor | None) -> Iterator[None]:
    """Add ``delta`` to the layer's output at ``position`` of the (single) sequence."""

    def hook(_module, _args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        onehot = torch.zeros(hidden.shape[1], 1, dtype=hidden.dtype)
        onehot[position] = 1
        patched = hidden + onehot * delta.to(hidden.dtype)
        return (patched, *output[1:]) if isinstance(output, tuple) else patched

    handle = layer.register_forward_hook(hook) if delta is not None else None
    try:
        yield
    finally:
        if handle is not None:
            handle.remove()


def log_probs(
    model: nn.Module, layer: nn.Module, prompt: HandPrompt, delta: torch.Tensor | None
) -> torch.Tensor:
    """Next-token log-probabilities ``[S, V]`` of one prompt, ``delta`` added at its subject."""
    with add_delta(layer, prompt.subject_last, delta):
        logits = model(input_ids=torch.tensor([prompt.ids])).logits[0]
    return torch.log_softmax(logits, dim=-1)


class HandLoss:
    """MEMIT's Stage I loss of one request, and wrong variants of each term, written out."""

    def __init__(self, model, model_type, tok, bos, request, contexts, hp):
        self.model, self.hp = model, hp
        self.layer = decoder_layer(model, model_type)
        self.prompts = [hand_prompt(tok, bos, request, c) for c in contexts]
        self.kl_prompt = hand_prompt(tok, bos, request, template=hp.kl_prompt, with_target=False)
        bare = hand_prompt(tok, bos, request, with_target=False)
        seen = []
        handle = self.layer.register_forward_hook(
            lambda _m, _a, out: seen.append(out[0] if isinstance(out, tuple) else out)
        )
        with torch.no_grad():
            model(input_ids=torch.tensor([bare.ids]))
            self.kl_orig = log_probs(model, self.layer, self.kl_prompt, None)
        handle.remove()
        self.v_init = seen[0][0, bare.subject_last].clone()

    def terms(self, delta: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every term (and wrong variant) at ``delta``; ``loss`` is MEMIT's."""
        nll_mean, nll_sum = [], []
        for p in self.prompts:
            logp = log_probs(self.model, self.layer, p, delta)
            rows = torch.arange(len(p.target_ids)) + p.first_target_pos
            token_nll = -logp[rows, torch.tensor(p.target_ids)]
            nll_mean.append(token_nll.mean())
            nll_sum.append(token_nll.sum())
        kl_logp = log_probs(self.model, self.layer, self.kl_prompt, delta)
        edit, orig = kl_logp[self.kl_prompt.subject_last], self.kl_orig[self.kl_prompt.subject_last]
        at_end, orig_end = kl_logp[-1], self.kl_orig[-1]
        norm2 = self.v_init.norm() ** 2
        t = {
            "nll": torch.stack(nll_mean).mean(),
            "kl": (edit.exp() * (edit - orig)).sum(),
            "weight_decay": self.hp.v_weight_decay * delta.norm() / norm2,
            # wrong variants
            "nll_summed": torch.stack(nll_sum).mean(),
            "kl_flipped": (orig.exp() * (orig - edit)).sum(),
            "kl_at_prompt_end": (at_end.exp() * (at_end - orig_end)).sum(),
            "decay_squared": self.hp.v_weight_decay * delta.norm() ** 2 / norm2,
            "decay_over_norm": self.hp.v_weight_decay * delta.norm() / norm2.sqrt(),
        }
        t["loss"] = t["nll"] + self.hp.kl_factor * t["kl"] + t["weight_decay"]
        return t


@dataclass
class Trajectory:
    """A request's hand-optimised delta, and its terms at every evaluated delta."""

    delta: torch.Tensor
    evaluated: list[dict[str, float]]
    updates: int


def hand_trajectory(ref: HandLoss, hp: MemitHparams) -> Trajectory:
    """Adam on the hand loss alone: evaluate, stop if below threshold or last step, else update."""
    delta = torch.zeros_like(ref.v_init, requires_grad=True)
    optimizer = torch.optim.Adam([delta], lr=hp.v_lr)
    evaluated, updates = [], 0
    for step in range(hp.v_steps):
        terms = ref.terms(delta)
        evaluated.append({k: v.item() for k, v in terms.items()})
        if terms["loss"].item() < hp.v_loss_threshold or step == hp.v_steps - 1:
            break
        optimizer.zero_grad()
        terms["loss"].backward()
        optimizer.step()
        updates += 1
    return Trajectory(delta.detach().clone(), evaluated, updates)


@contextmanager
def count_optimizer_steps() -> Iterator[list[int]]:
    """Count every ``torch.optim`` optimizer step taken inside the block."""
    calls: list[int] = []
    handle = register_optimizer_step_post_hook(lambda *_: calls.append(1))
    try:
        yield calls
    finally:
        handle.remove()


def setup(model_type: str, bos: bool, dtype: torch.dtype, hp: MemitHparams = HPARAMS):
    """Model, tokenizer and one hand loss per request."""
    model, tok = make_model(model_type, dtype), make_tokenizer(bos)
    refs = [HandLoss(model, model_type, tok, bos, r, CONTEXTS, hp) for r in REQUESTS]
    return model, tok, refs


def mean_over_requests(trajectories: list[Trajectory], step: int, key: str) -> float:
    """The mean of one term over requests at an evaluated step (a stopped request keeps its
    last evaluated value)."""
    values = [t.evaluated[min(step, len(t.evaluated) - 1)][key] for t in trajectories]
    return sum(values) / len(values)


@pytest.mark.parametrize("bos", [False, True])
@pytest.mark.parametrize("request_index", [0, 1])
def test_hand_encoding_equals_encode_request(bos, request_index):
    """Char-by-char ids, subject position and target tokens equal encode_request's."""
    tok, request = make_tokenizer(bos), REQUESTS[request_index]
    for context in CONTEXTS:
        hand = hand_prompt(tok, bos, request, context)
        enc = encode_request(tok, request, context)
        assert enc.input_ids == hand.ids
        assert enc.subject_last == hand.subject_last
        assert enc.target_ids == hand.target_ids
        assert len(hand.target_ids) > 2  # multi-token targets, with the leading space
        assert enc.target_positions == [
            hand.first_target_pos + k for k in range(len(enc.target_ids))
        ]
    kl = hand_prompt(tok, bos, request, template="{} is a", with_target=False)
    enc = encode_request(tok, request, with_target=False, prompt_template="{} is a")
    assert (enc.input_ids, enc.subject_last, enc.target_ids) == (kl.ids, kl.subject_last, [])


@pytest.mark.parametrize(("model_type", "bos", "dtype", "options"), CASES, ids=CASE_IDS)
def test_planner_follows_the_hand_written_adam_trajectory(model_type, bos, dtype, options):
    """v_init, the final delta, the logged terms and the step counts match the hand reference."""
    model, tok, refs = setup(model_type, bos, dtype)
    tol = TOLERANCE[dtype]
    trajectories = [hand_trajectory(ref, HPARAMS) for ref in refs]
    with count_optimizer_steps() as calls:
        plan = compute_targets(model, tok, REQUESTS, HPARAMS, CONTEXTS, **options)

    # (a) v_init: layer L's output at the subject's last token of the bare prompt
    torch.testing.assert_close(plan.v_init, torch.stack([r.v_init for r in refs]), **tol)
    # (b) the target moved by the hand delta after v_steps - 1 Adam updates
    hand_delta = torch.stack([t.delta for t in trajectories])
    assert hand_delta.norm(dim=-1).min() > 0.1
    torch.testing.assert_close(plan.v_target - plan.v_init, hand_delta, **tol)
    # (c) the log: means over requests of each term, at every evaluated delta
    assert len(plan.history) == HPARAMS.v_steps
    for step, entry in enumerate(plan.history):
        assert entry["step"] == step
        assert entry["active"] == len(REQUESTS)
        for key in TERMS:
            expected = mean_over_requests(trajectories, step, key)
            assert entry[key] == pytest.approx(expected, rel=tol["rtol"], abs=tol["atol"]), key
    assert plan.final_nll == pytest.approx(
        [t.evaluated[-1]["nll"] for t in trajectories], rel=tol["rtol"], abs=tol["atol"]
    )
    # every term matters in the evaluated losses (non-zero after the first update)
    for key in ("nll", "kl", "weight_decay"):
        assert plan.history[-1][key] > 1e-3, key
    # (d) MEMIT's count: v_steps evaluations, v_steps - 1 updates
    assert plan.steps_run == HPARAMS.v_steps - 1
    assert len(calls) == HPARAMS.v_steps - 1
    assert all(t.updates == HPARAMS.v_steps - 1 for t in trajectories)
    assert all(len(t.evaluated) == HPARAMS.v_steps for t in trajectories)


@pytest.mark.parametrize("v_steps", [1, 2, 4])
def test_evaluation_and_update_counts(v_steps):
    """v_steps loss evaluations and v_steps - 1 Adam updates; one step leaves v_init unchanged."""
    hp = replace(HPARAMS, v_steps=v_steps)
    model, tok, refs = setup("llama", True, torch.float64, hp)
    trajectories = [hand_trajectory(ref, hp) for ref in refs]
    with count_optimizer_steps() as calls:
        plan = compute_targets(model, tok, REQUESTS, hp, CONTEXTS)
    assert len(plan.history) == v_steps
    assert plan.steps_run == v_steps - 1
    assert len(calls) == v_steps - 1
    hand_delta = torch.stack([t.delta for t in trajectories])
    torch.testing.assert_close(plan.v_target - plan.v_init, hand_delta, **TOLERANCE[torch.float64])
    if v_steps == 1:
        assert torch.equal(plan.v_target, plan.v_init)


# (term in the planner's log, wrong variant of the hand reference)
WRONG_VARIANTS = [
    ("kl", "kl_flipped"),
    ("kl", "kl_at_prompt_end"),
    ("weight_decay", "decay_squared"),
    ("weight_decay", "decay_over_norm"),
    ("nll", "nll_summed"),
]


@pytest.mark.parametrize(("model_type", "bos", "dtype", "options"), CASES[:4], ids=CASE_IDS[:4])
def test_wrong_variants_are_told_apart(model_type, bos, dtype, options):
    """Wrong variants (flipped KL, squared decay, ...) miss the planner's log by > 10x tol."""
    model, tok, refs = setup(model_type, bos, dtype)
    tol = TOLERANCE[dtype]
    trajectories = [hand_trajectory(ref, HPARAMS) for ref in refs]
    plan = compute_targets(model, tok, REQUESTS, HPARAMS, CONTEXTS, **options)
    for step in range(1, HPARAMS.v_steps):  # delta is zero at step 0: every KL/decay is 0 there
        entry = plan.history[step]
        for key, wrong in WRONG_VARIANTS:
            right = mean_over_requests(trajectories, step, key)
            other = mean_over_requests(trajectories, step, wrong)
            allowed = tol["atol"] + tol["rtol"] * abs(entry[key])
            assert abs(entry[key] - right) <= allowed, key
            assert abs(entry[key] - other) > 10 * allowed, (step, wrong, entry[key], other)
            # and the wrong term would change the reported loss as well
            factor = HPARAMS.kl_factor if key == "kl" else 1.0
            wrong_loss = entry["loss"] + factor * (other - right)
            loss_allowed = tol["atol"] + tol["rtol"] * abs(entry["loss"])
            assert abs(wrong_loss - entry["loss"]) > 10 * loss_allowed, (step, wrong)


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_early_stop_keeps_a_finished_request_at_zero(model_type):
    """A request whose first loss is below v_loss_threshold keeps delta 0; the other goes on."""
    model, tok, refs = setup(model_type, model_type == "llama", torch.float64)
    with torch.no_grad():
        first = [ref.terms(torch.zeros_like(ref.v_init))["loss"].item() for ref in refs]
    assert abs(first[0] - first[1]) > 1e-3
    stopped, going = (0, 1) if first[0] < first[1] else (1, 0)
    hp = replace(HPARAMS, v_loss_threshold=(first[0] + first[1]) / 2)
    trajectories = [hand_trajectory(ref, hp) for ref in refs]
    assert trajectories[stopped].updates == 0 and trajectories[going].updates >= 1
    plan = compute_targets(model, tok, REQUESTS, hp, CONTEXTS)
    tol = TOLERANCE[torch.float64]

    assert torch.equal(plan.v_target[stopped], plan.v_init[stopped])
    assert not torch.allclose(plan.v_target[going], plan.v_init[going])
    torch.testing.assert_close(
        plan.v_target - plan.v_init, torch.stack([t.delta for t in trajectories]), **tol
    )
    assert plan.history[0]["active"] == 2
    assert all(entry["active"] == 1 for entry in plan.history[1:])
    for step, entry in enumerate(plan.history):
        expected = mean_over_requests(trajectories, step, "loss")
        assert entry["loss"] == pytest.approx(expected, rel=tol["rtol"], abs=tol["atol"])


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_request_stopping_after_an_update_keeps_its_delta(model_type):
    """A request that stops after one update keeps that delta while Adam goes on for the other."""
    free = replace(HPARAMS, v_steps=4, kl_factor=0.0, v_weight_decay=0.0)  # loss = NLL: it falls
    model, tok, refs = setup(model_type, model_type == "llama", torch.float64, free)
    losses = [[e["loss"] for e in hand_trajectory(ref, free).evaluated] for ref in refs]
    first, second = sorted(range(len(refs)), key=lambda i: losses[i][0])
    threshold = (losses[first][0] + losses[first][1]) / 2
    assert losses[first][1] < threshold <= losses[first][0] and min(losses[second]) >= threshold
    hp = replace(free, v_loss_threshold=threshold)
    trajectories = [hand_trajectory(ref, hp) for ref in refs]
    assert [trajectories[first].updates, trajectories[second].updates] == [1, 3]
    plan = compute_targets(model, tok, REQUESTS, hp, CONTEXTS)

    assert [entry["active"] for entry in plan.history] == [2, 2, 1, 1]
    assert trajectories[first].delta.norm() > 0.1
    torch.testing.assert_close(
        plan.v_target - plan.v_init,
        torch.stack([t.delta for t in trajectories]),
        **TOLERANCE[torch.float64],
    )
