"""The paired comparison of benchmarks/paired_check.py against a hand computation."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from paired_check import borrowed_base, paired_difference, parse_variant, verdict  # noqa: E402


def test_paired_difference_matches_records_by_index():
    base = [
        {"index": 3, "efficacy": 0.5},
        {"index": 7, "efficacy": 1.0},
        {"index": 9, "efficacy": 0.0},
    ]
    other = [
        {"index": 9, "efficacy": 0.25},
        {"index": 3, "efficacy": 0.5},
        {"index": 7, "efficacy": 0.5},
    ]
    mean, se = paired_difference(base, other, "efficacy")
    diffs = [25.0, 0.0, -50.0]  # points, record 9, 3, 7
    expected = sum(diffs) / 3
    var = sum((d - expected) ** 2 for d in diffs) / 2
    assert mean == pytest.approx(expected)
    assert se == pytest.approx(math.sqrt(var / 3))


def test_verdict_needs_two_standard_errors_either_way():
    assert verdict(0.3, 0.2) == "within"  # 0.7 <= 1
    assert verdict(-0.5, 0.3) == "undecided"  # 1.1 > 1, but 0.2 is not > 1
    assert verdict(2.0, 0.4) == "differs"  # 1.2 > 1
    assert verdict(-2.0, 0.6) == "undecided"


def _bench(records, **hparams):
    """The part of a bench ``results.json`` the borrowing reads: one seed, one method."""
    method = {"hparams": {"v_lr": 0.5, **hparams}, "per_record": []}
    return {"runs": {"0": {"records": records, "methods": {"alphaedit": method}}}}


def test_the_base_side_is_borrowed_only_from_the_same_records_and_settings(tmp_path):
    import json

    bf16 = _bench([1, 2, 3], planner_autocast="bfloat16")
    (tmp_path / "results.json").write_text(json.dumps(_bench([1, 2, 3], planner_autocast=None)))
    assert borrowed_base(tmp_path, bf16, ["alphaedit"], [0], {"planner_autocast"})["runs"]["0"][
        "records"
    ] == [1, 2, 3]
    (tmp_path / "results.json").write_text(json.dumps(_bench([1, 2, 4])))
    with pytest.raises(SystemExit, match="other records"):
        borrowed_base(tmp_path, bf16, ["alphaedit"], [0], {"planner_autocast"})
    (tmp_path / "results.json").write_text(json.dumps(_bench([1, 2, 3], v_steps=10)))
    with pytest.raises(SystemExit, match="v_steps"):
        borrowed_base(tmp_path, bf16, ["alphaedit"], [0], {"planner_autocast"})
    with pytest.raises(SystemExit, match="no seed 1"):
        borrowed_base(tmp_path, {"runs": {"1": bf16["runs"]["0"]}}, ["alphaedit"], [1], set())
    with pytest.raises(SystemExit, match="no metake"):
        borrowed_base(tmp_path, bf16, ["metake"], [0], set())


def test_a_variant_names_a_label_and_its_settings():
    assert parse_variant("bare:metake_edit_contexts=0") == ("bare", {"metake_edit_contexts": "0"})
    assert parse_variant("b:a=1,c=x") == ("b", {"a": "1", "c": "x"})
    for bad in ("bare", "bare:", ":a=1", "base:a=1", "bare:a"):
        with pytest.raises(SystemExit, match="--variant"):
            parse_variant(bad)
