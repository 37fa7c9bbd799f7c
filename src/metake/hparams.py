"""Hyper-parameters of an editing method, with per-model presets and a documented fallback."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from importlib.resources import files
from pathlib import Path
from typing import Any

from transformers import PretrainedConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MemitHparams:
    """MEMIT's hyper-parameters: Stage I (target optimisation) and Stage II (spread solve)."""

    layers: tuple[int, ...]
    # Stage I: optimise a residual delta at the last edit layer (MEMIT's compute_z)
    v_lr: float = 0.5
    v_steps: int = 25  # loss evaluations, as MEMIT's v_num_grad_steps: v_steps - 1 updates
    v_loss_threshold: float = 5e-2
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 0.75
    kl_factor: float = 0.0625
    kl_prompt: str = "{} is a"
    context_count: int = 5  # deterministic (greedy) context prefixes, plus the empty one
    context_length: int = 10
    planner_autocast: str | None = None  # "bfloat16": Stage I and look-ahead under autocast
    # Stage II: Delta = R K^T (lambda C0 + K K^T)^-1 per layer
    mom2_update_weight: float = 15000.0
    mom2_samples: int = 10033
    mom2_max_length: int = 256
    mom2_batch_size: int = 8
    mom2_dtype: str = "float64"
    mom2_autocast: str | None = None  # "bfloat16": the statistics' forward under autocast
    # AlphaEdit (method="alphaedit"): null-space projector of C0 and its own ridge term
    nullspace_threshold: float = 2e-2  # AlphaEdit's configs for GPT2-XL, GPT-J, Llama3-8B
    nullspace_relative: bool = False  # threshold as a fraction of C0's largest eigenvalue
    alphaedit_lambda: float = 10.0
    alphaedit_blue_lambda: float | None = None  # lambda_2 of alphaedit_blue (None: the above)
    # ROME (solver "rome"): ridge on C0 before solving, as a fraction of its mean eigenvalue
    rome_ridge: float = 0.0  # the reference solves with C0 as it is
    # RECT (solvers *_rect): share of each batch update's entries kept, by |Delta / W|
    rect_keep_fraction: float = 0.4
    # MetaKE (method="metake"): look-ahead refinement of the targets through the solver's gate
    metake_steps: int = 15
    metake_lr: float = 5e-3
    metake_edit_weight: float = 1.0  # NLL of the targets under the virtual weights
    metake_locality_weight: float = 1.0  # KL(original || virtual) on the locality prompts
    metake_reg_weight: float = 1.0  # ||v* - v_plan||^2, v_plan being Stage I's target
    metake_hypergradient: str = "proxy"  # "proxy" (Eq. 7-8), "exact" (every layer), "direct"
    metake_replay_every: int = 1  # exact/direct: replay the solver every k look-ahead steps
    # context prefixes the edit term reads besides the bare prompt (None: all of Stage I's; 0: the
    # bare prompt only, the paper's Eq. 11 -log P(y_e | x_e))
    metake_edit_contexts: int | None = None
    preset: str = field(default="custom", compare=False)

    def __post_init__(self) -> None:
        if not self.layers:
            raise ValueError("hparams: 'layers' must name at least one layer")
        if sorted(set(self.layers)) != list(self.layers):
            raise ValueError(f"hparams: 'layers' must be ascending and distinct, got {self.layers}")
        if self.metake_hypergradient not in ("proxy", "exact", "direct"):
            raise ValueError("hparams: 'metake_hypergradient' must be 'proxy', 'exact' or 'direct'")
        if self.planner_autocast not in (None, "bfloat16"):
            raise ValueError("hparams: 'planner_autocast' must be 'bfloat16' or none")
        if self.mom2_autocast not in (None, "bfloat16"):
            raise ValueError("hparams: 'mom2_autocast' must be 'bfloat16' or none")
        if self.mom2_dtype not in ("float32", "float64"):
            raise ValueError("hparams: 'mom2_dtype' must be 'float32' or 'float64'")
        positive = ("v_lr", "mom2_update_weight", "mom2_samples", "mom2_max_length", "metake_lr",
                    "alphaedit_lambda", "mom2_batch_size")  # fmt: skip
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"hparams: {name!r} must be positive, got {getattr(self, name)}")
        if self.metake_replay_every < 1:
            raise ValueError(
                f"hparams: 'metake_replay_every' must be at least 1, got {self.metake_replay_every}"
            )
        if self.metake_edit_contexts is not None and self.metake_edit_contexts < 0:
            raise ValueError(
                "hparams: 'metake_edit_contexts' must be >= 0 or none, "
                f"got {self.metake_edit_contexts}"
            )
        if self.v_steps < 1:
            raise ValueError("hparams: 'v_steps' must be at least 1 (loss evaluations)")
        if not 0.0 < self.rect_keep_fraction <= 1.0:
            raise ValueError("hparams: 'rect_keep_fraction' must lie in (0, 1]")
        if self.alphaedit_blue_lambda is not None and self.alphaedit_blue_lambda <= 0:
            raise ValueError(
                "hparams: 'alphaedit_blue_lambda' must be positive (a zero ridge "
                f"makes AlphaEdit's system singular), got {self.alphaedit_blue_lambda}"
            )
        for name in ("rome_ridge", "metake_steps", "metake_edit_weight", "metake_locality_weight",
                     "metake_reg_weight", "v_loss_threshold", "v_weight_decay", "kl_factor",
                     "context_count", "nullspace_threshold"):  # fmt: skip
            if getattr(self, name) < 0:
                raise ValueError(f"hparams: {name!r} must be >= 0, got {getattr(self, name)}")
        if self.clamp_norm_factor <= 0 or self.context_length < 1:
            raise ValueError(
                "hparams: 'clamp_norm_factor' must be positive and 'context_length' at least 1"
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (lists instead of tuples), for reports and JSON."""
        d = asdict(self)
        d["layers"] = list(self.layers)
        return d

    def differences(self, saved: Mapping[str, Any]) -> list[str]:
        """``"name saved (now value)"`` for each field a saved :meth:`to_dict` (e.g. from a
        checkpoint or a finished benchmark part) holds with another value than this one."""
        now = self.to_dict()
        return [f"{k} {saved[k]!r} (now {now[k]!r})" for k in now
                if k in saved and _plain(saved[k]) != _plain(now[k])]  # fmt: skip

    def with_overrides(self, **overrides: Any) -> MemitHparams:
        """A copy with some fields replaced; unknown names raise ``ValueError``."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(
                f"unknown hyper-parameter(s) {', '.join(unknown)}; "
                f"known: {', '.join(sorted(known))}"
            )
        types = {f.name: str(f.type) for f in fields(self)}
        typed = {name: coerce_hparam(name, value, types[name]) for name, value in overrides.items()}
        return replace(self, **typed)


def _plain(value: Any) -> Any:
    """``value`` as JSON stores it (tuples as lists), to compare a saved value with a live one."""
    return list(value) if isinstance(value, tuple) else value


class HparamError(ValueError):
    """A hyper-parameter value of the wrong type (``--set v_lr=abc``)."""


def _number(name: str, value: Any, kind: type) -> int | float:
    """``value`` as an int or a float: numbers as they are, numeric strings parsed."""
    if isinstance(value, bool):
        raise HparamError(f"{name} must be a number, got {value!r}")
    if isinstance(value, str):
        try:
            value = float(value.strip()) if kind is float else int(value.strip())
        except ValueError:
            what = "a number" if kind is float else "a whole number"
            raise HparamError(f"{name} must be {what}, got {value!r}") from None
    if kind is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int):
            raise HparamError(f"{name} must be a whole number, got {value!r}")
        return value
    if not isinstance(value, (int, float)):
        raise HparamError(f"{name} must be a number, got {value!r}")
    return float(value)


def _layers(value: Any) -> tuple[int, ...]:
    """Layers from ``[3, 4, 5]``, ``"3,4,5"``, ``"[3, 4, 5]"`` or one number."""
    if isinstance(value, str):
        text = value.strip().removeprefix("[").removesuffix("]")
        value = [part for part in text.replace(" ", "").split(",") if part]
    if isinstance(value, (int, str)) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value:
        raise HparamError(f"layers must be a list of layer numbers such as 3,4,5, got {value!r}")
    return tuple(int(_number("layers", v, int)) for v in value)


def coerce_hparam(name: str, value: Any, annotation: str) -> Any:
    """``value`` converted to the field's type (``annotation`` as written in the dataclass), or
    :class:`HparamError` naming the field: ``--set`` values arrive as JSON or as strings."""
    if name == "layers":
        return _layers(value)
    if annotation.endswith("| None") and (value is None or str(value).lower() in ("none", "null")):
        return None
    base = annotation.removesuffix("| None").strip()
    if base in ("float", "int"):
        return _number(name, value, float if base == "float" else int)
    if base == "bool":
        if isinstance(value, bool):
            return value
        flags = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
        if isinstance(value, (str, int)) and str(value).strip().lower() in flags:
            return flags[str(value).strip().lower()]
        raise HparamError(f"{name} must be true or false, got {value!r}")
    if base == "str" and not isinstance(value, str):
        raise HparamError(f"{name} must be a string, got {value!r}")
    return value


HPARAM_GROUPS: dict[str, tuple[str, ...]] = {
    "planner (every method: Stage I target optimisation)": (
        "layers", "v_lr", "v_steps", "v_loss_threshold", "v_weight_decay", "clamp_norm_factor",
        "kl_factor", "kl_prompt", "context_count", "context_length", "planner_autocast",
    ),
    "statistics (C0 of every edit layer)": (
        "mom2_samples", "mom2_max_length", "mom2_batch_size", "mom2_dtype", "mom2_autocast",
    ),
    "memit": ("mom2_update_weight",),
    "alphaedit": (
        "nullspace_threshold", "nullspace_relative", "alphaedit_lambda", "alphaedit_blue_lambda",
    ),
    "rome": ("rome_ridge",),
    "rect": ("rect_keep_fraction",),
    "metake": (
        "metake_steps", "metake_lr", "metake_edit_weight", "metake_locality_weight",
        "metake_reg_weight", "metake_hypergradient", "metake_replay_every",
        "metake_edit_contexts",
    ),
}  # fmt: skip
"""Which hyper-parameters each part of the pipeline reads (``metake methods`` prints this)."""


PRESET_META_KEYS = ("match", "experimental", "methods", "tuned")
"""Keys of a preset entry that are not hyper-parameters."""


def _load_presets() -> dict[str, dict[str, Any]]:
    text = files("metake").joinpath("presets/memit.json").read_text(encoding="utf-8")
    return {k: v for k, v in json.loads(text).items() if not k.startswith("_")}


def preset_names() -> list[str]:
    """Names of the shipped MEMIT presets."""
    return sorted(_load_presets())


def preset_entry_info(name: str) -> dict[str, Any]:
    """A shipped preset's raw entry (``methods`` and ``tuned`` sections included)."""
    return dict(_load_presets()[name])


def find_preset(config: PretrainedConfig) -> str | None:
    """Name of the preset whose ``match`` fields all equal the config's, or ``None``."""
    for name, preset in _load_presets().items():
        if _matches(preset, config):
            return name
    return None


def _matches(preset: Mapping[str, Any], config: PretrainedConfig) -> bool:
    return all(getattr(config, k, None) == v for k, v in preset.get("match", {}).items())


def is_preset_file(preset: str) -> bool:
    """Whether ``preset`` names a JSON file (e.g. one written by ``metake tune``), not a name."""
    return preset.endswith(".json") or Path(preset).is_file()


def load_preset_file(path: str | Path) -> tuple[str, dict[str, Any]]:
    """The one preset entry of a JSON file (``{name: entry}``, ``_``-keys ignored)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"preset file {path} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"preset file {path} is not valid JSON: {err}") from None
    entries = {k: v for k, v in data.items() if not k.startswith("_")} if isinstance(data, dict) \
        else {}  # fmt: skip
    if len(entries) != 1 or not isinstance(next(iter(entries.values())), dict):
        raise ValueError(f"preset file {path} must hold one preset: {{name: {{layers: [...], "
                         f"...}}}}, found {len(entries)} entries")  # fmt: skip
    name, entry = next(iter(entries.items()))
    if "layers" not in entry:
        raise ValueError(f"preset file {path}: entry {name!r} has no 'layers'")
    return name, entry


def method_keys(method: str | None, solver: str | None) -> list[str]:
    """Where a preset's ``methods`` section is looked up for a method, most specific first.

    ``metake_exact`` falls back to ``metake``; every method falls back to its solver's canonical
    name (``prune`` → ``memit_prune``) and then to its base solver (``memit``).
    """
    from metake.methods import parse_solver

    keys = [method] if method else []
    if method == "metake_exact":
        keys.append("metake")
    if solver:
        spec = parse_solver(solver)
        keys += [solver, spec.name, spec.base]
    return list(dict.fromkeys(keys))


def _entry_hparams(
    name: str, entry: Mapping[str, Any], method: str | None, solver: str | None
) -> MemitHparams:
    """An entry's hyper-parameters, with its ``methods`` section's values for ``method``."""
    values = {k: v for k, v in entry.items() if k not in PRESET_META_KEYS}
    sections = entry.get("methods", {})
    for key in method_keys(method, solver):
        if key in sections:
            values.update(sections[key])
            break
    values["layers"] = tuple(values["layers"])
    if "experimental" in entry:
        log.warning("preset %s is experimental: %s", name, entry["experimental"])
    known = {f.name for f in fields(MemitHparams)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"preset {name!r}: unknown hyper-parameter(s) {', '.join(unknown)}")
    return MemitHparams(**values, preset=name)


def fallback_layers(num_layers: int) -> tuple[int, ...]:
    """Early-middle MLP layers (15-30% of depth, at most 5) for a model without a preset."""
    first = max(1, round(0.15 * num_layers))
    last = max(first, min(first + 4, round(0.30 * num_layers)))
    return tuple(range(first, last + 1))


def preset_hparams(name: str, method: str | None = None, solver: str | None = None) -> MemitHparams:
    """The hyper-parameters of the shipped preset ``name`` (or a preset file) for a method."""
    if is_preset_file(name):
        entry_name, entry = load_preset_file(name)
        return _entry_hparams(entry_name, entry, method, solver)
    presets = _load_presets()
    if name not in presets:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(sorted(presets))}, or a "
                         f"preset file written by `metake tune`")  # fmt: skip
    return _entry_hparams(name, presets[name], method, solver)


def memit_hparams(
    config: PretrainedConfig,
    preset: str | None = None,
    method: str | None = None,
    solver: str | None = None,
    **overrides: Any,
) -> MemitHparams:
    """Hyper-parameters for a model and method: a named or matching preset, else the fallback.

    ``preset`` is a shipped preset's name or a preset file (``metake tune``'s output); a file
    tuned for another model (its ``match`` differs from ``config``) is refused.
    """
    if preset is not None and is_preset_file(preset):
        entry_name, entry = load_preset_file(preset)
        if not _matches(entry, config):
            raise ValueError(f"preset file {preset} ({entry_name}) was made for a model with "
                             f"{entry.get('match')}, not this one ({config.model_type}, "
                             f"{config.num_hidden_layers} layers)")  # fmt: skip
    if preset is None:
        preset = find_preset(config)
    if preset is not None:
        base = preset_hparams(preset, method, solver)
    else:
        num_layers = int(config.num_hidden_layers)
        base = MemitHparams(layers=fallback_layers(num_layers), preset="fallback")
        log.warning(
            "no MEMIT preset for %s (%d layers): using the fallback (layers %s, MEMIT's defaults); "
            "check edits on this model before trusting them, or run `metake tune`",
            config.model_type,
            num_layers,
            list(base.layers),
        )
    return base.with_overrides(**overrides) if overrides else base
