"""``scripts/check_edit.py``: which edits count as landed, and the probability-gain check."""

from __future__ import annotations

from conftest import script_module


def _request(after: str, target: str, before_p: float, after_p: float) -> dict:
    """One request entry of ``metake edit --json``."""
    return {
        "filled_prompt": f"prompt for {target}",
        "target_new": target,
        "after": after,
        "p_target_before": before_p,
        "p_target_after": after_p,
    }


def test_every_edit_must_land_unless_min_landed_says_otherwise() -> None:
    check = script_module("check_edit")
    requests = [
        _request(" Rome, Italy", "Rome", 1e-3, 0.9),
        _request(" of the genre", "piano", 1e-4, 0.11),
    ]
    strict = check.request_failures(requests, None, 10.0)
    assert any("piano" in line for line in strict) and any("1 of 2" in line for line in strict)
    assert check.request_failures(requests, 1, 10.0) == []
    assert check.request_failures(requests[:1], 2, 10.0) != []


def test_an_edit_that_barely_moves_its_target_fails_even_when_it_lands() -> None:
    check = script_module("check_edit")
    requests = [_request(" Paris, France", "Paris", 0.6, 0.9)]
    failures = check.request_failures(requests, None, 10.0)
    assert len(failures) == 1 and "Paris" in failures[0]
    assert check.request_failures(requests, None, 1.0) == []
