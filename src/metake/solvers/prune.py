"""PRUNE (Ma et al., 2024): restrain the large singular values of the accumulated edit.

Sequential edits make ``Delta W = W_edited - W_original`` (``[d_out, d_in]``) grow until its
singular values dwarf those of ``W``, and the edited matrix's condition number with them. PRUNE
takes the SVD ``Delta W = U diag(sigma) V^T`` and maps every ``sigma_i`` that reaches
``sigma_max`` (the largest singular value of the *original* weight) to

    F(sigma_i) = ln(sigma_i) + sigma_max - ln(sigma_max)

(natural log), leaving smaller ones and the singular vectors ``U``, ``V`` unchanged. ``F`` is
continuous at ``sigma_max`` and grows only logarithmically above it.
"""

from __future__ import annotations

import torch


def restrain_singular_values(sigma: torch.Tensor, sigma_max: float) -> torch.Tensor:
    """PRUNE's map ``F`` on singular values ``sigma`` (``[r]``): log growth above ``sigma_max``."""
    if sigma_max <= 0:
        raise ValueError(f"PRUNE: sigma_max must be positive, got {sigma_max}")
    restrained = (
        torch.log(sigma.clamp_min(sigma_max))
        + sigma_max
        - torch.log(torch.tensor(sigma_max, dtype=sigma.dtype, device=sigma.device))
    )
    return torch.where(sigma >= sigma_max, restrained, sigma)


def largest_singular_value(weight: torch.Tensor) -> float:
    """``sigma_max`` of a weight matrix ``[d_out, d_in]`` (float64 computation)."""
    return float(torch.linalg.matrix_norm(weight.double(), ord=2))


def prune_delta(delta: torch.Tensor, sigma_max: float) -> torch.Tensor:
    """PRUNE's restrained edit ``[d_out, d_in]`` (float64): ``U diag(F(sigma)) V^T`` of delta."""
    return prune_with_spectrum(delta, sigma_max)[0]


def prune_with_spectrum(delta: torch.Tensor, sigma_max: float) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`prune_delta` ``[d_out, d_in]`` and the edit's singular values before it (``[r]``,
    descending), from one SVD."""
    u, sigma, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    return (u * restrain_singular_values(sigma, sigma_max)) @ vh, sigma
