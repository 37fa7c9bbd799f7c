"""How a look-ahead sees the solver: the structural proxy (Eq. 7) or the exact multi-layer solve.

MetaKE's meta-loss is evaluated on *virtual* weights ``W + Delta(v*)``: the model's weights are
never written, forward hooks add the update's effect to the MLP output projections. A *channel*
turns the targets ``v*`` (``[n, d]`` at the last edit layer ``L``) into such a virtual edit:

- :class:`ProxyChannel`: the paper's structural gradient proxy, ``Delta_L = (v* - z_L)^T M_L`` at
  layer ``L`` only, ``M_L`` being the solver's gate there (fixed). Autograd through it gives
  exactly ``g_proxy = s_L M_L^T`` (Eq. 8, Lemma 5). Where a norm follows the MLP (Gemma3) the
  residual ``v* - z_L`` is first mapped to a change of the projection's output, as the solver
  maps it (:meth:`~metake.models.adapters.ArchAdapter.residual_to_projection`).
- :class:`SpreadChannel`: the whole Stage II solver as it will run, replayed differentiably
  (:func:`spread_updates`): for every edit layer in order the keys and the last layer's values are
  recomputed under the earlier layers' (virtual) updates, the residual is spread, the gate is
  solved in float64 from those keys, so autograd gives the exact hypergradient
  ``g_true = sum_l J_l^T s_l`` of the paper's Theorem 3 (through keys, residual spreading, the
  solves and every layer).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from metake.models.adapters import get_adapter
from metake.requests import EditRequest
from metake.solvers.memit import (
    SubjectActivations,
    layer_residuals,
    lower_layers,
    subject_activations,
)
from metake.trace import LowerLayers, Trace, add_delta, add_low_rank, capture

GateFn = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]
"""``(layer, keys [n, d_in], bare keys [n, d_in]) -> M [n, d_in]``: a solver's gate,
differentiable in the keys (context-averaged; the bare prompt's ones only matter to ROME)."""

HYPERGRADIENTS = ("proxy", "exact", "direct")


@contextmanager
def virtual_deltas(model: nn.Module, deltas: Mapping[int, torch.Tensor]) -> Iterator[None]:
    """Let the model act as if ``{layer: Delta [d_out, d_in]}`` were added to its weights."""
    adapter = get_adapter(model)
    with ExitStack() as stack:
        for layer, delta in deltas.items():
            stack.enter_context(add_delta(adapter.mlp_out(model, layer), delta))
        yield


@dataclass(frozen=True)
class LowRankUpdate:
    """A weight update kept in factors, ``Delta = up^T down`` (``[d_out, d_in]``): ``up`` is the
    residual ``R`` (``[n, d_out]``), ``down`` the solver's gate ``M`` (``[n, d_in]``)."""

    up: torch.Tensor
    down: torch.Tensor

    def dense(self) -> torch.Tensor:
        """``Delta = R^T M`` (``[d_out, d_in]``, the factors' dtype)."""
        return self.up.T @ self.down


@contextmanager
def virtual_updates(model: nn.Module, updates: Mapping[int, LowRankUpdate]) -> Iterator[None]:
    """Like :func:`virtual_deltas` for factored updates, in each projection's own dtype: an input
    row ``x`` gains ``(x M^T) R``, ``n (d_in + d_out)`` work per position instead of ``d_in d_out``.
    """
    adapter = get_adapter(model)
    with ExitStack() as stack:
        for layer, update in updates.items():
            stack.enter_context(low_rank_on(adapter.mlp_out(model, layer), update))
        yield


def low_rank_on(module: nn.Module, update: LowRankUpdate) -> AbstractContextManager[None]:
    """Make the projection ``module`` act as ``W + R^T M`` (in its own dtype; ``add_low_rank``)."""
    dtype = next(module.parameters()).dtype
    return add_low_rank(module, update.down.T.to(dtype), update.up.to(dtype))


@dataclass
class SpreadStart:
    """What the replay of Stage II computes before any (virtual) update: the same for every
    ``v*`` of one batch, so a look-ahead computes it once (:func:`spread_start`)."""

    lower: LowerLayers | None  # the residual stream below the first edit layer
    acts: SubjectActivations  # keys of the first edit layer, values of the last
    gate: torch.Tensor  # the first edit layer's M, [n, d_in]


@torch.no_grad()
def spread_start(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest],
    layers: Sequence[int],
    contexts: Sequence[str],
    gate: GateFn,
    key_average: str = "types",
) -> SpreadStart:
    """The first layer's keys and gate and the last layer's values on the unedited model."""
    lower = lower_layers(model, tokenizer, requests, contexts, layers[0])
    acts = subject_activations(model, tokenizer, requests, contexts, [layers[0]], layers[-1],
                               key_average=key_average, lower=lower)  # fmt: skip
    keys, bare = acts.keys[layers[0]], acts.bare_keys[layers[0]]
    return SpreadStart(lower, acts, gate(layers[0], keys, bare))


def spread_updates(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest],
    targets: torch.Tensor,
    layers: Sequence[int],
    contexts: Sequence[str],
    gate: GateFn,
    key_average: str = "types",
    start: SpreadStart | None = None,
    direct_only: bool = False,
    record: list[ReplayedLayer] | None = None,
) -> dict[int, LowRankUpdate]:
    """:func:`~metake.solvers.memit.apply_spread` as a differentiable function of ``targets``.

    ``targets`` is ``[n, d]`` at ``layers[-1]``; returns ``{layer: R^T M}`` in factors (float64)
    with the autograd graph back to ``targets``, and leaves the model unchanged. Layer ``l_i``
    sees keys and values computed under the virtual updates of ``l_1..l_{i-1}``, its residual is
    ``(v* - z) / (m - i)``, its update ``R^T gate(l_i, K)``, as in the solver.

    Nothing is computed twice: the first layer's keys and gate and the unedited values do not
    depend on ``targets`` (``start``, from :func:`spread_start`; computed here if not given), and
    the forward for layer ``l_{i+1}`` starts at layer ``l_i`` from the residual stream that the
    forward for ``l_i`` passed there (the updates below ``l_i`` are the same for both). Each of
    these forwards is checkpointed: its graph keeps only what it returns and is recomputed
    during the backward, so memory holds one forward's activations, not all of them (every
    request x context prompt runs at once here: the solve couples them).

    ``direct_only`` (diagnostics): the same updates, but the graph keeps only each layer's
    direct dependence on ``targets`` (its residual), not the one through the earlier layers'
    updates (the keys, gates and values they change): the part of the hypergradient a solver
    linearised at fixed keys and values would see.

    ``record`` (a list) receives each layer's keys, values and gate, cut from the graph: what
    :func:`frozen_updates` holds fixed until the next replay.
    """
    start = start or spread_start(model, tokenizer, requests, layers, contexts, gate, key_average)
    adapter = get_adapter(model)
    updates: dict[int, LowRankUpdate] = {}
    lower, acts, layer_gate = start.lower, start.acts, start.gate
    for i, layer in enumerate(layers):
        if i > 0:
            below = [adapter.layer_name(layer - 1)] if i + 1 < len(layers) else []
            args = (model, tokenizer, requests, contexts, layer, layers[-1], key_average,
                    lower, dict(updates), below)  # fmt: skip
            if direct_only:  # keys, values and the gate as constants
                with torch.no_grad():
                    acts, seen = _replay_layer(*args)
            elif torch.is_grad_enabled():  # keep inputs and outputs; recompute the rest backward
                acts, seen = checkpoint(_replay_layer, *args, use_reentrant=False)
            else:
                acts, seen = _replay_layer(*args)
            layer_gate = gate(layer, acts.keys[layer], acts.bare_keys[layer])
            if below:  # the input of layer l_i, for the forward of l_{i+1}
                lower = LowerLayers(adapter.layers_below(model, layer), seen.outputs[below[0]],
                                    below[0] in seen.tuple_outputs)  # fmt: skip
        if record is not None:
            record.append(ReplayedLayer.detached(layer, acts, layer_gate))
        resid = layer_residuals(model, acts, layer, targets, len(layers) - i)  # [n, d_out]
        updates[layer] = LowRankUpdate(resid.double(), layer_gate.double())
    return updates


class ReplayedLayer(NamedTuple):
    """One edit layer as a replay of the solver saw it (no graph): its keys', values' and
    projections' activations and its gate ``[n, d_in]``."""

    layer: int
    acts: SubjectActivations
    gate: torch.Tensor

    @classmethod
    def detached(cls, layer: int, acts: SubjectActivations, gate: torch.Tensor) -> ReplayedLayer:
        """The same, cut from any autograd graph."""
        cut = SubjectActivations(
            {k: v.detach() for k, v in acts.keys.items()},
            acts.values.detach(),
            {k: v.detach() for k, v in acts.projections.items()},
            {k: v.detach() for k, v in acts.bare_keys.items()},
        )
        return cls(layer, cut, gate.detach())


def frozen_updates(
    model: nn.Module, replay: Sequence[ReplayedLayer], targets: torch.Tensor
) -> dict[int, LowRankUpdate]:
    """The spread's updates ``{layer: R^T M}`` for ``targets`` (``[n, d]``) with every layer's
    keys, gate and values held where a replay (:func:`spread_updates`' ``record``) saw them:
    linear in ``targets``, no forward. At the replay's own targets they equal its updates; their
    gradient is the replay's direct part (``direct_only``) there."""
    count = len(replay)
    return {
        r.layer: LowRankUpdate(
            layer_residuals(model, r.acts, r.layer, targets, count - i).double(), r.gate.double()
        )
        for i, r in enumerate(replay)
    }


def _replay_layer(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest],
    contexts: Sequence[str],
    layer: int,
    last: int,
    key_average: str,
    lower: LowerLayers | None,
    done: Mapping[int, LowRankUpdate],
    below: Sequence[str],
) -> tuple[SubjectActivations, Trace]:
    """One forward of :func:`spread_updates`: keys at ``layer`` and values at ``last`` under
    the updates ``done``, from ``lower``; ``below`` (one layer name or none) is captured with
    its graph for the next layer's forward."""
    with virtual_updates(model, done), capture(model, below, inputs=False, detach=False) as seen:
        acts = subject_activations(model, tokenizer, requests, contexts, [layer], last,
                                   track_grad=True, key_average=key_average,
                                   lower=lower)  # fmt: skip
    return acts, seen


@dataclass
class ProxyChannel:
    """The structural proxy: ``Delta_L = (v* - z)^T M`` at layer ``layer`` only (Eq. 7)."""

    module: nn.Module  # the MLP output projection of ``layer``
    layer: int
    gate: torch.Tensor  # M, [n, d_in]
    current: torch.Tensor  # z, the layer's output at the subject's last token, [n, d]
    to_projection: Callable[[torch.Tensor], torch.Tensor] | None = None  # see below

    # ``to_projection`` maps the residual ``[n, d]`` to the change of the projection's output
    # where a norm follows the MLP (Gemma3; :meth:`ArchAdapter.residual_to_projection`).

    @property
    def entry_layer(self) -> int:
        """The lowest layer whose forward changes (the look-ahead replays those below)."""
        return self.layer

    def updates(self, v_star: torch.Tensor) -> dict[int, LowRankUpdate]:
        """``{layer: (v* - z)^T M}`` in factors, differentiable in ``v_star`` (``[n, d]``)."""
        resid = v_star - self.current
        if self.to_projection is not None:
            resid = self.to_projection(resid)
        return {self.layer: LowRankUpdate(resid, self.gate.to(v_star.device))}

    def apply(self, updates: Mapping[int, LowRankUpdate]) -> AbstractContextManager[None]:
        """Virtual weights for ``updates`` (as :meth:`updates` returns them)."""
        return low_rank_on(self.module, updates[self.layer])

    def __call__(self, v_star: torch.Tensor) -> AbstractContextManager[None]:
        """Virtual weights for targets ``v_star`` (``[n, d]``)."""
        return self.apply(self.updates(v_star))


@dataclass
class SpreadChannel:
    """The exact solver: every edit layer's update, as :func:`spread_updates` computes it.

    What does not depend on ``v*`` (:class:`SpreadStart`) is computed at the first call and kept:
    a channel serves one batch while the model's weights stay as they are (one look-ahead).
    """

    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    requests: Sequence[EditRequest]
    layers: Sequence[int]
    contexts: Sequence[str]
    gate: GateFn
    key_average: str = "types"  # how the solver averages keys over contexts (ROME: "plain")
    direct_only: bool = False  # "direct": the replay's keys, gates and values as constants
    replay_every: int = 1  # replay the solver every this many calls; in between, frozen_updates
    _start: SpreadStart | None = field(default=None, init=False, repr=False)
    _replay: list[ReplayedLayer] | None = field(default=None, init=False, repr=False)
    _calls: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.replay_every < 1:
            raise ValueError(f"replay_every must be at least 1, got {self.replay_every}")

    @property
    def entry_layer(self) -> int:
        """The lowest layer whose forward changes (the look-ahead replays those below)."""
        return self.layers[0]

    def updates(
        self, v_star: torch.Tensor, direct_only: bool | None = None
    ) -> dict[int, LowRankUpdate]:
        """``{layer: R^T M}`` in factors, differentiable in ``v_star`` (``[n, d]``; only through
        each layer's own residual with ``direct_only``, default the channel's, see
        :func:`spread_updates`).

        With ``replay_every`` k > 1 the solver is replayed at calls 0, k, 2k, ... (one call per
        look-ahead step) and the calls in between take :func:`frozen_updates` of the last
        replay: no forward, the gradient through each layer's residual only."""
        if self._start is None:
            self._start = spread_start(self.model, self.tokenizer, self.requests, self.layers,
                                       self.contexts, self.gate, self.key_average)  # fmt: skip
        call, self._calls = self._calls, self._calls + 1
        if self._replay is not None and call % self.replay_every:
            return frozen_updates(self.model, self._replay, v_star)
        direct = self.direct_only if direct_only is None else direct_only
        record: list[ReplayedLayer] | None = [] if self.replay_every > 1 else None
        updates = spread_updates(self.model, self.tokenizer, self.requests, v_star, self.layers,
                                 self.contexts, self.gate, self.key_average, self._start,
                                 direct, record)  # fmt: skip
        self._replay = record
        return updates

    def deltas(self, v_star: torch.Tensor) -> dict[int, torch.Tensor]:
        """``{layer: Delta(v*) [d_out, d_in]}`` (float64), differentiable in ``v_star``."""
        return {layer: u.dense() for layer, u in self.updates(v_star).items()}

    def apply(self, updates: Mapping[int, LowRankUpdate]) -> AbstractContextManager[None]:
        """Virtual weights for ``updates`` (as :meth:`updates` returns them)."""
        return virtual_updates(self.model, updates)

    def __call__(self, v_star: torch.Tensor) -> AbstractContextManager[None]:
        """Virtual weights for targets ``v_star`` (``[n, d]``)."""
        return self.apply(self.updates(v_star))


Channel = ProxyChannel | SpreadChannel


def detached_updates(
    updates: Mapping[int, LowRankUpdate], requires_grad: bool
) -> dict[int, LowRankUpdate]:
    """The same factors cut from their graph, as leaves; those that depend on ``v*`` collect
    gradients if asked (a constant factor, such as the proxy's gate, costs no gradient)."""

    def leaf(factor: torch.Tensor) -> torch.Tensor:
        return factor.detach().requires_grad_(requires_grad and factor.requires_grad)

    return {layer: LowRankUpdate(leaf(u.up), leaf(u.down)) for layer, u in updates.items()}


def backward_into_updates(
    updates: Mapping[int, LowRankUpdate], leaves: Mapping[int, LowRankUpdate]
) -> None:
    """Carry the gradients collected on ``leaves`` back through ``updates``' graph, once."""
    outputs, grads = [], []
    for layer, update in updates.items():
        for factor, leaf in ((update.up, leaves[layer].up), (update.down, leaves[layer].down)):
            if factor.requires_grad and leaf.grad is not None:
                outputs.append(factor)
                grads.append(leaf.grad)
    if outputs:
        torch.autograd.backward(outputs, grads)
