"""Stage II solvers: turn target values into weight updates."""

from metake.solvers.memit import apply_memit, keys_and_values, memit_delta

__all__ = ["apply_memit", "keys_and_values", "memit_delta"]
