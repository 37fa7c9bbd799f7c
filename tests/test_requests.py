"""Edit requests: every accepted style parses to one EditRequest; every problem is reported."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from metake.errors import InvalidRequestError, MetakeError
from metake.requests import EditRequest, load_requests, parse_request, parse_requests

ZSRE_1K = Path(__file__).resolve().parents[2] / "shared/data/zsre/zsre_1k.json"

EXPECTED = EditRequest(
    prompt="{} plays the sport of",
    subject="Michael Jordan",
    target_new="baseball",
    target_true="basketball",
    case_id=7,
)

METAKE = {
    "prompt": "{} plays the sport of",
    "subject": "Michael Jordan",
    "target_new": "baseball",
    "target_true": "basketball",
    "case_id": 7,
}

# A CounterFact record as MEMIT's data loader sees it (target dicts carry a Wikidata id too).
MEMIT = {
    "case_id": 7,
    "pararel_idx": 2795,
    "requested_rewrite": {
        "prompt": "{} plays the sport of",
        "relation_id": "P641",
        "subject": "Michael Jordan",
        "target_new": {"str": "baseball", "id": "Q5369"},
        "target_true": {"str": "basketball", "id": "Q5372"},
    },
    "paraphrase_prompts": ["He retired. Michael Jordan is a professional"],
    "neighborhood_prompts": ["Kobe Bryant plays the sport of"],
    "attribute_prompts": ["Babe Ruth plays the sport of"],
    "generation_prompts": ["Michael Jordan is known for"],
}

# EasyEdit's flat style: the subject occurs verbatim in the prompt, "ground_truth" is the truth.
EASYEDIT = {
    "prompt": "Michael Jordan plays the sport of",
    "subject": "Michael Jordan",
    "target_new": "baseball",
    "ground_truth": "basketball",
    "case_id": 7,
    "rephrase_prompt": "Michael Jordan is a professional",
    "locality_prompt": "Kobe Bryant plays the sport of",
    "locality_ground_truth": "basketball",
}

# A zsRE record shaped like those of MEND/MEMIT's zsre_mend_eval.json (hand-written).
ZSRE = {
    "subject": "Acme Corporation",
    "src": "What is the product made by Acme Corporation?",
    "pred": "anvil",
    "rephrase": "What does Acme Corporation make?",
    "alt": "rocket skates",
    "answers": ["anvil", "dynamite"],
    "loc": "nq question: who played the roadrunner in the cartoons",
    "loc_ans": "nobody",
    "cond": "anvil >> rocket skates || What is the product made by Acme Corporation?",
}


def _with(record: dict, **changes) -> dict:
    """A deep copy of ``record`` with top-level ``changes`` (a value of ``...`` deletes)."""
    out = copy.deepcopy(record)
    for key, value in changes.items():
        if value is ...:
            del out[key]
        else:
            out[key] = value
    return out


def _rewrite(**changes) -> dict:
    """The MEMIT record with ``changes`` applied to its requested_rewrite."""
    out = copy.deepcopy(MEMIT)
    out["requested_rewrite"] = _with(out["requested_rewrite"], **changes)
    return out


# ---------------------------------------------------------------------------------------------
# Accepted styles


@pytest.mark.parametrize(
    "record",
    [
        pytest.param(METAKE, id="metake"),
        pytest.param(_with(METAKE, target_new={"str": "baseball"}), id="metake-str-dict"),
        pytest.param(
            _with(METAKE, target_new={"str": "baseball"}, target_true={"str": "basketball"}),
            id="metake-both-str-dicts",
        ),
        pytest.param(_with(METAKE, target_new="  baseball\n"), id="metake-padded-target"),
        pytest.param(_with(METAKE, subject=" Michael Jordan "), id="metake-padded-subject"),
        pytest.param(_with(METAKE, case_id=..., id=7), id="metake-id-key"),
        pytest.param(MEMIT, id="memit"),
        pytest.param(EASYEDIT, id="easyedit-flat"),
        pytest.param(_with(EASYEDIT, ground_truth=["basketball"]), id="easyedit-list-truth"),
        pytest.param(
            _with(EASYEDIT, ground_truth=..., target_true="basketball"), id="easyedit-target-true"
        ),
    ],
)
def test_every_style_parses_to_the_same_request(record):
    before = copy.deepcopy(record)
    parsed = parse_request(record)
    assert parsed == EXPECTED
    assert parsed.prompt.count("{}") == 1
    assert parsed.filled_prompt == "Michael Jordan plays the sport of"
    assert record == before  # the input is not modified


def test_optional_fields_default_to_none():
    parsed = parse_request(_with(METAKE, target_true=..., case_id=...))
    assert parsed == EditRequest("{} plays the sport of", "Michael Jordan", "baseball")
    assert parsed.target_true is None and parsed.case_id is None
    assert parsed.to_dict() == {
        "prompt": "{} plays the sport of",
        "subject": "Michael Jordan",
        "target_new": "baseball",
    }


def test_to_dict_round_trips():
    assert parse_request(EXPECTED.to_dict()) == EXPECTED


def test_flat_prompt_replaces_only_the_first_occurrence_of_the_subject():
    record = {"prompt": "Paris is in France; Paris is a", "subject": "Paris", "target_new": "city"}
    assert parse_request(record).prompt == "{} is in France; Paris is a"


def test_subject_in_the_middle_and_end_of_a_flat_prompt():
    base = {"subject": "Michael Jordan", "target_new": "x"}
    middle = parse_request({**base, "prompt": "In 1990 Michael Jordan played"})
    end = parse_request({**base, "prompt": "The best player is Michael Jordan"})
    assert middle.prompt == "In 1990 {} played"
    assert end.prompt == "The best player is {}"


def test_edit_request_passes_through():
    assert parse_request(EXPECTED) is EXPECTED
    assert parse_requests([EXPECTED, METAKE]) == [EXPECTED, EXPECTED]


def test_parse_requests_accepts_one_dict_or_a_list():
    assert parse_requests(METAKE) == [EXPECTED]
    assert parse_requests([METAKE, MEMIT, EASYEDIT]) == [EXPECTED] * 3
    assert parse_requests(r for r in [METAKE, MEMIT]) == [EXPECTED] * 2


# ---------------------------------------------------------------------------------------------
# zsRE


def test_zsre_uses_the_first_answer_by_default():
    parsed = parse_request(ZSRE)
    assert parsed == EditRequest("What is the product made by {}?", "Acme Corporation", "anvil")
    assert parsed.filled_prompt == ZSRE["src"]
    assert parse_requests([ZSRE]) == [parsed]


def test_zsre_alt_target():
    parsed = parse_request(ZSRE, zsre_target="alt")
    assert parsed == EditRequest(
        "What is the product made by {}?", "Acme Corporation", "rocket skates"
    )
    assert parse_requests([ZSRE], zsre_target="alt") == [parsed]


def test_zsre_keeps_case_id():
    assert parse_request(_with(ZSRE, case_id=3)).case_id == 3


@pytest.fixture(scope="module")
def real_zsre_records() -> list[dict]:
    if not ZSRE_1K.is_file():
        pytest.skip(f"zsRE data not available: {ZSRE_1K} is absent (shared data not mounted)")
    records = json.loads(ZSRE_1K.read_text(encoding="utf-8"))[:2]
    assert len(records) == 2
    return records


@pytest.mark.parametrize("target", ["answers", "alt"])
def test_real_zsre_records(real_zsre_records, target):
    parsed = parse_requests(real_zsre_records, zsre_target=target)
    for record, request in zip(real_zsre_records, parsed, strict=True):
        expected_target = record["answers"][0] if target == "answers" else record["alt"]
        assert request.subject == record["subject"].strip()
        assert request.prompt.count("{}") == 1
        assert request.prompt == record["src"].replace(record["subject"], "{}", 1)
        assert request.filled_prompt == record["src"]
        assert request.target_new == expected_target.strip()
        assert request.target_true is None


def test_real_zsre_records_load_from_a_file(real_zsre_records, tmp_path):
    path = tmp_path / "zsre.json"
    path.write_text(json.dumps(real_zsre_records), encoding="utf-8")
    assert load_requests(path) == parse_requests(real_zsre_records)
    assert load_requests(path, zsre_target="alt") == parse_requests(
        real_zsre_records, zsre_target="alt"
    )


# ---------------------------------------------------------------------------------------------
# Errors


def _error(record, **kwargs) -> str:
    with pytest.raises(InvalidRequestError) as info:
        parse_request(record, **kwargs)
    return str(info.value)


def test_invalid_request_error_is_a_value_error():
    assert issubclass(InvalidRequestError, ValueError)
    assert issubclass(InvalidRequestError, MetakeError)


def test_prompt_without_placeholder_or_subject():
    msg = _error(_with(METAKE, prompt="Kobe Bryant plays the sport of"))
    assert "placeholder" in msg
    assert "'Michael Jordan'" in msg
    assert "Kobe Bryant plays the sport of" in msg


def test_two_placeholders():
    msg = _error(_with(METAKE, prompt="{} and {} play the sport of"))
    assert "2 '{}' placeholders" in msg


def test_two_placeholders_in_memit_style():
    msg = _error(_rewrite(prompt="{} plays {}"))
    assert "placeholders" in msg


def test_flat_subject_not_in_prompt():
    msg = _error(_with(EASYEDIT, subject="Michael Jordon"))
    assert "'Michael Jordon'" in msg
    assert "does not contain the subject" in msg


def test_flat_subject_matching_is_case_sensitive():
    msg = _error(_with(EASYEDIT, subject="michael jordan"))
    assert "'michael jordan'" in msg


@pytest.mark.parametrize("value", ["", "   ", "\n\t"])
@pytest.mark.parametrize("field", ["subject", "target_new", "prompt", "target_true"])
def test_empty_or_whitespace_text(field, value):
    msg = _error(_with(METAKE, **{field: value}))
    assert f"'{field}' is empty" in msg


@pytest.mark.parametrize("value", ["", "  "])
def test_empty_memit_target_str(value):
    msg = _error(_rewrite(target_new={"str": value}))
    assert "'target_new' is empty" in msg


@pytest.mark.parametrize(
    ("value", "type_name"),
    [(5, "int"), (None, "NoneType"), (["baseball"], "list"), ({"text": "x"}, "dict")],
)
def test_non_string_target(value, type_name):
    msg = _error(_with(METAKE, target_new=value))
    assert f"'target_new' must be a string, got {type_name}" in msg


def test_non_string_memit_target_str():
    msg = _error(_rewrite(target_new={"str": 1.5}))
    assert "'target_new' must be a string, got float" in msg


@pytest.mark.parametrize("field", ["subject", "prompt", "target_true"])
def test_non_string_other_fields(field):
    msg = _error(_with(METAKE, **{field: 42}))
    assert f"{field!r} must be a string, got int" in msg


def test_unknown_key_metake():
    msg = _error(_with(METAKE, tagret_true="basketball"))
    assert "unknown key" in msg
    assert "'tagret_true'" in msg
    assert "target_true" in msg  # the accepted keys are listed


def test_misspelt_required_key_is_reported_as_unknown():
    msg = _error(_with(METAKE, subject=..., subjet="Michael Jordan"))
    assert "'subjet'" in msg


def test_unknown_keys_are_all_listed():
    msg = _error(_with(METAKE, foo=1, bar=2))
    assert "'bar'" in msg and "'foo'" in msg


def test_unknown_key_memit_top_level():
    msg = _error(_with(MEMIT, extra_prompts=[]))
    assert "'extra_prompts'" in msg
    assert "MEMIT" in msg


def test_unknown_key_memit_rewrite():
    msg = _error(_rewrite(target="baseball"))
    assert "'target'" in msg
    assert "requested_rewrite" in msg


def test_unknown_key_zsre():
    msg = _error(_with(ZSRE, question="?"))
    assert "'question'" in msg
    assert "zsRE" in msg


@pytest.mark.parametrize("missing", ["prompt", "subject", "target_new"])
def test_missing_key_metake(missing):
    msg = _error(_with(METAKE, **{missing: ...}))
    assert "missing key" in msg
    assert repr(missing) in msg


def test_missing_keys_are_all_listed():
    msg = _error({"prompt": "{} plays"})
    assert "'subject'" in msg and "'target_new'" in msg


@pytest.mark.parametrize("missing", ["prompt", "subject", "target_new"])
def test_missing_key_memit(missing):
    msg = _error(_rewrite(**{missing: ...}))
    assert "missing key" in msg
    assert repr(missing) in msg


@pytest.mark.parametrize("missing", ["subject", "answers"])
def test_missing_key_zsre(missing):
    msg = _error(_with(ZSRE, **{missing: ...}))
    assert "missing key" in msg
    assert repr(missing) in msg


def test_missing_alt_in_zsre():
    msg = _error(_with(ZSRE, alt=...), zsre_target="alt")
    assert "missing key" in msg and "'alt'" in msg
    assert parse_request(_with(ZSRE, alt=...)).target_new == "anvil"  # not needed by default


@pytest.mark.parametrize("answers", [[], "anvil", None])
def test_zsre_answers_must_be_a_non_empty_list(answers):
    msg = _error(_with(ZSRE, answers=answers))
    assert "'answers' must be a non-empty list" in msg


def test_zsre_subject_not_in_src():
    msg = _error(_with(ZSRE, subject="Wile E. Coyote"))
    assert "'Wile E. Coyote'" in msg


def test_requested_rewrite_must_be_an_object():
    msg = _error(_with(MEMIT, requested_rewrite="{} plays"))
    assert "'requested_rewrite' must be an object" in msg


@pytest.mark.parametrize(
    ("record", "type_name"),
    [("{} plays the sport of", "str"), (["a", "b"], "list"), (None, "NoneType"), (3, "int")],
)
def test_non_dict_request(record, type_name):
    msg = _error(record)
    assert f"expected an object, got {type_name}" in msg


def test_non_dict_request_in_a_list():
    with pytest.raises(InvalidRequestError, match=r"request #1: expected an object, got int"):
        parse_requests([METAKE, 3])


@pytest.mark.parametrize("records", [[], ()])
def test_empty_list(records):
    with pytest.raises(InvalidRequestError, match="no edit requests"):
        parse_requests(records)


def test_request_index_in_messages_for_lists():
    with pytest.raises(InvalidRequestError) as info:
        parse_requests([METAKE, _with(METAKE, target_new="")])
    assert "request #1" in str(info.value)
    assert "'target_new' is empty" in str(info.value)
    with pytest.raises(InvalidRequestError) as info:
        parse_requests([METAKE, METAKE, _with(METAKE, subject=...)])
    assert "request #2" in str(info.value)


def test_no_index_for_a_single_request():
    msg = _error(_with(METAKE, target_new=""))
    assert msg.startswith("request:")
    assert "#" not in msg


def test_index_is_passed_through():
    assert _error(_with(METAKE, subject=""), index=4).startswith("request #4:")


# ---------------------------------------------------------------------------------------------
# Files


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_load_json_list_and_jsonl_agree(tmp_path):
    records = [METAKE, MEMIT, EASYEDIT, ZSRE]
    as_list = _write(tmp_path / "requests.json", json.dumps(records, indent=2))
    as_lines = _write(
        tmp_path / "requests.jsonl", "\n".join(json.dumps(r) for r in records) + "\n\n"
    )
    expected = parse_requests(records)
    assert load_requests(as_list) == expected
    assert load_requests(str(as_lines)) == expected  # str paths work too
    assert expected[:3] == [EXPECTED] * 3


def test_jsonl_skips_blank_lines(tmp_path):
    path = _write(tmp_path / "r.jsonl", f"\n{json.dumps(METAKE)}\n   \n{json.dumps(MEMIT)}\n")
    assert load_requests(path) == [EXPECTED, EXPECTED]


def test_load_single_object(tmp_path):
    path = _write(tmp_path / "one.json", json.dumps(MEMIT))
    assert load_requests(path) == [EXPECTED]


def test_load_zsre_alt(tmp_path):
    path = _write(tmp_path / "zsre.jsonl", json.dumps(ZSRE) + "\n")
    assert load_requests(path)[0].target_new == "anvil"
    assert load_requests(path, zsre_target="alt")[0].target_new == "rocket skates"


def test_malformed_json_names_file_and_line(tmp_path):
    path = _write(tmp_path / "bad.json", '[\n  {"prompt": "{} plays",\n   "subject" "x"}\n]\n')
    with pytest.raises(InvalidRequestError) as info:
        load_requests(path)
    msg = str(info.value)
    assert str(path) in msg
    assert "line 3" in msg
    assert "malformed JSON" in msg


def test_malformed_jsonl_names_line_number(tmp_path):
    lines = [json.dumps(METAKE), json.dumps(MEMIT), '{"prompt": "{} plays", ']
    path = _write(tmp_path / "bad.jsonl", "\n".join(lines) + "\n")
    with pytest.raises(InvalidRequestError) as info:
        load_requests(path)
    msg = str(info.value)
    assert f"{path}:3" in msg
    assert "malformed JSON" in msg


def test_missing_file(tmp_path):
    path = tmp_path / "nope.json"
    with pytest.raises(InvalidRequestError) as info:
        load_requests(path)
    assert "not found" in str(info.value)
    assert str(path) in str(info.value)


def test_directory_is_not_a_requests_file(tmp_path):
    with pytest.raises(InvalidRequestError, match="not found"):
        load_requests(tmp_path)


@pytest.mark.parametrize("content", ["42", '"a string"', "null", "true"])
def test_json_file_holding_a_scalar(tmp_path, content):
    path = _write(tmp_path / "scalar.json", content)
    with pytest.raises(InvalidRequestError) as info:
        load_requests(path)
    msg = str(info.value)
    assert str(path) in msg
    assert "expected a JSON list" in msg


@pytest.mark.parametrize(("name", "content"), [("empty.json", "[]"), ("empty.jsonl", "\n\n")])
def test_empty_file(tmp_path, name, content):
    path = _write(tmp_path / name, content)
    with pytest.raises(InvalidRequestError) as info:
        load_requests(path)
    assert str(path) in str(info.value)
    assert "no edit requests" in str(info.value)


def test_invalid_record_in_a_file_names_file_and_request(tmp_path):
    records = [METAKE, _with(METAKE, prompt="{} and {}")]
    path = _write(tmp_path / "r.json", json.dumps(records))
    with pytest.raises(InvalidRequestError) as info:
        load_requests(path)
    msg = str(info.value)
    assert str(path) in msg
    assert "request #1" in msg
    assert "placeholders" in msg


def test_non_object_line_in_jsonl(tmp_path):
    path = _write(tmp_path / "r.jsonl", f"{json.dumps(METAKE)}\n5\n")
    with pytest.raises(InvalidRequestError, match=r"request #1: expected an object, got int"):
        load_requests(path)
