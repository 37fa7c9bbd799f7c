"""The Stage II solver protocol: what a closed-form update rule tells the editing session.

Every solver of metake updates a layer by ``Delta = R^T M``: residuals ``R`` (``[n, d_out]``,
the wanted change of the layer's output at each request's subject) times the solver's *gate*
``M`` (``[n, d_in]``), which depends on the keys ``K`` (``[n, d_in]``), the layer's statistics
``C0`` and whatever the solver keeps across batches. A solver is one subclass of :class:`Solver`
that says

- its gate for a layer (:meth:`Solver.gate`; the update :meth:`Solver.delta` follows from it),
- how keys are averaged over the context prefixes (``key_average``) and whether it edits one
  layer, one request after another (``one_layer``, ROME) or spreads one target over the edit
  layers (MEMIT's loop),
- the state it keeps across sequential batches (:meth:`Solver.next_state`,
  :meth:`Solver.state_dict`, :meth:`Solver.load_state_dict`; AlphaEdit's key cache), which the
  session commits only when a whole batch succeeded and checkpoints with its weights,
- which hyper-parameter groups it reads (``reads``, for ``metake methods``) and, if ``metake
  diagnose`` can measure it, its single-key geometry (:meth:`Solver.geometry`).

Registering it in :mod:`metake.solvers.registry` makes it a method (``metake edit --method NAME``),
a solver for MetaKE's look-ahead (``--solver NAME``) and a base for RECT, PRUNE and BLUE.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from metake.errors import MetakeError

if TYPE_CHECKING:
    from metake.diagnostics.theory import SolverGeometry
    from metake.hparams import MemitHparams

SecondMoment = Callable[[int], torch.Tensor]
"""``layer -> C0`` (``[d_in, d_in]``, float64): the session's statistics, loaded on demand."""


class Solver:
    """A base Stage II solver over one editing session (see the module docstring)."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    reads: ClassVar[tuple[str, ...]] = ()  # hyper-parameter groups (HPARAM_GROUPS keys)
    key_average: ClassVar[str] = "types"  # MEMIT's per-type mean, or "plain" (ROME)
    one_layer: ClassVar[bool] = False  # edits the last edit layer, one request after another
    measurable: ClassVar[bool] = False  # `metake diagnose` can measure its geometry

    def __init__(self, hparams: MemitHparams, second_moment: SecondMoment) -> None:
        self.hparams = hparams
        self.second_moment = second_moment

    def gate(
        self, layer: int, keys: torch.Tensor, bare_keys: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The map ``M`` (``[n, d_in]``, float64) at ``layer`` for keys ``[n, d_in]``.

        ``bare_keys`` are the bare prompts' keys (same shape), for solvers that set a scale
        there (ROME); the session's current state (e.g. a key cache) is used as it is now.
        """
        raise NotImplementedError

    def delta(
        self,
        layer: int,
        keys: torch.Tensor,
        resid: torch.Tensor,
        bare_keys: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The update ``R^T M`` (``[d_out, d_in]``) for residuals ``[n, d_out]``."""
        gate = self.gate(layer, keys, bare_keys)
        return resid.double().to(gate.device).T @ gate

    def geometry(self, layer: int) -> SolverGeometry:
        """The single-key attenuation geometry at ``layer`` (``metake diagnose``)."""
        raise MetakeError(f"metake diagnose cannot measure the {self.name} solver")

    # ----- state across sequential batches ------------------------------------------------------
    wants_batch_keys: ClassVar[bool] = False  # next_state needs the batch's keys after the edit

    def next_state(self, keys: Mapping[int, torch.Tensor]) -> dict[str, Any]:
        """The state after a batch whose keys (``{layer: [n, d_in]}``, computed on the edited
        model) are ``keys``; not yet committed (see :meth:`load_state_dict`)."""
        return self.state_dict()

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of this solver (tensors on CPU); empty when stateless."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Take over ``state`` (from :meth:`state_dict`, :meth:`next_state` or a checkpoint that
        also holds the session's other keys, which are ignored)."""

    def reset(self) -> None:
        """Forget everything kept across batches (the session restored its weights)."""

    def report(self) -> dict[str, Any]:
        """Figures for an edit report (e.g. ``{"null_space_rank": {layer: rank}}``)."""
        return {}
