"""Tiny, randomly initialised causal LMs of every supported family, for fast CPU tests.

``from tiny_models import tiny_model`` works from any test module: ``tests/`` has no
``__init__.py``, so pytest's default ``prepend`` import mode puts ``tests/`` on ``sys.path``.
Nothing is downloaded: every model is built from a config with ``from_config``.
"""

from __future__ import annotations

import string

import torch
from tokenizers import Tokenizer, models
from transformers import (
    AutoModelForCausalLM,
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3TextConfig,
    GPT2Config,
    GPTJConfig,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    SiglipVisionConfig,
)

VOCAB = 128
HIDDEN = 32
INTERMEDIATE = 64
LAYERS = 3
HEADS = 4

#: every model type :func:`tiny_model` can build (the families the adapters table covers).
MODEL_TYPES = ("gpt2", "gptj", "gpt_neox", "llama", "mistral", "qwen2", "gemma3_text", "gemma3")

_LLAMA_LIKE = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    intermediate_size=INTERMEDIATE,
    num_hidden_layers=LAYERS,
    num_attention_heads=HEADS,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def _gemma3_text_config(**extra) -> Gemma3TextConfig:
    return Gemma3TextConfig(
        **_LLAMA_LIKE,
        head_dim=HIDDEN // HEADS,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        query_pre_attn_scalar=HIDDEN // HEADS,
        **extra,
    )


def tiny_config(model_type: str) -> PretrainedConfig:
    """The config of the tiny model of ``model_type`` (3 layers, hidden size 32)."""
    if model_type == "gpt2":
        return GPT2Config(
            vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=64,
            n_inner=INTERMEDIATE, bos_token_id=0, eos_token_id=1,
        )  # fmt: skip
    if model_type == "gptj":
        return GPTJConfig(
            vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=64,
            rotary_dim=4, n_inner=INTERMEDIATE, bos_token_id=0, eos_token_id=1,
        )  # fmt: skip
    if model_type == "gpt_neox":
        return GPTNeoXConfig(
            vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
            num_hidden_layers=LAYERS, num_attention_heads=HEADS, max_position_embeddings=64,
        )  # fmt: skip
    if model_type == "llama":
        return LlamaConfig(**_LLAMA_LIKE)
    if model_type == "mistral":
        return MistralConfig(**_LLAMA_LIKE, sliding_window=None)
    if model_type == "qwen2":
        return Qwen2Config(**_LLAMA_LIKE)
    if model_type == "gemma3_text":
        # a soft cap (off in released Gemma 3 checkpoints) exercises ArchAdapter.logits' capping;
        # Gemma3ForConditionalGeneration ignores it, so the multimodal config leaves it unset.
        return _gemma3_text_config(final_logit_softcapping=5.0)
    if model_type == "gemma3":
        vision = SiglipVisionConfig(
            hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            image_size=16, patch_size=4,
        )  # fmt: skip
        return Gemma3Config(
            text_config=_gemma3_text_config(), vision_config=vision, mm_tokens_per_image=4
        )
    raise KeyError(f"no tiny config for model type {model_type!r}")


def tiny_model(model_type: str, seed: int = 0, num_layers: int | None = None) -> PreTrainedModel:
    """A tiny random causal LM of ``model_type``, float32, in eval mode, on the CPU.

    Weights come from the library's initialiser under ``torch.manual_seed(seed)``; then every
    parameter gets extra gaussian noise so biases and norm weights are not trivially 0 or 1.
    ``num_layers`` replaces the 3 layers (model types without per-layer config lists only).
    """
    config = tiny_config(model_type)
    if num_layers is not None:
        if model_type.startswith("gemma3"):
            raise ValueError("gemma3 configs list a type per layer: keep their 3 layers")
        config.num_hidden_layers = num_layers
    torch.manual_seed(seed)
    if model_type == "gemma3":
        model = Gemma3ForConditionalGeneration(config)
    else:
        model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.float().eval()


def hidden_and_intermediate(model: PreTrainedModel) -> tuple[int, int]:
    """``(hidden_size, intermediate_size)`` of the (text) decoder of ``model``."""
    cfg = model.config.get_text_config()
    hidden = cfg.hidden_size
    inter = getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None)
    return hidden, inter or 4 * hidden


def tiny_tokenizer(with_pad: bool = True) -> PreTrainedTokenizerFast:
    """A character-level tokenizer (ids < 100) built offline; GPT-2-like: no pad token."""
    vocab = {"[UNK]": 0, "[PAD]": 1, "[EOS]": 2}
    for c in sorted(set(string.printable) - set("\x0b\x0c\r")):
        vocab[c] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="[UNK]"))
    extra = {"pad_token": "[PAD]"} if with_pad else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", eos_token="[EOS]", **extra
    )
