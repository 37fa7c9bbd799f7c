"""Hyper-parameters of an editing method, with per-model presets and a documented fallback."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field, fields, replace
from importlib.resources import files
from typing import Any

from transformers import PretrainedConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MemitHparams:
    """MEMIT's hyper-parameters: Stage I (target optimisation) and Stage II (spread solve)."""

    layers: tuple[int, ...]
    # Stage I: optimise a residual delta at the last edit layer (MEMIT's compute_z)
    v_lr: float = 0.5
    v_steps: int = 25
    v_loss_threshold: float = 5e-2
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 0.75
    kl_factor: float = 0.0625
    kl_prompt: str = "{} is a"
    context_count: int = 5  # deterministic (greedy) context prefixes, plus the empty one
    context_length: int = 10
    # Stage II: Delta = R K^T (lambda C0 + K K^T)^-1 per layer
    mom2_update_weight: float = 15000.0
    mom2_samples: int = 10033
    mom2_max_length: int = 256
    mom2_batch_size: int = 8
    mom2_dtype: str = "float64"
    # AlphaEdit (method="alphaedit"): null-space projector of C0 and its own ridge term
    nullspace_threshold: float = 2e-2  # AlphaEdit's configs for GPT2-XL, GPT-J, Llama3-8B
    nullspace_relative: bool = False  # threshold as a fraction of C0's largest eigenvalue
    alphaedit_lambda: float = 10.0
    alphaedit_blue_lambda: float | None = None  # lambda_2 of alphaedit_blue (None: the above)
    # RECT (solvers *_rect): share of each batch update's entries kept, by |Delta / W|
    rect_keep_fraction: float = 0.4
    # MetaKE (method="metake"): look-ahead refinement of the targets through the solver's gate
    metake_steps: int = 15
    metake_lr: float = 5e-3
    metake_edit_weight: float = 1.0  # NLL of the targets under the virtual weights
    metake_locality_weight: float = 1.0  # KL(original || virtual) on the locality prompts
    metake_reg_weight: float = 1.0  # ||v* - v_plan||^2, v_plan being Stage I's target
    metake_hypergradient: str = "proxy"  # "proxy" (Eq. 7-8) or "exact" (through every layer)
    preset: str = field(default="custom", compare=False)

    def __post_init__(self) -> None:
        if not self.layers:
            raise ValueError("hparams: 'layers' must name at least one layer")
        if sorted(set(self.layers)) != list(self.layers):
            raise ValueError(f"hparams: 'layers' must be ascending and distinct, got {self.layers}")
        if self.metake_hypergradient not in ("proxy", "exact"):
            raise ValueError("hparams: 'metake_hypergradient' must be 'proxy' or 'exact'")
        if self.mom2_dtype not in ("float32", "float64"):
            raise ValueError("hparams: 'mom2_dtype' must be 'float32' or 'float64'")
        positive = ("v_lr", "mom2_update_weight", "mom2_samples", "mom2_max_length", "metake_lr")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"hparams: {name!r} must be positive")
        if not 0.0 < self.rect_keep_fraction <= 1.0:
            raise ValueError("hparams: 'rect_keep_fraction' must lie in (0, 1]")
        if self.alphaedit_blue_lambda is not None and self.alphaedit_blue_lambda < 0:
            raise ValueError("hparams: 'alphaedit_blue_lambda' must be >= 0")
        for name in ("v_steps", "metake_steps", "metake_edit_weight", "metake_locality_weight",
                     "metake_reg_weight", "alphaedit_lambda"):  # fmt: skip
            if getattr(self, name) < 0:
                raise ValueError(f"hparams: {name!r} must be >= 0")

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (lists instead of tuples), for reports and JSON."""
        d = asdict(self)
        d["layers"] = list(self.layers)
        return d

    def with_overrides(self, **overrides: Any) -> MemitHparams:
        """A copy with some fields replaced; unknown names raise ``ValueError``."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(
                f"unknown hyper-parameter(s) {', '.join(unknown)}; "
                f"known: {', '.join(sorted(known))}"
            )
        if "layers" in overrides:
            overrides["layers"] = tuple(int(x) for x in overrides["layers"])
        return replace(self, **overrides)


HPARAM_GROUPS: dict[str, tuple[str, ...]] = {
    "planner (every method: Stage I target optimisation)": (
        "layers", "v_lr", "v_steps", "v_loss_threshold", "v_weight_decay", "clamp_norm_factor",
        "kl_factor", "kl_prompt", "context_count", "context_length",
    ),
    "statistics (C0 of every edit layer)": (
        "mom2_samples", "mom2_max_length", "mom2_batch_size", "mom2_dtype",
    ),
    "memit": ("mom2_update_weight",),
    "alphaedit": (
        "nullspace_threshold", "nullspace_relative", "alphaedit_lambda", "alphaedit_blue_lambda",
    ),
    "rect": ("rect_keep_fraction",),
    "metake": (
        "metake_steps", "metake_lr", "metake_edit_weight", "metake_locality_weight",
        "metake_reg_weight", "metake_hypergradient",
    ),
}  # fmt: skip
"""Which hyper-parameters each part of the pipeline reads (``metake methods`` prints this)."""


def _load_presets() -> dict[str, dict[str, Any]]:
    text = files("metake").joinpath("presets/memit.json").read_text(encoding="utf-8")
    return {k: v for k, v in json.loads(text).items() if not k.startswith("_")}


def preset_names() -> list[str]:
    """Names of the shipped MEMIT presets."""
    return sorted(_load_presets())


def find_preset(config: PretrainedConfig) -> str | None:
    """Name of the preset whose ``match`` fields all equal the config's, or ``None``."""
    for name, preset in _load_presets().items():
        if all(getattr(config, k, None) == v for k, v in preset["match"].items()):
            return name
    return None


def fallback_layers(num_layers: int) -> tuple[int, ...]:
    """Early-middle MLP layers (15-30% of depth, at most 5) for a model without a preset."""
    first = max(1, round(0.15 * num_layers))
    last = max(first, min(first + 4, round(0.30 * num_layers)))
    return tuple(range(first, last + 1))


def preset_hparams(name: str) -> MemitHparams:
    """The hyper-parameters of the shipped preset ``name``."""
    presets = _load_presets()
    if name not in presets:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(sorted(presets))}")
    values = {k: v for k, v in presets[name].items() if k not in ("match", "experimental")}
    values["layers"] = tuple(values["layers"])
    if "experimental" in presets[name]:
        log.warning("preset %s is experimental: %s", name, presets[name]["experimental"])
    return MemitHparams(**values, preset=name)


def memit_hparams(
    config: PretrainedConfig, preset: str | None = None, **overrides: Any
) -> MemitHparams:
    """MEMIT hyper-parameters for a model: a named or matching preset, else the fallback."""
    if preset is None:
        preset = find_preset(config)
    if preset is not None:
        base = preset_hparams(preset)
    else:
        num_layers = int(config.num_hidden_layers)
        base = MemitHparams(layers=fallback_layers(num_layers), preset="fallback")
        log.warning(
            "no MEMIT preset for %s (%d layers): using the fallback (layers %s, MEMIT's defaults); "
            "check edits on this model before trusting them",
            config.model_type,
            num_layers,
            list(base.layers),
        )
    return base.with_overrides(**overrides) if overrides else base
