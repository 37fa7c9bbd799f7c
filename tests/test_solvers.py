"""The solver protocol: the registry, the factory, EMMET's closed form, and adding a solver."""

from __future__ import annotations

import pytest
import torch
from test_editor import REQUESTS, _editor
from tiny_models import tiny_model

from metake.errors import MetakeError
from metake.hparams import MemitHparams
from metake.methods import resolve_method
from metake.solvers.base import Solver
from metake.solvers.emmet import emmet_gate
from metake.solvers.memit import memit_gate
from metake.solvers.registry import SOLVERS, build_solver, parse_solver, solver_layers


def _moment(d: int = 12, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, 3 * d, generator=g, dtype=torch.float64)
    return a @ a.T / (3 * d)


def _c0_inverse_sqrt(mom2: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(mom2)
    return vectors @ torch.diag(values.rsqrt()) @ vectors.T


def test_emmet_is_the_c0_smallest_update_that_maps_every_key_exactly():
    """Independent route: substitute Delta = Y C0^-1/2, then the least-norm Y of Y A = R with
    A = C0^-1/2 K is R pinv(A) (a pseudo-inverse from an SVD, no normal equations)."""
    mom2 = _moment()
    g = torch.Generator().manual_seed(1)
    keys = torch.randn(4, 12, generator=g, dtype=torch.float64)  # [n, d_in]
    resid = torch.randn(4, 7, generator=g, dtype=torch.float64)  # [n, d_out]
    delta = resid.T @ emmet_gate(keys, mom2)  # [d_out, d_in]
    torch.testing.assert_close(delta @ keys.T, resid.T)  # equality constraints hold
    root = _c0_inverse_sqrt(mom2)
    expected = resid.T @ torch.linalg.pinv(root @ keys.T) @ root
    torch.testing.assert_close(delta, expected)
    # any other update satisfying the constraints changes preserved outputs more
    other = delta + torch.randn(7, 12, generator=g, dtype=torch.float64) @ (
        torch.eye(12, dtype=torch.float64) - keys.T @ torch.linalg.pinv(keys.T)
    )
    torch.testing.assert_close(other @ keys.T, resid.T)
    assert torch.trace(other @ mom2 @ other.T) > torch.trace(delta @ mom2 @ delta.T)


def test_emmet_is_memit_without_a_trade_off():
    """MEMIT's gate tends to EMMET's as lambda -> 0 (the new keys outweigh C0 entirely)."""
    mom2 = _moment()
    keys = torch.randn(3, 12, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    torch.testing.assert_close(memit_gate(keys, mom2, 1e-9), emmet_gate(keys, mom2), atol=1e-6,
                               rtol=1e-6)  # fmt: skip


def test_registry_builds_every_solver_with_its_options():
    hp = MemitHparams(layers=(1, 2, 3))
    mom2 = _moment()
    keys = torch.randn(2, 12, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for name in SOLVERS:
        solver = build_solver(name, hp, lambda layer: mom2)
        assert solver.gate(1, keys).shape == (2, 12)
        assert solver.name == name
    rect = build_solver("memit_rect", hp, lambda layer: mom2)
    assert rect.rect_keep_fraction == hp.rect_keep_fraction and rect.edit_path == "spread"
    assert build_solver("rome", hp, lambda layer: mom2).edit_path == "one_by_one"
    assert build_solver("emmet_blue", hp, lambda layer: mom2).edit_path == "per_layer_targets"
    assert solver_layers("rome", hp) == [3] and solver_layers("alphaedit_blue", hp) == [1, 3]
    blue = build_solver("alphaedit_blue", hp.with_overrides(alphaedit_blue_lambda=3.0),
                        lambda layer: mom2)  # fmt: skip
    assert blue.base.lam2 == 3.0
    with pytest.raises(MetakeError, match="rome edits one layer"):
        parse_solver("rome_blue")
    with pytest.raises(MetakeError, match="unknown solver"):
        parse_solver("ridge")
    assert parse_solver("prune").name == "memit_prune"


def test_emmet_edits_a_model_as_a_method_and_under_metake(tmp_path):
    model = tiny_model("llama")
    before = model.state_dict()["model.layers.1.mlp.down_proj.weight"].clone()
    editor = _editor(model, tmp_path, method="emmet")
    editor.edit(REQUESTS)
    after = model.state_dict()["model.layers.1.mlp.down_proj.weight"]
    assert not torch.equal(before, after)
    assert resolve_method("metake", "emmet") == ("metake", "emmet")


class _HalfMemit(Solver):
    """A solver defined outside the package: MEMIT's gate, halved."""

    name = "halfmemit"
    description = "MEMIT's update, halved (a test solver)"

    def gate(self, layer, keys, bare_keys=None):
        return 0.5 * memit_gate(keys, self.second_moment(layer), self.hparams.mom2_update_weight)


def test_a_new_solver_needs_only_its_class_and_a_registry_line(tmp_path, monkeypatch):
    """Registered, it is a method, composes with the options and is a solver for metake."""
    monkeypatch.setitem(SOLVERS, "halfmemit", _HalfMemit)
    deltas = {}
    for method in ("memit", "halfmemit"):
        model = tiny_model("llama")
        editor = _editor(model, tmp_path, method=method)
        targets = torch.randn(2, model.config.hidden_size,
                              generator=torch.Generator().manual_seed(4))  # fmt: skip
        deltas[method] = editor.apply_targets(REQUESTS, targets)
    # the first layer sees the same keys and residuals: half of MEMIT's update exactly
    first = min(deltas["memit"])
    torch.testing.assert_close(deltas["halfmemit"][first], 0.5 * deltas["memit"][first])
    assert resolve_method("halfmemit_rect") == ("halfmemit_rect", "halfmemit_rect")
    assert resolve_method("metake", "halfmemit_prune") == ("metake", "halfmemit_prune")
    assert build_solver("halfmemit_rect", MemitHparams(layers=(0,)), _moment).name == (
        "halfmemit_rect"
    )
