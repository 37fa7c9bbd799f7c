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
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from metake.solvers.base import SecondMoment, Solver

if TYPE_CHECKING:
    from metake.diagnostics.theory import SolverGeometry
    from metake.hparams import MemitHparams

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


class AlphaEditSolver(Solver):
    """AlphaEdit: MEMIT's loop with the null-space projected update and a key cache.

    Keeps, per layer, the projector ``P`` (from ``C0`` and ``nullspace_threshold``) and
    ``C_prev``, the sum of ``K K^T`` over the batches edited so far (keys recomputed on the model
    after each batch, as the reference does). ``lam2`` is ``lambda_2`` (BLUE may set its own).
    """

    name = "alphaedit"
    description = (
        "MEMIT's loop with the update projected onto C0's null space, and a key cache of "
        "earlier batches for sequential editing"
    )
    reads = ("alphaedit",)
    measurable = True
    wants_batch_keys = True

    def __init__(
        self, hparams: MemitHparams, second_moment: SecondMoment, lam2: float | None = None
    ) -> None:
        super().__init__(hparams, second_moment)
        self.lam2 = hparams.alphaedit_lambda if lam2 is None else lam2
        self.null_spaces: dict[int, NullSpace] = {}
        self.prev_keys_cov: dict[int, torch.Tensor] = {}  # sum of K K^T so far, float64

    def null_space(self, layer: int) -> NullSpace:
        """The projector of ``layer`` (computed once from ``C0``)."""
        if layer not in self.null_spaces:
            hp = self.hparams
            ns = null_space(self.second_moment(layer), hp.nullspace_threshold,
                            hp.nullspace_relative)  # fmt: skip
            log.info("layer %d: null space of rank %d / %d", layer, ns.rank, ns.projector.shape[0])
            self.null_spaces[layer] = ns
        return self.null_spaces[layer]

    def key_cache(self, layer: int, dim: int) -> torch.Tensor:
        """``C_prev`` of ``layer`` (``[dim, dim]`` float64; zeros before any batch)."""
        if layer in self.prev_keys_cov:
            return self.prev_keys_cov[layer]
        return torch.zeros(dim, dim, dtype=torch.float64)

    def gate(
        self, layer: int, keys: torch.Tensor, bare_keys: torch.Tensor | None = None
    ) -> torch.Tensor:
        """AlphaEdit's gate ``[n, d_in]`` with this session's projector and key cache."""
        prev = self.key_cache(layer, keys.shape[1])
        return alphaedit_gate(keys, self.null_space(layer).projector, prev, self.lam2)

    def geometry(self, layer: int) -> SolverGeometry:
        """``P C_prev + lambda_2 I`` and ``P`` of ``layer``."""
        from metake.diagnostics.theory import SolverGeometry

        projector = self.null_space(layer).projector
        prev = self.key_cache(layer, projector.shape[0])
        return SolverGeometry.alphaedit(projector, prev, self.lam2)

    def next_state(self, keys: Mapping[int, torch.Tensor]) -> dict[str, Any]:
        """The key cache with this batch's ``K K^T`` added (``keys``: ``{layer: [n, d_in]}``)."""
        cache = dict(self.prev_keys_cov)
        for layer, layer_keys in keys.items():
            k = layer_keys.double().cpu()
            cache[layer] = self.key_cache(layer, k.shape[1]) + k.T @ k
        return {"prev_keys_cov": cache}

    def state_dict(self) -> dict[str, Any]:
        """The key cache ``{"prev_keys_cov": {layer: [d_in, d_in]}}``."""
        return {"prev_keys_cov": {k: v.clone() for k, v in self.prev_keys_cov.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Take over the key cache of ``state`` (none: an empty one)."""
        cache = state.get("prev_keys_cov", {})
        self.prev_keys_cov = {int(k): v.clone() for k, v in cache.items()}

    def reset(self) -> None:
        """Empty the key cache (the projectors depend on C0 only and stay)."""
        self.prev_keys_cov.clear()

    def report(self) -> dict[str, Any]:
        """The null-space rank of every layer solved so far."""
        return {"null_space_rank": {layer: ns.rank for layer, ns in self.null_spaces.items()}}
