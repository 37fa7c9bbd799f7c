"""Causal tracing (ROME's "locate" step): which layers' MLPs carry a fact at the subject.

For each known fact (prompt, subject, answer the model currently gives):

* **clean run**: the filled prompt, encoded as :func:`metake.tokens.encode_request` does without a
  target; ``p_clean`` is P(first answer token) at the last prompt position;
* **corrupted run**: Gaussian noise (std ``noise_scale`` x the std of the input embeddings over
  the vocabulary, ROME's 3 x std) is added to the input embeddings of every subject token;
  ``p_corrupt`` is the mean over ``samples`` noise draws;
* **restored run** for layer ``l``: the corrupted run with the MLP contribution of the layers in
  a window around ``l`` set, at the subject's last token, to its clean value; the indirect effect
  is ``IE(l) = p_restored(l) - p_corrupt``.

Every noise draw is shared by the corrupted run and all restored runs of a fact (as in ROME,
whose noise generator is re-seeded for every run), and all (configuration, draw) rows of a fact
go through the model in as few batched forwards as ``max_batch_rows`` allows.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from metake.errors import InvalidRequestError, MetakeError
from metake.models.adapters import ArchAdapter, get_adapter
from metake.requests import PLACEHOLDER, EditRequest
from metake.tokens import (
    encode_request,
    first_token_of_span,
    special_prefix,
    target_token_ids,
)
from metake.trace import _replace_main_tensor, capture, main_tensor

log = logging.getLogger(__name__)


@dataclass
class TraceResult:
    """Causal-tracing results for ``F`` facts over ``L`` layers (float64 CPU tensors).

    ``p_clean``, ``p_corrupt``: ``[F]``; ``p_restored``, ``ie``: ``[F, L]``; ``subject_spans``:
    ``(first, last)`` token positions of each subject; ``answer_ids``: the traced token of each.
    """

    p_clean: torch.Tensor
    p_corrupt: torch.Tensor
    p_restored: torch.Tensor
    ie: torch.Tensor
    answer_ids: list[int]
    subject_spans: list[tuple[int, int]]
    restored_module: str  # path inside a decoder layer, e.g. "mlp.c_proj"
    noise_std: float  # absolute std of the noise: noise_scale x embedding std
    noise_scale: float
    samples: int
    window: int
    seed: int

    @property
    def num_layers(self) -> int:
        """Number of decoder layers ``L`` traced."""
        return int(self.ie.shape[1])

    @property
    def mean_ie(self) -> torch.Tensor:
        """Indirect effect averaged over facts, ``[L]``."""
        return self.ie.mean(0)

    @property
    def peak_layer(self) -> int:
        """The layer with the largest mean indirect effect (argmax of ``mean_ie``)."""
        return int(self.mean_ie.argmax())

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict: every tensor as (nested) lists of floats."""
        return {
            "p_clean": self.p_clean.tolist(),
            "p_corrupt": self.p_corrupt.tolist(),
            "p_restored": self.p_restored.tolist(),
            "ie": self.ie.tolist(),
            "mean_ie": self.mean_ie.tolist(),
            "peak_layer": self.peak_layer,
            "num_layers": self.num_layers,
            "answer_ids": list(self.answer_ids),
            "subject_spans": [list(s) for s in self.subject_spans],
            "restored_module": self.restored_module,
            "noise_std": self.noise_std,
            "noise_scale": self.noise_scale,
            "samples": self.samples,
            "window": self.window,
            "seed": self.seed,
        }


@dataclass(frozen=True)
class _Fact:
    input_ids: list[int]  # [S], special prefix included
    first: int  # position of the subject's first token
    last: int  # position of the subject's last token
    answer_id: int


def window_layers(layer: int, window: int, num_layers: int) -> list[int]:
    """Layers restored for ``layer``: ROME's ``range(l - w // 2, l - (-w // 2))`` clipped to
    ``0..num_layers - 1`` (``w = 1``: just ``l``; ``w = 10``: ``l - 5 .. l + 4``)."""
    return list(range(max(0, layer - window // 2), min(num_layers, layer - (-window // 2))))


def restored_module_path(adapter: ArchAdapter) -> str:
    """Path, inside a decoder layer, of the module whose output causal tracing restores.

    The post-MLP norm where the adapter has one (Gemma3's ``post_feedforward_layernorm``), else
    the MLP's output projection: in both cases the tensor added to the residual stream (dropout
    after the projection is the identity in eval mode). Restoring the projection's output at a
    position would restore the norm's output there just as well (the norm acts per position);
    the norm's output is chosen because it is literally the MLP's contribution.
    """
    return adapter.mlp_out_norm_path or adapter.mlp_out_path


def embedding_std(model: nn.Module, chunk: int = 8192) -> float:
    """Std of the input-embedding module's outputs over the whole vocabulary (all ``V x d``
    entries; Gemma's ``sqrt(d)`` scaling included since the module's output is measured)."""
    embed = model.get_input_embeddings()
    if embed is None:
        raise MetakeError(f"{type(model).__name__} has no input embeddings")
    device = embed.weight.device
    vocab = embed.weight.shape[0]
    total = sq = 0.0
    count = 0
    with torch.no_grad():
        for start in range(0, vocab, chunk):
            ids = torch.arange(start, min(vocab, start + chunk), device=device)
            out = embed(ids).double()  # [n, d]
            total += float(out.sum())
            sq += float(out.pow(2).sum())
            count += out.numel()
    mean = total / count
    return max(sq - count * mean * mean, 0.0) ** 0.5 / max(count - 1, 1) ** 0.5


def _encode_fact(
    tokenizer: PreTrainedTokenizerBase, request: EditRequest, answer: str, index: int
) -> _Fact:
    where = f"fact #{index}"
    if not isinstance(request, EditRequest):
        raise InvalidRequestError(f"{where}: expected an EditRequest, got {type(request).__name__}")
    if PLACEHOLDER not in request.prompt:
        raise InvalidRequestError(
            f"{where}: prompt {request.prompt!r} has no '{{}}' placeholder, so the subject "
            f"{request.subject!r} is not found in it"
        )
    if not request.subject.strip():
        raise InvalidRequestError(f"{where}: the subject is empty")
    if not answer or not answer.strip():
        raise InvalidRequestError(f"{where}: the answer to trace is empty")
    try:
        enc = encode_request(tokenizer, request, with_target=False)
        before, after = request.prompt.split(PLACEHOLDER, 1)
        text = before + request.subject + after
        answer_id = target_token_ids(tokenizer, text, answer)[0]
    except InvalidRequestError as exc:
        raise InvalidRequestError(f"{where}: {exc}") from exc
    first = len(special_prefix(tokenizer)) + first_token_of_span(
        tokenizer, text, len(before), len(before) + len(request.subject)
    )
    if not 0 <= first <= enc.subject_last:
        raise InvalidRequestError(f"{where}: cannot locate subject {request.subject!r} in {text!r}")
    return _Fact(list(enc.input_ids), first, enc.subject_last, int(answer_id))


class _Patch:
    """Per-batch state the hooks read: noise rows and, per layer, the rows to restore."""

    def __init__(self) -> None:
        self.first = self.last = 0
        self.noise: torch.Tensor | None = None  # [R, n_subject, d]
        self.clean: torch.Tensor | None = None  # [L, d], clean MLP outputs at subject_last
        self.restore_rows: dict[int, torch.Tensor] = {}  # layer -> row indices [r]


@contextmanager
def _patch_hooks(model: nn.Module, modules: Sequence[nn.Module], state: _Patch) -> Iterator[None]:
    """Hooks: noise on the subject's input embeddings; clean MLP outputs at ``state.last``."""

    def noise_hook(_module, _args, output):
        if state.noise is None:
            return None
        hidden = main_tensor(output).clone()
        hidden[:, state.first : state.last + 1] += state.noise.to(hidden.dtype)
        return _replace_main_tensor(output, hidden)

    def make_restore_hook(layer: int):
        def hook(_module, _args, output):
            rows = state.restore_rows.get(layer)
            if rows is None:
                return None
            hidden = main_tensor(output).clone()
            hidden[rows, state.last] = state.clean[layer].to(hidden.dtype)
            return _replace_main_tensor(output, hidden)

        return hook

    handles = []
    try:
        embed = model.get_input_embeddings()
        handles.append(embed.register_forward_hook(noise_hook))
        for layer, module in enumerate(modules):
            handles.append(module.register_forward_hook(make_restore_hook(layer)))
        yield
    finally:
        for h in handles:
            h.remove()


def _answer_probs(
    model: nn.Module, adapter: ArchAdapter, ids: torch.Tensor, answer_id: int, extra: list[str]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """P(answer) ``[R]`` at the last position of ``ids`` (``[R, S]``), and outputs of ``extra``.

    The forward stops after the final norm; the logits of the last position only are formed.
    """
    final = adapter.final_norm_path
    with capture(model, [*extra, final], inputs=False, stop_after=final) as trace:
        model(input_ids=ids)
    logits = adapter.logits(model, trace.outputs[final][:, -1]).float()  # [R, V]
    return torch.softmax(logits, -1)[:, answer_id], trace.outputs


@torch.no_grad()
def causal_trace(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    facts: Sequence[EditRequest],
    *,
    noise_scale: float = 3.0,
    samples: int = 10,
    window: int = 1,
    seed: int = 0,
    progress: bool = False,
    answer: Literal["target_new", "target_true"] = "target_new",
    max_batch_rows: int = 256,
) -> TraceResult:
    """Causal tracing of MLP outputs at the subject's last token: IE ``[F, L]`` for ``F`` facts.

    ``facts``: requests whose ``answer`` field (``target_new`` by default, or ``target_true``
    for CounterFact-style records) is what the model currently answers; its first token is the
    one whose probability is measured. Noise: for each fact in order, one draw
    ``torch.randn(samples, n_subject_tokens, d, generator=g)`` (float32, CPU) from
    ``g = torch.Generator().manual_seed(seed)``, times ``noise_scale * embedding_std(model)``,
    added to the input-embedding module's output at the subject's tokens. The restored module
    is :func:`restored_module_path` (the tensor each layer's MLP adds to the residual stream),
    for the layers :func:`window_layers` gives. ``max_batch_rows`` caps the rows of a forward
    (all ``(1 + L) x samples`` rows of a fact are run in chunks of at most that many).
    """
    if not facts:
        raise InvalidRequestError("causal_trace needs at least one fact, got none")
    if not noise_scale > 0:
        raise MetakeError(f"noise_scale must be > 0, got {noise_scale}")
    if samples < 1:
        raise MetakeError(f"samples must be >= 1, got {samples}")
    if window < 1:
        raise MetakeError(f"window must be >= 1, got {window}")
    if max_batch_rows < 1:
        raise MetakeError(f"max_batch_rows must be >= 1, got {max_batch_rows}")
    if answer not in ("target_new", "target_true"):
        raise MetakeError(f"answer must be 'target_new' or 'target_true', got {answer!r}")
    if model.training:
        log.warning("causal_trace: the model is in training mode (dropout makes runs noisy)")

    encoded = []
    for i, fact in enumerate(facts):
        text = getattr(fact, answer, None)
        if text is None:
            raise InvalidRequestError(f"fact #{i}: {answer} is not set; it is the answer traced")
        encoded.append(_encode_fact(tokenizer, fact, text, i))

    adapter = get_adapter(model)
    num_layers = adapter.num_layers(model)
    path = restored_module_path(adapter)
    names = [f"{adapter.layer_name(layer)}.{path}" for layer in range(num_layers)]
    modules = [model.get_submodule(name) for name in names]
    device = model.get_input_embeddings().weight.device
    std = noise_scale * embedding_std(model)
    generator = torch.Generator().manual_seed(seed)

    # configuration 0: corrupted only; configuration 1 + l: restore window_layers(l)
    configs = [[]] + [window_layers(layer, window, num_layers) for layer in range(num_layers)]
    p_clean = torch.zeros(len(facts), dtype=torch.float64)
    p_corrupt = torch.zeros(len(facts), dtype=torch.float64)
    p_restored = torch.zeros(len(facts), num_layers, dtype=torch.float64)
    state = _Patch()
    bar = tqdm(encoded, desc="causal trace", unit="fact", disable=not progress)
    with _patch_hooks(model, modules, state):
        for f, fact in enumerate(bar):
            ids = torch.tensor([fact.input_ids], device=device)  # [1, S]
            state.noise, state.restore_rows = None, {}
            probs, outs = _answer_probs(model, adapter, ids, fact.answer_id, names)
            p_clean[f] = float(probs[0])
            state.clean = torch.stack([outs[name][0, fact.last] for name in names])  # [L, d]
            state.first, state.last = fact.first, fact.last
            width = state.clean.shape[-1]
            n_subject = fact.last - fact.first + 1
            noise = torch.randn(samples, n_subject, width, generator=generator) * std
            noise = noise.to(device)  # [samples, n_subject, d]

            sums = torch.zeros(len(configs), dtype=torch.float64)
            total = len(configs) * samples
            for start in range(0, total, max_batch_rows):
                rows = torch.arange(start, min(total, start + max_batch_rows))
                config_of, sample_of = rows // samples, rows % samples  # [R]
                state.noise = noise[sample_of.to(device)]
                state.restore_rows = {}
                for layer in range(num_layers):
                    hit = [r for r, c in enumerate(config_of.tolist()) if layer in configs[c]]
                    if hit:
                        state.restore_rows[layer] = torch.tensor(hit, device=device)
                batch = ids.expand(len(rows), -1)
                probs, _ = _answer_probs(model, adapter, batch, fact.answer_id, [])
                sums.index_add_(0, config_of, probs.double().cpu())
            means = sums / samples
            p_corrupt[f] = means[0]
            p_restored[f] = means[1:]
            log.debug("fact #%d: p_clean %.4g, p_corrupt %.4g", f, p_clean[f], p_corrupt[f])
    state.noise, state.clean = None, None

    result = TraceResult(
        p_clean=p_clean,
        p_corrupt=p_corrupt,
        p_restored=p_restored,
        ie=p_restored - p_corrupt[:, None],
        answer_ids=[fact.answer_id for fact in encoded],
        subject_spans=[(fact.first, fact.last) for fact in encoded],
        restored_module=path,
        noise_std=std,
        noise_scale=float(noise_scale),
        samples=samples,
        window=window,
        seed=seed,
    )
    log.info(
        "causal trace of %d fact(s): peak mean indirect effect %.4g at layer %d",
        len(facts),
        float(result.mean_ie.max()),
        result.peak_layer,
    )
    return result
