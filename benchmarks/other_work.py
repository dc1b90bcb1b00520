"""How busy the rest of the machine was while a benchmark ran.

The load average cannot tell: at the end of a benchmark that keeps 2 cores
busy it reads about 2 on an otherwise idle machine. This measures the CPU
time the whole machine spent (/proc/stat) minus the CPU time of this process
and the children it has waited for (its workers), over the run's wall time:
the average number of cores that other work kept busy (steal time, which a
hypervisor gave to other guests, counts as other work). About 0 means the
timings ran alone on this machine; 1 means another process took one core for
the whole run. What it cannot see: other guests of a virtual machine's host
competing for the shared caches and memory, which can slow a run severalfold
with this figure at 0 (so benchmarks compare implementations in one run).

    watch = OtherWork()          # at the start
    ...
    cores = watch.cores()        # at the end; None where /proc/stat is missing
"""

from __future__ import annotations

import datetime
import os
import sys
import time


def _machine_busy_seconds() -> float | None:
    """CPU seconds all cores spent busy since boot (user, nice, system, irq, softirq, steal), or None."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def describe(cores: float | None) -> str:
    """The phrase the results files use for OtherWork.cores()."""
    if cores is None:
        return "other work during the run: not measured"
    return f"other processes kept {cores:.2f} cores busy on average during the run"


class OtherWork:
    """Average cores used by other processes between construction and cores()."""

    def __init__(self) -> None:
        self._busy = _machine_busy_seconds()
        self._own = _own_seconds()
        self._wall = time.monotonic()

    def cores(self) -> float | None:
        busy = _machine_busy_seconds()
        if busy is None or self._busy is None:
            return None
        wall = time.monotonic() - self._wall
        if wall <= 0:
            return None
        other = (busy - self._busy) - (_own_seconds() - self._own)
        return round(max(other, 0.0) / wall, 3)


class RunRecord:
    """The fields every results file opens with: when the run started, how long it took, the command,
    the load average at start and end, and the other work during the run (OtherWork).

        record = RunRecord("dtype_bench.py", argv)   # at the start
        report = {**record.fields(), ...}             # at the end
    """

    def __init__(self, script: str, argv: list[str] | None) -> None:
        self.command = f"python benchmarks/{script} " + " ".join(argv if argv is not None else sys.argv[1:])
        self.load_at_start = [round(x, 2) for x in os.getloadavg()]
        self.started_utc = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        self._other_work = OtherWork()
        self._t0 = time.perf_counter()

    def fields(self) -> dict:
        return {
            "started_utc": self.started_utc,
            "elapsed_s": time.perf_counter() - self._t0,
            "command": self.command,
            "load_average_at_start": self.load_at_start,
            "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
            "other_work_cores": self._other_work.cores(),
        }
