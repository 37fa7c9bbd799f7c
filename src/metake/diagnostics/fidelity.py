"""Theorem 3 measured: the structural proxy's hypergradient against the exact one.

At targets ``v*`` (``[n, d]``) the exact hypergradient of the solver-borne meta-loss (edit NLL +
locality KL; the meta-regulariser's gradient is the same for both and left out) is
``g_true = sum_l J_l^T s_l`` with ``s_l = dL/dDelta_l`` at the solver's real multi-layer update
and ``J_l = dDelta_l/dv*`` (through keys, residual spreading and every solve); the proxy's is
``g_proxy = s_L M_L^T`` with ``s_L`` taken at the proxy's virtual update (Eq. 8). Reported: their
cosine and relative error, the non-degeneracy ``alpha = ||s_L M_L^T|| / (||s_L||_F ||M_L||_2)``
and the last-layer dominance ``rho = ||sum_{l != L} J_l^T s_l|| / ||J_L^T s_L||``. Beside them
``g_direct``: ``g_true`` without the paths through the earlier layers' updates (keys, gates and
values held fixed; each layer's residual alone), the direction a look-ahead linearised at fixed
keys would follow, and its cosine with ``g_true``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from metake.planners.hypergradient import ProxyChannel, SpreadChannel, virtual_deltas
from metake.planners.metake import MetaObjective


def update_gradients(
    objective: MetaObjective, deltas: Mapping[int, torch.Tensor]
) -> tuple[dict[int, torch.Tensor], float]:
    """``s_l = dL_task/dDelta_l`` (``[d_out, d_in]`` each) at the virtual updates ``deltas``."""
    leaves = {layer: d.detach().requires_grad_(True) for layer, d in deltas.items()}
    with virtual_deltas(objective.model, leaves):
        nll, kl = objective.terms()
    task = objective.task_loss(nll, kl)
    grads = torch.autograd.grad(task, list(leaves.values()))
    return dict(zip(leaves, grads, strict=True)), task.item()


def proxy_gradient(
    objective: MetaObjective, proxy: ProxyChannel, v_star: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``g_proxy = (s_L M^T)^T`` (``[n, d]``), ``s_L`` (``[d_out, d_in]``) and the task loss."""
    gate = proxy.gate.double()
    resid = (v_star.detach() - proxy.current.to(v_star.dtype)).double()
    s, task = update_gradients(objective, {proxy.layer: resid.T @ gate})
    s_last = s[proxy.layer].double()
    return gate @ s_last.T, s_last, task


def exact_gradients(
    objective: MetaObjective, exact: SpreadChannel, v_star: torch.Tensor, direct_only: bool = False
) -> tuple[dict[int, torch.Tensor], float]:
    """Per edit layer ``J_l^T s_l`` (``[n, d]`` each; their sum is ``g_true``), task loss;
    with ``direct_only`` each ``J_l`` keeps only the layer's own residual (``g_direct``)."""
    v = v_star.detach().clone().requires_grad_(True)
    deltas = {layer: u.dense() for layer, u in exact.updates(v, direct_only).items()}
    s, task = update_gradients(objective, deltas)
    channels = {}
    for layer, delta in deltas.items():
        (grad,) = torch.autograd.grad(delta, v, s[layer].to(delta.dtype), retain_graph=True)
        channels[layer] = grad.double()
    return channels, task


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-300))


def fidelity(
    objective: MetaObjective, proxy: ProxyChannel, exact: SpreadChannel, v_star: torch.Tensor
) -> dict[str, float]:
    """Proxy against exact hypergradient at ``v_star`` (``[n, d]``): cosine, error, alpha, rho."""
    g_proxy, s_last, proxy_task = proxy_gradient(objective, proxy, v_star)
    channels, exact_task = exact_gradients(objective, exact, v_star)
    g_true = sum(channels.values())
    g_direct = sum(exact_gradients(objective, exact, v_star, direct_only=True)[0].values())
    g_last = channels[proxy.layer]
    rest = g_true - g_last
    gate_norm = float(torch.linalg.matrix_norm(proxy.gate.double(), ord=2))
    return {
        "cosine": _cosine(g_true, g_proxy),
        "relative_error": float((g_true - g_proxy).norm() / g_true.norm().clamp_min(1e-300)),
        "alpha": float(g_proxy.norm() / (s_last.norm() * gate_norm)),
        "rho": float(rest.norm() / g_last.norm().clamp_min(1e-300)),
        "cosine_last_layer": _cosine(g_last, g_proxy),
        "cosine_direct": _cosine(g_true, g_direct),
        "norm_direct": float(g_direct.norm()),
        "norm_true": float(g_true.norm()),
        "norm_proxy": float(g_proxy.norm()),
        "task_loss_exact": exact_task,
        "task_loss_proxy": proxy_task,
    }
