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


def test_direction_from_the_averaged_key_scale_from_the_bare_prompt():
    """ROME's compute_u/compute_v: Delta = r u^T / (k^T u), u = C0^-1 k_bar, so Delta k = r."""
    key_bar, resid, mom2 = _problem(seed=4)
    bare = key_bar + 0.3 * torch.randn(
        key_bar.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64
    )
    delta = rome_delta(key_bar, resid, mom2, bare_key=bare)
    torch.testing.assert_close(delta @ bare, resid, rtol=1e-10, atol=1e-10)  # exact at the bare key
    u = torch.linalg.lstsq(mom2, key_bar[:, None]).solution[:, 0]  # independent solve of C0 u = k
    torch.testing.assert_close(delta, torch.outer(resid, u) / (bare @ u), rtol=1e-8, atol=1e-10)
    # the old scale (Delta k_bar = r) misses r at the bare prompt
    assert (rome_delta(key_bar, resid, mom2) @ bare - resid).abs().max() > 1e-3


def test_ridge_is_a_fraction_of_the_mean_eigenvalue():
    """rome_ridge adds ridge * tr(C0)/d * I to C0 before the solve; 0 leaves C0 as it is."""
    key, resid, mom2 = _problem(seed=6)
    ridge = 0.1
    bumped = mom2 + ridge * torch.trace(mom2) / mom2.shape[0] * torch.eye(
        mom2.shape[0], dtype=mom2.dtype
    )
    torch.testing.assert_close(
        rome_delta(key, resid, mom2, ridge=ridge),
        rome_delta(key, resid, bumped),
        rtol=1e-10,
        atol=1e-12,
    )
    # an ill-conditioned C0 (one direction 1e-12): the ridge bounds the update, none does not
    u, _ = torch.linalg.qr(
        torch.randn(12, 12, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    )
    spectrum = torch.ones(12, dtype=torch.float64)
    spectrum[0] = 1e-12
    bad = u @ torch.diag(spectrum) @ u.T
    key = key - (key @ u[:, 0]) * u[:, 0]  # the bare key misses the tiny direction
    skewed = key + 1e-3 * u[:, 0]  # the averaged key has a little of it
    raw = rome_delta(skewed, resid, bad, bare_key=key)
    calm = rome_delta(skewed, resid, bad, bare_key=key, ridge=1e-3)
    assert calm.norm() < raw.norm() / 10


def test_rome_session_lands_the_target_exactly_at_the_bare_prompt(tmp_path):
    """After a ROME edit, layer L's output at the bare prompt's subject equals Stage I's v*."""
    from test_editor import _editor
    from tiny_models import tiny_model, tiny_tokenizer

    from metake.planners.standard import compute_targets
    from metake.requests import EditRequest
    from metake.solvers.memit import keys_and_values

    model = tiny_model("llama")
    editor = _editor(model, tmp_path, method="rome", layers=[1])
    request = EditRequest("{} lives in", "Anna Berg", "Oslo")
    editor.load_statistics()
    plan = compute_targets(model, tiny_tokenizer(), [request], editor.hparams, editor.contexts)
    editor.edit([request])
    _, values = keys_and_values(model, tiny_tokenizer(), [request], [""], 1, 1)
    torch.testing.assert_close(values, plan.v_target, rtol=1e-4, atol=1e-4)
    assert (plan.v_target - plan.v_init).norm() > 1e-2  # the edit moved something
