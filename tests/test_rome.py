"""ROME's rank-one update: the constraint holds exactly and it is the C0-weighted minimum change."""

from __future__ import annotations

import torch

from metake.solvers.rome import rome_delta


def _problem(d_in=12, d_out=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    key = torch.randn(d_in, generator=g, dtype=torch.float64)
    resid = torch.randn(d_out, generator=g, dtype=torch.float64)
    a = torch.randn(d_in, 3 * d_in, generator=g, dtype=torch.float64)
    return key, resid, a @ a.T / a.shape[1]


def test_rank_one_and_constraint_exact():
    key, resid, mom2 = _problem()
    delta = rome_delta(key, resid, mom2)
    assert torch.linalg.matrix_rank(delta) == 1
    torch.testing.assert_close(delta @ key, resid, rtol=1e-12, atol=1e-12)


def test_minimum_c0_weighted_change_among_solutions():
    """Among all Delta with Delta k = r, ROME's minimises tr(Delta C0 Delta^T)."""
    key, resid, mom2 = _problem(seed=1)
    delta = rome_delta(key, resid, mom2)
    cost = torch.trace(delta @ mom2 @ delta.T)
    g = torch.Generator().manual_seed(2)
    # other solutions: add any E with E k = 0 (rows orthogonal to k)
    proj = torch.eye(key.shape[0], dtype=torch.float64) - torch.outer(key, key) / (key @ key)
    for _ in range(5):
        other = delta + torch.randn(delta.shape, generator=g, dtype=torch.float64) @ proj * 0.1
        torch.testing.assert_close(other @ key, resid)
        assert torch.trace(other @ mom2 @ other.T) > cost


def test_identity_moment_gives_the_plain_outer_product():
    key, resid, _ = _problem(seed=3)
    eye = torch.eye(key.shape[0], dtype=torch.float64)
    torch.testing.assert_close(rome_delta(key, resid, eye), torch.outer(resid, key) / (key @ key))
