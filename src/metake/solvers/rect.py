"""RECT (Gu et al., 2024): keep only the update entries with the largest relative change.

For an update ``Delta`` of weight ``W`` (both ``[d_out, d_in]``), RECT keeps the top ``k``
fraction of entries ranked by ``|Delta_ij| / |W_ij|`` over the whole matrix and zeroes the rest,
so that an edit changes few weights, each by a large share of its own size. The kept entries are
not rescaled.
"""

from __future__ import annotations

import math

import torch


def rect_mask(delta: torch.Tensor, weight: torch.Tensor, keep_fraction: float) -> torch.Tensor:
    """Boolean mask ``[d_out, d_in]`` of the ``ceil(keep_fraction * numel)`` largest ``|Delta/W|``.

    Exactly that many entries are ``True`` (ties broken by ``torch.topk``'s order). A zero weight
    entry counts as an infinite relative change.
    """
    if delta.shape != weight.shape:
        raise ValueError(
            f"RECT: update {tuple(delta.shape)} and weight {tuple(weight.shape)} differ"
        )
    if not 0.0 < keep_fraction <= 1.0:
        raise ValueError(f"RECT: keep_fraction must lie in (0, 1], got {keep_fraction}")
    relative = delta.abs().double() / weight.abs().double().to(delta.device)
    relative = torch.nan_to_num(relative, nan=0.0, posinf=math.inf).flatten()
    count = math.ceil(keep_fraction * relative.numel())
    mask = torch.zeros_like(relative, dtype=torch.bool)
    mask[torch.topk(relative, count, sorted=False).indices] = True
    return mask.view_as(delta)


def rect_delta(delta: torch.Tensor, weight: torch.Tensor, keep_fraction: float) -> torch.Tensor:
    """RECT's sparse update: ``Delta`` (``[d_out, d_in]``) with all but the top entries zeroed."""
    return delta * rect_mask(delta, weight, keep_fraction).to(delta.device)
