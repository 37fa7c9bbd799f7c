"""Finite checks at every stage that writes or keeps numbers: a NaN or an infinity never passes
silently into targets, weights, caches or files (:class:`~metake.errors.NonFiniteError`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from metake.errors import NonFiniteError
from metake.requests import EditRequest


def require_finite(
    values: torch.Tensor,
    stage: str,
    *,
    layer: int | None = None,
    requests: Sequence[EditRequest] | None = None,
    per_request: bool = False,
    consequence: str = "nothing was changed (the batch was rolled back)",
) -> None:
    """Raise :class:`NonFiniteError` unless every entry of ``values`` is finite.

    The message names ``stage``, ``layer`` and the requests concerned: with ``per_request`` the
    first dimension of ``values`` runs over ``requests`` and only the rows with a non-finite
    entry are named, otherwise every request of the batch is. ``consequence`` ends the message
    (what the caller did about it).
    """
    finite = torch.isfinite(values.detach())
    if bool(finite.all()):
        return
    where = f" at layer {layer}" if layer is not None else ""
    named = ""
    if requests:
        rows = range(len(requests))
        if per_request and values.dim() > 0 and values.shape[0] == len(requests):
            rows = [i for i in rows if not bool(finite[i].all())]
        subjects = ", ".join(f"#{i} {requests[i].subject!r}" for i in list(rows)[:5])
        more = f" and {len(rows) - 5} more" if len(rows) > 5 else ""
        named = f" for request(s) {subjects}{more}"
    bad = int((~finite).sum())
    raise NonFiniteError(
        f"{stage}{where} produced {bad} non-finite value(s) (NaN or inf){named}; {consequence}"
    )
