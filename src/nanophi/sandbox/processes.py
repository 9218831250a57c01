"""Finding and killing a run's processes: its process group, its marker variable, its uid; and the owner tag
that names a run's traces on the host after the process that made them."""

from __future__ import annotations

import functools
import logging
import os
import shutil
import signal
import subprocess
import time

from nanophi.sandbox.limits import KILL_ROUNDS, SAFE_PATH, SANDBOX_ID_VAR

log = logging.getLogger(__name__)


def kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def kill_leftovers(sandbox_id: str, uid: int | None) -> None:
    """SIGKILL every process still carrying this run's marker, or (without namespaces) this run's uid.

    With a PID namespace the kernel has already done this; without one, a daemon that called setsid has left
    our process group, and one that re-exec'd itself with a clean environment has dropped the marker, but it
    cannot drop the uid, and `kill(-1)` run as that uid reaches every process of it.
    """
    for _ in range(KILL_ROUNDS):
        pids = processes_with_marker(sandbox_id)
        uid_alive = uid is not None and count_processes(uid) > 0
        if not pids and not uid_alive:
            return
        if uid_alive:
            kill_uid(uid)
        for pid in pids:
            kill_pid(pid)
        time.sleep(0.01)  # let the kernel reap before looking again
    log.warning("sandbox %s: processes survived %d kill rounds", sandbox_id, KILL_ROUNDS)


def kill_pid(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def processes_with_marker(sandbox_id: str) -> list[int]:
    marker = f"{SANDBOX_ID_VAR}={sandbox_id}".encode()
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/environ", "rb") as f:
                if marker in f.read().split(b"\0"):
                    pids.append(int(entry.name))
        except OSError:  # gone, or not ours to read
            continue
    return pids


def count_processes(uid: int) -> int:
    """Live (non-zombie) processes running as `uid` (the owner of /proc/PID is the process's uid)."""
    count = 0
    for entry in os.scandir("/proc"):
        try:
            if not entry.name.isdigit() or entry.stat().st_uid != uid:
                continue
            with open(f"/proc/{entry.name}/stat") as f:
                state = f.read().rpartition(")")[2].split()[0]  # after "pid (comm)", which may hold spaces
        except (OSError, IndexError):
            continue
        count += state != "Z"
    return count


def kill_uid(uid: int) -> None:
    """`kill -KILL -1` as `uid`: the kernel signals every process of that uid (but the killer itself)."""
    kill = shutil.which("kill", path=SAFE_PATH)
    if kill is None:
        return
    subprocess.run([kill, "-KILL", "-1"], user=uid, group=uid, extra_groups=[], env={"PATH": SAFE_PATH},
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)


def start_time(pid: int) -> int | None:
    """The start time of process `pid` (clock ticks since boot), which tells a reused pid from the original."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rpartition(")")[2].split()[19])  # field 22; fields 1-2 are before ")"
    except (OSError, IndexError, ValueError):
        return None


@functools.cache
def owner_tag() -> str:
    """"<pid>.<start time>" of this process: what names our work dirs and cgroups (pids never change)."""
    return f"{os.getpid()}.{start_time(os.getpid()) or 0}"
