"""Method names: a base solver with composable options, and MetaKE's planner over any of them.

A solver name is a base solver (``rome``, ``memit``, ``alphaedit``, ``emmet``: the registry of
:mod:`metake.solvers.registry`) followed by options joined with ``_``: ``rect`` (RECT's
sparsified update), ``prune`` (PRUNE's restrained singular values) and ``blue`` (BLUE: edit only
the first and last edit layers, each towards its own target). So ``alphaedit_blue``,
``memit_rect`` or ``alphaedit_rect_prune`` are solvers; ``rect`` and ``prune`` alone mean
``memit_rect`` and ``memit_prune``, the forms their papers evaluate. A method is a solver name or
``metake`` (the look-ahead planner over a ``--solver``).
"""

from __future__ import annotations

from metake.errors import MetakeError
from metake.solvers.registry import ALIASES, OPTIONS, SOLVERS, SolverSpec, parse_solver

BASE_SOLVERS = tuple(SOLVERS)
DEFAULT_METAKE_SOLVER = "alphaedit"
__all__ = ["ALIASES", "BASE_SOLVERS", "OPTIONS", "SolverSpec", "parse_solver", "resolve_method"]

SOLVER_DESCRIPTIONS = {
    **{name: cls.description for name, cls in SOLVERS.items()},
    "rect": "MEMIT, each batch's update kept only on its top rect_keep_fraction entries by "
    "relative change |Delta/W| (RECT)",
    "prune": "MEMIT; when the session is finalised (before evaluating or saving) the singular "
    "values of each layer's accumulated edit above the original weight's largest one are "
    "restrained to ln(s) + s_max - ln(s_max); editing goes on from the raw weights (PRUNE)",
    "memit_blue": "MEMIT on the first and last edit layers only, each towards a target "
    "optimised at its own output, full residual (BLUE)",
    "alphaedit_blue": "AlphaEdit on the first and last edit layers only, each towards a target "
    "optimised at its own output (AlphaEdit+BLUE)",
}
"""The named solvers ``metake methods`` lists; any other composition is accepted too."""

METHOD_DESCRIPTIONS = {
    **SOLVER_DESCRIPTIONS,
    "metake": "MetaKE: Stage I's targets refined by a look-ahead through the chosen solver's "
    "closed form (gate M at each solved layer), then that solver executes (--solver)",
    "metake_exact": "MetaKE with the exact hypergradient: the look-ahead differentiates through "
    "the whole multi-layer solver (keys, residual spreading, every layer's solve) instead of "
    "the last-layer proxy (metake_hypergradient=exact)",
}
PLANNER_METHODS = ("metake", "metake_exact")
"""Methods that plan through a solver (``--solver``); the others are solvers themselves."""
METHODS = tuple(METHOD_DESCRIPTIONS)
TABLE1_METHODS = ("rome", "memit", "prune", "rect", "alphaedit", "alphaedit_blue", "metake")
"""The rows of the MetaKE paper's Table 1, in its order (``--methods table1``)."""


def expand_methods(text: str) -> list[str]:
    """Comma-separated method specs, with ``table1`` standing for :data:`TABLE1_METHODS`."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    return [m for name in names for m in (TABLE1_METHODS if name == "table1" else (name,))]


def resolve_method(method: str, solver: str | None = None) -> tuple[str, str]:
    """``(method, canonical solver name)``: ``metake`` runs over a solver (default alphaedit)."""
    if method in PLANNER_METHODS:
        return method, parse_solver(solver or DEFAULT_METAKE_SOLVER).name
    try:
        spec = parse_solver(method)
    except MetakeError:
        raise MetakeError(
            f"unknown method {method!r}; available: {', '.join(METHODS)} (and any solver "
            f"composed as BASE_OPTION, e.g. alphaedit_rect)"
        ) from None
    if solver is not None and parse_solver(solver) != spec:
        raise MetakeError(f"a solver is chosen for metake methods only; {method!r} is its own")
    return method, spec.name
