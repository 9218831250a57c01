"""Run untrusted Python (a model's output) in a sandbox, one fresh process per program.

    nanophi sandbox run program.py --timeout 3 --json
    nanophi sandbox info            # which protections this machine gives

Model output is hostile until proven otherwise, so the defences are layered, and each one is used only where the
OS grants it (`detect_protections()` tries once and says which are active):

1. Namespaces: `unshare --pid --net --mount` runs a small bootstrap as PID 1 of a fresh PID namespace with an
   empty network namespace (a down loopback only). As root, the bootstrap mounts a size-capped private tmpfs on
   /tmp, which becomes the program's work dir, and remounts every other mount read-only and nosuid; then it
   forks the program and waits for it. When PID 1 exits, or is killed through `--kill-child`, the kernel kills
   everything left in the namespace, so a double-forked daemon that called setsid dies with it. Without root,
   a user namespace still gives the PID and network namespaces (no remounts).
2. Privileges: as root the program runs under a fresh unprivileged uid/gid per run (not a shared `nobody`, so
   RLIMIT_NPROC counts this run only and concurrent sandboxes cannot signal or trace each other), with no
   supplementary groups and PR_SET_NO_NEW_PRIVS (setuid binaries cannot raise it back).
3. Limits: rlimits per process (CPU seconds, address space, file size, open files, processes, no core dumps)
   and, where root can make cgroups, a memory and a task cap on all of a run's processes together (a fork of
   memory hogs passes every per-process limit).
4. The process: its own session and process group, killed as a group with SIGKILL on timeout and after exit;
   leftovers are then hunted by a marker variable in their environment, by uid and by cgroup membership.
   If the caller itself is killed (SIGKILL runs no clean-up), the kernel takes the run down: a parent-death
   signal on `unshare` (via `setpriv --pdeathsig`) or on the program, then PID 1's exit; with a mount
   namespace the files never touch the host's disk (they reach the tmpfs through an unnamed file). Host work
   dirs and cgroups are named after their owner's pid, and `reap_stale()` removes dead owners' at the next run.
5. I/O: stdin is /dev/null; stdout/stderr go to unnamed temporary files (never pipes: a flood cannot deadlock the
   parent or fill its memory), bounded by RLIMIT_FSIZE and truncated (head and tail kept) on read.
6. Environment: scrubbed to a handful of variables; nothing (no API keys) is inherited from the parent.

None of this is a security boundary against kernel exploits; see docs/sandbox.md for what is and is not covered.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import marshal
import math
import os
import re
import secrets
import select
import shutil
import signal
import stat
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO

from nanophi.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 3.0
DEFAULT_MEMORY_MB = 1024
DEFAULT_MAX_OUTPUT = 64_000  # bytes kept per stream (head and tail halves)
OUTPUT_FILE_LIMIT = 16 << 20  # RLIMIT_FSIZE: no file (stdout, stderr, or one the program writes) grows past this
WORKDIR_TMPFS_MB = 64  # with a mount namespace the work dir is a tmpfs of this size: bounds total disk use
MAX_PROCESSES = 64  # RLIMIT_NPROC (threads count too) for the sandbox uid: defuses fork and thread bombs
MAX_OPEN_FILES = 256
CPU_GRACE_S = 1  # RLIMIT_CPU = timeout + this, so a busy loop normally meets the wall-clock timeout first
WATCHDOG_GRACE_S = 2  # the bootstrap kills its own namespace this long after the timeout, even if we died
KILL_ROUNDS = 20  # leftover hunting repeats until nothing is found, at most this many times
SANDBOX_ID_VAR = "NANOPHI_SANDBOX_ID"
# Work dirs and cgroups are named PREFIX + "<owner pid>.<owner start time>.<sandbox id>", so a later run can tell
# the ones whose owner is dead (killed with SIGKILL, which no finally clause survives) and remove them.
SANDBOX_PREFIX = "nanophi-sandbox-"
STALE_NAME = re.compile(r"nanophi-sandbox-(?:probe-)?(\d+)\.(\d+)\.([0-9a-f]+)(?:-|$)")
PROGRAM_NAME = "program.py"
TRUNCATION_MARKER = "\n... [nanophi sandbox: {n} bytes truncated] ...\n"
# Unprivileged uids are drawn per run from a range no distribution hands out to real users.
SANDBOX_UID_BASE = 1_500_000_000
SANDBOX_UID_SPAN = 100_000_000
SAFE_PATH = "/usr/bin:/bin"
CGROUP_ROOT = Path("/sys/fs/cgroup")
NAMESPACE_PROGRAM_DIR = "/tmp"  # inside the mount namespace the program's tmpfs hides the host's /tmp
PROBE_TIMEOUT_S = 10.0
MAX_TIMEOUT_S = 86_400.0  # a day: beyond it a limit is a typo, and RLIMIT_CPU and the alarm need finite seconds
MAX_MEMORY_MB = 1 << 20  # 1 TiB: RLIMIT_AS must fit the kernel's rlim_t
# `nanophi sandbox run` exit codes beyond the program's own, as coreutils `timeout` has them.
EXIT_TIMEOUT = 124
EXIT_SANDBOX_ERROR = 125
EXIT_SIGNAL_BASE = 128  # killed by signal N: 128 + N, as a shell reports it
UNSHARE_FLAGS = ("--pid", "--fork", "--kill-child", "--net", "--mount", "--mount-proc")


@dataclass
class SandboxResult:
    """What happened to one program. `status` is the verdict; the rest explains it."""

    status: str  # "passed" (exit 0) | "failed" (non-zero exit or a signal) | "timeout" (we killed it) | "error"
    returncode: int | None  # exit code, or -N when killed by signal N; None when it never ran
    stdout: str
    stderr: str
    duration_s: float
    signal: int | None = None  # the signal that ended the program, if one did
    reason: str = ""  # one line for humans: "exit code 1", "killed by SIGSEGV", "timed out after 3.0 s"...
    protections: list[str] = field(default_factory=list)
    sandbox_id: str = ""  # the marker in the program's environment, for audits and leftover hunts
    uid: int | None = None  # the unprivileged uid it ran as, when one was used
    workdir: str = ""  # the host work dir it ran in, removed by now ("": it ran on its namespace's own tmpfs)

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def to_dict(self) -> dict:
        return asdict(self)


# The bootstrap runs as `python -I -S -c BOOTSTRAP FD` (FD: an unnamed temporary file holding the marshalled
# config, and with a mount namespace the program's files too), as root inside the new namespaces (or directly,
# without them). It is stdlib-only and self-contained because it runs before any
# privilege is dropped and must not import nanophi. It reports on `status_fd`, one "key value" line each:
# "returncode N" (the program's real exit status, -N for signal N), "error ..." when the sandbox itself failed
# (so a setup failure is never mistaken for a failing program), "watchdog 1" when it timed itself out.
BOOTSTRAP = r'''
import ctypes, marshal, os, resource, signal, sys

with os.fdopen(int(sys.argv[1]), "rb") as config_file:  # closed here: the program must not see it
    cfg = marshal.load(config_file)  # marshal: no import cost, unlike json
status_fd = cfg["status_fd"]
os.set_inheritable(status_fd, False)  # the program must not see it
libc = ctypes.CDLL(None, use_errno=True)
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND = 1, 2, 4, 8, 32, 4096
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38


def report(key, value):
    os.write(status_fd, ("%s %s\n" % (key, value)).encode())


def unescape(path):  # mountinfo writes space, tab, newline and backslash as \ooo
    parts = path.split("\\")
    return parts[0] + "".join(chr(int(p[:3], 8)) + p[3:] for p in parts[1:])


def mount(source, target, fstype, flags, data):
    if libc.mount(source.encode(), target.encode(), fstype and fstype.encode(), flags, data and data.encode()):
        err = ctypes.get_errno()
        raise OSError(err, "mount %s: %s" % (target, os.strerror(err)))


def isolate_filesystem():
    # The program's files came in the config, never touching the host's disk: mount a capped tmpfs owned by the
    # sandbox uid on the program dir (/tmp: this hides the host's /tmp too) and put them there. The tmpfs lives
    # exactly as long as the mount namespace, so nothing is left behind even if every process of ours is killed.
    # Then every other mount becomes read-only and nosuid.
    files, home, uid, gid = cfg["files"], cfg["program_dir"], cfg["uid"], cfg["gid"]
    owner = "" if uid is None else ",uid=%d,gid=%d" % (uid, gid)
    mount("tmpfs", home, "tmpfs", MS_NOSUID | MS_NODEV, "size=%dm,mode=0700%s" % (cfg["tmpfs_mb"], owner))
    for rel, data in files.items():
        path = os.path.join(home, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
    if uid is not None:
        for root, dirs, names in os.walk(home):
            for name in dirs + names:
                os.chown(os.path.join(root, name), uid, gid)
    with open("/proc/self/mountinfo") as f:
        mounts = [line.split() for line in f]
    for fields in mounts:
        point = unescape(fields[4])
        if point == home:
            continue
        opts = fields[5].split(",")
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID
        flags |= (MS_NODEV if "nodev" in opts else 0) | (MS_NOEXEC if "noexec" in opts else 0)
        try:
            mount("none", point, None, flags, None)
        except OSError:
            if not os.path.exists(point):  # shadowed by a later mount: unreachable anyway
                continue
            raise


def exec_program():
    # Order matters: limits first (root may set any), then no-new-privs, then drop groups, gid, uid.
    for name, (soft, hard) in cfg["rlimits"].items():
        resource.setrlimit(getattr(resource, name), (soft, hard))
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0):
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    if cfg["uid"] is not None:
        os.setgroups([])
        os.setgid(cfg["gid"])
        os.setuid(cfg["uid"])
    if not cfg["init"]:
        # No PID 1 to take the program down with it: the kernel kills it when its parent (the caller) dies.
        # After setuid, which clears the setting; the check closes the race with a parent that died already.
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0):
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
        if os.getppid() != cfg["parent_pid"]:
            os._exit(1)
    os.chdir(cfg["program_dir"])
    os.execve(cfg["argv"][0], cfg["argv"], cfg["env"])


def run_as_init():
    # PID 1 of the namespace: fork the program, reap everything, report the program's status, exit (which tears
    # the namespace down). The alarm is a watchdog for when the parent that should kill us is itself dead.
    def on_alarm(signum, frame):
        report("watchdog", 1)
        os._exit(1)
    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(cfg["watchdog_s"])
    child = os.fork()
    if child == 0:
        try:
            exec_program()
        except BaseException as e:
            report("error", "starting the program: %r" % (e,))
        os._exit(1)
    while True:
        pid, status = os.waitpid(-1, 0)
        if pid == child:
            report("returncode", os.waitstatus_to_exitcode(status))
            return


try:
    for cgroup in cfg["cgroups"]:  # first: before any remount makes /sys read-only, and before any fork
        with open(cgroup + "/cgroup.procs", "w") as f:
            f.write("0")
    if cfg["mounts"]:
        isolate_filesystem()
    if cfg["init"]:
        run_as_init()
    else:
        exec_program()
except BaseException as e:
    report("error", "bootstrap: %r" % (e,))
    sys.exit(1)
'''


@dataclass(frozen=True)
class _Mode:
    """How runs are isolated: the wrapper, what the bootstrap does, and what that buys (`protections`)."""

    name: str  # "root-namespaces" | "user-namespaces" | "plain"
    unshare_flags: tuple[str, ...]  # empty: no namespaces, the bootstrap execs the program directly
    mounts: bool  # private /tmp tmpfs + read-only remounts (needs real root)
    drop_uid: bool  # run the program under a fresh unprivileged uid (needs real root)
    protections: tuple[str, ...]


def _mode(name: str) -> _Mode:
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
    return _Mode(name, flags, mounts=name == "root-namespaces", drop_uid=drop_uid, protections=tuple(names))


@functools.cache
def _active_mode() -> _Mode:
    """The strongest mode that works here, found by running a trivial program in it once per process."""
    if shutil.which("unshare", path=SAFE_PATH) is not None:
        mode = _mode("root-namespaces" if os.geteuid() == 0 else "user-namespaces")
        result = _execute("print('ok')", mode=mode, timeout=PROBE_TIMEOUT_S, memory_mb=DEFAULT_MEMORY_MB,
                          max_output=DEFAULT_MAX_OUTPUT, files=None)
        if result.status == "passed" and result.stdout.strip() == "ok":
            return mode
        log.warning("sandbox: %s unavailable (%s %s)", mode.name, result.reason, result.stderr.strip()[-200:])
    if os.geteuid() != 0:
        log.warning("sandbox: no namespaces and not root: a sandboxed program runs as you and can signal "
                    "every process of yours; run as root or allow user namespaces for real isolation")
    return _mode("plain")


def detect_protections() -> list[str]:
    """The protections `run_program` applies on this machine (tried once, cached)."""
    return list(_active_mode().protections) + (["cgroup-limits"] if _cgroups_work() else [])


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
    return _execute(code, mode=_active_mode(), timeout=timeout, memory_mb=memory_mb,
                    max_output=max_output, files=files)


def _execute(code: str, *, mode: _Mode, timeout: float, memory_mb: int, max_output: int,
             files: dict[str, str] | None) -> SandboxResult:
    protections = list(mode.protections)
    interpreter = _program_interpreter(mode.drop_uid)
    if interpreter is None:
        return _error("no Python interpreter is readable by an unprivileged user (install python3 in /usr/bin)",
                      protections)
    reap_stale()  # what runs of a caller killed with SIGKILL left behind
    sandbox_id = secrets.token_hex(8)
    name = f"{SANDBOX_PREFIX}{_owner_tag()}.{sandbox_id}"  # the owner's pid: stale entries are recognisable
    uid = SANDBOX_UID_BASE + secrets.randbelow(SANDBOX_UID_SPAN) if mode.drop_uid else None
    sources = _program_files(code, files or {})
    workdir = ""
    if not mode.mounts:
        # No private tmpfs: the program runs in a host directory, so an unprivileged uid must be able to reach it.
        base = None
        if mode.drop_uid and not _searchable(Path(tempfile.gettempdir())):
            base = "/tmp"
        workdir = tempfile.mkdtemp(prefix=name + "-", dir=base)
    cgroups = _create_cgroups(name, memory_mb) if _cgroups_work() else []
    if cgroups:
        protections.append("cgroup-limits")
    try:
        # With a mount namespace the bootstrap puts the files onto a tmpfs it owns; without, they are the program's.
        if workdir:
            _write_workdir(workdir, sources, uid)
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
            "rlimits": _rlimits(timeout, memory_mb, uid),
            "memory_mb": memory_mb,
            # -s -B rather than -I: -I implies -E, which would ignore PYTHONHASHSEED=0 (reproducible set order),
            # and the environment is entirely ours anyway, so -E would protect nothing.
            "argv": [interpreter, "-s", "-B", PROGRAM_NAME],
            "env": env,
        }
        return _launch(config, mode, timeout, max_output, sandbox_id, protections)
    finally:
        _remove_cgroups(cgroups)
        if workdir:
            _remove_tree(workdir)


def _launch(config: dict, mode: _Mode, timeout: float, max_output: int, sandbox_id: str,
            protections: list[str]) -> SandboxResult:
    """Start the bootstrap (under unshare when we can), wait, kill whatever is left, and judge."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, tempfile.TemporaryFile() as status, \
            tempfile.TemporaryFile() as config_file:
        config["status_fd"] = status.fileno()
        marshal.dump(config, config_file)  # a file, not argv: one argument may hold only 128 KiB
        config_file.flush()
        config_file.seek(0)
        command = [os.path.realpath(sys.executable), "-I", "-S", "-c", BOOTSTRAP, str(config_file.fileno())]
        if mode.unshare_flags:
            command = [shutil.which("unshare", path=SAFE_PATH), *mode.unshare_flags, "--", *command]
            # unshare --kill-child takes the namespace down when unshare dies; --pdeathsig makes unshare die
            # when we do (the bootstrap's watchdog covers the instant before setpriv sets it, or no setpriv).
            setpriv = _setpriv_pdeathsig()
            if setpriv:
                command = [setpriv, "--pdeathsig", "KILL", "--", *command]
        start = time.monotonic()
        try:
            proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=config["env"],
                                    cwd="/", close_fds=True, pass_fds=(status.fileno(), config_file.fileno()),
                                    start_new_session=True)
        except OSError as e:
            return _error(f"could not start the sandbox: {e}", protections)
        try:
            timed_out = not _wait_for_exit(proc, timeout)
        finally:
            _kill_group(proc.pid)  # on timeout, and for forked leftovers of a program that has exited
            proc.wait()
            _kill_leftovers(sandbox_id, config["uid"])
        duration = time.monotonic() - start
        status.seek(0)
        reports: dict[str, str] = {}
        for line in status.read().decode(errors="replace").splitlines():
            key, _, value = line.partition(" ")
            reports.setdefault(key, value)
        result = _verdict(proc.returncode, reports, bool(mode.unshare_flags), timed_out, timeout,
                          _read_capped(out, max_output), _read_capped(err, max_output), duration, protections)
    result.sandbox_id, result.uid, result.workdir = sandbox_id, config["uid"], config["workdir"]
    oom_kills = _oom_kills([Path(c) for c in config["cgroups"]])
    if oom_kills:
        result.reason += f"; {oom_kills} process(es) killed for memory (the sandbox's {config['memory_mb']} MB)"
    return result


def _wait_for_exit(proc: subprocess.Popen, timeout: float) -> bool:
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


def _verdict(wrapper_rc: int, reports: dict[str, str], init: bool, timed_out: bool, timeout: float, stdout: str,
             stderr: str, duration: float, protections: list[str]) -> SandboxResult:
    """Turn what the wrapper and the bootstrap reported into one status."""
    def result(status: str, rc: int | None, reason: str) -> SandboxResult:
        sig = -rc if rc is not None and rc < 0 else None
        return SandboxResult(status, rc, stdout, stderr, round(duration, 4), sig, reason, protections)

    if "error" in reports:
        return result("error", None, f"sandbox error: {reports['error']}")
    code = int(reports["returncode"]) if "returncode" in reports else None
    if timed_out or "watchdog" in reports:
        return result("timeout", code, f"timed out after {timeout:g} s")
    # As PID 1 the bootstrap reports the program's own status; otherwise the wrapper *is* the program.
    if init:
        if code is None:
            return result("error", None, f"sandbox error: the bootstrap exited with {wrapper_rc} and no report")
        rc = code
    else:
        rc = wrapper_rc
    if rc == 0:
        return result("passed", 0, "exit code 0")
    if rc > 0:
        return result("failed", rc, f"exit code {rc}")
    name = _signal_name(-rc)
    if -rc == signal.SIGXCPU:
        return result("timeout", rc, f"CPU time limit reached ({name})")
    if -rc == signal.SIGXFSZ:
        return result("failed", rc, f"killed by {name}: a file or the output passed {OUTPUT_FILE_LIMIT} bytes")
    return result("failed", rc, f"killed by {name}")


def _error(reason: str, protections: list[str]) -> SandboxResult:
    return SandboxResult("error", None, "", "", 0.0, None, f"sandbox error: {reason}", protections)


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _rlimits(timeout: float, memory_mb: int, uid: int | None) -> dict[str, tuple[int, int]]:
    """(soft, hard) per rlimit. Soft = hard everywhere but CPU, where SIGXCPU at the soft limit names the cause
    before SIGKILL at the hard one."""
    nproc = MAX_PROCESSES
    if uid is None:
        # Without a uid of its own, RLIMIT_NPROC counts every process of ours, so leave room for those.
        nproc += _count_processes(os.getuid())
    cpu = math.ceil(timeout) + CPU_GRACE_S
    limits = {"RLIMIT_AS": memory_mb << 20, "RLIMIT_FSIZE": OUTPUT_FILE_LIMIT, "RLIMIT_NOFILE": MAX_OPEN_FILES,
              "RLIMIT_NPROC": nproc, "RLIMIT_CORE": 0}
    return {"RLIMIT_CPU": (cpu, cpu + 1), **{name: (value, value) for name, value in limits.items()}}


@functools.cache
def _program_interpreter(drop_uid: bool) -> str | None:
    """A Python the program can run: ours, unless an unprivileged uid cannot reach it (e.g. under /root)."""
    ours = os.path.realpath(sys.executable)
    if not drop_uid or (_world_reachable(ours) and _world_reachable(sysconfig.get_paths()["stdlib"])):
        return ours
    for name in ("python3", "python"):
        candidate = shutil.which(name, path=SAFE_PATH)
        if candidate and _world_reachable(os.path.realpath(candidate)):
            return os.path.realpath(candidate)
    return None


def _world_reachable(path: str) -> bool:
    """Can a user with no relation to the owner read `path` (and search every directory above it)?"""
    p = Path(path)
    try:
        return _searchable(p.parent) and bool(p.stat().st_mode & stat.S_IROTH)
    except OSError:
        return False


def _searchable(directory: Path) -> bool:
    """Is `directory`, and every directory above it, searchable by anyone?"""
    try:
        return all(d.stat().st_mode & stat.S_IXOTH for d in (directory, *directory.parents))
    except OSError:
        return False


def _program_files(code: str, files: dict[str, str]) -> dict[str, str]:
    """relative path -> text of everything the program gets, with paths checked to stay inside its directory."""
    out = {}
    for rel, text in {**files, PROGRAM_NAME: code}.items():
        parts = Path(rel).parts
        if not parts or Path(rel).is_absolute() or ".." in parts:
            raise ValueError(f"sandbox file {rel!r} would land outside the work directory")
        out[str(Path(rel))] = text
    return out


def _write_workdir(workdir: str, files: dict[str, str], uid: int | None) -> None:
    root = Path(workdir)
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    if uid is not None:  # without namespaces the program runs in this very directory as `uid`
        for path in [root, *root.rglob("*")]:
            os.chown(path, uid, uid)


def _read_capped(f: IO[bytes], max_output: int) -> str:
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


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _kill_leftovers(sandbox_id: str, uid: int | None) -> None:
    """SIGKILL every process still carrying this run's marker, or (without namespaces) this run's uid.

    With a PID namespace the kernel has already done this; without one, a daemon that called setsid has left
    our process group, and one that re-exec'd itself with a clean environment has dropped the marker, but it
    cannot drop the uid, and `kill(-1)` run as that uid reaches every process of it.
    """
    for _ in range(KILL_ROUNDS):
        pids = _processes_with_marker(sandbox_id)
        uid_alive = uid is not None and _count_processes(uid) > 0
        if not pids and not uid_alive:
            return
        if uid_alive:
            _kill_uid(uid)
        for pid in pids:
            _kill_pid(pid)
        time.sleep(0.01)  # let the kernel reap before looking again
    log.warning("sandbox %s: processes survived %d kill rounds", sandbox_id, KILL_ROUNDS)


def _kill_pid(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _processes_with_marker(sandbox_id: str) -> list[int]:
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


def _count_processes(uid: int) -> int:
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


def _kill_uid(uid: int) -> None:
    """`kill -KILL -1` as `uid`: the kernel signals every process of that uid (but the killer itself)."""
    kill = shutil.which("kill", path=SAFE_PATH)
    if kill is None:
        return
    subprocess.run([kill, "-KILL", "-1"], user=uid, group=uid, extra_groups=[], env={"PATH": SAFE_PATH},
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)


@functools.cache
def _cgroups_work() -> bool:
    """Can we make (and remove) the per-run cgroups here? Tried once per process."""
    if os.geteuid() != 0:
        return False
    made = _create_cgroups(f"{SANDBOX_PREFIX}probe-{_owner_tag()}.{secrets.token_hex(4)}", DEFAULT_MEMORY_MB)
    _remove_cgroups(made)
    return bool(made)


def _cgroup_settings(name: str, memory_mb: int) -> list[tuple[Path, dict[str, str]]]:
    """Where this run's cgroups go and what they cap: all its processes together get `memory_mb` of memory and
    MAX_PROCESSES tasks, which the per-process rlimits alone cannot promise."""
    memory = str(memory_mb << 20)
    if (CGROUP_ROOT / "cgroup.controllers").exists():  # cgroup v2
        return [(CGROUP_ROOT / name, {"memory.max": memory, "pids.max": str(MAX_PROCESSES)})]
    return [(CGROUP_ROOT / "memory" / name, {"memory.limit_in_bytes": memory}),  # cgroup v1
            (CGROUP_ROOT / "pids" / name, {"pids.max": str(MAX_PROCESSES)})]


def _create_cgroups(name: str, memory_mb: int) -> list[Path]:
    """All of this run's cgroups, or none (a half-limited sandbox would report protections it lacks)."""
    made: list[Path] = []
    try:
        for directory, settings in _cgroup_settings(name, memory_mb):
            directory.mkdir()
            made.append(directory)
            for file, value in settings.items():
                (directory / file).write_text(value)
    except OSError as e:
        log.debug("sandbox: no cgroups (%s)", e)
        _remove_cgroups(made)
        return []
    return made


def _oom_kills(cgroups: list[Path]) -> int:
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


def _remove_cgroups(cgroups: list[Path]) -> None:
    """Kill whatever is still inside (membership is exact, unlike markers), then remove the cgroups."""
    for cgroup in cgroups:
        for _ in range(KILL_ROUNDS):
            try:
                for pid in (cgroup / "cgroup.procs").read_text().split():
                    _kill_pid(int(pid))
                cgroup.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:  # EBUSY: the dying are not yet gone
                time.sleep(0.01)
        else:
            log.warning("sandbox: could not remove cgroup %s", cgroup)


@functools.cache
def _setpriv_pdeathsig() -> str | None:
    """util-linux setpriv, if it can set the parent-death signal (util-linux >= 2.33)."""
    setpriv = shutil.which("setpriv", path=SAFE_PATH)
    if setpriv is None:
        return None
    probe = subprocess.run([setpriv, "--pdeathsig", "KILL", "--", "true"], stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    return setpriv if probe.returncode == 0 else None


def _start_time(pid: int) -> int | None:
    """The start time of process `pid` (clock ticks since boot), which tells a reused pid from the original."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rpartition(")")[2].split()[19])  # field 22; fields 1-2 are before ")"
    except (OSError, IndexError, ValueError):
        return None


@functools.cache
def _owner_tag() -> str:
    """"<pid>.<start time>" of this process: what names our work dirs and cgroups (pids never change)."""
    return f"{os.getpid()}.{_start_time(os.getpid()) or 0}"


def _stale(name: str) -> str | None:
    """The sandbox id of a work dir or cgroup named by a run whose owner process is gone, else None."""
    m = STALE_NAME.match(name)
    if m is None:
        return None
    pid, start = int(m.group(1)), int(m.group(2))
    return None if _start_time(pid) == start else m.group(3)


def reap_stale() -> list[str]:
    """Remove the work dirs and cgroups (killing what is still in them) of runs whose owner died; return them.

    A caller killed with SIGKILL runs no clean-up. The kernel takes its sandboxes' processes down (parent-death
    signals, and PID 1 of a namespace), and with a mount namespace the work dir is a tmpfs that dies with it;
    a host work dir and cgroups are what is left, and the next run in any process removes them here.
    """
    reaped: list[str] = []
    cgroup_dirs = {d.parent for d, _ in _cgroup_settings("x", DEFAULT_MEMORY_MB)}
    for base in cgroup_dirs:
        for entry in _scan(base):
            sandbox_id = _stale(entry.name)
            if sandbox_id is not None and entry.is_dir(follow_symlinks=False):
                _remove_cgroups([Path(entry.path)])
                _kill_leftovers(sandbox_id, None)
                reaped.append(entry.path)
    for base in {tempfile.gettempdir(), "/tmp"}:
        for entry in _scan(Path(base)):
            sandbox_id = _stale(entry.name)
            if sandbox_id is None or not entry.is_dir(follow_symlinks=False):
                continue
            _kill_leftovers(sandbox_id, None)  # a daemon of a plain-mode run may still be using it
            try:
                if os.geteuid() != 0 and entry.stat(follow_symlinks=False).st_uid != os.geteuid():
                    continue  # another user's: not ours to judge or remove
            except OSError:
                continue
            _remove_tree(entry.path)
            reaped.append(entry.path)
    if reaped:
        log.info("sandbox: removed %d left over by killed runs: %s", len(reaped), ", ".join(reaped))
    return reaped


def _scan(directory: Path) -> list[os.DirEntry]:
    try:
        return [e for e in os.scandir(directory) if e.name.startswith(SANDBOX_PREFIX)]
    except OSError:
        return []


def _remove_tree(path: str) -> None:
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


# ----------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="sandbox_command", metavar="SUBCOMMAND")
    p = sub.add_parser("run", help="run a Python file in the sandbox and report how it ended",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=RUN_EXIT_CODES)
    p.add_argument("file", type=Path, help="the Python program to run")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                   help=f"wall-clock limit in seconds (at most {MAX_TIMEOUT_S:g})")
    p.add_argument("--memory", type=int, default=DEFAULT_MEMORY_MB,
                   help=f"address-space limit in MB (at most {MAX_MEMORY_MB})")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p = sub.add_parser("info", help="list the protections active on this machine")
    p.add_argument("--json", action="store_true", help="print the list as JSON")


RUN_EXIT_CODES = f"""exit status (as coreutils `timeout` reports it):
  0        the program exited with code 0
  N        the program exited with code N (1-255)
  {EXIT_TIMEOUT}      the program timed out (wall clock or CPU time) and was killed
  {EXIT_SANDBOX_ERROR}      the sandbox itself failed to run the program
  128+N    the program was killed by signal N (e.g. 137 for SIGKILL, 153 for SIGXFSZ: output too large)
  2        also: a bad command line (no such file, bad --timeout), reported in one line
The JSON (--json) or the summary line says which it was."""


def exit_code(result: SandboxResult) -> int:
    """The exit status of `nanophi sandbox run` for `result` (see RUN_EXIT_CODES)."""
    if result.status == "passed":
        return 0
    if result.status == "timeout":
        return EXIT_TIMEOUT
    if result.status == "error" or result.returncode is None:
        return EXIT_SANDBOX_ERROR
    if result.returncode < 0:
        return EXIT_SIGNAL_BASE - result.returncode
    return result.returncode or 1  # "failed" with code 0 cannot happen; never report a failure as success


def run(args: argparse.Namespace) -> int:
    if args.sandbox_command == "info":
        names = detect_protections()
        print(json.dumps(names) if args.json else "\n".join(names))
        return 0
    if args.sandbox_command != "run":
        raise UserError("say what to do: `nanophi sandbox run FILE.py` or `nanophi sandbox info`")
    if not args.file.is_file():
        what = "is a directory" if args.file.is_dir() else "does not exist"
        raise UserError(f"{args.file} {what}; give the path of a Python program to run")
    if not 0 < args.timeout <= MAX_TIMEOUT_S:  # also false for NaN
        raise UserError(f"--timeout must be a number of seconds in (0, {MAX_TIMEOUT_S:g}], got {args.timeout}")
    if not 0 < args.memory <= MAX_MEMORY_MB:
        raise UserError(f"--memory must be a number of MB in (0, {MAX_MEMORY_MB}], got {args.memory}")
    try:
        code = args.file.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise UserError(f"cannot read {args.file}: {e.strerror}; check its permissions") from None
    result = run_program(code, timeout=args.timeout, memory_mb=args.memory)
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        print(f"{result.status}: {result.reason} ({result.duration_s:.2f} s)")
        print(f"protections: {', '.join(result.protections)}")
        for name, text in (("stdout", result.stdout), ("stderr", result.stderr)):
            if text:
                print(f"--- {name} ---\n{text}", end="" if text.endswith("\n") else "\n")
    return exit_code(result)
