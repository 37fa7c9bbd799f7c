"""Stage II, ROME: a rank-one update of one layer's MLP output projection per edit.

For one edit with key ``k*`` (``[d_in]``, context-averaged) and wanted change ``r`` of the
layer's output at the subject's last token (``[d_out]``), ROME's constrained least squares
(minimise the change on C0-weighted keys subject to ``(W + Delta) k* = W k* + r``) gives

    Delta = r (C0^-1 k*)^T / ((C0^-1 k*)^T k*)

which satisfies the constraint exactly: ``Delta k* = r``. Several edits are applied one after
another (ROME has no batched form), each against the weights the previous one left.
"""

from __future__ import annotations

import torch


def rome_gate(keys: torch.Tensor, mom2: torch.Tensor) -> torch.Tensor:
    """ROME's map per key: row ``i`` is ``(C0^-1 k_i)^T / (k_i^T C0^-1 k_i)`` (``[n, d_in]``).

    Each request's update is ``r_i`` times its row (rank one); for several requests the rows
    stack, which is the sum of their rank-one updates when each is computed on the same weights.
    """
    k = keys.double().reshape(-1, keys.shape[-1]).T  # [d_in, n]
    directions = torch.linalg.solve(mom2.double().to(k.device), k)  # C0^-1 k_i, [d_in, n]
    return (directions / (directions * k).sum(0)).T


def rome_delta(key: torch.Tensor, resid: torch.Tensor, mom2: torch.Tensor) -> torch.Tensor:
    """ROME's rank-one update ``[d_out, d_in]`` from one key ``[d_in]`` and residual ``[d_out]``."""
    gate = rome_gate(key.reshape(1, -1), mom2)  # [1, d_in]
    return resid.double().to(gate.device).reshape(-1, 1) @ gate
