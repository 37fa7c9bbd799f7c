"""Second-moment statistics ``C0 = E[k k^T]`` of the MLP keys, as MEMIT uses them.

The key ``k`` of layer ``l`` is the input of that layer's MLP output projection (see
:mod:`metake.models.adapters`); ``C0`` is the uncentred mean of ``k k^T`` over every non-padding
token of the first ``num_samples`` texts of a corpus. One streamed pass computes all requested
layers at once (one forward per batch, stopped after the highest layer); only the running sum
``sum k k^T`` (``[d_in, d_in]`` per layer) is kept in memory.

Results are cached on disk as safetensors files (no pickle), keyed by the model id, a content
fingerprint of the model weights, the layer, the corpus fingerprint, ``num_samples``,
``max_length``, the accumulation dtype and (when set) the forward's autocast dtype.

With ``autocast="bfloat16"`` the forward runs under :func:`~metake.precision.planner_precision`
(matrix products in bfloat16: several times faster on CPUs with AMX/AVX512-BF16 and on GPUs)
and so does each batch's ``k^T k`` (the keys already are bfloat16 numbers: their products are
exact and summed in float32 inside the kernel, only the batch's result is rounded), which is
then added to the running sum in the accumulation dtype. How much that changes ``C0``, next to
the sampling noise of the corpus itself, is measured by ``benchmarks/stats_speed.py``
(docs/statistics.md).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from metake.corpus import TextCorpus
from metake.distributed import rank_and_world, sum_across_processes, union_across_processes
from metake.errors import CorpusError
from metake.files import write_file_atomically
from metake.finite import require_finite
from metake.models.adapters import ArchAdapter, get_adapter, input_device
from metake.models.modes import frozen
from metake.precision import AUTOCAST_DTYPES, planner_precision
from metake.tokens import padding_id, right_pad
from metake.trace import capture

log = logging.getLogger("metake.stats")

_FORMAT = "metake-stats-v1"
_ACCUM_DTYPES = {torch.float32: "float32", torch.float64: "float64"}


@dataclass
class SecondMoment:
    """``mom2`` = ``sum k k^T / num_tokens`` as a ``[d_in, d_in]`` float64 CPU tensor."""

    mom2: torch.Tensor
    num_tokens: int


# ----- computation ---------------------------------------------------------------------------
def compute_second_moments(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    layers: Sequence[int],
    corpus: TextCorpus,
    *,
    num_samples: int,
    max_length: int = 256,
    batch_size: int = 8,
    accum_dtype: torch.dtype = torch.float64,
    autocast: str | None = None,
    progress: bool = True,
) -> dict[int, SecondMoment]:
    """One pass over ``num_samples`` texts: ``{layer: E[k k^T]}`` with ``mom2`` ``[d_in, d_in]``.

    ``autocast`` (``None`` or ``"bfloat16"``) runs the forward in that precision (module doc).
    """
    layers = _check_args(model, layers, num_samples, max_length, batch_size, accum_dtype,
                         autocast)  # fmt: skip
    adapter = get_adapter(model)
    names = {layer: adapter.mlp_out_name(layer) for layer in layers}
    stop_after = names[max(layers)]
    device = input_device(model)
    acc_device = _accum_device(device, accum_dtype)
    batch_dtype = AUTOCAST_DTYPES[autocast] if autocast is not None else None
    pad_id = padding_id(tokenizer)

    rank, world = rank_and_world()
    total = min(num_samples, corpus.num_texts) if corpus.num_texts else num_samples
    if corpus.num_texts and corpus.num_texts < num_samples and rank == 0:
        log.warning(
            "corpus %r has only %d texts; using all of them instead of num_samples=%d",
            corpus.name,
            corpus.num_texts,
            num_samples,
        )

    sums = {layer: _zeros_for(model, adapter, layer, accum_dtype, acc_device) for layer in layers}
    num_tokens = 0
    num_texts = 0
    bar = tqdm(total=total, desc=f"key statistics ({corpus.name})", unit="text",
               disable=not progress or rank != 0)  # fmt: skip
    try:
        with torch.no_grad(), frozen(model), planner_precision(model, autocast):
            texts = itertools.islice(corpus.iter_texts(), num_samples)
            batches = _token_batches(tokenizer, texts, batch_size, max_length)
            for number, (consumed, rows) in enumerate(batches):
                bar.update(consumed)
                # in a process group, every world-th batch from the rank-th: the same batches
                # as one process forms, so each key is computed exactly as there
                if number % world != rank:
                    continue
                num_texts += consumed
                if not rows:
                    continue
                input_ids, mask = right_pad(rows, pad_id)  # real tokens at 0..n-1 in every row
                input_ids, mask = input_ids.to(device), mask.to(device)
                with capture(
                    model, list(names.values()), inputs=True, outputs=False, stop_after=stop_after
                ) as trace:
                    model(input_ids=input_ids, attention_mask=mask, use_cache=False)
                keep = mask.bool()
                num_tokens += int(keep.sum())
                with _full_precision(device, autocast):  # the sums outside autocast
                    for layer, name in names.items():
                        k = trace.inputs[name]  # [batch, seq, d_in]
                        k = k[keep.to(k.device)].to(acc_device)  # [n, d_in]
                        _accumulate(sums, layer, k, accum_dtype, batch_dtype)
                del trace
    finally:
        bar.close()

    if world > 1:  # every process's sums and counts, added up on every process (exact in float64)
        counts = torch.tensor([num_tokens, num_texts], dtype=torch.float64, device=acc_device)
        sum_across_processes([counts, *(sums[layer] for layer in layers)])
        num_tokens, num_texts = int(counts[0]), int(counts[1])
    if num_tokens == 0:
        raise CorpusError(
            f"corpus {corpus.name!r} produced no tokens in its first {num_texts} texts; "
            "cannot compute key statistics"
        )
    log.info(
        "key statistics for layers %s: %d texts, %d tokens (corpus %r, %d process(es))",
        layers,
        num_texts,
        num_tokens,
        corpus.name,
        world,
    )
    return {
        layer: SecondMoment(
            mom2=(sums[layer].to(device="cpu", dtype=torch.float64) / num_tokens).contiguous(),
            num_tokens=num_tokens,
        )
        for layer in layers
    }


def _full_precision(device: torch.device, autocast: str | None):
    """Autocast switched off for the enclosed code, where the statistics' forward had it on."""
    if autocast is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, enabled=False)


def _zeros_for(
    model: nn.Module, adapter: ArchAdapter, layer: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """An all-zero running sum ``[d_in, d_in]`` for ``layer``'s keys."""
    d_in = adapter.weight(model, layer).shape[1]
    return torch.zeros(d_in, d_in, dtype=dtype, device=device)


def _accumulate(
    sums: dict[int, torch.Tensor],
    layer: int,
    keys: torch.Tensor,
    accum_dtype: torch.dtype,
    batch_dtype: torch.dtype | None = None,
) -> None:
    """Add ``keys^T keys`` (keys ``[n, d_in]``) to ``sums[layer]`` (``[d_in, d_in]``, created
    on first use); with ``batch_dtype`` the batch's product is formed in that dtype first."""
    if layer not in sums:
        d_in = keys.shape[-1]
        sums[layer] = torch.zeros(d_in, d_in, dtype=accum_dtype, device=keys.device)
    if batch_dtype is not None:
        keys = keys.to(batch_dtype)
        sums[layer].add_(keys.T @ keys)
    else:
        keys = keys.to(accum_dtype)
        sums[layer].addmm_(keys.T, keys)


def _check_args(
    model: nn.Module,
    layers: Sequence[int],
    num_samples: int,
    max_length: int,
    batch_size: int,
    accum_dtype: torch.dtype,
    autocast: str | None = None,
) -> list[int]:
    if accum_dtype not in _ACCUM_DTYPES:
        raise ValueError(f"accum_dtype must be torch.float32 or torch.float64, got {accum_dtype}")
    if autocast is not None and autocast not in AUTOCAST_DTYPES:
        raise ValueError(f"the statistics' autocast must be one of {sorted(AUTOCAST_DTYPES)} or "
                         f"None, got {autocast!r}")  # fmt: skip
    for value, what in (
        (num_samples, "num_samples"),
        (max_length, "max_length"),
        (batch_size, "batch_size"),
    ):
        if int(value) < 1:
            raise ValueError(f"{what} must be at least 1, got {value}")
    out = sorted({int(layer) for layer in layers})
    if not out:
        raise ValueError("no layers requested")
    adapter = get_adapter(model)
    for layer in out:
        adapter.mlp_out(model, layer)  # raises ValueError when out of range
    return out


def _accum_device(device: torch.device, accum_dtype: torch.dtype) -> torch.device:
    # MPS has no float64; accumulate on the CPU there (keys are small per batch).
    if device.type == "mps" and accum_dtype == torch.float64:
        return torch.device("cpu")
    return device


_SORT_WINDOW = 16  # batches whose texts are sorted by length together (less padding)


def _token_batches(
    tokenizer, texts: Iterator[str], batch_size: int, max_length: int
) -> Iterator[tuple[int, list[list[int]]]]:
    """``(number of texts consumed, token rows)`` per batch; rows of similar length together.

    Texts are tokenised a window of ``_SORT_WINDOW`` batches at a time and sorted by length
    inside the window, which cuts padding (and forward time) without changing the statistics:
    they are a sum over tokens, and each text is still its own row. Empty rows are dropped.
    """
    while window := list(itertools.islice(texts, batch_size * _SORT_WINDOW)):
        enc = tokenizer(window, truncation=True, max_length=max_length)
        rows = sorted((list(ids)[:max_length] for ids in enc["input_ids"]), key=len)
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            yield len(chunk), [r for r in chunk if r]


# ----- fingerprints and cache ----------------------------------------------------------------
def model_fingerprint(model: nn.Module) -> str:
    """sha256 hex over config sizes and every parameter's name, shape, dtype and sampled values."""
    h = hashlib.sha256(b"metake-model-v1\0")
    config = getattr(model, "config", None)
    if config is not None:
        h.update(_config_summary(config).encode("utf-8"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            h.update(f"\0{name}\0{tuple(p.shape)}\0{p.dtype}\0".encode())
            if p.is_meta or p.numel() == 0:
                continue
            flat = p.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 4096)]
            h.update(sample.to(device="cpu", dtype=torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def _config_summary(config) -> str:
    """model_type and the integer sizes of ``config`` (no paths, flags or token ids)."""
    try:
        data = json.loads(config.to_json_string(use_diff=False))
    except Exception:  # exotic configs: fall back to the type alone
        data = {}
    summary = {"model_type": getattr(config, "model_type", data.get("model_type"))}

    def walk(prefix: str, d: dict) -> None:
        for key, value in sorted(d.items()):
            if key.startswith("_") or key.endswith(("token_id", "token_ids")):
                continue
            if isinstance(value, dict):
                walk(f"{prefix}{key}.", value)
            elif isinstance(value, int) and not isinstance(value, bool):
                summary[f"{prefix}{key}"] = value

    walk("", data)
    return json.dumps(summary, sort_keys=True)


def default_cache_dir() -> Path:
    """``$METAKE_CACHE/stats``, or ``~/.cache/metake/stats`` when the variable is unset."""
    base = os.environ.get("METAKE_CACHE") or os.path.join("~", ".cache", "metake")
    return Path(base).expanduser() / "stats"


class StatsCache:
    """Second moments on disk: one safetensors file per (model, layer, corpus, settings)."""

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        """Files live directly in ``root`` (default: :func:`default_cache_dir`)."""
        self.root = Path(root).expanduser() if root is not None else default_cache_dir()

    def __repr__(self) -> str:
        return f"StatsCache({str(self.root)!r})"

    @staticmethod
    def key(
        *,
        model_id: str,
        model_fp: str,
        layer: int,
        corpus_fp: str,
        num_samples: int,
        max_length: int,
        accum_dtype: torch.dtype,
        autocast: str | None = None,
    ) -> dict[str, str]:
        """The cache key as string metadata (all values are strings, as safetensors requires).

        ``autocast`` enters the key only when set, so the full-precision keys stay as they were.
        """
        key = {
            "format": _FORMAT,
            "model_id": str(model_id),
            "model_fingerprint": model_fp,
            "layer": str(int(layer)),
            "corpus_fingerprint": corpus_fp,
            "num_samples": str(int(num_samples)),
            "max_length": str(int(max_length)),
            "accum_dtype": _ACCUM_DTYPES.get(accum_dtype, str(accum_dtype)),
        }
        if autocast is not None:
            key["forward_autocast"] = str(autocast)
        return key

    def path_for(self, key: dict[str, str]) -> Path:
        """File of ``key``: ``<model id>-L<layer>-<16 hex of the key's sha256>.safetensors``."""
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode("utf-8")).hexdigest()
        return self.root / f"{_file_stem(key)}-L{key['layer']}-{digest[:16]}.safetensors"

    def lock(self, key: dict[str, str]) -> FileLock:
        """An inter-process lock for computing ``key``'s model statistics (one per model)."""
        locks = self.root / "locks"
        locks.mkdir(parents=True, exist_ok=True)
        return FileLock(str(locks / f"{_file_stem(key)}-{key['model_fingerprint'][:16]}.lock"))

    def load(self, key: dict[str, str]) -> SecondMoment | None:
        """The stored moment of ``key`` (``mom2`` ``[d_in, d_in]`` float64), or None if absent."""
        path = self.path_for(key)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                mom2 = f.get_tensor("mom2")
            if any(meta.get(k) != v for k, v in key.items()):
                log.warning("ignoring cache file %s: its metadata does not match the key", path)
                return None
            expected = meta.get("sha256")
            if expected is not None and expected != _tensor_digest(mom2):
                log.warning("ignoring cache file %s: its checksum does not match (corrupt); "
                            "recomputing", path)  # fmt: skip
                return None
            if not bool(torch.isfinite(mom2).all()):
                log.warning("ignoring cache file %s: it holds non-finite values; recomputing", path)
                return None
            return SecondMoment(mom2=mom2.to(torch.float64), num_tokens=int(meta["num_tokens"]))
        except Exception as e:  # corrupt or truncated file: recompute
            log.warning("ignoring unreadable cache file %s: %s", path, e)
            return None

    def save(
        self, key: dict[str, str], moment: SecondMoment, extra: dict[str, str] | None = None
    ) -> Path:
        """Write ``moment`` atomically (:func:`~metake.files.write_file_atomically`), with the
        sha256 of its tensor in the metadata; returns the file path."""
        tensor = moment.mom2.detach().to(device="cpu", dtype=torch.float64).contiguous()
        meta = {**(extra or {}), **key, "num_tokens": str(int(moment.num_tokens)),
                "sha256": _tensor_digest(tensor)}  # fmt: skip
        return write_file_atomically(
            self.path_for(key), lambda tmp: save_file({"mom2": tensor}, str(tmp), metadata=meta)
        )


# ----- cached entry point --------------------------------------------------------------------
def get_second_moments(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    layers: Sequence[int],
    corpus: TextCorpus,
    *,
    model_id: str,
    num_samples: int,
    max_length: int = 256,
    batch_size: int = 8,
    accum_dtype: torch.dtype = torch.float64,
    autocast: str | None = None,
    cache: StatsCache | None = None,
    use_cache: bool = True,
    progress: bool = True,
) -> dict[int, SecondMoment]:
    """``{layer: E[k k^T]}`` (``[d_in, d_in]`` float64): cached layers loaded, the rest computed."""
    layers = _check_args(model, layers, num_samples, max_length, batch_size, accum_dtype,
                         autocast)  # fmt: skip
    if not use_cache:
        return compute_second_moments(
            model,
            tokenizer,
            layers,
            corpus,
            num_samples=num_samples,
            max_length=max_length,
            batch_size=batch_size,
            accum_dtype=accum_dtype,
            autocast=autocast,
            progress=progress,
        )

    cache = cache if cache is not None else StatsCache()
    keys = cache_keys(model, layers, corpus, model_id=model_id, num_samples=num_samples,
                      max_length=max_length, accum_dtype=accum_dtype,
                      autocast=autocast)  # fmt: skip
    options = dict(num_samples=num_samples, max_length=max_length, batch_size=batch_size,
                   accum_dtype=accum_dtype, autocast=autocast, progress=progress)  # fmt: skip
    result = _load_cached(cache, keys, layers)
    missing = [layer for layer in layers if layer not in result]
    if rank_and_world()[1] > 1:
        return _distributed_moments(model, tokenizer, layers, corpus, cache, keys, result,
                                    **options)  # fmt: skip
    if missing:
        with cache.lock(keys[missing[0]]):  # a second process waits here, then reads the cache
            result.update(_load_cached(cache, keys, missing))
            missing = [layer for layer in layers if layer not in result]
            if missing:
                result.update(_compute_and_cache(model, tokenizer, missing, corpus, cache, keys,
                                                 **options))  # fmt: skip
    return {layer: result[layer] for layer in layers}


def cache_keys(
    model: nn.Module,
    layers: Sequence[int],
    corpus: TextCorpus,
    *,
    model_id: str,
    num_samples: int,
    max_length: int,
    accum_dtype: torch.dtype,
    autocast: str | None,
) -> dict[int, dict[str, str]]:
    """``{layer: cache key}`` of these statistics (:meth:`StatsCache.key`)."""
    model_fp = model_fingerprint(model)
    return {
        layer: StatsCache.key(model_id=model_id, model_fp=model_fp, layer=layer,
                              corpus_fp=corpus.fingerprint, num_samples=num_samples,
                              max_length=max_length, accum_dtype=accum_dtype, autocast=autocast)
        for layer in layers
    }  # fmt: skip


def _distributed_moments(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    layers: Sequence[int],
    corpus: TextCorpus,
    cache: StatsCache,
    keys: dict[int, dict[str, str]],
    found: dict[int, SecondMoment],
    **options: Any,
) -> dict[int, SecondMoment]:
    """:func:`get_second_moments` in a process group: the layers that any process lacks are
    computed by all of them (each on its share of the batches), and only rank 0 writes the cache."""
    lacking = torch.tensor([layer not in found for layer in layers], device=input_device(model))
    lacking = union_across_processes(lacking)
    missing = [layer for layer, flag in zip(layers, lacking.tolist(), strict=True) if flag]
    if missing:
        rank = rank_and_world()[0]
        computed = _compute_and_cache(model, tokenizer, missing, corpus, cache, keys,
                                      save=rank == 0, **options)  # fmt: skip
        found = {**found, **computed}
    return {layer: found[layer] for layer in layers}


def _file_stem(key: dict[str, str]) -> str:
    """A key's model id as a safe file-name part (at most 60 characters)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", key["model_id"]).strip("._")[:60] or "model"


def _tensor_digest(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's bytes (float64, contiguous): a cache file's integrity check."""
    data = tensor.detach().to(device="cpu", dtype=torch.float64).contiguous().numpy()
    return hashlib.sha256(data.tobytes()).hexdigest()


def _load_cached(
    cache: StatsCache, keys: dict[int, dict[str, str]], layers: Sequence[int]
) -> dict[int, SecondMoment]:
    """The layers of ``layers`` whose statistics are in ``cache``."""
    found_all = {}
    for layer in layers:
        found = cache.load(keys[layer])
        if found is not None:
            found_all[layer] = found
            log.info("layer %d: key statistics loaded from cache %s (%d tokens)", layer,
                     cache.path_for(keys[layer]), found.num_tokens)  # fmt: skip
    return found_all


def _compute_and_cache(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    missing: Sequence[int],
    corpus: TextCorpus,
    cache: StatsCache,
    keys: dict[int, dict[str, str]],
    save: bool = True,
    **options: Any,
) -> dict[int, SecondMoment]:
    """Compute ``missing`` layers in one corpus pass, check them, then (``save``) cache each."""
    computed = compute_second_moments(model, tokenizer, missing, corpus, **options)
    extra = {"corpus_name": corpus.name}
    for layer in missing:  # all checked before any is cached
        require_finite(computed[layer].mom2, "the key statistics (C0)", layer=layer,
                       consequence="nothing was cached")  # fmt: skip
    for layer in missing if save else ():
        try:
            path = cache.save(keys[layer], computed[layer], extra=extra)
        except OSError as e:
            log.warning("layer %d: could not write the statistics cache: %s", layer, e)
        else:
            log.info("layer %d: key statistics computed (%d tokens), saved to %s", layer,
                     computed[layer].num_tokens, path)  # fmt: skip
    return {layer: computed[layer] for layer in missing}


# ----- export / import -----------------------------------------------------------------------
_EXPORT_FORMAT = "metake-stats-export-v1"
_SHARED_KEY_FIELDS = ("model_fingerprint", "corpus_fingerprint", "num_samples", "max_length",
                      "accum_dtype", "forward_autocast")  # fmt: skip
"""Cache-key fields that hold on any machine (an import sets format, model id and layer)."""


def export_moments(
    path: str | os.PathLike[str],
    moments: dict[int, SecondMoment],
    keys: dict[int, dict[str, str]],
    corpus_name: str,
) -> Path:
    """Write ``moments`` (``{layer: [d_in, d_in]}``) and their token counts as one safetensors
    file another machine can :func:`import_moments`; returns its path."""
    layers = sorted(moments)
    first = keys[layers[0]]
    meta = {k: v for k, v in first.items() if k in _SHARED_KEY_FIELDS}
    counts = {str(layer): moments[layer].num_tokens for layer in layers}
    meta.update(format=_EXPORT_FORMAT, corpus_name=corpus_name, layers=json.dumps(layers),
                exported_model_id=first["model_id"], num_tokens=json.dumps(counts))  # fmt: skip
    tensors = {f"layer.{layer}": moments[layer].mom2.detach().to("cpu", torch.float64).contiguous()
               for layer in layers}  # fmt: skip
    return write_file_atomically(
        Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=meta)
    )


def import_moments(
    path: str | os.PathLike[str], model: nn.Module, model_id: str, cache: StatsCache | None = None
) -> dict[int, SecondMoment]:
    """Put the statistics of an :func:`export_moments` file into ``cache`` under this machine's
    ``model_id``, after checking that they were computed on the same weights as ``model``."""
    cache = cache if cache is not None else StatsCache()
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    except Exception as e:  # missing, truncated or not safetensors
        raise CorpusError(f"cannot read the statistics export {str(path)!r}: {e}") from e
    if meta.get("format") != _EXPORT_FORMAT:
        raise CorpusError(f"{str(path)!r} is not a `metake stats --export` file")
    here = model_fingerprint(model)
    if meta.get("model_fingerprint") != here:
        raise CorpusError(
            f"the statistics in {str(path)!r} were computed on other weights than this model's "
            f"(fingerprint {meta.get('model_fingerprint', '?')[:16]}, here {here[:16]}); "
            "load the same model (and dtype) the exporting machine used"
        )
    counts = json.loads(meta["num_tokens"])
    imported = {}
    for layer in json.loads(meta["layers"]):
        mom2 = tensors[f"layer.{layer}"].to(torch.float64)
        require_finite(mom2, "the imported key statistics (C0)", layer=layer,
                       consequence="nothing was imported")  # fmt: skip
        imported[int(layer)] = SecondMoment(mom2=mom2, num_tokens=int(counts[str(layer)]))
    shared = {k: meta[k] for k in _SHARED_KEY_FIELDS if k in meta}
    for layer, moment in imported.items():
        key = {"format": _FORMAT, "model_id": str(model_id), "layer": str(layer), **shared}
        cache.save(key, moment, extra={"corpus_name": meta.get("corpus_name", ""),
                                       "imported_from": str(path)})  # fmt: skip
    return imported
