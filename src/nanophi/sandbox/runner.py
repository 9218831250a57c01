"""Running one program: choose the isolation mode this machine allows, lay out its files, start the bootstrap
(`bootstrap.py`, under unshare when we can), wait, kill whatever is left, and judge."""

from __future__ import annotations

import functools
import logging
import marshal
import math
import os
import secrets
import select
import shutil
import stat
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from nanophi.sandbox.cgroups import cgroups_work, create_cgroups, oom_kills, remove_cgroups
from nanophi.sandbox.limits import (CPU_GRACE_S, DEFAULT_MAX_OUTPUT, DEFAULT_MEMORY_MB, DEFAULT_TIMEOUT_S,
                                    MAX_MEMORY_MB, MAX_OPEN_FILES, MAX_PROCESSES, MAX_TIMEOUT_S,
                                    NAMESPACE_PROGRAM_DIR, OUTPUT_FILE_LIMIT, PROBE_TIMEOUT_S, PROGRAM_NAME,
                                    SAFE_PATH, SANDBOX_ID_VAR, SANDBOX_PREFIX, SANDBOX_UID_BASE, SANDBOX_UID_SPAN,
                                    TRUNCATION_MARKER, UNSHARE_FLAGS, WATCHDOG_GRACE_S, WORKDIR_TMPFS_MB)
from nanophi.sandbox.processes import count_processes, kill_group, kill_leftovers, owner_tag
from nanophi.sandbox.reap import remove_tree, reap_stale
from nanophi.sandbox.result import SandboxResult, error_result, verdict

log = logging.getLogger(__name__)
# The program that sets a run up from inside (namespaces, mounts, limits, uid), run by path as its own process.
BOOTSTRAP = Path(__file__).with_name("bootstrap.py")


@dataclass(frozen=True)
class Mode:
    """How runs are isolated: the wrapper, what the bootstrap does, and what that buys (`protections`)."""

    name: str  # "root-namespaces" | "user-namespaces" | "plain"
    unshare_flags: tuple[str, ...]  # empty: no namespaces, the bootstrap execs the program directly
    mounts: bool  # private /tmp tmpfs + read-only remounts (needs real root)
    drop_uid: bool  # run the program under a fresh unprivileged uid (needs real root)
    protections: tuple[str, ...]


def mode_named(name: str) -> Mode:
    root = os.geteuid() == 0
    names = ["process-group-kill", "rlimits", "scrubbed-env", "fresh-workdir", "output-to-files", "no-new-privs",
             "leftover-kill"]
    if root and name != "user-namespaces":
        names.append("unprivileged-uid")
    if name == "root-namespaces":
        flags: tuple[str, ...] = UNSHARE_FLAGS
        names += ["pid-namespace", "net-namespace", "mount-namespace", "read-only-fs", "private-tmp", "watchdog"]
    elif name == "user-namespaces":
        # Not root: a user namespace grants pid/net/mount namespaces but no uid to drop to. The bootstrap runs
        # as our own uid inside it, so it has no capabilities left to remount anything; /proc is fresh though.
        flags = ("--user", "--map-current-user", *UNSHARE_FLAGS)
        names += ["pid-namespace", "net-namespace", "mount-namespace", "watchdog"]
    elif name == "plain":
        flags = ()
    else:
        raise ValueError(f"unknown sandbox mode {name!r}")
    drop_uid = root and name != "user-namespaces"  # a user namespace maps our uid only: nothing to drop to
    return Mode(name, flags, mounts=name == "root-namespaces", drop_uid=drop_uid, protections=tuple(names))


@functools.cache
def active_mode() -> Mode:
    """The strongest mode that works here, found by running a trivial program in it once per process."""
    if shutil.which("unshare", path=SAFE_PATH) is not None:
        mode = mode_named("root-namespaces" if os.geteuid() == 0 else "user-namespaces")
        result = execute("print('ok')", mode=mode, timeout=PROBE_TIMEOUT_S, memory_mb=DEFAULT_MEMORY_MB,
                         max_output=DEFAULT_MAX_OUTPUT, files=None)
        if result.status == "passed" and result.stdout.strip() == "ok":
            return mode
        log.warning("sandbox: %s unavailable (%s %s)", mode.name, result.reason, result.stderr.strip()[-200:])
    if os.geteuid() != 0:
        log.warning("sandbox: no namespaces and not root: a sandboxed program runs as you and can signal "
                    "every process of yours; run as root or allow user namespaces for real isolation")
    return mode_named("plain")


def detect_protections() -> list[str]:
    """The protections `run_program` applies on this machine (tried once, cached)."""
    return list(active_mode().protections) + (["cgroup-limits"] if cgroups_work() else [])


def run_program(
    code: str,
    *,
    timeout: float = DEFAULT_TIMEOUT_S,
    memory_mb: int = DEFAULT_MEMORY_MB,
    stdin: None = None,
    max_output: int = DEFAULT_MAX_OUTPUT,
    files: dict[str, str] | None = None,
) -> SandboxResult:
    """Run `code` as a Python program in a fresh sandboxed process and say how it ended.

    `files` are extra text files (relative paths) put next to the program. stdin is always /dev/null. The
    caller survives whatever the program does; when the sandbox itself cannot run it the status is "error".
    """
    if stdin is not None:
        raise ValueError("the sandbox gives programs no stdin (it is /dev/null); pass data through `files`")
    if not (0 < timeout <= MAX_TIMEOUT_S) or not (0 < memory_mb <= MAX_MEMORY_MB) or max_output < 0:
        raise ValueError(f"timeout must be in (0, {MAX_TIMEOUT_S}] s, memory_mb in (0, {MAX_MEMORY_MB}] and "
                         f"max_output non-negative (got {timeout}, {memory_mb}, {max_output})")
    return execute(code, mode=active_mode(), timeout=timeout, memory_mb=memory_mb,
                   max_output=max_output, files=files)


def execute(code: str, *, mode: Mode, timeout: float, memory_mb: int, max_output: int,
            files: dict[str, str] | None) -> SandboxResult:
    protections = list(mode.protections)
    interpreter = program_interpreter(mode.drop_uid)
    if interpreter is None:
        return error_result("no Python interpreter is readable by an unprivileged user (install python3 in "
                            "/usr/bin)", protections)
    reap_stale()  # what runs of a caller killed with SIGKILL left behind
    sandbox_id = secrets.token_hex(8)
    name = f"{SANDBOX_PREFIX}{owner_tag()}.{sandbox_id}"  # the owner's pid: stale entries are recognisable
    uid = SANDBOX_UID_BASE + secrets.randbelow(SANDBOX_UID_SPAN) if mode.drop_uid else None
    sources = program_files(code, files or {})
    workdir = ""
    if not mode.mounts:
        # No private tmpfs: the program runs in a host directory, so an unprivileged uid must be able to reach it.
        base = None
        if mode.drop_uid and not searchable(Path(tempfile.gettempdir())):
            base = "/tmp"
        workdir = tempfile.mkdtemp(prefix=name + "-", dir=base)
    cgroups = create_cgroups(name, memory_mb) if cgroups_work() else []
    if cgroups:
        protections.append("cgroup-limits")
    try:
        # With a mount namespace the bootstrap puts the files onto a tmpfs it owns; without, they are the program's.
        if workdir:
            write_workdir(workdir, sources, uid)
        program_dir = workdir or NAMESPACE_PROGRAM_DIR
        env = {
            "PATH": SAFE_PATH,
            "LANG": "C.UTF-8",
            "HOME": program_dir,
            "TMPDIR": program_dir,  # the one writable place: tempfile must not go looking for another
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONHASHSEED": "0",
            SANDBOX_ID_VAR: sandbox_id,
        }
        config = {
            "workdir": workdir,
            "files": {} if workdir else {rel: text.encode("utf-8") for rel, text in sources.items()},
            "program_dir": program_dir,
            "parent_pid": os.getpid(),
            "cgroups": [str(c) for c in cgroups],
            "uid": uid,
            "gid": uid,
            "tmpfs_mb": WORKDIR_TMPFS_MB,
            "mounts": mode.mounts,
            "init": bool(mode.unshare_flags),
            "watchdog_s": math.ceil(timeout) + WATCHDOG_GRACE_S,
            "rlimits": rlimits(timeout, memory_mb, uid),
            "memory_mb": memory_mb,
            # -s -B rather than -I: -I implies -E, which would ignore PYTHONHASHSEED=0 (reproducible set order),
            # and the environment is entirely ours anyway, so -E would protect nothing.
            "argv": [interpreter, "-s", "-B", PROGRAM_NAME],
            "env": env,
        }
        return launch(config, mode, timeout, max_output, sandbox_id, protections)
    finally:
        remove_cgroups(cgroups)
        if workdir:
            remove_tree(workdir)


def launch(config: dict, mode: Mode, timeout: float, max_output: int, sandbox_id: str,
           protections: list[str]) -> SandboxResult:
    """Start the bootstrap (under unshare when we can), wait, kill whatever is left, and judge."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, tempfile.TemporaryFile() as status, \
            tempfile.TemporaryFile() as config_file:
        config["status_fd"] = status.fileno()
        marshal.dump(config, config_file)  # a file, not argv: one argument may hold only 128 KiB
        config_file.flush()
        config_file.seek(0)
        # -I -S: no environment, user site, site-packages, current or script directory on the bootstrap's path
        command = [os.path.realpath(sys.executable), "-I", "-S", str(BOOTSTRAP), str(config_file.fileno())]
        if mode.unshare_flags:
            command = [shutil.which("unshare", path=SAFE_PATH), *mode.unshare_flags, "--", *command]
            # unshare --kill-child takes the namespace down when unshare dies; --pdeathsig makes unshare die
            # when we do (the bootstrap's watchdog covers the instant before setpriv sets it, or no setpriv).
            setpriv = setpriv_pdeathsig()
            if setpriv:
                command = [setpriv, "--pdeathsig", "KILL", "--", *command]
        start = time.monotonic()
        try:
            proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=config["env"],
                                    cwd="/", close_fds=True, pass_fds=(status.fileno(), config_file.fileno()),
                                    start_new_session=True)
        except OSError as e:
            return error_result(f"could not start the sandbox: {e}", protections)
        try:
            timed_out = not wait_for_exit(proc, timeout)
        finally:
            kill_group(proc.pid)  # on timeout, and for forked leftovers of a program that has exited
            proc.wait()
            kill_leftovers(sandbox_id, config["uid"])
        duration = time.monotonic() - start
        status.seek(0)
        reports: dict[str, str] = {}
        for line in status.read().decode(errors="replace").splitlines():
            key, _, value = line.partition(" ")
            reports.setdefault(key, value)
        result = verdict(proc.returncode, reports, bool(mode.unshare_flags), timed_out, timeout,
                         read_capped(out, max_output), read_capped(err, max_output), duration, protections)
    result.sandbox_id, result.uid, result.workdir = sandbox_id, config["uid"], config["workdir"]
    killed = oom_kills([Path(c) for c in config["cgroups"]])
    if killed:
        result.reason += f"; {killed} process(es) killed for memory (the sandbox's {config['memory_mb']} MB)"
    return result


def wait_for_exit(proc: subprocess.Popen, timeout: float) -> bool:
    """Wait up to `timeout` s for `proc` to exit; True if it did. A pidfd wakes us the moment it exits, where
    Popen.wait(timeout) polls with sleeps of up to 50 ms, which would add that much to every run."""
    try:
        pidfd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):  # not Linux >= 5.3
        try:
            proc.wait(timeout=timeout)
            return True
        except subprocess.TimeoutExpired:
            return False
    try:
        return bool(select.select([pidfd], [], [], timeout)[0])
    finally:
        os.close(pidfd)


def rlimits(timeout: float, memory_mb: int, uid: int | None) -> dict[str, tuple[int, int]]:
    """(soft, hard) per rlimit. Soft = hard everywhere but CPU, where SIGXCPU at the soft limit names the cause
    before SIGKILL at the hard one."""
    nproc = MAX_PROCESSES
    if uid is None:
        # Without a uid of its own, RLIMIT_NPROC counts every process of ours, so leave room for those.
        nproc += count_processes(os.getuid())
    cpu = math.ceil(timeout) + CPU_GRACE_S
    limits = {"RLIMIT_AS": memory_mb << 20, "RLIMIT_FSIZE": OUTPUT_FILE_LIMIT, "RLIMIT_NOFILE": MAX_OPEN_FILES,
              "RLIMIT_NPROC": nproc, "RLIMIT_CORE": 0}
    return {"RLIMIT_CPU": (cpu, cpu + 1), **{name: (value, value) for name, value in limits.items()}}


@functools.cache
def program_interpreter(drop_uid: bool) -> str | None:
    """A Python the program can run: ours, unless an unprivileged uid cannot reach it (e.g. under /root)."""
    ours = os.path.realpath(sys.executable)
    if not drop_uid or (world_reachable(ours) and world_reachable(sysconfig.get_paths()["stdlib"])):
        return ours
    for name in ("python3", "python"):
        candidate = shutil.which(name, path=SAFE_PATH)
        if candidate and world_reachable(os.path.realpath(candidate)):
            return os.path.realpath(candidate)
    return None


def world_reachable(path: str) -> bool:
    """Can a user with no relation to the owner read `path` (and search every directory above it)?"""
    p = Path(path)
    try:
        return searchable(p.parent) and bool(p.stat().st_mode & stat.S_IROTH)
    except OSError:
        return False


def searchable(directory: Path) -> bool:
    """Is `directory`, and every directory above it, searchable by anyone?"""
    try:
        return all(d.stat().st_mode & stat.S_IXOTH for d in (directory, *directory.parents))
    except OSError:
        return False


def program_files(code: str, files: dict[str, str]) -> dict[str, str]:
    """relative path -> text of everything the program gets, with paths checked to stay inside its directory."""
    out = {}
    for rel, text in {**files, PROGRAM_NAME: code}.items():
        parts = Path(rel).parts
        if not parts or Path(rel).is_absolute() or ".." in parts:
            raise ValueError(f"sandbox file {rel!r} would land outside the work directory")
        out[str(Path(rel))] = text
    return out


def write_workdir(workdir: str, files: dict[str, str], uid: int | None) -> None:
    root = Path(workdir)
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    if uid is not None:  # without namespaces the program runs in this very directory as `uid`
        for path in [root, *root.rglob("*")]:
            os.chown(path, uid, uid)


def read_capped(f: IO[bytes], max_output: int) -> str:
    """The head and tail of a captured stream, with a marker saying how much was cut from the middle."""
    size = os.fstat(f.fileno()).st_size
    f.seek(0)
    if size <= max_output:
        return f.read().decode("utf-8", errors="replace")
    head = f.read(max_output // 2)
    f.seek(size - (max_output - max_output // 2))
    tail = f.read()
    cut = size - len(head) - len(tail)
    return head.decode("utf-8", errors="replace") + TRUNCATION_MARKER.format(n=cut) + tail.decode(
        "utf-8", errors="replace")


@functools.cache
def setpriv_pdeathsig() -> str | None:
    """util-linux setpriv, if it can set the parent-death signal (util-linux >= 2.33)."""
    setpriv = shutil.which("setpriv", path=SAFE_PATH)
    if setpriv is None:
        return None
    probe = subprocess.run([setpriv, "--pdeathsig", "KILL", "--", "true"], stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    return setpriv if probe.returncode == 0 else None
