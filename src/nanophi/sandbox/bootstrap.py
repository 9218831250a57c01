"""The sandbox's bootstrap: the program `runner.launch` starts, by path, as `python -I -S bootstrap.py FD`.

FD is an unnamed temporary file holding the marshalled config (and, with a mount namespace, the program's files).
The bootstrap runs as root inside the new namespaces (or as the caller, without them), before any privilege is
dropped, so it is standard library only and imports nothing from nanophi: `-I -S` keeps nanophi, site-packages,
the current directory and this file's own directory off its `sys.path`, and no environment variable reaches it.

As PID 1 of a fresh PID namespace it mounts the private /tmp and remounts the rest read-only (as root), forks the
program under its rlimits and uid, reaps everything, and exits, which tears the namespace down. Without
namespaces it sets the limits and execs the program directly.

It reports on `status_fd`, one "key value" line each: "returncode N" (the program's real exit status, -N for
signal N), "error ..." when the sandbox itself failed (so a setup failure is never mistaken for a failing
program), "watchdog 1" when it timed itself out.
"""

from __future__ import annotations

import ctypes
import marshal
import os
import resource
import signal
import sys

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND = 1, 2, 4, 8, 32, 4096
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38


def report(status_fd: int, key: str, value: object) -> None:
    os.write(status_fd, ("%s %s\n" % (key, value)).encode())


def unescape(path: str) -> str:
    """A mount point as /proc/self/mountinfo writes it (space, tab, newline and backslash as \\ooo), unescaped."""
    parts = path.split("\\")
    return parts[0] + "".join(chr(int(p[:3], 8)) + p[3:] for p in parts[1:])


def mount(libc: ctypes.CDLL, source: str, target: str, fstype: str | None, flags: int, data: str | None) -> None:
    if libc.mount(source.encode(), target.encode(), fstype and fstype.encode(), flags, data and data.encode()):
        err = ctypes.get_errno()
        raise OSError(err, "mount %s: %s" % (target, os.strerror(err)))


def isolate_filesystem(cfg: dict, libc: ctypes.CDLL) -> None:
    # The program's files came in the config, never touching the host's disk: mount a capped tmpfs owned by the
    # sandbox uid on the program dir (/tmp: this hides the host's /tmp too) and put them there. The tmpfs lives
    # exactly as long as the mount namespace, so nothing is left behind even if every process of ours is killed.
    # Then every other mount becomes read-only and nosuid.
    files, home, uid, gid = cfg["files"], cfg["program_dir"], cfg["uid"], cfg["gid"]
    owner = "" if uid is None else ",uid=%d,gid=%d" % (uid, gid)
    mount(libc, "tmpfs", home, "tmpfs", MS_NOSUID | MS_NODEV, "size=%dm,mode=0700%s" % (cfg["tmpfs_mb"], owner))
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
            mount(libc, "none", point, None, flags, None)
        except OSError:
            if not os.path.exists(point):  # shadowed by a later mount: unreachable anyway
                continue
            raise


def exec_program(cfg: dict, libc: ctypes.CDLL) -> None:
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


def run_as_init(cfg: dict, libc: ctypes.CDLL, status_fd: int) -> None:
    # PID 1 of the namespace: fork the program, reap everything, report the program's status, exit (which tears
    # the namespace down). The alarm is a watchdog for when the parent that should kill us is itself dead.
    def on_alarm(signum: int, frame: object) -> None:
        report(status_fd, "watchdog", 1)
        os._exit(1)
    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(cfg["watchdog_s"])
    child = os.fork()
    if child == 0:
        try:
            exec_program(cfg, libc)
        except BaseException as e:
            report(status_fd, "error", "starting the program: %r" % (e,))
        os._exit(1)
    while True:
        pid, status = os.waitpid(-1, 0)
        if pid == child:
            report(status_fd, "returncode", os.waitstatus_to_exitcode(status))
            return


def main(argv: list[str]) -> None:
    with os.fdopen(int(argv[1]), "rb") as config_file:  # closed here: the program must not see it
        cfg = marshal.load(config_file)  # marshal: no import cost, unlike json
    status_fd = cfg["status_fd"]
    os.set_inheritable(status_fd, False)  # the program must not see it
    libc = ctypes.CDLL(None, use_errno=True)
    try:
        for cgroup in cfg["cgroups"]:  # first: before any remount makes /sys read-only, and before any fork
            with open(cgroup + "/cgroup.procs", "w") as f:
                f.write("0")
        if cfg["mounts"]:
            isolate_filesystem(cfg, libc)
        if cfg["init"]:
            run_as_init(cfg, libc, status_fd)
        else:
            exec_program(cfg, libc)
    except BaseException as e:
        report(status_fd, "error", "bootstrap: %r" % (e,))
        sys.exit(1)


if __name__ == "__main__":
    main(sys.argv)
