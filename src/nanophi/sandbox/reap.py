"""What runs of a killed caller left behind (host work dirs, cgroups), found by their dead owner's name and removed
at the next run."""

from __future__ import annotations

import logging
import os
import shutil
import stat
import tempfile
from pathlib import Path

from nanophi.sandbox.cgroups import cgroup_settings, remove_cgroups
from nanophi.sandbox.limits import DEFAULT_MEMORY_MB, SANDBOX_PREFIX, STALE_NAME
from nanophi.sandbox.processes import kill_leftovers, start_time

log = logging.getLogger(__name__)


def _stale(name: str) -> str | None:
    """The sandbox id of a work dir or cgroup named by a run whose owner process is gone, else None."""
    m = STALE_NAME.match(name)
    if m is None:
        return None
    pid, start = int(m.group(1)), int(m.group(2))
    return None if start_time(pid) == start else m.group(3)


def reap_stale() -> list[str]:
    """Remove the work dirs and cgroups (killing what is still in them) of runs whose owner died; return them.

    A caller killed with SIGKILL runs no clean-up. The kernel takes its sandboxes' processes down (parent-death
    signals, and PID 1 of a namespace), and with a mount namespace the work dir is a tmpfs that dies with it;
    a host work dir and cgroups are what is left, and the next run in any process removes them here.
    """
    reaped: list[str] = []
    cgroup_dirs = {d.parent for d, _ in cgroup_settings("x", DEFAULT_MEMORY_MB)}
    for base in cgroup_dirs:
        for entry in _scan(base):
            sandbox_id = _stale(entry.name)
            if sandbox_id is not None and entry.is_dir(follow_symlinks=False):
                remove_cgroups([Path(entry.path)])
                kill_leftovers(sandbox_id, None)
                reaped.append(entry.path)
    for base in {tempfile.gettempdir(), "/tmp"}:
        for entry in _scan(Path(base)):
            sandbox_id = _stale(entry.name)
            if sandbox_id is None or not entry.is_dir(follow_symlinks=False):
                continue
            kill_leftovers(sandbox_id, None)  # a daemon of a plain-mode run may still be using it
            try:
                if os.geteuid() != 0 and entry.stat(follow_symlinks=False).st_uid != os.geteuid():
                    continue  # another user's: not ours to judge or remove
            except OSError:
                continue
            remove_tree(entry.path)
            reaped.append(entry.path)
    if reaped:
        log.info("sandbox: removed %d left over by killed runs: %s", len(reaped), ", ".join(reaped))
    return reaped


def _scan(directory: Path) -> list[os.DirEntry]:
    try:
        return [e for e in os.scandir(directory) if e.name.startswith(SANDBOX_PREFIX)]
    except OSError:
        return []


def remove_tree(path: str) -> None:
    """Remove the work dir even if the program made parts of it unreadable (matters when we are not root)."""
    try:
        shutil.rmtree(path)
        return
    except OSError:
        _make_owner_writable(Path(path))
    try:
        shutil.rmtree(path)
    except OSError as e:
        log.warning("sandbox: could not remove %s: %s", path, e)


def _make_owner_writable(directory: Path) -> None:
    try:
        directory.chmod(stat.S_IRWXU)  # before listing: the program may have made it unreadable
        children = list(directory.iterdir())
    except OSError:
        return
    for child in children:
        if child.is_dir() and not child.is_symlink():
            _make_owner_writable(child)
