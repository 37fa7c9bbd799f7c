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
  (:func:`spread_deltas`): for every edit layer in order the keys and the last layer's values are
  recomputed under the earlier layers' (virtual) updates, the residual is spread, the gate is
  solved in float64 from those keys, so autograd gives the exact hypergradient
  ``g_true = sum_l J_l^T s_l`` of the paper's Theorem 3 (through keys, residual spreading, the
  solves and every layer).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from metake.models.adapters import get_adapter
from metake.requests import EditRequest
from metake.solvers.memit import layer_residuals, lower_layers, subject_activations
from metake.trace import add_delta, add_low_rank

GateFn = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]
"""``(layer, keys [n, d_in], bare keys [n, d_in]) -> M [n, d_in]``: a solver's gate,
differentiable in the keys (context-averaged; the bare prompt's ones only matter to ROME)."""

HYPERGRADIENTS = ("proxy", "exact")


@contextmanager
def virtual_deltas(model: nn.Module, deltas: Mapping[int, torch.Tensor]) -> Iterator[None]:
    """Let the model act as if ``{layer: Delta [d_out, d_in]}`` were added to its weights."""
    adapter = get_adapter(model)
    with ExitStack() as stack:
        for layer, delta in deltas.items():
            stack.enter_context(add_delta(adapter.mlp_out(model, layer), delta))
        yield


def spread_deltas(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest],
    targets: torch.Tensor,
    layers: Sequence[int],
    contexts: Sequence[str],
    gate: GateFn,
    key_average: str = "types",
) -> dict[int, torch.Tensor]:
    """:func:`~metake.solvers.memit.apply_spread` as a differentiable function of ``targets``.

    ``targets`` is ``[n, d]`` at ``layers[-1]``; returns ``{layer: Delta [d_out, d_in]}``
    (float64) with the autograd graph back to ``targets``, and leaves the model unchanged.
    Layer ``l_i`` sees keys and values computed under the virtual updates of ``l_1..l_{i-1}``,
    its residual is ``(v* - z) / (m - i)``, its update ``R^T gate(l_i, K)``, as in the solver.
    """
    deltas: dict[int, torch.Tensor] = {}
    last = layers[-1]
    lower = lower_layers(model, tokenizer, requests, contexts, min(layers))  # not edited
    for i, layer in enumerate(layers):
        with virtual_deltas(model, deltas):
            acts = subject_activations(model, tokenizer, requests, contexts, [layer], last,
                                       track_grad=True, key_average=key_average,
                                       lower=lower)  # fmt: skip
        resid = layer_residuals(model, acts, layer, targets, len(layers) - i)  # [n, d]
        deltas[layer] = resid.double().T @ gate(layer, acts.keys[layer], acts.bare_keys[layer])
    return deltas


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

    def __call__(self, v_star: torch.Tensor) -> AbstractContextManager[None]:
        """Virtual weights for targets ``v_star`` (``[n, d]``)."""
        dtype = next(self.module.parameters()).dtype
        down = self.gate.to(device=v_star.device, dtype=dtype).T  # [d_in, n]
        resid = v_star - self.current
        if self.to_projection is not None:
            resid = self.to_projection(resid)
        return add_low_rank(self.module, down, resid.to(dtype))


@dataclass
class SpreadChannel:
    """The exact solver: every edit layer's update, as :func:`spread_deltas` computes it."""

    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    requests: Sequence[EditRequest]
    layers: Sequence[int]
    contexts: Sequence[str]
    gate: GateFn
    key_average: str = "types"  # how the solver averages keys over contexts (ROME: "plain")

    @property
    def entry_layer(self) -> int:
        """The lowest layer whose forward changes (the look-ahead replays those below)."""
        return self.layers[0]

    def deltas(self, v_star: torch.Tensor) -> dict[int, torch.Tensor]:
        """``{layer: Delta(v*) [d_out, d_in]}``, differentiable in ``v_star`` (``[n, d]``)."""
        return spread_deltas(self.model, self.tokenizer, self.requests, v_star, self.layers,
                             self.contexts, self.gate, self.key_average)  # fmt: skip

    def __call__(self, v_star: torch.Tensor) -> AbstractContextManager[None]:
        """Virtual weights for targets ``v_star`` (``[n, d]``)."""
        return virtual_deltas(self.model, self.deltas(v_star))


Channel = ProxyChannel | SpreadChannel
