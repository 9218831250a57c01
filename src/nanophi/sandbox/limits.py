"""The sandbox's limits and names: what every run gets, and how its traces on the host are recognised."""

from __future__ import annotations

import re
from pathlib import Path

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
UNSHARE_FLAGS = ("--pid", "--fork", "--kill-child", "--net", "--mount", "--mount-proc")
