"""The solver protocol: the registry, the factory, EMMET's closed form, and adding a solver."""

from __future__ import annotations

import pytest
import torch
from test_editor import REQUESTS, _editor
from tiny_models import tiny_model

from metake.errors import MetakeError
from metake.hparams import MemitHparams
from metake.methods import resolve_method
from metake.solvers.alphaedit import alphaedit_gate, null_space
from metake.solvers.base import Solver
from metake.solvers.emmet import emmet_gate
from metake.solvers.memit import keys_and_values, memit_gate
from metake.solvers.rect import rect_delta
from metake.solvers.registry import SOLVERS, build_solver, parse_solver, solver_layers
from metake.solvers.rome import rome_gate


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
    expected = {
        "memit": memit_gate(keys, mom2, hp.mom2_update_weight),
        "alphaedit": alphaedit_gate(
            keys,
            null_space(mom2, hp.nullspace_threshold).projector,
            torch.zeros(12, 12, dtype=torch.float64),
            hp.alphaedit_lambda,
        ),  # fmt: skip
        "rome": rome_gate(keys, mom2),
        "emmet": emmet_gate(keys, mom2),
    }
    assert set(SOLVERS) == set(expected)
    for name in SOLVERS:
        solver = build_solver(name, hp, lambda layer: mom2)
        torch.testing.assert_close(solver.gate(1, keys), expected[name], msg=name)
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


def test_emmet_writes_stage1_targets_exactly_and_plans_under_metake(tmp_path):
    """One edit layer, no context prefixes (the key is the bare prompt's): EMMET's equality
    constraints put every target in place exactly (up to float32 weights); MetaKE without
    look-ahead steps over EMMET is EMMET."""
    model = tiny_model("llama")
    editor = _editor(model, tmp_path, method="emmet", layers=[1], contexts=[""])  # bare keys
    targets = torch.randn(2, model.config.hidden_size, generator=torch.Generator().manual_seed(5))
    editor.apply_targets(REQUESTS, targets)
    parsed = editor.prepare(REQUESTS)
    _, values = keys_and_values(model, editor.tokenizer, parsed, editor.contexts, 1, 1)
    torch.testing.assert_close(values.float(), targets, atol=2e-4, rtol=2e-4)
    plain = _editor(tiny_model("llama"), tmp_path, method="emmet").edit(REQUESTS)
    meta = _editor(tiny_model("llama"), tmp_path, method="metake", solver="emmet",
                   metake_steps=0).edit(REQUESTS)  # fmt: skip
    assert meta.report.solver == "emmet"
    for name, delta in plain.deltas.items():
        torch.testing.assert_close(meta.deltas[name], delta)


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
    # with RECT: the halved update, sparsified against the weights it starts from
    model = tiny_model("llama")
    editor = _editor(model, tmp_path, method="halfmemit_rect", layers=[1],
                     rect_keep_fraction=0.3)  # fmt: skip
    weight = editor.adapter.weight(model, 1).detach().clone().float()
    half = _editor(tiny_model("llama"), tmp_path, method="halfmemit", layers=[1])
    full = half.apply_targets(REQUESTS, targets)[1]
    kept = editor.apply_targets(REQUESTS, targets)[1]
    torch.testing.assert_close(kept, rect_delta(full.float(), weight, 0.3))
    # under MetaKE without look-ahead steps: the plain solver's edit
    plain = _editor(tiny_model("llama"), tmp_path, method="halfmemit").edit(REQUESTS)
    meta = _editor(tiny_model("llama"), tmp_path, method="metake", solver="halfmemit",
                   metake_steps=0).edit(REQUESTS)  # fmt: skip
    for name, delta in plain.deltas.items():
        torch.testing.assert_close(meta.deltas[name], delta)
