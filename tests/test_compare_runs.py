"""benchmarks/compare_runs.py against hand-made bench results."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from compare_runs import compare, table  # noqa: E402


def _run(eff: dict[str, float], hparams: dict[str, dict], exclude: str | None) -> dict:
    """The part of a bench ``results.json`` the comparison reads."""
    stat = {m: {"efficacy": {"mean": v, "std": 1.0, "n": 3}} for m, v in eff.items()}
    methods = {m: {"hparams": h} for m, h in hparams.items()}
    return {
        "config": {"edits": 100, "exclude": exclude, "command": "metake bench ..."},
        "pre_edit": {"efficacy": {"mean": 16.0, "std": 3.0, "n": 3}},
        "aggregate": stat,
        "runs": {"0": {"methods": methods}},
    }


def test_differences_changed_hyperparameters_and_settings():
    old = _run({"memit": 82.0, "rome": 80.0}, {"memit": {"layers": [4, 5]}, "rome": {}}, None)
    new = _run(
        {"memit": 75.5, "metake_exact": 90.0},
        {"memit": {"layers": [5, 6], "v_lr": 0.5}, "metake_exact": {"layers": [1]}},
        "900:1000",
    )
    result = compare(old, new)
    rows = result["methods"]
    assert list(rows) == ["unedited", "memit", "rome", "metake_exact"]
    assert rows["memit"]["scores"]["efficacy"]["difference"] == pytest.approx(-6.5)
    assert rows["unedited"]["scores"]["efficacy"]["difference"] == 0.0
    assert rows["rome"]["scores"]["efficacy"]["new"] is None
    assert rows["rome"]["scores"]["efficacy"]["difference"] is None
    assert rows["memit"]["hparams_changed"] == {"layers": [[4, 5], [5, 6]]}
    assert rows["memit"]["hparams_recorded_only"] == {"old": {}, "new": {"v_lr": 0.5}}
    assert rows["metake_exact"]["ran_in"] == ["new"]
    assert result["settings_changed"] == {"exclude": [None, "900:1000"]}
    text = "\n".join(table(result, ("hand", "tuned")))
    assert "| memit | 82.00 ± 1.00 | 75.50 ± 1.00 | -6.50 |" in text
    assert "| rome | 80.00 ± 1.00 | – | – |" in text
    assert "- metake_exact: ran only in tuned" in text
    assert "- `exclude`: hand None, tuned '900:1000'" in text
    assert "- memit: layers [4, 5] → [5, 6], recorded only by tuned (v_lr 0.5)" in text


def test_a_setting_one_run_did_not_record_is_not_shown_as_changed():
    old = _run({"memit": 82.0}, {"memit": {"layers": [4]}}, None)
    new = _run({"memit": 80.0}, {"memit": {"layers": [4], "ridge": 0.0}}, None)
    del old["config"]["exclude"]
    result = compare(old, new)
    assert result["settings_changed"] == {}
    assert result["settings_recorded_only"] == {"old": {}, "new": {"exclude": None}}
    assert result["methods"]["memit"]["hparams_changed"] == {}
    text = "\n".join(table(result, ("hand", "tuned")))
    assert "Run settings that differ:" in text
    assert "- recorded only by tuned: `exclude` None" in text
    assert "- memit: recorded only by tuned (ridge 0.0)" in text
    assert "did not record (or have) when the other ran" in text
