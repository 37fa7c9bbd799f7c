"""The paired comparison of benchmarks/paired_check.py against a hand computation."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from paired_check import (  # noqa: E402
    borrowed_base,
    finished_sides,
    paired_difference,
    parse_variant,
    verdict,
)


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


def test_records_are_paired_within_their_seed():
    """Two seeds may draw the same record; each is edited in its own sequence."""
    base = [{"seed": 0, "index": 5, "efficacy": 1.0}, {"seed": 1, "index": 5, "efficacy": 0.0}]
    other = [{"seed": 1, "index": 5, "efficacy": 0.0}, {"seed": 0, "index": 5, "efficacy": 1.0}]
    assert paired_difference(base, other, "efficacy") == (0.0, 0.0)
    with pytest.raises(SystemExit, match="exactly once"):
        paired_difference(base, other[:1], "efficacy")


def _parts(folder, seed, records, methods, **hparams):
    """A bench folder's finished parts for one seed: unedited scores and ``methods``."""
    import json

    parts = folder / "parts" / f"seed{seed}"
    parts.mkdir(parents=True)
    rows = [{"index": i, "efficacy": 0.5, "generalization": 0.5, "specificity": 0.5}
            for i in records]  # fmt: skip
    (parts / "pre_edit.json").write_text(json.dumps({"per_record": rows}))
    for method, value in methods.items():
        scored = [{**r, "efficacy": value} for r in rows]
        part = {"hparams": {"v_lr": 0.5, **hparams}, "per_record": scored, "seconds_per_edit": 2.0}
        (parts / f"{method}.json").write_text(json.dumps(part))


def test_finished_compares_the_methods_done_on_every_seed_of_both_sides(tmp_path):
    base, out = tmp_path / "table1", tmp_path / "check"
    for seed, records in ((0, [1, 2]), (1, [2, 3])):
        _parts(base, seed, records, {"alphaedit": 0.5, "metake": 0.5, "memit": 0.5})
    _parts(out / "bf16", 0, [1, 2], {"alphaedit": 1.0, "metake": 1.0}, planner_autocast="bf16")
    _parts(out / "bf16", 1, [2, 3], {"alphaedit": 0.0}, planner_autocast="bf16")  # metake: going
    sides, done = finished_sides(out, "bf16", str(base), ["alphaedit", "metake"], [0, 1],
                                 {"planner_autocast": "bf16"})  # fmt: skip
    assert done == ["alphaedit"]
    assert sides["base"]["aggregate"]["alphaedit"]["seconds_per_edit"]["mean"] == 2.0
    records = sides["bf16"]["runs"]["0"]["methods"]["alphaedit"]["per_record"]
    assert [r["efficacy"] for r in records] == [1.0, 1.0]
    with pytest.raises(SystemExit, match="planner_autocast"):  # a setting the variant lacks
        finished_sides(out, "bf16", str(base), ["alphaedit"], [0, 1], {})
    with pytest.raises(SystemExit, match="no method"):
        finished_sides(out, "bf16", str(base), ["memit"], [0, 1], {"planner_autocast": "bf16"})
    with pytest.raises(SystemExit, match="not started seed 2"):
        finished_sides(out, "bf16", str(base), ["alphaedit"], [2], {"planner_autocast": "bf16"})
