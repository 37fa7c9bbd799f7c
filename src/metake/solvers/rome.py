"""Stage II, ROME: a rank-one update of one layer's MLP output projection per edit.

For one edit, ROME's ``compute_u`` takes the direction ``u = C0^-1 k_bar`` from the key averaged
over the context prefixes (``k_bar``, ``[d_in]``; a plain mean over all of them, ROME's templates
being one flat list, unlike MEMIT's per-type mean), and its ``compute_v`` sets the scale at the bare
prompt: with ``k`` the bare prompt's key and ``r`` the wanted change of the layer's output there
(``[d_out]``),

    Delta = r u^T / (k^T u)

so that ``Delta k = r`` holds exactly at the bare prompt (and, when ``k_bar = k``, ``Delta`` is the
C0-weighted minimum change among all updates that satisfy it). ``C0`` gets a ridge
``rome_ridge * tr(C0) / d_in`` before it is solved, so that an ill-conditioned ``C0`` cannot blow
up the direction (the reference inverts ``C0`` as it is; ``rome_ridge=0`` does the same). Several
edits are applied one after another (ROME has no batched form), each against the weights the
previous one left.
"""

from __future__ import annotations

import torch

from metake.solvers.base import Solver


def ridged(mom2: torch.Tensor, ridge: float) -> torch.Tensor:
    """``C0 + ridge * tr(C0) / d * I`` in float64 (``[d, d]``): a scale-free ridge."""
    mom2 = mom2.double()
    if ridge == 0:
        return mom2
    scale = ridge * float(torch.diagonal(mom2).mean())
    return mom2 + scale * torch.eye(mom2.shape[0], dtype=mom2.dtype, device=mom2.device)


def rome_gate(
    keys: torch.Tensor,
    mom2: torch.Tensor,
    bare_keys: torch.Tensor | None = None,
    ridge: float = 0.0,
) -> torch.Tensor:
    """ROME's map per request: row ``i`` is ``u_i^T / (k_i^T u_i)``, ``u_i = C0^-1 k_bar_i``.

    ``keys`` (``[n, d_in]``) are the context-averaged keys ``k_bar``, ``bare_keys`` (same shape,
    default ``keys``) the bare prompts' keys ``k``; returns ``[n, d_in]`` (float64). Each
    request's update is ``r_i`` times its row (rank one); for several requests the rows stack,
    which is the sum of their rank-one updates when each is computed on the same weights.
    """
    k_bar = keys.double().reshape(-1, keys.shape[-1]).T  # [d_in, n]
    k = k_bar if bare_keys is None else bare_keys.double().reshape(k_bar.T.shape).T
    directions = torch.linalg.solve(ridged(mom2, ridge).to(k_bar.device), k_bar)  # [d_in, n]
    return (directions / (directions * k.to(k_bar.device)).sum(0)).T


def rome_delta(
    key: torch.Tensor,
    resid: torch.Tensor,
    mom2: torch.Tensor,
    bare_key: torch.Tensor | None = None,
    ridge: float = 0.0,
) -> torch.Tensor:
    """ROME's rank-one update ``[d_out, d_in]`` from the context-averaged key ``[d_in]``, the
    residual ``[d_out]`` at the bare prompt and that prompt's key ``[d_in]`` (default ``key``)."""
    bare = None if bare_key is None else bare_key.reshape(1, -1)
    gate = rome_gate(key.reshape(1, -1), mom2, bare, ridge)  # [1, d_in]
    return resid.double().to(gate.device).reshape(-1, 1) @ gate


class RomeSolver(Solver):
    """ROME: one rank-one update of the last edit layer per request, in order."""

    name = "rome"
    description = (
        "rank-one update of the last edit layer, one request after another (C0^-1 directed)"
    )
    reads = ("rome",)
    key_average = "plain"
    one_layer = True

    def gate(
        self, layer: int, keys: torch.Tensor, bare_keys: torch.Tensor | None = None
    ) -> torch.Tensor:
        """ROME's rows ``u_i^T / (k_i^T u_i)`` (:func:`rome_gate`), ``[n, d_in]``."""
        return rome_gate(keys, self.second_moment(layer), bare_keys, self.hparams.rome_ridge)
