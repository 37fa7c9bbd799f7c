"""Run the positions before each subject's last token once, and only the rest at every step.

Stage I adds a vector to the residual stream at the subject's last token; hidden states at
earlier positions cannot change, so their keys and values in every attention layer are the same
at every optimisation step. :class:`PrefixCachedBatch` splits each prompt there: the *prefix*
(tokens before the subject's last token, left-padded) runs once and fills a key/value cache; the
*suffix* (from the subject's last token on, right-padded) runs at every step against a copy of
that cache. For questions with the subject near the end (zsRE) most tokens are prefix.

Position ids are passed explicitly (each row counts from its first real token), so absolute
position embeddings (GPT-2) and rotary ones see the same positions as an unsplit, right-padded
prompt. The suffix view is a :class:`PromptBatch` in suffix coordinates: the subject's last token
is position 0 of every row and target positions are shifted accordingly.
"""

from __future__ import annotations

import copy
from inspect import signature

import torch
from torch import nn

from metake.tokens import PromptBatch


class PrefixCachedBatch:
    """A right-padded :class:`PromptBatch` split at each row's subject's last token."""

    def __init__(self, model: nn.Module, batch: PromptBatch, pad_id: int) -> None:
        self.model = model
        split = batch.subject_last  # [B]: first position whose state can change
        lengths = batch.attention_mask.sum(1)  # [B]
        rows = batch.input_ids.shape[0]
        width_prefix = int(split.max())
        width_suffix = int((lengths - split).max())
        device = batch.input_ids.device
        prefix_ids = torch.full((rows, width_prefix), pad_id, dtype=torch.long, device=device)
        prefix_mask = torch.zeros((rows, width_prefix), dtype=torch.long, device=device)
        suffix_ids = torch.full((rows, width_suffix), pad_id, dtype=torch.long, device=device)
        suffix_mask = torch.zeros((rows, width_suffix), dtype=torch.long, device=device)
        for r in range(rows):
            s, n = int(split[r]), int(lengths[r])
            prefix_ids[r, width_prefix - s :] = batch.input_ids[r, :s]
            prefix_mask[r, width_prefix - s :] = 1
            suffix_ids[r, : n - s] = batch.input_ids[r, s:n]
            suffix_mask[r, : n - s] = 1
        self.prefix_ids, self.prefix_mask = prefix_ids, prefix_mask
        self.prefix_positions = (prefix_mask.cumsum(1) - 1).clamp_min(0)
        self.suffix_positions = split[:, None] + torch.arange(width_suffix, device=device)
        self.full_mask = torch.cat([prefix_mask, suffix_mask], dim=1)
        self.suffix = PromptBatch(
            input_ids=suffix_ids,
            attention_mask=suffix_mask,
            subject_last=torch.zeros_like(split),
            target_rows=batch.target_rows,
            target_positions=batch.target_positions - split[batch.target_rows],
            target_ids=batch.target_ids,
        )
        self._cache = self._run_prefix() if width_prefix else None

    @staticmethod
    def supports(model: nn.Module, batch: PromptBatch) -> bool:
        """False when sliding-window attention could drop cached prefix tokens still needed."""
        config = model.config.get_text_config()
        window = getattr(config, "sliding_window", None)
        return not window or batch.input_ids.shape[1] <= window

    @torch.no_grad()
    def _run_prefix(self):
        out = self.model.base_model(
            input_ids=self.prefix_ids,
            attention_mask=self.prefix_mask,
            position_ids=self.prefix_positions,
            use_cache=True,
        )
        return out.cache if hasattr(out, "cache") else out.past_key_values

    def release_layers_below(self, layer: int) -> None:
        """Free the cached keys and values of decoder layers ``0 .. layer - 1``.

        For runners whose lower layers are replayed from their cached output (they never attend
        again): each is replaced by a zero-stride view of its shape, which takes no memory and
        still answers the cache's length queries (read at layer 0).
        """
        for cached in self._cache_layers()[:layer]:
            for name in ("keys", "values"):
                tensor = getattr(cached, name, None)
                if isinstance(tensor, torch.Tensor) and tensor.numel():
                    setattr(cached, name, tensor.new_zeros(()).expand(tensor.shape))

    def cached_bytes(self) -> int:
        """Bytes held by the prefix's key/value cache (zero-stride views count nothing)."""
        total = 0
        for cached in self._cache_layers():
            for name in ("keys", "values"):
                tensor = getattr(cached, name, None)
                if isinstance(tensor, torch.Tensor):
                    total += tensor.untyped_storage().nbytes()
        return total

    def _cache_layers(self) -> list:
        """The per-layer entries (with ``keys``/``values``) of the prefix cache; none without."""
        return list(getattr(self._cache, "layers", [])) if self._cache is not None else []

    def hidden(self) -> torch.Tensor:
        """Final-normed hidden states ``[B, S_suffix, d]`` of the suffix (hooks apply as usual)."""
        if self._cache is None:
            inputs = {"attention_mask": self.suffix.attention_mask, "use_cache": False}
        else:  # transformers 5 names the argument ``cache``, 4.x ``past_key_values``
            name = "cache" if "cache" in signature(self.model.base_model.forward).parameters else (
                "past_key_values")  # fmt: skip
            inputs = {"attention_mask": self.full_mask, name: copy.deepcopy(self._cache),
                      "use_cache": True}  # fmt: skip
        out = self.model.base_model(
            input_ids=self.suffix.input_ids, position_ids=self.suffix_positions, **inputs
        )
        return out[0]
