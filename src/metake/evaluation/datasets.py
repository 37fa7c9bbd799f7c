"""Evaluation datasets: zsRE, CounterFact (flat and MEMIT style) and the user's own requests.

Every record becomes an :class:`EvalRecord`: the edit request plus the prompts its metrics read
(paraphrases for Generalisation, unrelated prompts with their own answers for Specificity /
Neighbourhood, optional generation prompts for fluency). Malformed records are skipped and
listed (index and reason) in :attr:`EvalDataset.skipped`; loading never stops at one bad record.

zsRE (MEND/MEMIT question format): the edit is ``src`` → ``answers[0]`` (the paper's protocol;
``zsre_target="alt"`` gives EasyEdit's choice), Generalisation reads ``rephrase``, Specificity
reads ``loc + "?"`` with ``loc_ans`` (MEMIT's construction).

CounterFact, flat (EasyEdit) style: ``prompt`` (subject verbatim), ``target_new``,
``ground_truth``, ``rephrase_prompt``, ``locality_prompt``, ``locality_ground_truth``;
MEMIT style: ``requested_rewrite`` with ``target_new``/``target_true``, ``paraphrase_prompts``,
``neighborhood_prompts`` (their expected answer is ``target_true``), ``generation_prompts``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from metake.errors import InvalidRequestError, MetakeError
from metake.requests import EditRequest, MalformedLine, parse_request, read_json_records

log = logging.getLogger(__name__)

DATASETS = ("zsre", "counterfact", "requests")
"""Dataset kinds: which loader and which metric family (``requests`` uses zsRE's metrics)."""

DATA_ENV = {"zsre": "METAKE_ZSRE_DATA", "counterfact": "METAKE_COUNTERFACT_DATA",
            "requests": "METAKE_REQUESTS_DATA"}  # fmt: skip
"""Environment variables that name a dataset file once, instead of ``--data`` every time."""


class DatasetError(MetakeError):
    """A dataset file that cannot be read at all (missing, not JSON, not a list of records)."""


@dataclass(frozen=True)
class EvalRecord:
    """One edit and the prompts its metrics read."""

    index: int  # position in the file
    request: EditRequest
    paraphrases: tuple[str, ...] = ()  # filled prompts expecting request.target_new
    neighbours: tuple[tuple[str, str], ...] = ()  # (prompt, its own answer)
    generation_prompts: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict."""
        return {
            "index": self.index,
            "request": self.request.to_dict(),
            "paraphrases": list(self.paraphrases),
            "neighbours": [list(p) for p in self.neighbours],
            "generation_prompts": list(self.generation_prompts),
        }


@dataclass
class EvalDataset:
    """Valid records of a file, and the skipped ones as ``(index, reason)``."""

    kind: str
    path: Path
    records: list[EvalRecord]
    skipped: list[tuple[int, str]] = field(default_factory=list)
    zsre_target: str = "answers"


def data_path(kind: str, path: str | os.PathLike[str] | None) -> Path:
    """The dataset file: ``path`` if given, else the kind's environment variable."""
    if kind not in DATASETS:
        raise DatasetError(f"unknown dataset {kind!r}; available: {', '.join(DATASETS)}")
    if path is None:
        path = os.environ.get(DATA_ENV[kind])
        if not path:
            raise DatasetError(
                f"no data file for {kind!r}: pass --data PATH or set {DATA_ENV[kind]}"
            )
    return Path(path)


def read_records(path: Path) -> list[Any]:
    """The records of a JSON list file or a JSONL file; a malformed JSONL line stays in place as
    a :class:`~metake.requests.MalformedLine` (skipped and counted later)."""
    return read_json_records(path, "dataset", DatasetError, keep_bad_lines=True)


def _strings(value: Any, field_name: str) -> tuple[str, ...]:
    """A string or a list of strings as a tuple of non-empty strings."""
    if value is None:
        return ()
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise InvalidRequestError(f"{field_name!r} must be a string or a list of strings")
    return tuple(v for v in values if v.strip())


def _answer(value: Any, field_name: str) -> str:
    if isinstance(value, Mapping):
        value = value.get("str")
    if isinstance(value, list):
        value = value[0] if value else None
    if not isinstance(value, str) or not value.strip():
        raise InvalidRequestError(f"{field_name!r} must be a non-empty string")
    return value.strip()


def _zsre_record(record: Mapping[str, Any], index: int, zsre_target: str) -> EvalRecord:
    request = parse_request(record, index, zsre_target)  # type: ignore[arg-type]
    neighbours = ()
    if record.get("loc") is not None:
        neighbours = ((f"{_answer(record['loc'], 'loc')}?", _answer(record.get("loc_ans"),
                                                                      "loc_ans")),)  # fmt: skip
    return EvalRecord(index, request, _strings(record.get("rephrase"), "rephrase"), neighbours)


def _counterfact_record(record: Mapping[str, Any], index: int) -> EvalRecord:
    request = parse_request(record, index)
    if request.target_true is None:
        raise InvalidRequestError("CounterFact needs the true answer ('ground_truth')")
    if "requested_rewrite" in record:
        paraphrases = _strings(record.get("paraphrase_prompts"), "paraphrase_prompts")
        neighbour_prompts = _strings(record.get("neighborhood_prompts"), "neighborhood_prompts")
        neighbours = tuple((p, request.target_true) for p in neighbour_prompts)
        generation = _strings(record.get("generation_prompts"), "generation_prompts")
        return EvalRecord(index, request, paraphrases, neighbours, generation)
    paraphrases = _strings(record.get("rephrase_prompt"), "rephrase_prompt")
    neighbours = ()
    if record.get("locality_prompt") is not None:
        truth = record.get("locality_ground_truth", request.target_true)
        neighbours = tuple(
            (p, _answer(truth, "locality_ground_truth"))
            for p in _strings(record["locality_prompt"], "locality_prompt")
        )
    return EvalRecord(index, request, paraphrases, neighbours)


def _own_record(record: Mapping[str, Any], index: int) -> EvalRecord:
    """A metake/EasyEdit-style request with optional ``rephrase_prompt(s)`` and locality."""
    core = {k: v for k, v in record.items() if k not in ("rephrase_prompts", "locality")}
    request = parse_request(core, index)
    paraphrases = _strings(record.get("rephrase_prompts", record.get("rephrase_prompt")),
                           "rephrase_prompts")  # fmt: skip
    neighbours: tuple[tuple[str, str], ...] = ()
    if record.get("locality_prompt") is not None:
        truth = _answer(record.get("locality_ground_truth"), "locality_ground_truth")
        neighbours = ((_answer(record["locality_prompt"], "locality_prompt"), truth),)
    return EvalRecord(index, request, paraphrases, neighbours)


def parse_record(
    kind: str, record: Any, index: int, zsre_target: Literal["answers", "alt"] = "answers"
) -> EvalRecord:
    """One raw record of dataset ``kind`` as an :class:`EvalRecord` (raises if malformed)."""
    if isinstance(record, MalformedLine):
        raise InvalidRequestError(record.message)
    if not isinstance(record, Mapping):
        raise InvalidRequestError(f"expected an object, got {type(record).__name__}")
    if kind == "zsre":
        return _zsre_record(record, index, zsre_target)
    if kind == "counterfact":
        return _counterfact_record(record, index)
    return _own_record(record, index)


def load_dataset(
    kind: str,
    path: str | os.PathLike[str] | None = None,
    zsre_target: Literal["answers", "alt"] = "answers",
    tokenizer: Any = None,
) -> EvalDataset:
    """Read a dataset file; malformed records are skipped and counted, never fatal.

    With ``tokenizer`` given, records whose prompts cannot be encoded for that model (subject
    not found after tokenisation, empty target) are skipped too.
    """
    file = data_path(kind, path)
    raw = read_records(file)
    records, skipped = [], []
    for index, item in enumerate(raw):
        try:
            record = parse_record(kind, item, index, zsre_target)
            if tokenizer is not None:
                check_encodable(tokenizer, record)
        except InvalidRequestError as exc:
            skipped.append((index, str(exc)))
            continue
        records.append(record)
    if skipped:
        log.warning("%s: skipped %d malformed record(s) of %d; first: #%d %s", file,
                    len(skipped), len(raw), *skipped[0])  # fmt: skip
    if not records:
        raise DatasetError(f"{file}: no valid {kind} records ({len(skipped)} skipped)")
    return EvalDataset(kind, file, records, skipped, zsre_target)


def check_encodable(tokenizer: Any, record: EvalRecord) -> None:
    """Raise :class:`InvalidRequestError` if the record's edit cannot be tokenised."""
    from metake.tokens import encode_request

    encode_request(tokenizer, record.request)


def parse_ranges(text: str, what: str = "records") -> list[range]:
    """``"0:100"`` or ``"0:100,500:600"`` (file positions, end exclusive) as ranges."""
    out = []
    for part in (p.strip() for p in str(text).split(",")):
        start, sep, end = part.partition(":")
        try:
            lo, hi = int(start), int(end)
        except ValueError:
            lo = hi = -1
        if not sep or lo < 0 or hi <= lo:
            raise DatasetError(
                f"{what}: {part!r} is not a range START:END of record positions (0 <= START < END)"
            )
        out.append(range(lo, hi))
    if not out:
        raise DatasetError(f"{what}: give at least one range START:END")
    return out


def in_ranges(index: int, ranges: Sequence[range]) -> bool:
    """Whether file position ``index`` lies in one of ``ranges``."""
    return any(index in r for r in ranges)


def select_records(
    records: Sequence[EvalRecord],
    count: int,
    seed: int,
    only: str | None = None,
    exclude: str | None = None,
) -> list[EvalRecord]:
    """The records a run edits: the first ``count`` of ``only`` (ranges of file positions, in
    file order, no sampling) or, without it, :func:`sample_records` over the records outside
    ``exclude`` (e.g. a tuning split that must stay out of every evaluation)."""
    if only is not None:
        ranges = parse_ranges(only, "--records")
        if exclude is not None and any(in_ranges(i, parse_ranges(exclude)) for r in ranges
                                       for i in r):  # fmt: skip
            raise DatasetError(f"--records {only} overlaps --exclude {exclude}")
        by_index = {r.index: r for r in records}
        chosen = [by_index[i] for r in ranges for i in r if i in by_index]
        if len(chosen) < count:
            raise DatasetError(f"--records {only} holds {len(chosen)} valid records, fewer than "
                               f"the {count} edits asked for")  # fmt: skip
        return chosen[:count]
    if exclude is not None:
        left_out = parse_ranges(exclude, "--exclude")
        records = [r for r in records if not in_ranges(r.index, left_out)]
    return sample_records(records, count, seed)


def sample_records(records: Sequence[EvalRecord], count: int, seed: int) -> list[EvalRecord]:
    """``count`` records drawn without replacement by a ``seed``-ed generator (stable order)."""
    import random

    if count > len(records):
        raise DatasetError(f"asked for {count} edits but the dataset has {len(records)} records")
    picks = random.Random(seed).sample(range(len(records)), count)
    return [records[i] for i in picks]
