"""The solver registry and the factory that builds a session's solver from its name.

A solver name is a base solver (a key of :data:`SOLVERS`) followed by options joined with
``_``: ``rect`` (RECT), ``prune`` (PRUNE), ``blue`` (BLUE), e.g. ``alphaedit_blue`` or
``memit_rect``; ``rect`` and ``prune`` alone mean ``memit_rect`` and ``memit_prune``. Adding a
base solver is one file with a :class:`~metake.solvers.base.Solver` subclass and one line in
:data:`SOLVERS` (see ``docs/solvers.md``).
"""

from __future__ import annotations

from dataclasses import dataclass

from metake.errors import MetakeError
from metake.hparams import MemitHparams
from metake.solvers.alphaedit import AlphaEditSolver
from metake.solvers.base import SecondMoment, Solver
from metake.solvers.emmet import EmmetSolver
from metake.solvers.memit import MemitSolver
from metake.solvers.options import ComposedSolver
from metake.solvers.rome import RomeSolver

SOLVERS: dict[str, type[Solver]] = {
    "rome": RomeSolver,
    "memit": MemitSolver,
    "alphaedit": AlphaEditSolver,
    "emmet": EmmetSolver,
}
"""Base solvers by name, in the order ``metake methods`` lists them."""
OPTIONS = ("rect", "prune", "blue")
ALIASES = {"rect": "memit_rect", "prune": "memit_prune"}


@dataclass(frozen=True)
class SolverSpec:
    """A base solver and which options it runs with (parsed from a solver name)."""

    base: str
    rect: bool = False
    prune: bool = False
    blue: bool = False

    @property
    def name(self) -> str:
        """Canonical name, e.g. ``memit_rect`` or ``alphaedit_blue``."""
        chosen = [option for option in OPTIONS if getattr(self, option)]
        return "_".join([self.base, *chosen])

    @property
    def base_class(self) -> type[Solver]:
        """The registered class of the base solver."""
        return SOLVERS[self.base]

    @property
    def spreads_one_target(self) -> bool:
        """Whether a batch is one Stage I target per request spread over the edit layers (so
        Stage II can be re-run for fixed targets), not ROME's or BLUE's own planning."""
        return not self.base_class.one_layer and not self.blue


def parse_solver(name: str) -> SolverSpec:
    """``"alphaedit_blue"`` → ``SolverSpec("alphaedit", blue=True)``; clear error when unknown."""
    parts = ALIASES.get(name, name).split("_")
    base, options = parts[0], parts[1:]
    known = f"a base solver ({', '.join(SOLVERS)}) with options _{', _'.join(OPTIONS)}"
    if base not in SOLVERS:
        raise MetakeError(f"unknown solver {name!r}; a solver is {known}, e.g. alphaedit_blue")
    unknown = [o for o in options if o not in OPTIONS]
    if unknown or len(set(options)) != len(options):
        raise MetakeError(f"solver {name!r}: options must be distinct ones of {', '.join(OPTIONS)}")
    if SOLVERS[base].one_layer and "blue" in options:
        raise MetakeError(f"solver {name!r}: {base} edits one layer, BLUE needs two")
    return SolverSpec(base, **{option: True for option in options})


def solver_layers(name: str, hparams: MemitHparams) -> list[int]:
    """The layers solver ``name`` edits out of ``hparams.layers``: the last one for a one-layer
    solver (ROME), the first and last for BLUE, all of them otherwise."""
    spec, layers = parse_solver(name), list(hparams.layers)
    if spec.base_class.one_layer:
        return layers[-1:]
    if spec.blue:
        if len(layers) < 2:
            raise MetakeError(f"BLUE edits the first and last of at least two layers, got "
                              f"layers {layers}")  # fmt: skip
        return [layers[0], layers[-1]]
    return layers


def build_solver(name: str, hparams: MemitHparams, second_moment: SecondMoment) -> ComposedSolver:
    """The solver ``name`` for a session with ``hparams`` and its statistics ``second_moment``."""
    spec = parse_solver(name)
    options = {}
    if (
        spec.blue
        and spec.base_class is AlphaEditSolver
        and hparams.alphaedit_blue_lambda is not None
    ):
        options["lam2"] = hparams.alphaedit_blue_lambda  # BLUE's own lambda_2
    base = spec.base_class(hparams, second_moment, **options)
    return ComposedSolver(
        base,
        spec.name,
        rect_keep_fraction=hparams.rect_keep_fraction if spec.rect else None,
        prune=spec.prune,
        blue=spec.blue,
    )
