"""The paper's three theorems as measurable quantities (Sec. 4.1, 5 and Appendix B).

Every solver of metake updates a layer by ``Delta = R^T M`` (residuals ``R``, ``[n, d_out]``;
gate ``M``, ``[n, d_in]``, see :mod:`metake.solvers`). For ONE key ``k`` the gate is
``m = A^-1 b / (1 + gamma)`` with ``gamma = k^T A^-1 b``, so the realised change at the key is
``Delta k = beta * r`` with ``beta = gamma / (1 + gamma)`` (Theorem 1, Sherman–Morrison):

- MEMIT: ``A = lambda C0``, ``b = k`` — the paper's ``gamma = sum_j (u_j^T k)^2 / (sigma_j^2 +
  lambda_ridge)`` with our parametrisation's ridge on ``C0`` (``C_eff = lambda C0``);
- AlphaEdit: ``A = P C_prev + lambda_2 I``, ``b = P k``; without earlier batches (``C_prev = 0``)
  ``beta = ||Pk||^2 / (||Pk||^2 + lambda_2)``, the paper's Eq. 35.

In a batch the realised change of request ``i`` is row ``i`` of ``K M^T R``: its own share is
``diag(K M^T)`` (:func:`batch_attenuation`), the rest leaks between requests.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SolverGeometry:
    """What fixes a solver's single-key attenuation at one layer (all float64, ``[d_in, d_in]``).

    ``kind`` is ``"memit"`` (``system = lambda C0``, ``projector = None``) or ``"alphaedit"``
    (``system = P C_prev + lambda_2 I``, ``projector = P``); ``lam`` is that ``lambda``.
    """

    kind: str
    system: torch.Tensor
    projector: torch.Tensor | None
    lam: float

    @classmethod
    def memit(cls, mom2: torch.Tensor, lam: float) -> SolverGeometry:
        """MEMIT's ``lambda C0`` (``mom2``: ``[d_in, d_in]``)."""
        return cls("memit", lam * mom2.double(), None, lam)

    @classmethod
    def alphaedit(
        cls, projector: torch.Tensor, prev_keys_cov: torch.Tensor, lam2: float
    ) -> SolverGeometry:
        """AlphaEdit's ``P C_prev + lambda_2 I`` and ``P`` (``[d_in, d_in]`` each)."""
        p = projector.double()
        eye = torch.eye(p.shape[0], dtype=torch.float64, device=p.device)
        return cls("alphaedit", p @ prev_keys_cov.double().to(p.device) + lam2 * eye, p, lam2)

    def with_lambda(self, lam: float) -> SolverGeometry:
        """The same geometry with another ``lambda`` (for sweeping one global ridge)."""
        if self.kind == "memit":
            return SolverGeometry("memit", self.system * (lam / self.lam), None, lam)
        eye = torch.eye(self.system.shape[0], dtype=torch.float64, device=self.system.device)
        system = self.system + (lam - self.lam) * eye
        return SolverGeometry("alphaedit", system, self.projector, lam)

    def directions(self, keys: torch.Tensor) -> torch.Tensor:
        """``b`` per key (``[n, d_in]``): the key itself, or its null-space projection ``P k``."""
        k = keys.double().to(self.system.device)
        return k if self.projector is None else k @ self.projector


def single_key_gates(geometry: SolverGeometry, keys: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per key solved alone: ``gamma`` ``[n]``, ``beta`` ``[n]`` and the gate rows ``[n, d_in]``."""
    b = geometry.directions(keys)  # [n, d_in]
    solved = torch.linalg.solve(geometry.system, b.T).T  # A^-1 b, [n, d_in]
    gamma = (keys.double().to(b.device) * solved).sum(-1)
    gates = solved / (1 + gamma)[:, None]
    return gamma, gamma / (1 + gamma), gates


def attenuation(geometry: SolverGeometry, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Theorem 1 per key (``keys``: ``[n, d_in]``): ``gamma`` and ``beta = gamma/(1+gamma)``."""
    gamma, beta, _ = single_key_gates(geometry, keys)
    return gamma, beta


def batch_attenuation(keys: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """Each request's own share of its residual in a batch solve: ``diag(K M^T)`` ``[n]``."""
    return (keys.double() * gate.double().to(keys.device)).sum(-1)


def realised_fraction(keys: torch.Tensor, resid: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``||Delta k_i|| / ||r_i||`` per request (``[n]``) on an applied update ``[d_out, d_in]``."""
    realised = keys.double() @ delta.double().to(keys.device).T  # [n, d_out]
    return realised.norm(dim=-1) / resid.double().to(keys.device).norm(dim=-1)


def disruption_per_unit(geometry: SolverGeometry, keys: torch.Tensor, mom2: torch.Tensor):
    """Per key solved alone: ``m^T C0 m`` (``[n]``), the preserved keys' mean squared change per
    unit squared residual (``tr(Delta C0 Delta^T) = ||r||^2 m^T C0 m`` for ``Delta = r m^T``)."""
    _, _, gates = single_key_gates(geometry, keys)
    return ((gates @ mom2.double().to(gates.device)) * gates).sum(-1)


def spectral_drift(mom2s: dict[int, torch.Tensor], last: int) -> dict[int, dict[str, float]]:
    """Theorem 3's ``epsilon_C = ||C_l - C_L||_2`` per layer, also relative to ``||C_L||_2``."""
    reference = mom2s[last].double()
    scale = float(torch.linalg.matrix_norm(reference, ord=2))
    out = {}
    for layer, mom2 in mom2s.items():
        eps = float(torch.linalg.matrix_norm(mom2.double() - reference, ord=2))
        out[layer] = {"eps_C": eps, "eps_C_relative": eps / scale}
    return out


def key_drift(keys: dict[int, torch.Tensor], last: int) -> dict[int, torch.Tensor]:
    """Theorem 3's ``epsilon_k = ||k_l - k_L||`` per layer and request (``[n]`` each)."""
    reference = keys[last].double()
    return {layer: (k.double() - reference).norm(dim=-1) for layer, k in keys.items()}


@dataclass(frozen=True)
class TrapSweep:
    """Theorem 2 measured: one global ``lambda`` for every edit of a batch (see :func:`trap`)."""

    lambdas: list[float]
    progress: list[float]  # share of edits with beta >= min_beta, per lambda
    safe: list[float]  # share with disruption <= budget, per lambda
    both: list[float]  # share with both, per lambda
    budget: float
    min_beta: float
    budget_quantile: float  # the budget is this quantile of the disruption at the own lambda
    best_lambda_per_edit: list[float | None]  # largest grid lambda giving progress (None: none)
    safe_lambda_per_edit: list[float | None]  # smallest grid lambda within budget
    cost_per_realised: list[float]  # m^T C0 m / beta^2 at the solver's lambda, per edit
    cost_spread: float  # its 90th / 10th percentile: how anisotropic the edits' costs are


def trap(
    geometry: SolverGeometry,
    keys: torch.Tensor,
    needed: torch.Tensor,
    mom2: torch.Tensor,
    factors: tuple[float, ...] = (1 / 64, 1 / 16, 1 / 4, 1.0, 4.0, 16.0, 64.0),
    min_beta: float = 0.5,
    budget_quantile: float = 0.5,
) -> TrapSweep:
    """Sweep the solver's ``lambda`` by ``factors`` around its own value, every key solved alone.

    ``needed`` (``[n]``) is the norm of the change each edit asks for (``||v* - z||``). Per edit
    and ``lambda``: progress is ``beta >= min_beta``; its disruption of preserved keys is
    ``(beta ||u||)^2 c`` with ``c = m^T C0 m / beta^2`` (cost per unit squared *realised* change,
    fixed by the key; its spread over edits is the anisotropy the theorem is about). The budget
    is the ``budget_quantile`` of the disruption at the solver's own ``lambda`` (the median by
    default).
    """
    if not 0.0 < min_beta <= 1.0:
        raise ValueError(f"trap: min_beta must be in (0, 1], got {min_beta}")
    if not 0.0 <= budget_quantile <= 1.0:
        raise ValueError(f"trap: budget_quantile must be in [0, 1], got {budget_quantile}")
    needed = needed.double()
    lambdas = [geometry.lam * f for f in factors]
    betas, costs = [], []
    for lam in lambdas:
        g = geometry.with_lambda(lam)
        betas.append(attenuation(g, keys)[1].cpu())
        costs.append(disruption_per_unit(g, keys, mom2).cpu() * needed.cpu() ** 2)
    own = factors.index(1.0) if 1.0 in factors else len(factors) // 2
    budget = float(torch.quantile(costs[own], budget_quantile))
    per_realised = costs[own] / (betas[own] * needed.cpu()) ** 2  # fixed by the key
    spread = torch.quantile(per_realised, 0.9) / torch.quantile(per_realised, 0.1)
    progress = [b >= min_beta for b in betas]
    safe = [c <= budget for c in costs]
    n = len(needed)

    def share(masks: list[torch.Tensor]) -> list[float]:
        return [float(m.double().mean()) for m in masks]

    best = [max((lam for lam, p in zip(lambdas, progress, strict=True) if p[i]), default=None)
            for i in range(n)]  # fmt: skip
    lowest_safe = [min((lam for lam, s in zip(lambdas, safe, strict=True) if s[i]), default=None)
                   for i in range(n)]  # fmt: skip
    return TrapSweep(
        lambdas=lambdas,
        progress=share(progress),
        safe=share(safe),
        both=share([p & s for p, s in zip(progress, safe, strict=True)]),
        budget=budget,
        min_beta=min_beta,
        budget_quantile=budget_quantile,
        best_lambda_per_edit=best,
        safe_lambda_per_edit=lowest_safe,
        cost_per_realised=[float(c) for c in per_realised],
        cost_spread=float(spread),
    )
