"""How busy the rest of the machine was while a timed piece of work ran.

A time measured beside other jobs is not the time of an idle machine. Benchmarks record, for
every timed piece, the CPU time this process used and the CPU time the whole machine used over
the same wall-clock span (Linux: ``/proc/stat``); the difference, divided by the wall time, is
the average number of cores that other processes kept busy meanwhile. Reports print it next to
the seconds, so that no timing is mistaken for an idle one.
"""

from __future__ import annotations

import os
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

PROC_STAT = Path("/proc/stat")
IDLE_BELOW_CORES = 0.25
"""Other processes using fewer cores than this on average count as an idle machine."""


def machine_cpu_seconds(stat_file: Path = PROC_STAT) -> float | None:
    """CPU seconds all processes of the machine have used since boot (``None``: not Linux)."""
    try:
        fields = stat_file.read_text(encoding="ascii").splitlines()[0].split()
    except (OSError, IndexError):
        return None
    if not fields or fields[0] != "cpu":
        return None
    ticks = [int(v) for v in fields[1:9]]  # user nice system idle iowait irq softirq steal
    busy = sum(ticks) - ticks[3] - ticks[4]  # guest time is already inside user and nice
    return busy / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU seconds of this process (all its threads) and of its finished, waited-for children."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


@dataclass(frozen=True)
class CpuUse:
    """One timed span: wall seconds, CPU seconds of this process and of the whole machine."""

    seconds: float
    own_cpu_seconds: float
    machine_cpu_seconds: float | None
    cores: int

    @property
    def other_cores(self) -> float | None:
        """Average number of cores other processes kept busy (``None``: not measurable here)."""
        if self.machine_cpu_seconds is None or self.seconds <= 0:
            return None
        return max(0.0, (self.machine_cpu_seconds - self.own_cpu_seconds) / self.seconds)

    def to_dict(self) -> dict[str, Any]:
        """The fields and ``other_cores``, for JSON."""
        return {**asdict(self), "other_cores": self.other_cores}


class CpuMeter:
    """Measures a span: ``meter = CpuMeter()`` … ``use = meter.stop()``; reusable as a context."""

    def __init__(self) -> None:
        self._wall = time.perf_counter()
        self._own = own_cpu_seconds()
        self._machine = machine_cpu_seconds()

    def stop(self) -> CpuUse:
        """The span from construction until now."""
        machine = machine_cpu_seconds()
        used = None if machine is None or self._machine is None else machine - self._machine
        return CpuUse(
            seconds=time.perf_counter() - self._wall,
            own_cpu_seconds=own_cpu_seconds() - self._own,
            machine_cpu_seconds=used,
            cores=os.cpu_count() or 1,
        )


def span_other_cores(batches: list[dict[str, Any]]) -> float | None:
    """Other processes' average busy cores over a run's batches (weighted by their wall time;
    ``None`` when any batch has no record of it, e.g. one run by an older metake)."""
    spans = [b.get("cpu") for b in batches]
    if not spans or any(s is None or s.get("other_cores") is None for s in spans):
        return None
    wall = sum(s["seconds"] for s in spans)
    return sum(s["other_cores"] * s["seconds"] for s in spans) / wall if wall > 0 else None


def contention_sentence(other_cores: list[float | None], cores: int) -> str:
    """One sentence on the machine's load during timed spans (each span's other-core average)."""
    known = [c for c in other_cores if c is not None]
    if not known:
        return "How busy the machine was meanwhile was not recorded."
    if len(known) < len(other_cores):
        prefix = f"For {len(known)} of {len(other_cores)} timed parts (the others not recorded), o"
    else:
        prefix = "O"
    low, high = min(known), max(known)
    if high < IDLE_BELOW_CORES:
        return (f"{prefix}ther processes kept under {IDLE_BELOW_CORES} of the {cores} cores "
                "busy: an idle machine.")  # fmt: skip
    span = f"{low:.1f}" if round(low, 1) == round(high, 1) else f"{low:.1f}–{high:.1f}"
    return (f"{prefix}ther processes kept {span} of the {cores} cores busy on average meanwhile: "
            "the seconds are not those of an idle machine.")  # fmt: skip
