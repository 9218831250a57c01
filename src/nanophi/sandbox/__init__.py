"""Run untrusted Python (a model's output) in a sandbox, one fresh process per program.

    nanophi sandbox run program.py --timeout 3 --json
    nanophi sandbox info            # which protections this machine gives

Model output is hostile until proven otherwise, so the defences are layered, and each one is used only where the
OS grants it (`detect_protections()` tries once and says which are active):

1. Namespaces: `unshare --pid --net --mount` runs a small bootstrap (`bootstrap.py`) as PID 1 of a fresh PID namespace with an
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

The package, one job per module: `runner` (modes, the launch, the wait), `bootstrap` (the program that sets a
run up from inside, run by path), `result` (`SandboxResult` and the verdict), `processes` (finding and killing a
run's processes), `cgroups`, `reap` (what killed callers left behind), `limits` (the numbers and names), `cli`.
"""

from nanophi.sandbox.limits import (DEFAULT_MAX_OUTPUT, DEFAULT_MEMORY_MB, DEFAULT_TIMEOUT_S, MAX_MEMORY_MB,
                                    MAX_TIMEOUT_S, SANDBOX_ID_VAR, SANDBOX_PREFIX, SANDBOX_UID_BASE,
                                    SANDBOX_UID_SPAN)
from nanophi.sandbox.reap import reap_stale
from nanophi.sandbox.result import SandboxResult
from nanophi.sandbox.runner import detect_protections, run_program

__all__ = ["DEFAULT_MAX_OUTPUT", "DEFAULT_MEMORY_MB", "DEFAULT_TIMEOUT_S", "MAX_MEMORY_MB", "MAX_TIMEOUT_S",
           "SANDBOX_ID_VAR", "SANDBOX_PREFIX", "SANDBOX_UID_BASE", "SANDBOX_UID_SPAN", "SandboxResult",
           "detect_protections", "reap_stale", "run_program"]
