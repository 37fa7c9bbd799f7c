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


def rome_delta(key: torch.Tensor, resid: torch.Tensor, mom2: torch.Tensor) -> torch.Tensor:
    """ROME's rank-one update ``[d_out, d_in]`` from one key ``[d_in]`` and residual ``[d_out]``."""
    k = key.double().reshape(-1)
    r = resid.double().reshape(-1)
    direction = torch.linalg.solve(mom2.double().to(k.device), k)  # C0^-1 k*, [d_in]
    return torch.outer(r, direction) / (direction @ k)
