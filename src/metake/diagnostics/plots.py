"""Figures of a ``metake diagnose`` report (PNG, matplotlib's Agg backend)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _last_layer_values(report: dict[str, Any], label: str, name: str) -> list[float]:
    last = str(report["layers"][-1])
    return [v for b in report["batches"] for v in b[label]["layers"][last][name]]


def plot_attenuation(report: dict[str, Any], path: Path) -> Path:
    """Histograms at the last edit layer: beta, realised fraction and share, Stage I vs MetaKE."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    panels = [
        ("beta (single key, solver geometry)", lambda lab: _last_layer_values(report, lab, "beta")),
        ("realised fraction ||Delta k|| / ||r||",
         lambda lab: _last_layer_values(report, lab, "realised_fraction")),
        ("share of Stage I's change realised (all layers)",
         lambda lab: [v for b in report["batches"] for v in b[lab]["realised_share"]]),
    ]  # fmt: skip
    for ax, (title, values) in zip(axes, panels, strict=True):
        for label, colour in (("stage1", "tab:blue"), ("metake", "tab:orange")):
            name = "Stage I target" if label == "stage1" else "MetaKE target"
            ax.hist(values(label), bins=20, alpha=0.55, color=colour, label=name)
        ax.set_title(title, fontsize=9)
        ax.set_ylabel("edits")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Spectral suppression at layer {report['layers'][-1]} ({report['solver']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_fidelity(report: dict[str, Any], path: Path) -> Path:
    """Proxy–exact cosine, alpha and rho over the look-ahead steps, one line per batch."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for i, batch in enumerate(report["batches"]):
        steps = [s["step"] for s in batch["fidelity"]]
        for ax, key in zip(axes, ("cosine", "alpha", "rho"), strict=True):
            ax.plot(steps, [s[key] for s in batch["fidelity"]], marker="o", label=f"batch {i}")
    titles = ("cos(g_true, g_proxy)", "alpha (non-degeneracy)", "rho (non-last layers / last)")
    for ax, title in zip(axes, titles, strict=True):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("look-ahead step")
    axes[0].legend(fontsize=8)
    fig.suptitle("Proxy fidelity (Theorem 3)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_realised_vs_gamma(report: dict[str, Any], path: Path) -> Path:
    """Realised fraction against gamma, every edit layer, Stage I vs MetaKE targets."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for label, marker in (("stage1", "o"), ("metake", "x")):
        gammas, fractions = [], []
        for batch in report["batches"]:
            for values in batch[label]["layers"].values():
                gammas += values["gamma"]
                fractions += values["realised_fraction"]
        name = "Stage I target" if label == "stage1" else "MetaKE target"
        ax.scatter(gammas, fractions, s=12, marker=marker, alpha=0.6, label=name)
    ax.set_xscale("log")
    ax.set_xlabel("gamma = k^T A^-1 b (per edit and layer)")
    ax.set_ylabel("realised fraction ||Delta k|| / ||r||")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_trap(report: dict[str, Any], path: Path) -> Path:
    """Share of edits that progress, stay within budget, or both, per global lambda."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for i, batch in enumerate(report["batches"]):
        sweep = batch["trap"]
        for key, style in (("progress", "--"), ("safe", ":"), ("both", "-")):
            ax.plot(sweep["lambdas"], sweep[key], style, marker="o",
                    label=f"{key} (batch {i})")  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("global lambda of the solver")
    ax.set_ylabel("share of edits")
    ax.set_title("Static regularisation trap (Theorem 2)", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plots(report: dict[str, Any], out: Path) -> list[Path]:
    """All four figures into ``out``."""
    return [
        plot_attenuation(report, out / "attenuation_hist.png"),
        plot_fidelity(report, out / "proxy_fidelity.png"),
        plot_realised_vs_gamma(report, out / "realised_vs_gamma.png"),
        plot_trap(report, out / "regularisation_trap.png"),
    ]
