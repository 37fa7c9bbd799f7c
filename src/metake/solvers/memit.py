"""Stage II, MEMIT: spread each target's residual over the edit layers with a closed-form solve.

For edit layers ``l_1 < ... < l_m`` (the last one, ``L``, holds the targets ``v*``), in order:

1. with the current weights, compute the keys ``K`` (``[n, d_in]``: input of the MLP output
   projection at the subject's last token, averaged over the context prefixes) and the current
   values ``z`` of layer ``L`` (``[n, d]``) at the subject's last token of the plain prompt;
2. residual ``R = (v* - z) / (number of layers still to edit)``, read as a change of the
   layer's projection output (the same, except where a norm follows the MLP, as in Gemma3: see
   :meth:`metake.models.adapters.ArchAdapter.residual_to_projection`);
3. ``Delta = R^T K (lambda C0 + K^T K)^-1`` in float64 (``[d_out, d_in]``), the minimiser of
   ``||Delta K^T - R^T||^2 + lambda tr(Delta C0 Delta^T)``;
4. add ``Delta`` to the layer's weight before moving to the next layer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import nn
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from metake.models.adapters import get_adapter, input_device
from metake.requests import EditRequest
from metake.solvers.base import Solver
from metake.tokens import EncodedPrompt, PromptBatch, encode_request, pad_batch, padding_id
from metake.trace import LowerLayers, cache_lower_layers, capture

if TYPE_CHECKING:
    from metake.diagnostics.theory import SolverGeometry


def memit_gate(keys: torch.Tensor, mom2: torch.Tensor, lam: float) -> torch.Tensor:
    """MEMIT's linear map ``M = K^T (lambda C0 + K K^T)^-1`` (``[n, d_in]``, float64).

    ``keys`` is ``[n, d_in]``; the update for residuals ``R`` (``[n, d_out]``) is ``R^T M``.
    """
    k = keys.double().T  # [d_in, n]
    system = lam * mom2.double().to(k.device) + k @ k.T  # [d_in, d_in], symmetric positive
    return torch.linalg.solve(system, k).T  # (lambda C0 + K K^T)^-1 is symmetric


def memit_delta(
    keys: torch.Tensor, resid: torch.Tensor, mom2: torch.Tensor, lam: float
) -> torch.Tensor:
    """MEMIT's update ``[d_out, d_in]`` from keys ``[n, d_in]``, residuals ``[n, d_out]``, C0."""
    gate = memit_gate(keys, mom2, lam)
    return resid.double().to(gate.device).T @ gate


class MemitSolver(Solver):
    """MEMIT: ``M = K^T (lambda C0 + K K^T)^-1`` per layer, ``lambda`` = ``mom2_update_weight``."""

    name = "memit"
    description = "residual spread over the edit layers, lambda C0 + K K^T closed form per layer"
    reads = ("memit",)
    measurable = True

    def gate(
        self, layer: int, keys: torch.Tensor, bare_keys: torch.Tensor | None = None
    ) -> torch.Tensor:
        """MEMIT's gate ``[n, d_in]`` at ``layer`` (:func:`memit_gate`)."""
        return memit_gate(keys, self.second_moment(layer), self.hparams.mom2_update_weight)

    def geometry(self, layer: int) -> SolverGeometry:
        """``lambda C0`` of ``layer``."""
        from metake.diagnostics.theory import SolverGeometry

        return SolverGeometry.memit(self.second_moment(layer), self.hparams.mom2_update_weight)


class SubjectActivations(NamedTuple):
    """What one forward records at the subject's last token (see :func:`subject_activations`)."""

    keys: dict[int, torch.Tensor]  # {layer: [n, d_in]}, context-averaged projection inputs
    values: torch.Tensor  # [n, d], output of the value layer, prompt without context
    projections: dict[int, torch.Tensor]  # {layer: [n, d]}, projection outputs, no context
    bare_keys: dict[int, torch.Tensor]  # {layer: [n, d_in]}, projection inputs, no context


KEY_AVERAGES = ("types", "plain")
"""How keys are averaged over contexts: MEMIT's per-type mean, or ROME's plain mean."""


def context_type_mean(acts: torch.Tensor, how: str = "types") -> torch.Tensor:
    """Average ``[n, c, d]`` over contexts: ``[n, d]``.

    ``"types"`` (MEMIT's and AlphaEdit's ``compute_ks``): the contexts form two *types*, the
    bare prompt (context 0) and the prefixed prompts (the rest); each type is averaged first,
    then the types, so the bare prompt weighs one half. ``"plain"`` (ROME's ``compute_u``, whose
    templates form one flat list): every context weighs the same.
    """
    if how not in KEY_AVERAGES:
        raise ValueError(f"key average must be one of {KEY_AVERAGES}, got {how!r}")
    if acts.shape[1] == 1 or how == "plain":
        return acts.mean(1)
    return (acts[:, 0] + acts[:, 1:].mean(1)) / 2


def subject_activations(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest],
    contexts: Sequence[str],
    key_layers: Sequence[int],
    value_layer: int,
    *,
    track_grad: bool = False,
    key_average: str = "types",
    lower: LowerLayers | None = None,
) -> SubjectActivations:
    """Keys ``{layer: [n, d_in]}`` (context-averaged), values ``[n, d]`` at ``value_layer``,
    the projections' outputs ``{layer: [n, d]}`` and the bare prompt's keys ``{layer: [n, d_in]}``.

    Keys are the inputs of each layer's MLP output projection at the subject's last token,
    averaged over the context prefixes by :func:`context_type_mean` (``key_average``: MEMIT's
    per-type mean, or ROME's plain one);
    values are the output of decoder layer ``value_layer``
    there, and projections the output of each key layer's projection, both for the prompt
    without context (``contexts[0]`` must be ``""``). One forward, stopped after the last module
    needed. With ``track_grad`` the forward keeps its autograd graph (for differentiating
    through virtual updates, see :mod:`metake.planners.hypergradient`). ``lower`` (from
    :func:`lower_layers` for the same requests and contexts) skips the layers below its layer.
    """
    adapter = get_adapter(model)
    device = input_device(model)
    batch = _activation_batch(tokenizer, requests, contexts, device)
    key_names = {layer: adapter.mlp_out_name(layer) for layer in key_layers}
    value_name = adapter.layer_name(value_layer)
    top = max(key_layers)
    stop = value_name if value_layer >= top else key_names[top]
    if lower is not None and lower.layer > min(key_layers):
        raise ValueError(
            f"keys of layer {min(key_layers)} lie below the cached layer {lower.layer}"
        )
    run = _run_rows(model, batch, [*key_names.values(), value_name], stop, lower=lower,
                    track_grad=track_grad)  # fmt: skip
    n, c = len(requests), len(contexts)

    def at_subject(kind: str, name: str) -> torch.Tensor:  # [n, c, d], float32 or float64
        acts = (run.inputs if kind == "in" else run.outputs)[name]
        return acts.view(n, c, -1).to(torch.promote_types(acts.dtype, torch.float32))

    inputs = {layer: at_subject("in", name) for layer, name in key_names.items()}
    keys = {layer: context_type_mean(acts, key_average) for layer, acts in inputs.items()}
    bare_keys = {layer: acts[:, 0] for layer, acts in inputs.items()}
    projections = {layer: at_subject("out", name)[:, 0] for layer, name in key_names.items()}
    values = at_subject("out", value_name)[:, 0]
    return SubjectActivations(keys, values, projections, bare_keys)


ACTIVATION_ROWS = 128
"""Rows one graph-free forward of :func:`subject_activations` runs at most (memory)."""


class RowRun(NamedTuple):
    """What :func:`_run_rows` read, in the batch's row order."""

    inputs: dict[str, torch.Tensor]  # {name: [R, d]}, module inputs at the subject's last token
    outputs: dict[str, torch.Tensor]  # {name: [R, d]}, module outputs there
    streams: dict[str, torch.Tensor]  # {name: [R, S, d]}, whole outputs (zeros past a row's end)
    tuple_outputs: set[str]  # modules that returned tuples


def _run_rows(
    model: nn.Module,
    batch: PromptBatch,
    names: Sequence[str],
    stop: str,
    *,
    lower: LowerLayers | None = None,
    track_grad: bool = False,
    streams: Sequence[str] = (),
) -> RowRun:
    """Forward ``batch`` up to module ``stop``, reading ``names`` at the subject's last token and
    the whole output of ``streams``. Without a graph the rows run in length-sorted pieces of at
    most :data:`ACTIVATION_ROWS`, each trimmed to its own length and replayed from its slice of
    ``lower`` (memory, padding); with one, in a single forward (the exact hypergradient's replay
    captures the whole batch)."""
    device = batch.input_ids.device
    pieces = [None] if track_grad else _row_pieces(batch.attention_mask.sum(1), ACTIVATION_ROWS)
    parts: dict[tuple[str, str], list[torch.Tensor]] = {}
    whole: dict[str, torch.Tensor] = {}
    tuples: set[str] = set()
    for piece in pieces:
        sub = batch if piece is None else batch.select(piece)
        low = lower
        if lower is not None and piece is not None:
            low = lower.select(piece, sub.input_ids.shape[1])
        with (
            torch.set_grad_enabled(track_grad),
            capture(model, [*names, *streams], stop_after=stop, detach=not track_grad) as tr,
            low.replay() if low else nullcontext(),
        ):
            model.base_model(input_ids=sub.input_ids, attention_mask=sub.attention_mask)
        rows = torch.arange(sub.input_ids.shape[0], device=device)
        for kind, acts in (("in", tr.inputs), ("out", tr.outputs)):
            for name in names:
                parts.setdefault((kind, name), []).append(acts[name][rows, sub.subject_last])
        for name in streams:
            hidden = tr.outputs[name]
            if name not in whole:
                whole[name] = hidden.new_zeros(*batch.input_ids.shape, hidden.shape[-1])
            target_rows = rows if piece is None else piece.to(hidden.device)
            whole[name][target_rows, : hidden.shape[1]] = hidden
        tuples |= tr.tuple_outputs
    order = None if track_grad else torch.cat(pieces)

    def in_row_order(acts: list[torch.Tensor]) -> torch.Tensor:
        joined = torch.cat(acts)
        if order is None:
            return joined
        return joined.new_empty(joined.shape).index_copy_(0, order, joined)

    inputs = {name: in_row_order(parts[("in", name)]) for name in names}
    outputs = {name: in_row_order(parts[("out", name)]) for name in names}
    return RowRun(inputs, outputs, whole, tuples)


@torch.no_grad()
def spread_activations(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest],
    contexts: Sequence[str],
    layer: int,
    value_layer: int,
    *,
    lower: LowerLayers | None = None,
) -> tuple[SubjectActivations, LowerLayers | None]:
    """:func:`subject_activations` for one key ``layer`` of MEMIT's loop, at less cost, and the
    residual stream entering ``layer`` (``[rows, seq, d]``) for the next layer's call.

    Every (request, context) prompt runs only up to ``layer``; the bare prompts alone, which the
    values are read from, go on to ``value_layer`` (``>= layer``). ``lower`` (the stream entering
    some layer ``<= layer``: :func:`lower_layers`, or the previous call's) skips the layers below
    it. An edit of ``layer`` or a layer above leaves the returned stream valid, which is what
    MEMIT's loop needs: each call starts where the layer edited last begins.
    """
    if value_layer < layer:
        raise ValueError(f"the value layer {value_layer} lies below the key layer {layer}")
    if lower is not None and lower.layer > layer:
        raise ValueError(f"keys of layer {layer} lie below the cached layer {lower.layer}")
    adapter = get_adapter(model)
    batch = _activation_batch(tokenizer, requests, contexts, input_device(model))
    key_name, out_name = adapter.mlp_out_name(layer), adapter.layer_name(layer)
    entry = adapter.layer_name(layer - 1) if layer > 0 else None
    keep_entry = entry is not None and (lower is None or lower.layer < layer)
    streams = [out_name, *([entry] if keep_entry else [])]
    run = _run_rows(model, batch, [key_name], out_name, lower=lower, streams=streams)
    n, c = len(requests), len(contexts)
    acts = run.inputs[key_name].view(n, c, -1)
    acts = acts.to(torch.promote_types(acts.dtype, torch.float32))
    bare = torch.arange(0, n * c, c, device=batch.input_ids.device)  # request-major rows
    if value_layer == layer:
        values = run.streams[out_name][bare, batch.subject_last[bare]]
    else:
        bare_batch = batch.select(bare)
        above = LowerLayers(
            adapter.layers_below(model, layer + 1),
            run.streams[out_name][bare, : bare_batch.input_ids.shape[1]],
            out_name in run.tuple_outputs,
        )
        value_name = adapter.layer_name(value_layer)
        values = _run_rows(model, bare_batch, [value_name], value_name, lower=above).outputs[
            value_name
        ]
    projections = run.outputs[key_name].view(n, c, -1)[:, 0]
    found = SubjectActivations(
        keys={layer: context_type_mean(acts)},
        values=values.to(torch.promote_types(values.dtype, torch.float32)),
        projections={layer: projections.to(torch.promote_types(projections.dtype, torch.float32))},
        bare_keys={layer: acts[:, 0]},
    )
    if not keep_entry:
        return found, lower
    below = adapter.layers_below(model, layer)
    return found, LowerLayers(below, run.streams[entry], entry in run.tuple_outputs)


def _row_pieces(lengths: torch.Tensor, size: int) -> list[torch.Tensor]:
    """Row indices ``[R]`` of ``lengths`` (``[rows]``) sorted by length, in pieces of ``size``."""
    order = torch.sort(lengths, stable=True).indices
    return list(order.split(size))


def _activation_batch(
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest],
    contexts: Sequence[str],
    device: torch.device,
) -> PromptBatch:
    """Every (request, context) prompt without its target, cut after the subject's last token
    (everything read there is causal: later tokens change nothing), padded: the rows of
    :func:`subject_activations`, request-major."""
    if contexts[0] != "":
        raise ValueError("the first context prefix must be the empty one")
    encoded = [
        encode_request(tokenizer, r, c, with_target=False) for r in requests for c in contexts
    ]
    cut = [EncodedPrompt(e.input_ids[: e.subject_last + 1], e.subject_last) for e in encoded]
    return pad_batch(cut, padding_id(tokenizer)).to(device)


@torch.no_grad()
def lower_layers(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest],
    contexts: Sequence[str],
    layer: int,
) -> LowerLayers | None:
    """Run the prompts of :func:`subject_activations` once up to layer ``layer - 1`` and keep
    the residual stream there (``None`` for layer 0: nothing to skip)."""
    if layer == 0:
        return None
    adapter = get_adapter(model)
    batch = _activation_batch(tokenizer, requests, contexts, input_device(model))
    return cache_lower_layers(
        model,
        adapter.layers_below(model, layer),
        adapter.layer_name(layer - 1),
        lambda: model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask),
    )


def keys_and_values(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest],
    contexts: Sequence[str],
    layer: int,
    value_layer: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys ``[n, d_in]`` at ``layer`` and values ``[n, d]`` at ``value_layer`` (one forward)."""
    acts = subject_activations(model, tokenizer, requests, contexts, [layer], value_layer)
    return acts.keys[layer], acts.values


def layer_residuals(
    model: nn.Module,
    acts: SubjectActivations,
    layer: int,
    targets: torch.Tensor,
    share: int,
) -> torch.Tensor:
    """Residuals ``[n, d_out]`` for ``layer``'s solve: ``(v* - z) / share`` (``targets`` ``[n,
    d]``, ``z = acts.values``) as a change of that layer's projection output."""
    resid = (targets - acts.values.to(device=targets.device, dtype=targets.dtype)) / share
    return get_adapter(model).residual_to_projection(model, layer, resid,
                                                     acts.projections[layer])  # fmt: skip


LayerSolve = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]
"""``(layer, keys [n, d_in], residuals [n, d_out]) -> Delta [d_out, d_in]``."""


def apply_spread(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest],
    targets: torch.Tensor,
    layers: Sequence[int],
    contexts: Sequence[str],
    solve: LayerSolve,
) -> dict[int, torch.Tensor]:
    """MEMIT's layer loop with any per-layer closed form; returns ``{layer: Delta [d_out, d_in]}``.

    ``targets`` (``[n, d]``) are the values wanted at the last layer of ``layers``. The model is
    edited in place, layer after layer; the caller undoes a partially applied loop when it raises
    (see :class:`metake.editor.Editor`). Each layer's forward starts at the layer edited before it
    (the stream entering that one is unchanged by its edit) and only the bare prompts go on to the
    last layer (:func:`spread_activations`).
    """
    adapter = get_adapter(model)
    deltas: dict[int, torch.Tensor] = {}
    last = layers[-1]
    lower = lower_layers(model, tokenizer, requests, contexts, min(layers))  # never edited here
    for i, layer in enumerate(layers):
        acts, lower = spread_activations(model, tokenizer, requests, contexts, layer, last,
                                         lower=lower)  # fmt: skip
        resid = layer_residuals(model, acts, layer, targets.to(acts.values.device),
                                len(layers) - i)  # fmt: skip
        delta = solve(layer, acts.keys[layer], resid)
        adapter.add_to_weight(model, layer, delta)
        deltas[layer] = delta.float().cpu()
    return deltas


def apply_memit(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest],
    targets: torch.Tensor,
    layers: Sequence[int],
    mom2: Callable[[int], torch.Tensor],
    lam: float,
    contexts: Sequence[str],
) -> dict[int, torch.Tensor]:
    """MEMIT: :func:`apply_spread` with ``memit_delta``; ``mom2(l)`` is C0 of layer ``l``."""

    def solve(layer: int, keys: torch.Tensor, resid: torch.Tensor) -> torch.Tensor:
        return memit_delta(keys, resid, mom2(layer), lam)

    return apply_spread(model, tokenizer, requests, targets, layers, contexts, solve)
