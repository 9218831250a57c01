"""What happened to one sandboxed program (`SandboxResult`), and the verdict drawn from what was reported."""

from __future__ import annotations

import signal
from dataclasses import asdict, dataclass, field

from nanophi.sandbox.limits import OUTPUT_FILE_LIMIT


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


def verdict(wrapper_rc: int, reports: dict[str, str], init: bool, timed_out: bool, timeout: float, stdout: str,
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
    name = signal_name(-rc)
    if -rc == signal.SIGXCPU:
        return result("timeout", rc, f"CPU time limit reached ({name})")
    if -rc == signal.SIGXFSZ:
        return result("failed", rc, f"killed by {name}: a file or the output passed {OUTPUT_FILE_LIMIT} bytes")
    return result("failed", rc, f"killed by {name}")


def error_result(reason: str, protections: list[str]) -> SandboxResult:
    return SandboxResult("error", None, "", "", 0.0, None, f"sandbox error: {reason}", protections)


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
