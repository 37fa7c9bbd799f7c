"""``metake diagnose``: measure the paper's theorems on a real model and real edits.

A MetaKE session (look-ahead through the proxy, as ``metake`` runs) over batches of requests;
for every batch, before its edit is committed:

1. **Theorem 1** (spectral suppression): per edit and edit layer ``gamma`` and ``beta`` of the
   solver's own geometry (C0 and lambda, or AlphaEdit's P, lambda_2 and key cache); then Stage
   II is executed twice on a scratch copy of the weights, once for Stage I's target and once for
   MetaKE's refined one, recording at every layer the keys, residuals and updates the solver
   used: ``beta`` of those keys, the batch share ``diag(K M^T)``, the realised fraction
   ``||Delta_l k_l|| / ||r_l||``, and at the last layer how much of Stage I's requested change
   ``v_plan - z`` the edited model's output moved (``realised share``, ``along``);
2. **Theorem 2** (static regularisation trap): :func:`~metake.diagnostics.theory.trap` at the
   last layer, the needed norms being ``||v_plan - z||``;
3. **Theorem 3** (proxy fidelity): at the look-ahead's steps, proxy against exact hypergradient
   (:func:`~metake.diagnostics.fidelity.fidelity`), and the cross-layer drifts ``eps_C``,
   ``eps_k``.

Then MetaKE's targets are committed (:meth:`~metake.editor.Editor.apply_targets`) and the next
batch sees the edited model, as in sequential editing.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from metake.diagnostics.fidelity import fidelity
from metake.diagnostics.theory import (
    SolverGeometry,
    attenuation,
    batch_attenuation,
    key_drift,
    realised_fraction,
    spectral_drift,
    trap,
)
from metake.editor import Editor
from metake.errors import MetakeError
from metake.methods import parse_solver
from metake.planners.hypergradient import ProxyChannel, SpreadChannel
from metake.planners.metake import MetaObjective, edit_contexts, lookahead_targets
from metake.planners.standard import TargetPlan, compute_targets
from metake.requests import EditRequest
from metake.solvers.memit import apply_spread, keys_and_values, subject_activations
from metake.solvers.registry import SOLVERS

log = logging.getLogger(__name__)


def solver_geometry(editor: Editor, layer: int) -> SolverGeometry:
    """The single-key attenuation geometry of the session's solver at ``layer`` right now."""
    return editor.stage2.geometry(layer)


def _floats(x: torch.Tensor) -> list[float]:
    return [float(v) for v in x.detach().cpu().reshape(-1)]


def _execution(
    editor: Editor, requests: list[EditRequest], targets: torch.Tensor, plan: TargetPlan
) -> dict[str, Any]:
    """Run Stage II for ``targets`` on the model, measure it, and put the weights back."""
    model, tok, contexts = editor.model, editor.tokenizer, editor.contexts
    layers = list(editor.hparams.layers)
    last = layers[-1]
    geometries = {layer: solver_geometry(editor, layer) for layer in layers}
    solve = editor.layer_solve()
    per_layer: dict[int, dict[str, list[float]]] = {}

    def recording_solve(layer: int, keys: torch.Tensor, resid: torch.Tensor) -> torch.Tensor:
        delta = solve(layer, keys, resid)
        gamma, beta = attenuation(geometries[layer], keys)
        per_layer[layer] = {
            "gamma": _floats(gamma),
            "beta": _floats(beta),
            "batch_share": _floats(batch_attenuation(keys, editor.gate(layer, keys))),
            "realised_fraction": _floats(realised_fraction(keys, resid, delta)),
            "residual_norm": _floats(resid.norm(dim=-1)),
        }
        return delta

    snapshot = {layer: editor.adapter.weight(model, layer).detach().clone() for layer in layers}
    try:
        apply_spread(model, tok, requests, targets, layers, contexts, recording_solve)
        _, after = keys_and_values(model, tok, requests, contexts, last, last)
    finally:
        for layer, weight in snapshot.items():
            editor.adapter.set_weight(model, layer, weight)
    before = plan.v_init.to(after)
    demand = plan.v_target.to(after) - before  # Stage I's requested change at the last layer
    moved = after - before
    return {
        "layers": {str(layer): values for layer, values in per_layer.items()},
        "realised_share": _floats(moved.norm(dim=-1) / demand.norm(dim=-1)),
        "along": _floats((moved * demand).sum(-1) / (demand * demand).sum(-1)),
        "target_norm": _floats((targets.to(after) - before).norm(dim=-1)),
    }


def _batch(
    editor: Editor, requests: list[EditRequest], fidelity_every: int, trap_options: TrapOptions
) -> tuple[dict[str, Any], torch.Tensor]:
    """Every measurement of one batch; returns them and MetaKE's refined targets."""
    model, tok, hp = editor.model, editor.tokenizer, editor.hparams
    contexts = editor.contexts
    layers = list(hp.layers)
    last = layers[-1]
    torch.manual_seed(editor.seed)
    keys = subject_activations(model, tok, requests, contexts, layers, last).keys
    plan = compute_targets(model, tok, requests, hp, contexts)
    before = {}
    for layer in layers:
        gamma, beta = attenuation(solver_geometry(editor, layer), keys[layer])
        before[str(layer)] = {"gamma": _floats(gamma), "beta": _floats(beta)}
    proxy = editor.channel(requests, contexts, plan, hypergradient="proxy")
    exact = editor.channel(requests, contexts, plan, hypergradient="exact")
    assert isinstance(proxy, ProxyChannel) and isinstance(exact, SpreadChannel)
    objective = MetaObjective(model, tok, requests, plan.v_target, hp, edit_contexts(contexts, hp),
                              editor.locality_prompts, entry_layer=layers[0])  # fmt: skip
    steps: list[dict[str, float]] = []

    def observe(step: int, v_star: torch.Tensor) -> None:
        if step % fidelity_every == 0 or step == hp.metake_steps:
            steps.append({"step": step, **fidelity(objective, proxy, exact, v_star)})

    start = time.perf_counter()
    refined = lookahead_targets(model, tok, requests, plan, proxy, hp, contexts,
                                editor.locality_prompts, observer=observe)  # fmt: skip
    seconds = time.perf_counter() - start
    needed = (plan.v_target - plan.v_init.to(plan.v_target)).norm(dim=-1)
    sweep = trap(solver_geometry(editor, last), keys[last], needed, editor.second_moment(last),
                 min_beta=trap_options.min_beta,
                 budget_quantile=trap_options.budget_quantile)  # fmt: skip
    record = {
        "subjects": [r.subject for r in requests],
        "attenuation_before_edit": before,
        "stage1": _execution(editor, requests, plan.v_target, plan),
        "metake": _execution(editor, requests, refined.v_target, plan),
        "fidelity": steps,
        "seconds_lookahead_with_fidelity": seconds,
        "eps_k": {str(layer): _floats(d) for layer, d in key_drift(keys, last).items()},
        "key_norm": {str(layer): _floats(k.norm(dim=-1)) for layer, k in keys.items()},
        "trap": sweep.__dict__,
        "lookahead_history": refined.history,
    }
    return record, refined.v_target


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def summarise(batches: Sequence[dict[str, Any]], last: int) -> dict[str, Any]:
    """Medians over every edit (and every look-ahead step) of the run."""

    def gather(path: Sequence[str]) -> list[float]:
        out = []
        for batch in batches:
            node: Any = batch
            for key in path:
                node = node[key]
            out += node
        return out

    def at(label: str, name: str) -> float | None:
        return _median(gather([label, "layers", str(last), name]))

    steps = [s for b in batches for s in b["fidelity"]]
    first = [s for s in steps if s["step"] == 0]
    return {
        "last_layer": last,
        "median_beta_before_edit": _median(gather(["attenuation_before_edit", str(last), "beta"])),
        "median_beta_stage1_execution": at("stage1", "beta"),
        "median_beta_metake_execution": at("metake", "beta"),
        "median_realised_fraction_stage1": at("stage1", "realised_fraction"),
        "median_realised_fraction_metake": at("metake", "realised_fraction"),
        "median_realised_share_stage1": _median(gather(["stage1", "realised_share"])),
        "median_realised_share_metake": _median(gather(["metake", "realised_share"])),
        "median_target_norm_stage1": _median(gather(["stage1", "target_norm"])),
        "median_target_norm_metake": _median(gather(["metake", "target_norm"])),
        "median_cosine": _median([s["cosine"] for s in steps]),
        "min_cosine": min((s["cosine"] for s in steps), default=None),
        "median_cosine_step0": _median([s["cosine"] for s in first]),
        "median_cosine_direct": _median([s["cosine_direct"] for s in steps]),
        "median_cosine_direct_step0": _median([s["cosine_direct"] for s in first]),
        "median_alpha": _median([s["alpha"] for s in steps]),
        "median_rho": _median([s["rho"] for s in steps]),
        "median_relative_error": _median([s["relative_error"] for s in steps]),
        "trap_best_share_both": [max(b["trap"]["both"]) for b in batches],
        "trap_cost_spread": [b["trap"]["cost_spread"] for b in batches],
    }


def check_solver(name: str) -> None:
    """Raise unless ``name`` is a solver ``metake diagnose`` can measure (a spread solver with a
    single-key geometry, without options: memit, alphaedit)."""
    spec = parse_solver(name)
    if not spec.base_class.measurable or spec.blue or spec.rect or spec.prune:
        measurable = ", ".join(n for n, cls in SOLVERS.items() if cls.measurable)
        raise MetakeError(f"diagnose measures the spread solvers {measurable} (without "
                          f"options); got {name}")  # fmt: skip


@dataclass(frozen=True)
class TrapOptions:
    """Theorem 2's thresholds: progress is ``beta >= min_beta``; the disruption budget is the
    ``budget_quantile`` of the edits' disruption at the solver's own ``lambda``."""

    min_beta: float = 0.5
    budget_quantile: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 < self.min_beta <= 1.0:
            raise MetakeError(f"--trap-min-beta must be in (0, 1], got {self.min_beta}")
        if not 0.0 <= self.budget_quantile <= 1.0:
            raise MetakeError(f"--trap-budget-quantile must be in [0, 1], got "
                              f"{self.budget_quantile}")  # fmt: skip


def diagnose(
    editor: Editor,
    requests: Sequence[EditRequest],
    batch_size: int,
    fidelity_every: int = 1,
    progress: bool = True,
    trap_options: TrapOptions | None = None,
) -> dict[str, Any]:
    """Run the diagnostics over ``requests`` in sequential batches; returns the report dict."""
    check_solver(editor.solver)
    if batch_size < 1 or fidelity_every < 1:
        raise MetakeError("batch size and --fidelity-every must be at least 1")
    trap_options = trap_options or TrapOptions()
    editor.load_statistics()
    layers = list(editor.hparams.layers)
    batches = []
    chunks = [list(requests[i : i + batch_size]) for i in range(0, len(requests), batch_size)]
    for chunk in tqdm(chunks, desc="diagnose", unit="batch", disable=not progress):
        parsed = editor.prepare(chunk)
        record, targets = _batch(editor, parsed, fidelity_every, trap_options)
        editor.apply_targets(parsed, targets)
        batches.append(record)
    mom2s = {layer: editor.second_moment(layer) for layer in layers}
    return {
        "solver": editor.solver,
        "layers": layers,
        "hparams": editor.hparams.to_dict(),
        "trap_options": asdict(trap_options),
        "eps_C": {str(k): v for k, v in spectral_drift(mom2s, layers[-1]).items()},
        "batches": batches,
        "summary": summarise(batches, layers[-1]),
    }


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, list):
        return ", ".join(_fmt(v) for v in value)
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def summary_markdown(report: dict[str, Any]) -> str:
    """A readable summary of a report: the command, then the medians per theorem."""
    s = report["summary"]
    last = s["last_layer"]
    eps_c = ", ".join(f"L{k}: {v['eps_C_relative']:.2f}" for k, v in report["eps_C"].items())
    eps_k = []
    for layer in report["layers"]:
        rel = []
        for b in report["batches"]:
            pairs = zip(b["eps_k"][str(layer)], b["key_norm"][str(last)], strict=True)
            rel += [d / n for d, n in pairs]
        eps_k.append(f"L{layer}: {_fmt(_median(rel))}")
    trap = report.get("trap_options", asdict(TrapOptions()))  # reports before the options
    rows = [
        (f"**Theorem 1** median beta at layer {last}, before the batch",
         s["median_beta_before_edit"]),
        ("median beta of the keys the solver used: Stage I / MetaKE target",
         [s["median_beta_stage1_execution"], s["median_beta_metake_execution"]]),
        (f"median realised fraction ||Delta k|| / ||r|| at layer {last}: Stage I / MetaKE",
         [s["median_realised_fraction_stage1"], s["median_realised_fraction_metake"]]),
        (f"median share of Stage I's change realised at layer {last}: Stage I / MetaKE",
         [s["median_realised_share_stage1"], s["median_realised_share_metake"]]),
        ("median ||v* - z||: Stage I / MetaKE target",
         [s["median_target_norm_stage1"], s["median_target_norm_metake"]]),
        (f"**Theorem 2** best share of edits both progressing (beta >= {trap['min_beta']}) and "
         f"within budget (quantile {trap['budget_quantile']} of the disruption at the solver's "
         "lambda), one lambda", s["trap_best_share_both"]),
        ("p90 / p10 over edits of the disruption per unit realised change",
         s["trap_cost_spread"]),
        ("**Theorem 3** median cos(g_true, g_proxy) over all steps (at step 0)",
         [s["median_cosine"], s["median_cosine_step0"]]),
        ("smallest cosine", s["min_cosine"]),
        ("median cos(g_true, g_direct) over all steps (at step 0): g_true without the paths "
         "through the earlier layers' keys, gates and values",
         [s["median_cosine_direct"], s["median_cosine_direct_step0"]]),
        ("median relative error ||g_true - g_proxy|| / ||g_true||", s["median_relative_error"]),
        ("median alpha (non-degeneracy)", s["median_alpha"]),
        ("median rho (non-last layers / last layer)", s["median_rho"]),
        ("eps_C / ||C_L||_2 per layer", eps_c),
        ("median eps_k / ||k_L|| per layer", "; ".join(eps_k)),
    ]  # fmt: skip
    lines = [
        f"# metake diagnose: {report.get('model', '')}, {report['solver']}, "
        f"{report.get('edits', '')} edits",
        "",
        "```",
        report.get("command", ""),
        "```",
        "",
        "| Measurement | Value |",
        "|---|---|",
        *(f"| {name} | {_fmt(value)} |" for name, value in rows),
        "",
    ]
    return "\n".join(lines)
