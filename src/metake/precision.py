"""Lower-precision compute for the planners' forward and backward passes (``planner_autocast``).

Stage I and MetaKE's look-ahead spend nearly all their time in the model's matrix products. On
CPUs with AMX or AVX512-BF16 (and on most GPUs) these run several times faster in bfloat16.
:func:`planner_precision` runs them under :func:`torch.autocast`: matrix products in bfloat16,
reductions, norms and softmaxes in float32 as autocast decides, the residual stream, the
optimised vectors and everything the solvers compute (keys, C0, the float64 solves) in their own
precision; weights are never cast in place. On the CPU two more things hold meanwhile: the
model's attention runs in its eager form (PyTorch's fused CPU attention is slow in bfloat16, its
backward most of all), and the matrix-product weights are cast once, not at every call.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from metake.models.adapters import input_device

AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16}
"""The values ``planner_autocast`` accepts (``None``: the model's own precision)."""


@contextmanager
def planner_precision(model: nn.Module, autocast: str | None) -> Iterator[None]:
    """Run the enclosed forwards and backwards of ``model`` under ``torch.autocast(autocast)``.

    ``None`` changes nothing. Nested use is harmless (the inner one finds autocast on).
    """
    device_type = input_device(model).type
    if autocast is None or torch.is_autocast_enabled(device_type):
        yield
        return
    if autocast not in AUTOCAST_DTYPES:
        raise ValueError(f"planner_autocast must be one of {sorted(AUTOCAST_DTYPES)} or None, "
                         f"got {autocast!r}")  # fmt: skip
    config = getattr(model, "config", None)
    previous = getattr(config, "_attn_implementation", None)
    on_cpu = device_type == "cpu"
    eager = on_cpu and previous == "sdpa" and hasattr(model, "set_attn_implementation")
    dtype = AUTOCAST_DTYPES[autocast]
    with ExitStack() as stack:
        if eager:
            model.set_attn_implementation("eager")
            stack.callback(model.set_attn_implementation, previous)
        if on_cpu:
            stack.enter_context(_weights_cast_once(model, dtype))
        stack.enter_context(torch.autocast(device_type, dtype=dtype))
        yield


@contextmanager
def _weights_cast_once(model: nn.Module, dtype: torch.dtype) -> Iterator[None]:
    """Give every matrix-product module (``nn.Linear``, GPT-2's ``Conv1D``) a ``dtype`` copy
    of its weight for the enclosed code, the original ``Parameter`` put back on exit.

    Autocast would otherwise cast each weight at every call, which on a CPU costs about as much
    as the product itself when few tokens run (Stage I's rows). Tied weights (an LM head sharing
    the embedding) are untied meanwhile, so the embedding keeps its precision. Costs one copy
    of those weights in ``dtype`` while it lasts.
    """
    swapped: list[tuple[nn.Module, nn.Parameter]] = []
    try:
        for module in model.modules():
            weight = getattr(module, "weight", None)
            product = isinstance(module, (nn.Linear, Conv1D)) and isinstance(weight, nn.Parameter)
            if product and weight.dtype != dtype and not weight.requires_grad:
                module.weight = nn.Parameter(weight.detach().to(dtype), requires_grad=False)
                swapped.append((module, weight))
        yield
    finally:
        for module, weight in swapped:
            module.weight = weight
