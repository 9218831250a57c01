"""One cgroup per run (as root): a memory and a task cap on all of a run's processes together, and an exact
list of them to kill."""

from __future__ import annotations

import functools
import os
import logging
import secrets
import time
from pathlib import Path

from nanophi.sandbox.limits import CGROUP_ROOT, DEFAULT_MEMORY_MB, KILL_ROUNDS, MAX_PROCESSES, SANDBOX_PREFIX
from nanophi.sandbox.processes import kill_pid, owner_tag

log = logging.getLogger(__name__)


@functools.cache
def cgroups_work() -> bool:
    """Can we make (and remove) the per-run cgroups here? Tried once per process."""
    if os.geteuid() != 0:
        return False
    made = create_cgroups(f"{SANDBOX_PREFIX}probe-{owner_tag()}.{secrets.token_hex(4)}", DEFAULT_MEMORY_MB)
    remove_cgroups(made)
    return bool(made)


def cgroup_settings(name: str, memory_mb: int) -> list[tuple[Path, dict[str, str]]]:
    """Where this run's cgroups go and what they cap: all its processes together get `memory_mb` of memory and
    MAX_PROCESSES tasks, which the per-process rlimits alone cannot promise."""
    memory = str(memory_mb << 20)
    if (CGROUP_ROOT / "cgroup.controllers").exists():  # cgroup v2
        return [(CGROUP_ROOT / name, {"memory.max": memory, "pids.max": str(MAX_PROCESSES)})]
    return [(CGROUP_ROOT / "memory" / name, {"memory.limit_in_bytes": memory}),  # cgroup v1
            (CGROUP_ROOT / "pids" / name, {"pids.max": str(MAX_PROCESSES)})]


def create_cgroups(name: str, memory_mb: int) -> list[Path]:
    """All of this run's cgroups, or none (a half-limited sandbox would report protections it lacks)."""
    made: list[Path] = []
    try:
        for directory, settings in cgroup_settings(name, memory_mb):
            directory.mkdir()
            made.append(directory)
            for file, value in settings.items():
                (directory / file).write_text(value)
    except OSError as e:
        log.debug("sandbox: no cgroups (%s)", e)
        remove_cgroups(made)
        return []
    return made


def oom_kills(cgroups: list[Path]) -> int:
    """How many processes the kernel killed for going over the cgroup's memory limit."""
    for cgroup in cgroups:
        for file in ("memory.events", "memory.oom_control"):  # v2, v1: both have an "oom_kill N" line
            try:
                lines = (cgroup / file).read_text().splitlines()
            except OSError:
                continue
            counts = [int(line.split()[1]) for line in lines if line.startswith("oom_kill ")]
            if counts:
                return counts[0]
    return 0


def remove_cgroups(cgroups: list[Path]) -> None:
    """Kill whatever is still inside (membership is exact, unlike markers), then remove the cgroups."""
    for cgroup in cgroups:
        for _ in range(KILL_ROUNDS):
            try:
                for pid in (cgroup / "cgroup.procs").read_text().split():
                    kill_pid(int(pid))
                cgroup.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:  # EBUSY: the dying are not yet gone
                time.sleep(0.01)
        else:
            log.warning("sandbox: could not remove cgroup %s", cgroup)
