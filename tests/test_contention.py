"""How busy the machine was during a timed span (metake.evaluation.contention)."""

from __future__ import annotations

import os

import pytest

from metake.evaluation.contention import (
    CpuMeter,
    CpuUse,
    contention_sentence,
    machine_cpu_seconds,
    span_other_cores,
)


def test_machine_cpu_seconds_counts_busy_ticks_only(tmp_path):
    stat = tmp_path / "stat"
    # user nice system idle iowait irq softirq steal guest guest_nice
    stat.write_text("cpu  100 20 30 5000 400 5 6 7 50 0\ncpu0 1 2 3 4 5 6 7 8 9 0\n")
    busy = 100 + 20 + 30 + 5 + 6 + 7  # idle and iowait left out; guest is inside user
    assert machine_cpu_seconds(stat) == pytest.approx(busy / os.sysconf("SC_CLK_TCK"))
    stat.write_text("intr 1 2 3\n")
    assert machine_cpu_seconds(stat) is None
    assert machine_cpu_seconds(tmp_path / "missing") is None


def test_other_cores_is_the_rest_of_the_machine_per_wall_second():
    assert CpuUse(10.0, 9.0, 19.0, 2).other_cores == pytest.approx(1.0)
    assert CpuUse(10.0, 9.0, 8.0, 2).other_cores == 0.0  # tick rounding: never negative
    assert CpuUse(10.0, 9.0, None, 2).other_cores is None
    assert CpuUse(10.0, 9.0, 19.0, 2).to_dict()["other_cores"] == pytest.approx(1.0)


def test_a_meter_sees_its_own_work():
    meter = CpuMeter()
    sum(i * i for i in range(200_000))
    use = meter.stop()
    assert use.seconds > 0 and use.own_cpu_seconds > 0 and use.cores == os.cpu_count()


def test_span_average_weights_batches_by_wall_time():
    batches = [
        {"cpu": {"seconds": 30.0, "other_cores": 1.0}},
        {"cpu": {"seconds": 10.0, "other_cores": 0.0}},
    ]
    assert span_other_cores(batches) == pytest.approx(0.75)
    assert span_other_cores([*batches, {"seconds": 5.0}]) is None  # an older run's batch
    assert span_other_cores([]) is None


def test_the_sentence_says_idle_or_busy_and_what_is_unknown():
    assert "an idle machine" in contention_sentence([0.01, 0.1], 2)
    busy = contention_sentence([0.96, 1.04], 2)
    assert "kept 1.0 of the 2 cores busy" in busy and "not those of an idle machine" in busy
    assert "0.2–1.0 of the 2 cores" in contention_sentence([0.2, 1.0, None], 2)
    assert contention_sentence([0.2, 1.0, None], 2).startswith("For 2 of 3 timed parts")
    assert "not recorded" in contention_sentence([None], 2)
