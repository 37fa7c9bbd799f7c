"""Edit requests: parse and validate every accepted style into one :class:`EditRequest`.

Accepted styles (one dict per request):

* metake: ``{"prompt": "{} plays the sport of", "subject": "Michael Jordan",
  "target_new": "baseball"}`` (``target_new`` may also be ``{"str": ...}``);
* MEMIT/CounterFact: ``{"case_id": ..., "requested_rewrite": {"prompt": "{} ...", "subject": ...,
  "target_new": {"str": ...}, "target_true": {"str": ...}}, ...}``;
* EasyEdit flat: ``{"prompt": "Michael Jordan plays the sport of", "subject": "Michael Jordan",
  "target_new": "baseball", "ground_truth": ...}``: the subject must occur verbatim in the prompt;
* zsRE (MEND/MEMIT question format): ``{"subject", "src", "answers", "alt", ...}``: the prompt is
  ``src`` and the target ``answers[0]`` (the paper's protocol) or ``alt`` (EasyEdit's choice).

Every problem raises :class:`~metake.errors.InvalidRequestError` naming the request and the field.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from metake.errors import InvalidRequestError

PLACEHOLDER = "{}"

_METAKE_KEYS = {"prompt", "subject", "target_new", "target_true", "case_id", "id"}
_FLAT_EXTRA_KEYS = {
    "ground_truth", "rephrase_prompt", "rephrase_prompts", "locality_prompt",
    "locality_ground_truth", "portability", "locality", "rephrase", "relation_id",
}  # fmt: skip
_MEMIT_TOP_KEYS = {
    "case_id", "pararel_idx", "requested_rewrite", "paraphrase_prompts", "neighborhood_prompts",
    "attribute_prompts", "generation_prompts",
}  # fmt: skip
_MEMIT_REWRITE_KEYS = {"prompt", "subject", "target_new", "target_true", "relation_id"}
_ZSRE_KEYS = {"subject", "src", "rephrase", "answers", "alt", "loc", "loc_ans", "pred", "cond",
              "case_id"}  # fmt: skip


@dataclass(frozen=True)
class EditRequest:
    """One fact to write: ``prompt`` (template, one ``{}`` for the subject) → ``target_new``."""

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    case_id: str | int | None = None

    @property
    def filled_prompt(self) -> str:
        """The prompt with the subject filled in."""
        return self.prompt.replace(PLACEHOLDER, self.subject)

    def to_dict(self) -> dict[str, Any]:
        """A plain dict (metake style)."""
        return {k: v for k, v in asdict(self).items() if v is not None}


def _where(index: int | None) -> str:
    return "request" if index is None else f"request #{index}"


def _text(value: Any, field: str, where: str) -> str:
    """A non-empty string from ``value`` (or ``{"str": value}``)."""
    if isinstance(value, Mapping) and "str" in value:
        value = value["str"]
    if not isinstance(value, str):
        raise InvalidRequestError(
            f"{where}: {field!r} must be a string, got {type(value).__name__}"
        )
    if not value.strip():
        raise InvalidRequestError(f"{where}: {field!r} is empty")
    return value


def _check_keys(record: Mapping[str, Any], allowed: set[str], style: str, where: str) -> None:
    unknown = sorted(set(record) - allowed)
    if unknown:
        raise InvalidRequestError(
            f"{where}: unknown key(s) {', '.join(map(repr, unknown))} for a {style} request; "
            f"accepted keys: {', '.join(sorted(allowed))}"
        )


def _template(prompt: str, subject: str, where: str) -> str:
    """A prompt template with exactly one ``{}``; a flat prompt has its subject replaced."""
    count = prompt.count(PLACEHOLDER)
    if count > 1:
        raise InvalidRequestError(f"{where}: prompt {prompt!r} has {count} '{{}}' placeholders")
    if count == 1:
        return prompt
    if subject in prompt:
        return prompt.replace(subject, PLACEHOLDER, 1)
    raise InvalidRequestError(
        f"{where}: prompt {prompt!r} has no '{{}}' placeholder for the subject and does not "
        f"contain the subject {subject!r} either"
    )


def _build(prompt: Any, subject: Any, target: Any, true: Any, case_id: Any, where: str):
    subject = _text(subject, "subject", where).strip()
    prompt = _template(_text(prompt, "prompt", where), subject, where)
    target = _text(target, "target_new", where).strip()
    true = None if true is None else _text(true, "target_true", where).strip()
    return EditRequest(prompt, subject, target, true, case_id)


def parse_request(
    record: Mapping[str, Any],
    index: int | None = None,
    zsre_target: Literal["answers", "alt"] = "answers",
) -> EditRequest:
    """Validate one request dict of any accepted style into an :class:`EditRequest`."""
    where = _where(index)
    if isinstance(record, EditRequest):
        return record
    if not isinstance(record, Mapping):
        raise InvalidRequestError(f"{where}: expected an object, got {type(record).__name__}")
    if "requested_rewrite" in record:
        _check_keys(record, _MEMIT_TOP_KEYS, "MEMIT", where)
        rw = record["requested_rewrite"]
        if not isinstance(rw, Mapping):
            raise InvalidRequestError(f"{where}: 'requested_rewrite' must be an object")
        _check_keys(rw, _MEMIT_REWRITE_KEYS, "MEMIT requested_rewrite", where)
        _require(rw, ("prompt", "subject", "target_new"), where)
        return _build(rw["prompt"], rw["subject"], rw["target_new"], rw.get("target_true"),
                      record.get("case_id"), where)  # fmt: skip
    if "src" in record:
        _check_keys(record, _ZSRE_KEYS, "zsRE", where)
        _require(record, ("subject", "src", zsre_target), where)
        target = record[zsre_target]
        if zsre_target == "answers":
            if not isinstance(target, list) or not target:
                raise InvalidRequestError(f"{where}: 'answers' must be a non-empty list")
            target = target[0]
        return _build(record["src"], record["subject"], target, None, record.get("case_id"), where)
    _check_keys(record, _METAKE_KEYS | _FLAT_EXTRA_KEYS, "metake/EasyEdit", where)
    _require(record, ("prompt", "subject", "target_new"), where)
    true = record.get("target_true", record.get("ground_truth"))
    if isinstance(true, list):  # EasyEdit sometimes lists ground truths
        true = true[0] if true else None
    case_id = record.get("case_id", record.get("id"))
    return _build(record["prompt"], record["subject"], record["target_new"], true, case_id, where)


def _require(record: Mapping[str, Any], keys: Iterable[str], where: str) -> None:
    missing = [k for k in keys if k not in record]
    if missing:
        raise InvalidRequestError(f"{where}: missing key(s) {', '.join(map(repr, missing))}")


def parse_requests(
    records: Iterable[Mapping[str, Any] | EditRequest] | Mapping[str, Any],
    zsre_target: Literal["answers", "alt"] = "answers",
) -> list[EditRequest]:
    """Validate a list of request dicts (or one dict); raises before anything is edited."""
    if isinstance(records, (Mapping, EditRequest)):
        records = [records]
    parsed = [parse_request(r, i, zsre_target) for i, r in enumerate(records)]
    if not parsed:
        raise InvalidRequestError("no edit requests given")
    return parsed


@dataclass(frozen=True)
class MalformedLine:
    """A JSONL line that is not JSON (kept in place when bad lines are skipped, not raised)."""

    number: int
    message: str


def read_json_records(
    path: str | Path,
    kind: str = "requests",
    error: type[Exception] = InvalidRequestError,
    keep_bad_lines: bool = False,
) -> list[Any]:
    """The records of a JSON file (a list, or one object) or a JSONL file (one per line).

    Problems raise ``error`` naming the file (and line); with ``keep_bad_lines`` a malformed
    JSONL line becomes a :class:`MalformedLine` in its place instead.
    """
    path = Path(path)
    if not path.is_file():
        raise error(f"{kind} file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    if path.suffix == ".jsonl":
        records: list[Any] = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                if not keep_bad_lines:
                    raise error(f"{path}:{number}: malformed JSON: {exc.msg}") from exc
                records.append(MalformedLine(number, f"line {number}: malformed JSON: {exc.msg}"))
        return records
    try:
        records = json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(
            f"{path}: malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
        ) from exc
    if isinstance(records, Mapping):
        return [records]
    if not isinstance(records, list):
        raise error(f"{path}: expected a JSON list of {kind} or one object")
    return records


def load_requests(
    path: str | Path, zsre_target: Literal["answers", "alt"] = "answers"
) -> list[EditRequest]:
    """Read requests from a JSON file (a list or one object) or a JSONL file (one per line)."""
    records = read_json_records(path)
    try:
        return parse_requests(records, zsre_target)
    except InvalidRequestError as exc:
        raise InvalidRequestError(f"{path}: {exc}") from exc
