"""RECT, PRUNE and BLUE as options around any base solver: what an editing session edits with.

- RECT keeps each batch's update of a layer only on its top ``rect_keep_fraction`` entries by
  relative change (:func:`~metake.solvers.rect.rect_delta`);
- PRUNE restrains the large singular values of each layer's accumulated edit when the session is
  finalised (:func:`~metake.solvers.prune.prune_with_spectrum`); editing goes on from the raw
  weights;
- BLUE edits only the first and last edit layers, each towards a target optimised at its own
  output (the session plans once per layer); with AlphaEdit it may use its own ``lambda_2``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from metake.solvers.base import Solver
from metake.solvers.prune import largest_singular_value, prune_with_spectrum
from metake.solvers.rect import rect_delta

if TYPE_CHECKING:
    from metake.diagnostics.theory import SolverGeometry

log = logging.getLogger(__name__)

EDIT_PATHS = ("one_by_one", "per_layer_targets", "spread")
"""How a session runs a batch: each request alone at the last layer (ROME), one target per edit
layer (BLUE), or one target at the last layer spread over all of them (MEMIT's loop)."""


class ComposedSolver:
    """A base :class:`~metake.solvers.base.Solver` with the RECT/PRUNE/BLUE options it runs with.

    Built by :func:`metake.solvers.registry.build_solver`; the session asks it, never a name.
    """

    def __init__(
        self,
        base: Solver,
        name: str,
        rect_keep_fraction: float | None = None,
        prune: bool = False,
        blue: bool = False,
    ) -> None:
        self.base = base
        self.name = name
        self.rect_keep_fraction = rect_keep_fraction
        self.prune = prune
        self.blue = blue
        self._sigma_max: dict[int, float] = {}  # PRUNE: of the original weights

    # ----- the base solver's math ---------------------------------------------------------------
    @property
    def key_average(self) -> str:
        """How keys are averaged over the context prefixes (``"types"`` or ``"plain"``)."""
        return self.base.key_average

    @property
    def edit_path(self) -> str:
        """One of :data:`EDIT_PATHS`."""
        if self.base.one_layer:
            return "one_by_one"
        return "per_layer_targets" if self.blue else "spread"

    def gate(
        self, layer: int, keys: torch.Tensor, bare_keys: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The base solver's map ``M`` (``[n, d_in]``) at ``layer``."""
        return self.base.gate(layer, keys, bare_keys)

    def delta(
        self,
        layer: int,
        keys: torch.Tensor,
        resid: torch.Tensor,
        bare_keys: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The base solver's update ``[d_out, d_in]`` for residuals ``[n, d_out]``."""
        return self.base.delta(layer, keys, resid, bare_keys)

    def geometry(self, layer: int) -> SolverGeometry:
        """The base solver's geometry; ``metake diagnose`` measures plain solvers only."""
        if self.rect_keep_fraction is not None or self.prune or self.blue:
            from metake.errors import MetakeError

            raise MetakeError(f"metake diagnose measures solvers without options; got {self.name}")
        return self.base.geometry(layer)

    # ----- state --------------------------------------------------------------------------------
    def next_state(self, keys: Mapping[int, torch.Tensor]) -> dict[str, Any]:
        """The base solver's state after a batch with ``keys`` (uncommitted)."""
        return self.base.next_state(keys)

    def state_dict(self) -> dict[str, Any]:
        """The base solver's checkpointed state."""
        return self.base.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Commit or restore the base solver's state."""
        self.base.load_state_dict(state)

    def reset(self) -> None:
        """Forget the state kept across batches."""
        self.base.reset()

    def report(self) -> dict[str, Any]:
        """The base solver's report figures."""
        return self.base.report()

    # ----- the options ----------------------------------------------------------------------------
    def sparsify(
        self, before: Mapping[int, torch.Tensor], after: Mapping[int, torch.Tensor]
    ) -> dict[int, torch.Tensor] | None:
        """RECT: the batch's kept update per layer (``after - before`` on its top entries by
        ``|Delta / W|``, ``[d_out, d_in]`` float32); ``None`` without RECT."""
        if self.rect_keep_fraction is None:
            return None
        return {
            layer: rect_delta(
                after[layer].float() - weight.float(), weight.float(), self.rect_keep_fraction
            )  # fmt: skip
            for layer, weight in before.items()
        }

    def restrain(
        self, originals: Mapping[int, torch.Tensor], raw: Mapping[int, torch.Tensor]
    ) -> dict[int, tuple[torch.Tensor, int]] | None:
        """PRUNE: per layer, ``(original + restrained edit [d_out, d_in] float64, number of
        singular values restrained)``; ``None`` without PRUNE."""
        if not self.prune:
            return None
        out = {}
        for layer, original in originals.items():
            if layer not in self._sigma_max:
                self._sigma_max[layer] = largest_singular_value(original)
            sigma_max = self._sigma_max[layer]
            restrained, sigma = prune_with_spectrum(raw[layer].double() - original.double(),
                                                    sigma_max)  # fmt: skip
            count = int((sigma >= sigma_max).sum())
            log.info("PRUNE layer %d: %d singular value(s) of the edit (largest %.3g) at or "
                     "above sigma_max %.3g restrained", layer, count, float(sigma[0]),
                     sigma_max)  # fmt: skip
            # nothing restrained: F is the identity there, and the raw weight stays bit for bit
            # (not rebuilt from its SVD), so PRUNE equals its base method exactly
            out[layer] = (original.double() + restrained if count else raw[layer], count)
        return out
