"""Stage II, EMMET (Gupta et al., 2024): MEMIT's layer loop with equality-constrained updates.

Where MEMIT trades the new facts against the preserved ones (``lambda C0 + K K^T``), EMMET
demands that every new key be mapped exactly to its residual and changes the preserved outputs as
little as it can: for keys ``K`` (``[d_in, n]`` as columns) and residuals ``R`` (``[d_out, n]``),

    min_Delta tr(Delta C0 Delta^T)   subject to   Delta K = R

whose solution is ``Delta = R (K^T C0^-1 K)^-1 K^T C0^-1`` (the ``lambda`` of MEMIT cancels).
The batch's keys must be linearly independent (``n <= d_in``); a singular ``K^T C0^-1 K`` is
solved by least squares (the reference falls back to a pseudo-inverse as well).

This module is also the worked example of adding a solver: this class and one line in
:data:`metake.solvers.registry.SOLVERS` (see ``docs/solvers.md``).
"""

from __future__ import annotations

import torch

from metake.solvers.base import Solver


def emmet_gate(keys: torch.Tensor, mom2: torch.Tensor) -> torch.Tensor:
    """EMMET's map ``M = (K^T C0^-1 K)^-1 K^T C0^-1`` (``[n, d_in]``, float64).

    ``keys`` is ``[n, d_in]``, ``mom2`` (C0) ``[d_in, d_in]``; the update for residuals ``R``
    (``[n, d_out]``) is ``R^T M``, and it maps each key exactly: ``M K^T = I``.
    """
    k = keys.double().T  # [d_in, n]
    c_inv_k = torch.linalg.solve(mom2.double().to(k.device), k)  # C0^-1 K, [d_in, n]
    system = k.T @ c_inv_k  # K^T C0^-1 K, [n, n]
    return torch.linalg.lstsq(system, c_inv_k.T).solution  # [n, d_in]


class EmmetSolver(Solver):
    """EMMET: the C0-smallest update that maps every key of the batch exactly."""

    name = "emmet"
    description = (
        "MEMIT's layer loop with equality constraints: each key mapped exactly, the C0-weighted "
        "change of preserved outputs minimal (EMMET)"
    )

    def gate(
        self, layer: int, keys: torch.Tensor, bare_keys: torch.Tensor | None = None
    ) -> torch.Tensor:
        """EMMET's gate ``[n, d_in]`` at ``layer`` (:func:`emmet_gate`)."""
        return emmet_gate(keys, self.second_moment(layer))
