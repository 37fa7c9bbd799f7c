"""The theory diagnostics: formulas against direct computations, fidelity, the diagnose run."""

from __future__ import annotations

import json

import pytest
import torch
from test_editor import REQUESTS, _editor
from test_hypergradient import CONTEXTS, LAYERS, _setup, _solvers
from tiny_models import tiny_model

from metake import MetakeError
from metake.cli import main
from metake.diagnostics.fidelity import exact_gradients, fidelity
from metake.diagnostics.plots import write_plots
from metake.diagnostics.run import diagnose, summary_markdown
from metake.diagnostics.theory import (
    SolverGeometry,
    attenuation,
    batch_attenuation,
    disruption_per_unit,
    key_drift,
    realised_fraction,
    spectral_drift,
    trap,
)
from metake.models.adapters import get_adapter
from metake.planners.hypergradient import (
    LowRankUpdate,
    ProxyChannel,
    SpreadChannel,
    virtual_updates,
)
from metake.solvers.alphaedit import alphaedit_delta, alphaedit_gate, null_space
from metake.solvers.memit import keys_and_values, memit_delta, memit_gate

DIM = 24


def _random(seed: int = 0):
    """Random keys ``[5, DIM]``, a positive definite C0 and a C_prev (float64)."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(5, DIM, generator=g, dtype=torch.float64)
    scales = torch.linspace(0.1, 3, DIM, dtype=torch.float64)[:, None]  # an anisotropic C0
    a = torch.randn(DIM, 3 * DIM, generator=g, dtype=torch.float64) * scales
    mom2 = a @ a.T / a.shape[1]
    b = torch.randn(DIM, 4, generator=g, dtype=torch.float64)
    return keys, mom2, b @ b.T


def test_memit_gamma_is_the_papers_spectral_sum_and_beta_the_solvers_own_share():
    keys, mom2, _ = _random()
    lam = 2.5
    gamma, beta = attenuation(SolverGeometry.memit(mom2, lam), keys)
    eigenvalues, vectors = torch.linalg.eigh(mom2)
    spectral = ((keys @ vectors) ** 2 / (lam * eigenvalues)).sum(-1)  # sum_j (u_j^T k)^2/sigma_j^2
    torch.testing.assert_close(gamma, spectral)
    for i in range(len(keys)):  # one key solved alone by the solver: Delta k = beta r
        k = keys[i : i + 1]
        torch.testing.assert_close(beta[i], (k @ memit_gate(k, mom2, lam).T).squeeze())
        r = torch.randn(1, 7, dtype=torch.float64)
        delta = memit_delta(k, r, mom2, lam)
        torch.testing.assert_close((delta @ k.T).T, beta[i] * r)
        torch.testing.assert_close(realised_fraction(k, r, delta), beta[i : i + 1])
        cost = torch.trace(delta @ mom2 @ delta.T) / (r**2).sum()
        geometry = SolverGeometry.memit(mom2, lam)
        torch.testing.assert_close(disruption_per_unit(geometry, k, mom2)[0], cost)


def test_alphaedit_beta_is_the_projected_key_formula_and_the_gates_share_with_a_cache():
    keys, mom2, prev = _random(1)
    projector = null_space(mom2, 0.3, relative=True).projector
    lam2 = 0.7
    zero = torch.zeros(DIM, DIM, dtype=torch.float64)
    _, beta = attenuation(SolverGeometry.alphaedit(projector, zero, lam2), keys)
    pk2 = ((keys @ projector) ** 2).sum(-1)
    torch.testing.assert_close(beta, pk2 / (pk2 + lam2))  # the paper's Eq. 35
    geometry = SolverGeometry.alphaedit(projector, prev, lam2)
    _, beta = attenuation(geometry, keys)
    for i in range(len(keys)):
        k = keys[i : i + 1]
        gate = alphaedit_gate(k, projector, prev, lam2)
        torch.testing.assert_close(beta[i], batch_attenuation(k, gate)[0])
        r = torch.randn(1, 3, dtype=torch.float64)
        delta = alphaedit_delta(k, r, projector, prev, lam2)
        torch.testing.assert_close((delta @ k.T).T, beta[i] * r)


def test_with_lambda_equals_a_fresh_geometry():
    keys, mom2, prev = _random(2)
    projector = null_space(mom2, 0.3, relative=True).projector
    memit = SolverGeometry.memit(mom2, 1.0).with_lambda(4.0)
    torch.testing.assert_close(attenuation(memit, keys)[1],
                               attenuation(SolverGeometry.memit(mom2, 4.0), keys)[1])  # fmt: skip
    alpha = SolverGeometry.alphaedit(projector, prev, 1.0).with_lambda(4.0)
    fresh = SolverGeometry.alphaedit(projector, prev, 4.0)
    torch.testing.assert_close(attenuation(alpha, keys)[1], attenuation(fresh, keys)[1])


def test_trap_sweep_is_monotone_and_its_budget_is_the_median_at_the_solvers_lambda():
    keys, mom2, _ = _random(3)
    needed = torch.linspace(0.5, 3.0, len(keys), dtype=torch.float64)
    geometry = SolverGeometry.memit(mom2, 1.0)
    sweep = trap(geometry, keys, needed, mom2)
    own = disruption_per_unit(geometry, keys, mom2) * needed**2
    assert sweep.budget == pytest.approx(float(own.median()))
    assert sweep.progress == sorted(sweep.progress, reverse=True)  # larger lambda: less through
    assert sweep.safe == sorted(sweep.safe)  # ... and less disruption
    assert all(
        b <= min(p, s) for b, p, s in zip(sweep.both, sweep.progress, sweep.safe, strict=True)
    )
    # a looser budget (a higher quantile) and a lower progress bar only admit more edits
    loose = trap(geometry, keys, needed, mom2, min_beta=0.2, budget_quantile=0.9)
    assert loose.budget == pytest.approx(float(torch.quantile(own, 0.9)))
    assert all(a >= b for a, b in zip(loose.safe, sweep.safe, strict=True))
    assert all(a >= b for a, b in zip(loose.progress, sweep.progress, strict=True))
    with pytest.raises(ValueError, match="min_beta"):
        trap(geometry, keys, needed, mom2, min_beta=0.0)


def test_drifts_are_zero_at_the_last_layer():
    keys, mom2, prev = _random(4)
    drift = spectral_drift({0: mom2 + prev, 1: mom2}, last=1)
    assert drift[1]["eps_C"] == 0.0
    assert drift[0]["eps_C"] == pytest.approx(float(torch.linalg.matrix_norm(prev, ord=2)))
    eps_k = key_drift({0: keys + 1.0, 1: keys}, last=1)
    torch.testing.assert_close(eps_k[0], torch.full((5,), DIM**0.5, dtype=torch.float64))


@pytest.mark.parametrize("solver", ["memit", "alphaedit"])
def test_fidelity_channels_sum_to_the_autograd_hypergradient(solver):
    model, tok, requests, values, targets, objective = _setup()
    dim = get_adapter(model).weight(model, 0).shape[1]
    gate, _ = _solvers(dim)[solver]
    exact = SpreadChannel(model, tok, requests, LAYERS, CONTEXTS, gate)
    channels, _ = exact_gradients(objective, exact, targets)
    v = targets.clone().requires_grad_(True)
    with exact(v):
        nll, kl = objective.terms()
    (direct,) = torch.autograd.grad(objective.task_loss(nll, kl), v)
    torch.testing.assert_close(sum(channels.values()), direct, rtol=1e-8, atol=1e-12)
    keys, _ = keys_and_values(model, tok, requests, CONTEXTS, LAYERS[-1], LAYERS[-1])
    module = get_adapter(model).mlp_out(model, LAYERS[-1])
    proxy = ProxyChannel(module, LAYERS[-1], gate(LAYERS[-1], keys), values)
    with proxy(v):
        nll, kl = objective.terms()
    (proxy_direct,) = torch.autograd.grad(objective.task_loss(nll, kl), v)
    report = fidelity(objective, proxy, exact, targets)
    assert report["norm_proxy"] == pytest.approx(float(proxy_direct.norm()), rel=1e-8)
    assert report["norm_true"] == pytest.approx(float(direct.norm()), rel=1e-8)
    # the figures from the autograd gradients computed here, not from the module's internals
    cosine = torch.nn.functional.cosine_similarity(proxy_direct.flatten(), direct.flatten(), 0)
    assert report["cosine"] == pytest.approx(float(cosine), rel=1e-7)
    error = (direct - proxy_direct).norm() / direct.norm()
    assert report["relative_error"] == pytest.approx(float(error), rel=1e-7)
    last = channels[LAYERS[-1]]
    assert report["rho"] == pytest.approx(float((direct - last).norm() / last.norm()), rel=1e-7)
    assert 0.0 < report["alpha"] <= 1.0 + 1e-9 and report["rho"] > 0.0


def test_direct_gradient_holds_the_earlier_layers_fixed():
    """g_direct against an independent computation: the spread recomputed by hand with every
    layer's keys, gate and value taken from the real replay as constants, only each layer's
    residual (v* - z) / (layers left) depending on v*."""
    model, tok, requests, values, targets, objective = _setup()
    dim = get_adapter(model).weight(model, 0).shape[1]
    gate, _ = _solvers(dim)["alphaedit"]
    exact = SpreadChannel(model, tok, requests, LAYERS, CONTEXTS, gate)
    with torch.no_grad():
        real = exact.updates(targets)  # the solver's factors at v*: residuals and gates
    v = targets.clone().requires_grad_(True)
    updates = {}
    for i, (layer, u) in enumerate(real.items()):
        z = targets.double() - u.up * (len(LAYERS) - i)  # the value layer i's residual came from
        updates[layer] = LowRankUpdate((v.double() - z) / (len(LAYERS) - i), u.down)
    with virtual_updates(model, updates):
        nll, kl = objective.terms()
    (expected,) = torch.autograd.grad(objective.task_loss(nll, kl), v)
    channels, _ = exact_gradients(objective, exact, targets, direct_only=True)
    torch.testing.assert_close(sum(channels.values()), expected.double(), rtol=1e-6, atol=1e-10)
    report = fidelity(objective, ProxyChannel(get_adapter(model).mlp_out(model, LAYERS[-1]),
                                              LAYERS[-1], real[LAYERS[-1]].down, values),
                      exact, targets)  # fmt: skip
    true = sum(exact_gradients(objective, exact, targets)[0].values())
    cosine = torch.nn.functional.cosine_similarity(expected.double().flatten(), true.flatten(), 0)
    assert report["cosine_direct"] == pytest.approx(float(cosine), rel=1e-6)
    assert report["cosine_direct"] < 1.0 - 1e-6  # the earlier layers' paths do matter here


def test_direct_channel_is_the_exact_replay_with_the_direct_gradient(tmp_path):
    """metake_hypergradient="direct": the virtual updates are the exact replay's, the gradient
    through them is g_direct (checked above against a hand-built spread); an edit with it runs,
    is deterministic, and differs from the exact one."""
    model, tok, requests, values, targets, objective = _setup()
    dim = get_adapter(model).weight(model, 0).shape[1]
    gate, _ = _solvers(dim)["alphaedit"]
    exact = SpreadChannel(model, tok, requests, LAYERS, CONTEXTS, gate)
    direct = SpreadChannel(model, tok, requests, LAYERS, CONTEXTS, gate, direct_only=True)
    with torch.no_grad():
        real, same = exact.updates(targets), direct.updates(targets)
    for layer in LAYERS:
        torch.testing.assert_close(same[layer].up, real[layer].up)
        torch.testing.assert_close(same[layer].down, real[layer].down)
    v = targets.clone().requires_grad_(True)
    with direct(v):
        nll, kl = objective.terms()
    (grad,) = torch.autograd.grad(objective.task_loss(nll, kl), v)
    channels, _ = exact_gradients(objective, exact, targets, direct_only=True)
    torch.testing.assert_close(grad.double(), sum(channels.values()), rtol=1e-6, atol=1e-10)

    def deltas(hypergradient):
        editor = _editor(tiny_model("llama"), tmp_path, method="metake", metake_steps=2,
                         metake_hypergradient=hypergradient)  # fmt: skip
        return editor.edit(REQUESTS).deltas

    first, again, exact_deltas = deltas("direct"), deltas("direct"), deltas("exact")
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.allclose(first[k], exact_deltas[k]) for k in first)


def test_fidelity_is_perfect_with_one_edit_layer():
    layer = 1
    model, tok, requests, values, targets, objective = _setup(layers=(layer,))
    dim = get_adapter(model).weight(model, 0).shape[1]
    gate, _ = _solvers(dim)["alphaedit"]
    keys, _ = keys_and_values(model, tok, requests, CONTEXTS, layer, layer)
    module = get_adapter(model).mlp_out(model, layer)
    proxy = ProxyChannel(module, layer, gate(layer, keys), values)
    exact = SpreadChannel(model, tok, requests, [layer], CONTEXTS, gate)
    report = fidelity(objective, proxy, exact, targets)
    assert report["cosine"] == pytest.approx(1.0, abs=1e-10)
    assert report["relative_error"] == pytest.approx(0.0, abs=1e-8)
    assert report["rho"] == 0.0


@pytest.mark.parametrize("solver", ["memit", "alphaedit"])
def test_diagnose_runs_sequential_batches_and_commits_metakes_edits(solver, tmp_path):
    model = tiny_model("llama")
    editor = _editor(model, tmp_path, method="metake", solver=solver, metake_steps=2)
    requests = editor.prepare(REQUESTS * 2)
    report = diagnose(editor, requests, batch_size=2, fidelity_every=2, progress=False)
    assert len(report["batches"]) == 2 and len(editor.history) == 4
    # the edits committed are MetaKE's: the same two batches through edit() leave the same deltas
    replay = _editor(tiny_model("llama"), tmp_path, method="metake", solver=solver,
                     metake_steps=2, contexts=editor.contexts)  # fmt: skip
    replay.edit(requests[:2])
    replay.edit(requests[2:])
    committed, replayed = editor.accumulated_deltas(), replay.accumulated_deltas()
    assert committed.keys() == replayed.keys() and committed
    for name, delta in committed.items():
        torch.testing.assert_close(delta, replayed[name], atol=1e-6, rtol=1e-5)
    batch = report["batches"][0]
    assert [s["step"] for s in batch["fidelity"]] == [0, 2]
    for label in ("stage1", "metake"):
        assert set(batch[label]["layers"]) == {"0", "1"}
        assert len(batch[label]["realised_share"]) == 2
    summary = report["summary"]
    assert 0.0 < summary["median_beta_before_edit"] < 1.0
    assert summary["median_cosine"] is not None
    json.dumps(report)  # JSON-able
    assert "Theorem 3" in summary_markdown(report)
    assert all(p.exists() for p in write_plots(report, tmp_path))


def test_diagnose_refuses_solvers_it_cannot_measure(tmp_path):
    editor = _editor(tiny_model("llama"), tmp_path, method="metake", solver="alphaedit_blue")
    with pytest.raises(MetakeError, match="spread solvers"):
        diagnose(editor, editor.prepare(REQUESTS), batch_size=2)


def test_diagnose_cli_rejects_bad_input_before_loading(capsys):
    assert main(["diagnose", "--solver", "rome", "--out", "x", "--model", "missing"]) == 2
    assert "spread solvers" in capsys.readouterr().err
    assert main(["diagnose", "--edits", "0", "--out", "x", "--model", "missing"]) == 2
    assert "--edits" in capsys.readouterr().err
    for flag, value in (("--trap-min-beta", "0"), ("--trap-budget-quantile", "1.5")):
        assert main(["diagnose", flag, value, "--out", "x", "--model", "missing"]) == 2
        assert flag in capsys.readouterr().err


def test_diagnose_cli_writes_the_report(model_dir, tmp_path):
    folder, corpus = model_dir
    data = tmp_path / "requests.json"
    data.write_text(json.dumps(REQUESTS * 2))
    out = tmp_path / "diag"
    code = main(["diagnose", "--model", str(folder), "--dataset", "requests", "--data", str(data),
                 "--edits", "3", "--batch-size", "2", "--solver", "memit", "--corpus", str(corpus),
                 "--samples", "8", "--layers", "0,1", "--set", "metake_steps=1", "--set",
                 "v_steps=2", "--set", "context_count=1", "--device", "cpu",
                 "--trap-min-beta", "0.3", "--trap-budget-quantile", "0.9",
                 "--out", str(out)])  # fmt: skip
    assert code == 0
    report = json.loads((out / "diagnostics.json").read_text())
    assert report["edits"] == 3 and len(report["batches"]) == 2
    assert report["trap_options"] == {"min_beta": 0.3, "budget_quantile": 0.9}
    assert all(b["trap"]["min_beta"] == 0.3 for b in report["batches"])
    summary = (out / "summary.md").read_text()
    assert summary.startswith("# metake diagnose") and "beta >= 0.3" in summary
    assert (out / "proxy_fidelity.png").exists()
