"""Stage II, AlphaEdit: MEMIT's layer loop with the update projected onto C0's null space.

``P = U U^T`` with ``U`` the eigenvectors of ``C0 = E[k k^T]`` whose eigenvalues lie below a
threshold (the directions preserved knowledge hardly uses). For keys ``K`` (``[d_in, n]`` as
columns), residuals ``R`` (``[d_out, n]``), the keys of earlier sequential batches accumulated
in ``C_prev = sum K_prev K_prev^T`` and ``lambda_2``:

    Delta = R K^T P (K K^T P + C_prev P + lambda_2 I)^-1

the minimiser, over ``Delta = D P``, of ``||D P K - R||^2 + ||D P K_prev||^2 + lambda_2 ||D P||^2``.
``Delta (I - P) = 0`` holds exactly, so keys in the preserved subspace are untouched.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NullSpace:
    """Projector ``P`` (``[d, d]``, float64) onto C0's low-eigenvalue directions, and its rank."""

    projector: torch.Tensor
    rank: int
    threshold: float  # the absolute eigenvalue threshold that was applied
    max_eigenvalue: float


def null_space(mom2: torch.Tensor, threshold: float, relative: bool = False) -> NullSpace:
    """``P`` from the eigen-decomposition of ``mom2`` (``[d, d]``): eigenvalues below threshold.

    With ``relative=True`` the threshold is a fraction of the largest eigenvalue, which keeps its
    meaning across models whose activations differ in scale. A projector of full rank (``P = I``)
    preserves nothing and one of rank 0 allows no update: both are logged as warnings.
    """
    values, vectors = torch.linalg.eigh(mom2.double())
    cutoff = threshold * float(values.max()) if relative else threshold
    basis = vectors[:, values < cutoff]  # [d, r]
    rank, dim = basis.shape[1], mom2.shape[0]
    if rank == dim:
        log.warning(
            "null-space threshold %.3g keeps all %d directions (largest eigenvalue %.3g): P = I, "
            "AlphaEdit preserves nothing; lower the threshold or use a relative one",
            cutoff,
            dim,
            float(values.max()),
        )
    elif rank == 0:
        log.warning("null-space threshold %.3g leaves no direction: P = 0, no update", cutoff)
    return NullSpace(basis @ basis.T, rank, cutoff, float(values.max()))


def alphaedit_gate(
    keys: torch.Tensor, projector: torch.Tensor, prev_keys_cov: torch.Tensor, lam2: float
) -> torch.Tensor:
    """AlphaEdit's linear map ``M = (P (K K^T + C_prev) + lambda_2 I)^-1 P K``, transposed.

    ``keys`` is ``[n, d_in]``, ``projector`` P and ``prev_keys_cov`` (the accumulated
    ``K_prev K_prev^T`` of earlier batches, zeros for the first one) are ``[d_in, d_in]``.
    Returns ``M`` as ``[n, d_in]`` (float64); the update for residuals ``R`` is ``R^T M``.
    """
    k = keys.double().T  # [d_in, n]
    p = projector.double().to(k.device)
    system = p @ (k @ k.T + prev_keys_cov.double().to(k.device))
    system += lam2 * torch.eye(system.shape[0], dtype=torch.float64, device=k.device)
    return torch.linalg.solve(system, p @ k).T


def alphaedit_delta(
    keys: torch.Tensor,
    resid: torch.Tensor,
    projector: torch.Tensor,
    prev_keys_cov: torch.Tensor,
    lam2: float,
) -> torch.Tensor:
    """AlphaEdit's update ``[d_out, d_in]`` from keys ``[n, d_in]``, residuals ``[n, d_out]``.

    ``projector`` is P (``[d_in, d_in]``), ``prev_keys_cov`` the accumulated ``K_prev K_prev^T``
    of earlier batches (``[d_in, d_in]``, zeros for the first one).
    """
    gate = alphaedit_gate(keys, projector, prev_keys_cov, lam2)
    return resid.double().to(gate.device).T @ gate
