"""AlphaEdit's closed form: null-space projector and update against independent computations."""

from __future__ import annotations

import logging

import pytest
import torch

from metake.solvers.alphaedit import alphaedit_delta, null_space


def _low_rank_moment(d=16, used=10, seed=0) -> torch.Tensor:
    """A second moment whose keys live mostly in ``used`` of ``d`` directions."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]
    scales = torch.cat([torch.linspace(1.0, 3.0, used), torch.full((d - used,), 1e-4)])
    return basis @ torch.diag(scales.double()) @ basis.T


def test_null_space_keeps_the_small_eigen_directions():
    mom2 = _low_rank_moment()
    ns = null_space(mom2, threshold=1e-2)
    assert ns.rank == 6
    p = ns.projector
    torch.testing.assert_close(p @ p, p)  # a projector
    torch.testing.assert_close(p, p.T)
    # directions preserved knowledge uses are (almost) removed: ||P C0 P|| tiny
    assert torch.linalg.matrix_norm(p @ mom2 @ p, ord=2) < 1e-3


def test_relative_threshold_and_degenerate_projectors_warn(caplog):
    mom2 = _low_rank_moment()
    assert null_space(mom2, threshold=1e-2, relative=True).rank == 6  # 1% of the largest (3.0)
    with caplog.at_level(logging.WARNING, logger="metake.solvers.alphaedit"):
        everything = null_space(mom2, threshold=10.0)
    assert everything.rank == 16 and "P = I" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="metake.solvers.alphaedit"):
        nothing = null_space(mom2, threshold=1e-9)
    assert nothing.rank == 0 and "P = 0" in caplog.text


def _problem(n=4, d_in=16, d_out=8, n_prev=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(n, d_in, generator=g, dtype=torch.float64)
    resid = torch.randn(n, d_out, generator=g, dtype=torch.float64)
    prev = torch.randn(n_prev, d_in, generator=g, dtype=torch.float64)
    return keys, resid, prev


@pytest.mark.parametrize("lam2", [0.1, 10.0])
def test_alphaedit_delta_solves_its_objective(lam2):
    """min over D of ||D P K - R||^2 + ||D P K_prev||^2 + lam2 ||D P||^2, with Delta = D P."""
    keys, resid, prev = _problem()
    p = null_space(_low_rank_moment(), 1e-2).projector
    # least squares on the stacked system D [P K, P K_prev^T, sqrt(lam2) P] = [R^T, 0, 0]
    design = torch.cat([(p @ keys.T).T, (p @ prev.T).T, lam2**0.5 * p])  # rows: [., d_in]
    rhs = torch.cat([resid, torch.zeros(prev.shape[0] + p.shape[0], resid.shape[1]).double()])
    d_min_norm = torch.linalg.lstsq(design, rhs, driver="gelsd").solution.T  # [d_out, d_in]
    expected = d_min_norm @ p
    got = alphaedit_delta(keys, resid, p, prev.T @ prev, lam2)
    torch.testing.assert_close(got, expected, rtol=1e-7, atol=1e-9)


def test_alphaedit_delta_leaves_the_preserved_subspace_untouched():
    keys, resid, prev = _problem(seed=2)
    mom2 = _low_rank_moment(seed=2)
    p = null_space(mom2, 1e-2).projector
    delta = alphaedit_delta(keys, resid, p, prev.T @ prev, 10.0)
    eye = torch.eye(p.shape[0], dtype=torch.float64)
    assert torch.linalg.matrix_norm(delta @ (eye - p)) < 1e-10 * torch.linalg.matrix_norm(delta)
    # so the keys that preserved knowledge produces barely move: ||Delta C0 Delta^T|| tiny
    assert torch.trace(delta @ mom2 @ delta.T) < 1e-3 * torch.trace(delta @ delta.T)


def test_with_identity_projector_and_no_cache_it_is_ridge_regression():
    keys, resid, _ = _problem(seed=3)
    eye = torch.eye(keys.shape[1], dtype=torch.float64)
    got = alphaedit_delta(keys, resid, eye, torch.zeros_like(eye), 2.0)
    expected = resid.T @ keys @ torch.linalg.inv(keys.T @ keys + 2.0 * eye)
    torch.testing.assert_close(got, expected)
