"""Architecture adapters: where each model family keeps the modules that editing touches.

One table, keyed by ``config.model_type``. An adapter knows, for layer ``i``:

* the decoder layer module (its output is the residual stream after layer ``i``),
* the MLP output projection (its *input* is the key ``k``, its weight ``W`` maps keys to values),
* the weight of that projection in ``[out, in]`` orientation (GPT-2's ``Conv1D`` stores it
  transposed as ``[in, out]``; the adapter hides that),
* the norm, if any, between that projection and the residual add (Gemma3's
  ``post_feedforward_layernorm``), through which a change of the projection's output reaches the
  residual stream (:meth:`ArchAdapter.residual_to_projection`),
* the final norm and the unembedding.

Nothing here matches on module-name substrings: every path is written down per model type.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from metake.errors import UnsupportedModelError


@dataclass(frozen=True)
class ArchAdapter:
    """Module paths and weight orientation of one model family."""

    model_type: str
    layers_path: str  # the ModuleList of decoder layers, e.g. "model.layers"
    mlp_out_path: str  # relative to one decoder layer, e.g. "mlp.down_proj"
    final_norm_path: str  # e.g. "model.norm"
    weight_is_transposed: bool = False  # True for GPT-2's Conv1D ([in, out] storage)
    mlp_out_norm_path: str | None = None  # RMSNorm between projection and residual add (Gemma3)
    note: str = ""

    # ----- module lookup -------------------------------------------------------------------
    def layers(self, model: nn.Module) -> nn.ModuleList:
        """The model's list of decoder layers."""
        return model.get_submodule(self.layers_path)

    def num_layers(self, model: nn.Module) -> int:
        """Number of decoder layers."""
        return len(self.layers(model))

    def layer_name(self, layer: int) -> str:
        """Full module name of decoder layer ``layer`` (its output is the residual stream)."""
        return f"{self.layers_path}.{layer}"

    def mlp_out_name(self, layer: int) -> str:
        """Full module name of the MLP output projection of layer ``layer``."""
        return f"{self.layers_path}.{layer}.{self.mlp_out_path}"

    def layer_module(self, model: nn.Module, layer: int) -> nn.Module:
        """Decoder layer ``layer``."""
        self._check_layer(model, layer)
        return model.get_submodule(self.layer_name(layer))

    def layers_below(self, model: nn.Module, layer: int) -> list[nn.Module]:
        """Decoder layers ``0 .. layer - 1`` (what a cached residual stream at ``layer`` skips)."""
        return [self.layer_module(model, i) for i in range(layer)]

    def mlp_out(self, model: nn.Module, layer: int) -> nn.Module:
        """The MLP output projection module of layer ``layer``."""
        self._check_layer(model, layer)
        return model.get_submodule(self.mlp_out_name(layer))

    def mlp_out_norm(self, model: nn.Module, layer: int) -> nn.Module | None:
        """The norm applied to the MLP output before the residual add, or ``None``."""
        if self.mlp_out_norm_path is None:
            return None
        self._check_layer(model, layer)
        return model.get_submodule(f"{self.layer_name(layer)}.{self.mlp_out_norm_path}")

    def mlp_out_gain(self, model: nn.Module, layer: int) -> torch.Tensor | None:
        """Gain ``g`` (``[d]``, float64) of the RMSNorm after the MLP, ``None`` without one.

        Read from the module itself (its output for an all-ones input, times ``sqrt(1 + eps)``),
        so Llama-style ``w`` and Gemma-style ``1 + w`` gains are both handled.
        """
        norm = self.mlp_out_norm(model, layer)
        if norm is None:
            return None
        eps = rms_norm_eps(norm)
        param = next(norm.parameters())
        width = param.shape[-1]
        with torch.no_grad():
            dtype = torch.promote_types(param.dtype, torch.float32)  # no bf16 rounding of g
            ones = torch.ones(1, width, device=param.device, dtype=dtype)
            return norm(ones)[0].double() * (1.0 + eps) ** 0.5

    def residual_to_projection(
        self, model: nn.Module, layer: int, resid: torch.Tensor, outputs: torch.Tensor
    ) -> torch.Tensor:
        """Change ``[n, d]`` of the projection's output that moves the residual stream by
        ``resid`` (``[n, d]``) as nearly as it can, the projection's outputs being ``outputs``.

        Without a norm after the MLP the two coincide and ``resid`` is returned. With an RMSNorm
        ``y = g * x / rms(x)`` there (Gemma3) see :func:`rms_norm_preimage`; ``g`` is read from
        the module (its output for an all-ones input), so Llama-style ``w`` and Gemma-style
        ``1 + w`` gains are both handled. Differentiable in ``resid`` and ``outputs``.
        """
        gain = self.mlp_out_gain(model, layer)
        if gain is None:
            return resid
        eps = rms_norm_eps(self.mlp_out_norm(model, layer))
        x = outputs.to(device=resid.device, dtype=torch.float64)
        change = rms_norm_preimage(x, gain.to(resid.device), resid.double(), eps)  # float64
        return change.to(torch.promote_types(resid.dtype, torch.float32))

    def final_norm(self, model: nn.Module) -> nn.Module:
        """The norm applied to the last hidden state before the unembedding."""
        return model.get_submodule(self.final_norm_path)

    def unembed(self, model: nn.Module) -> nn.Module:
        """The unembedding (LM head) module."""
        head = model.get_output_embeddings()
        if head is None:
            raise UnsupportedModelError(f"{type(model).__name__} has no output embeddings")
        return head

    # ----- weights ---------------------------------------------------------------------------
    def weight(self, model: nn.Module, layer: int) -> torch.Tensor:
        """Weight of the MLP output projection as ``[d_out, d_in]`` (a view, not a copy)."""
        w = self.mlp_out(model, layer).weight
        return w.T if self.weight_is_transposed else w

    def add_to_weight(self, model: nn.Module, layer: int, delta: torch.Tensor) -> None:
        """In place: ``W[out, in] += delta[out, in]`` (cast to the weight's dtype and device)."""
        self._check_shape(model, layer, delta)
        param = self.mlp_out(model, layer).weight
        d = delta.T if self.weight_is_transposed else delta
        with torch.no_grad():
            param.add_(d.to(device=param.device, dtype=param.dtype))

    def set_weight(self, model: nn.Module, layer: int, value: torch.Tensor) -> None:
        """In place: set layer ``layer``'s stored weight to ``value`` given as ``[out, in]``."""
        self._check_shape(model, layer, value)
        param = self.mlp_out(model, layer).weight
        v = value.T if self.weight_is_transposed else value
        with torch.no_grad():
            param.copy_(v.to(device=param.device, dtype=param.dtype))

    def logits(self, model: nn.Module, normed_hidden: torch.Tensor) -> torch.Tensor:
        """Logits ``[..., vocab]`` from final-normed hidden states ``[..., d]``, on the hidden
        states' device (an LM head that a device map put elsewhere computes them there)."""
        logits = self.unembed(model)(normed_hidden).to(normed_hidden.device)
        cap = getattr(model.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def _check_shape(self, model: nn.Module, layer: int, value: torch.Tensor) -> None:
        expected = tuple(self.weight(model, layer).shape)
        if tuple(value.shape) != expected:
            raise ValueError(
                f"shape {tuple(value.shape)} does not fit layer {layer}'s weight {expected} "
                "([d_out, d_in])"
            )

    def _check_layer(self, model: nn.Module, layer: int) -> None:
        n = self.num_layers(model)
        if not 0 <= layer < n:
            raise ValueError(f"layer {layer} out of range: this model has layers 0..{n - 1}")


def rms_norm_eps(norm: nn.Module) -> float:
    """The ``eps`` an RMSNorm module adds to ``mean(x^2)`` (``eps`` or ``variance_epsilon``)."""
    return float(getattr(norm, "eps", getattr(norm, "variance_epsilon", 0.0)))


def rms_norm_preimage(
    x: torch.Tensor, gain: torch.Tensor, resid: torch.Tensor, eps: float = 0.0
) -> torch.Tensor:
    """Change ``[n, d]`` of ``x`` (``[n, d]``) that moves ``y = gain * x / rms(x)`` by ``resid``
    (``[n, d]``) as nearly as an RMSNorm can; ``gain`` is ``[d]``.

    The norm's outputs lie on the ellipsoid ``sum_j (y_j / g_j)^2 = const`` (``rms`` of ``x /
    rms(x)`` is 1), so ``y + resid`` is first projected onto it, the nearest point in the
    Euclidean norm being ``y'_j = t_j g_j^2 / (g_j^2 + mu)`` (``t = y + resid``) with the
    multiplier ``mu`` found by bisection; then ``x' = rms(x) * y' / g`` keeps ``rms(x)`` and
    gives exactly ``y'``. Coordinates with ``g_j = 0`` keep their ``x_j``. Differentiable in
    ``x`` and ``resid`` (through ``mu`` as an implicit function).
    """
    r = (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()  # [n, 1]
    u = x / r  # [n, d]
    live = gain != 0
    g = torch.where(live, gain, torch.ones_like(gain))
    g2 = g * g
    target = torch.where(live, gain * u + resid, torch.zeros_like(resid))  # t, [n, d]
    budget = torch.where(live, u * u, torch.zeros_like(u)).sum(-1, keepdim=True)  # [n, 1]
    tg = target * g  # [n, d]

    def excess(mu: torch.Tensor) -> torch.Tensor:  # [n, 1], decreasing in mu
        return (
            torch.where(live, tg / (g2 + mu), torch.zeros_like(tg)).pow(2).sum(-1, keepdim=True)
            - budget
        )

    with torch.no_grad():
        pole = g2[live].min()
        low = torch.full_like(budget, -float(pole)) * (1 - 1e-12)
        high = (tg.detach().pow(2).sum(-1, keepdim=True) / budget.clamp_min(1e-30)).sqrt()
        high = torch.maximum(high, torch.zeros_like(high)) + 1e-12
        for _ in range(200):
            mid = (low + high) / 2
            above = excess(mid) > 0
            low = torch.where(above, mid, low)
            high = torch.where(above, high, mid)
        mu0 = (low + high) / 2
    if torch.is_grad_enabled() and target.requires_grad:
        # one Newton step from the root: mu0 itself in value, the implicit derivative in autograd
        slope = -2 * torch.where(live, tg.pow(2) / (g2 + mu0).pow(3), torch.zeros_like(tg))
        mu = mu0 - excess(mu0) / slope.sum(-1, keepdim=True)
    else:
        mu = mu0
    u_new = torch.where(live, tg / (g2 + mu), u)
    return r * (u_new - u)


_LLAMA_LIKE = dict(layers_path="model.layers", mlp_out_path="mlp.down_proj",
                   final_norm_path="model.norm")  # fmt: skip

ADAPTERS: dict[str, ArchAdapter] = {
    a.model_type: a
    for a in [
        ArchAdapter("gpt2", "transformer.h", "mlp.c_proj", "transformer.ln_f", True),
        ArchAdapter("gptj", "transformer.h", "mlp.fc_out", "transformer.ln_f"),
        ArchAdapter(
            "gpt_neox", "gpt_neox.layers", "mlp.dense_4h_to_h", "gpt_neox.final_layer_norm"
        ),
        ArchAdapter("llama", **_LLAMA_LIKE),
        ArchAdapter("mistral", **_LLAMA_LIKE),
        ArchAdapter("qwen2", **_LLAMA_LIKE),
        ArchAdapter("qwen3", **_LLAMA_LIKE),
        ArchAdapter(
            "gemma3_text",
            **_LLAMA_LIKE,
            mlp_out_norm_path="post_feedforward_layernorm",
            note="Gemma3 normalises the MLP output (post_feedforward_layernorm) before the "
            "residual add; residual changes are mapped into the projection's output space "
            "through that norm (residual_to_projection).",
        ),
        ArchAdapter(
            "gemma3",
            layers_path="model.language_model.layers",
            mlp_out_path="mlp.down_proj",
            final_norm_path="model.language_model.norm",
            mlp_out_norm_path="post_feedforward_layernorm",
            note="Gemma3 multimodal wrapper; the text decoder is edited.",
        ),
    ]
}


def get_adapter(model: nn.Module) -> ArchAdapter:
    """The adapter for ``model``, chosen by ``model.config.model_type``."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ADAPTERS:
        raise UnsupportedModelError(
            f"unsupported model type {model_type!r}; supported: {', '.join(sorted(ADAPTERS))}. "
            "Add an ArchAdapter entry in metake/models/adapters.py for a new family."
        )
    return ADAPTERS[model_type]


def input_device(model: nn.Module) -> torch.device:
    """The device a forward's inputs go to: that of the input embedding (the first layer of a
    model spread over devices by accelerate; accelerate's hooks move activations onwards)."""
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embedding, "weight", None)
    if weight is not None and not weight.is_meta:
        return weight.device
    hook = getattr(embedding, "_hf_hook", None)  # offloaded by accelerate: runs on this device
    device = getattr(hook, "execution_device", None)
    if device is not None:
        return torch.device(device)
    return next(p.device for p in model.parameters() if not p.is_meta)


def require_in_memory(model: nn.Module, layers: list[int] | tuple[int, ...]) -> None:
    """A clear error when an edit layer's weight is offloaded (accelerate leaves ``meta``
    parameters for weights kept on disk or in a CPU offload): edits change it in place."""
    adapter = get_adapter(model)
    offloaded = [layer for layer in layers if adapter.weight(model, layer).is_meta]
    if offloaded:
        names = ", ".join(adapter.layer_name(layer) for layer in offloaded)
        raise UnsupportedModelError(
            f"the weights of edit layer(s) {offloaded} are offloaded by the device map (their "
            f"parameters are on the meta device); edits change them in place, so {names} must "
            "sit on a device: give them one in --device-map, or raise --max-memory so that "
            "they fit (other layers may stay offloaded)"
        )
