"""The paired comparison of benchmarks/precision_check.py against a hand computation."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from precision_check import paired_difference, verdict  # noqa: E402


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
