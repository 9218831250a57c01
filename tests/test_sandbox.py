"""The sandbox against hostile programs: the parent survives, the verdict is right, nothing is left running.

Every hostile program runs in the strongest mode this machine offers (`run_program`), and the ones that matter
without namespaces run again in the plain mode (rlimits + process group + uid), which is what a machine without
`unshare` gets. A non-root user's view (user namespaces) is checked in a child process running as a fresh uid.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from nanophi import sandbox
from nanophi.sandbox import processes, runner
from nanophi.sandbox.cli import EXIT_TIMEOUT
from nanophi.cli import main
from nanophi.sandbox import SANDBOX_ID_VAR, SANDBOX_UID_BASE, SANDBOX_UID_SPAN, run_program

HOSTILE_TIMEOUT_S = 2.0  # room for a slow interpreter start on a loaded 2-core machine
HOSTILE_MEMORY_MB = 256
SRC_DIR = Path(sandbox.__file__).resolve().parents[2]  # src/, which holds nanophi/

DAEMON = """
import os, sys, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.chdir("/")
        for fd in (0, 1, 2):
            os.close(fd)
        time.sleep(1000)
    os._exit(0)
os.wait()
print("parent done")
"""

# A daemon that also drops the marker variable by re-exec'ing with an empty environment.
MARKERLESS_DAEMON = """
import os, sys, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.execve(sys.executable, [sys.executable, "-c", "import time; time.sleep(1000)"], {})
    os._exit(0)
os.wait()
"""

# name -> (program, acceptable statuses)
HOSTILE: dict[str, tuple[str, set[str]]] = {
    "fork_bomb": ("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
                  {"timeout"}),
    "thread_bomb": ("import threading, time\nwhile True:\n"
                    "    threading.Thread(target=time.sleep, args=(1000,), daemon=True).start()\n", {"failed"}),
    "memory_bomb": ("x = bytearray(8 << 30)\n", {"failed"}),
    "memory_creep": ("chunks = []\nwhile True:\n    chunks.append(bytearray(16 << 20))\n", {"failed"}),
    "stdout_flood": ("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n", {"failed"}),
    "stderr_flood": ("import os\nwhile True:\n    os.write(2, b'y' * 65536)\n", {"failed"}),
    "segfault": ("import ctypes\nctypes.string_at(0)\n", {"failed"}),
    "sleep_forever": ("import time\ntime.sleep(1000)\n", {"timeout"}),
    "busy_loop": ("while True:\n    pass\n", {"timeout"}),
    "ignore_sigterm": ("import signal, time\nfor s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):\n"
                       "    signal.signal(s, signal.SIG_IGN)\nwhile True:\n    time.sleep(0.05)\n", {"timeout"}),
    "daemonize": (DAEMON, {"passed"}),
    "markerless_daemon": (MARKERLESS_DAEMON, {"passed"}),
    "orphaned_child": ("import os, time\nif os.fork() == 0:\n    time.sleep(1000)\n", {"passed"}),
    "kill_parent": ("import os\ntry:\n    os.kill(os.getppid(), 9)\nexcept OSError as e:\n"
                    "    print('denied', type(e).__name__)\n", {"passed"}),
    "kill_everything": ("import os\nfor sig in (9, 15):\n    try:\n        os.kill(-1, sig)\n    except OSError:\n"
                        "        pass\nprint('alive')\n", {"passed"}),
    "kill_own_group": ("import os\nos.killpg(0, 9)\n", {"failed"}),
    "close_stdout": ("import os\nos.close(1)\nos.close(2)\nprint('x' * 100)\n", {"failed"}),
    "huge_file": ("open('big', 'wb').write(b'x' * (64 << 20))\n", {"failed"}),
    "chmod_everything": ("import os\nos.makedirs('a/b')\nopen('a/b/f', 'w').write('x')\n"
                         "for p in ('a/b/f', 'a/b', 'a', '.'):\n    os.chmod(p, 0)\n", {"passed"}),
}
# The plain mode has no PID namespace, so these are the ones whose clean-up it must get right by itself.
PLAIN_SUBSET = ["fork_bomb", "sleep_forever", "ignore_sigterm", "daemonize", "markerless_daemon", "orphaned_child",
                "kill_parent", "kill_everything", "segfault", "stdout_flood", "chmod_everything"]


def sandbox_processes(result: sandbox.SandboxResult | None = None) -> list[int]:
    """Every live process that belongs to a sandbox run (to `result`'s run when given, so that sandboxes other
    programs run at the same time do not count): by marker variable or by sandbox uid."""
    if result is not None:
        marker = f"{SANDBOX_ID_VAR}={result.sandbox_id}".encode()
        uids = {result.uid} if result.uid is not None else set()
    else:
        marker, uids = f"{SANDBOX_ID_VAR}=".encode(), set(range(SANDBOX_UID_BASE, SANDBOX_UID_BASE + SANDBOX_UID_SPAN))
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            uid = entry.stat().st_uid
            with open(f"/proc/{entry.name}/stat") as f:
                if f.read().rpartition(")")[2].split()[0] == "Z":
                    continue
            with open(f"/proc/{entry.name}/environ", "rb") as f:
                environ = f.read()
        except (OSError, IndexError):
            continue
        if marker in environ or uid in uids:
            found.append(int(entry.name))
    return found


@pytest.fixture
def bystander():
    """A process of ours that no sandboxed program may kill."""
    proc = subprocess.Popen(["sleep", "60"])
    yield proc
    proc.kill()
    proc.wait()


def check_hostile(result: sandbox.SandboxResult, expected: set[str], bystander: subprocess.Popen) -> None:
    assert result.status in expected, (result.status, result.reason, result.stderr[-500:])
    assert bystander.poll() is None, "a sandboxed program killed a process outside the sandbox"
    assert result.sandbox_id and sandbox_processes(result) == [], "processes survived the sandbox"
    assert result.duration_s < HOSTILE_TIMEOUT_S + 1.5
    # With a mount namespace the work dir is the namespace's own tmpfs and never exists on the host.
    assert bool(result.workdir) == ("private-tmp" not in result.protections)
    assert not result.workdir or not os.path.exists(result.workdir), "the work directory was not removed"


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_program(name: str, bystander: subprocess.Popen) -> None:
    code, expected = HOSTILE[name]
    result = run_program(code, timeout=HOSTILE_TIMEOUT_S, memory_mb=HOSTILE_MEMORY_MB)
    check_hostile(result, expected, bystander)
    if name == "segfault":
        assert result.signal == 11 and "SIGSEGV" in result.reason
    if name == "kill_parent":
        assert "denied" in result.stdout
    if name == "kill_everything":
        assert "alive" in result.stdout
    if name == "stdout_flood":
        assert "truncated" in result.stdout and len(result.stdout) < 70_000


@pytest.mark.parametrize("name", PLAIN_SUBSET)
def test_hostile_program_without_namespaces(name: str, bystander: subprocess.Popen) -> None:
    code, expected = HOSTILE[name]
    result = runner.execute(code, mode=runner.mode_named("plain"), timeout=HOSTILE_TIMEOUT_S,
                            memory_mb=HOSTILE_MEMORY_MB, max_output=sandbox.DEFAULT_MAX_OUTPUT, files=None)
    check_hostile(result, expected, bystander)
    assert "pid-namespace" not in result.protections


def test_statuses_and_output() -> None:
    ok = run_program("print('hello')\n")
    assert (ok.status, ok.returncode, ok.stdout, ok.signal) == ("passed", 0, "hello\n", None)
    assert ok.protections == sandbox.detect_protections()
    bad = run_program("import sys\nprint('oops', file=sys.stderr)\nsys.exit(3)\n")
    assert (bad.status, bad.returncode, bad.stderr) == ("failed", 3, "oops\n")
    raised = run_program("raise ValueError('boom')\n")
    assert raised.status == "failed" and "ValueError: boom" in raised.stderr


def test_output_keeps_head_and_tail() -> None:
    result = run_program("print('a' * 100_000)\nprint('END')\n", max_output=1000)
    assert result.stdout.startswith("a" * 100) and result.stdout.rstrip().endswith("END")
    assert "truncated" in result.stdout and len(result.stdout) < 1200


def test_files_environment_and_determinism(monkeypatch: pytest.MonkeyPatch) -> None:
    secret = secrets.token_hex(16)
    monkeypatch.setenv("NANOPHI_TEST_SECRET", secret)
    code = ("import os, helper\nprint(helper.VALUE)\nprint(sorted(os.environ))\nprint(hash('abc'))\n"
            "for path in ('/proc/1/environ', f'/proc/{os.getppid()}/environ'):\n"
            "    try:\n        print(open(path, 'rb').read())\n    except OSError:\n        pass\n")
    first = run_program(code, files={"helper.py": "VALUE = 42\n"})
    assert first.status == "passed", first.stderr
    lines = first.stdout.splitlines()
    assert lines[0] == "42"
    assert eval(lines[1]) == sorted(["PATH", "LANG", "HOME", "TMPDIR", "PYTHONDONTWRITEBYTECODE", "PYTHONHASHSEED",
                                     SANDBOX_ID_VAR])
    assert secret not in first.stdout and secret not in first.stderr
    second = run_program(code, files={"helper.py": "VALUE = 42\n"})
    assert second.stdout.splitlines()[2] == lines[2], "PYTHONHASHSEED=0 should make hashing reproducible"


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        run_program("pass", stdin="data")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        run_program("pass", files={"../escape.py": "x"})
    with pytest.raises(ValueError):
        run_program("pass", timeout=0)


needs_namespaces = pytest.mark.skipif("net-namespace" not in sandbox.detect_protections(),
                                      reason="no network namespace on this machine")


@needs_namespaces
def test_no_network(bystander: subprocess.Popen) -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        code = (f"import socket\ntry:\n    socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
                f"    print('connected')\nexcept OSError as e:\n    print('refused', e.errno)\n")
        result = run_program(code, timeout=HOSTILE_TIMEOUT_S)
    assert result.status == "passed" and "refused" in result.stdout, result.stdout


@pytest.mark.skipif("read-only-fs" not in sandbox.detect_protections(), reason="no read-only remounts here")
def test_writes_stay_inside(tmp_path: Path) -> None:
    name = f"nanophi-escape-{secrets.token_hex(4)}"
    targets = [f"/tmp/{name}", f"/var/tmp/{name}", f"/dev/shm/{name}", str(tmp_path / name)]
    code = ("import os\nfor path in %r:\n    try:\n        open(path, 'w').write('x')\n"
            "    except OSError as e:\n        print('blocked', path)\n"
            "for i in range(100):\n    open(f'fill{i}', 'wb').write(b'x' * (8 << 20))\n") % (targets,)
    result = run_program(code, timeout=HOSTILE_TIMEOUT_S, memory_mb=HOSTILE_MEMORY_MB)
    assert result.status == "failed" and "No space left" in result.stderr  # the private tmpfs is capped
    for target in targets:
        assert not os.path.exists(target), f"the program wrote {target} on the host"


@pytest.mark.skipif("cgroup-limits" not in sandbox.detect_protections(), reason="no cgroups here")
def test_memory_is_capped_for_all_processes_together(bystander: subprocess.Popen) -> None:
    """Six children of 200 MB each pass the per-process RLIMIT_AS of 256 MB; the cgroup stops the sum."""
    code = ("import os, time\nkids = []\nfor i in range(6):\n    pid = os.fork()\n    if pid == 0:\n"
            "        data = b'x' * (200 << 20)\n        time.sleep(0.3)\n        os._exit(0)\n    kids.append(pid)\n"
            "killed = 0\nfor pid in kids:\n    _, status = os.waitpid(pid, 0)\n"
            "    killed += os.WIFSIGNALED(status) and os.WTERMSIG(status) == 9\nprint('killed', killed)\n")
    result = run_program(code, timeout=3.0, memory_mb=HOSTILE_MEMORY_MB)
    assert result.status == "passed" and int(result.stdout.split()[1]) >= 3, (result.stdout, result.reason)
    assert "killed for memory" in result.reason
    assert bystander.poll() is None and sandbox_processes(result) == []
    leftover = [p for p in Path("/sys/fs/cgroup").rglob("nanophi-sandbox-*") if p.is_dir()]
    assert leftover == [], "cgroups were not removed"


def test_unprivileged_user_view() -> None:
    """As a non-root user the sandbox still isolates (user namespaces) and the caller still survives."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None or not os.access("/usr/bin/python3", os.X_OK):
        pytest.skip("needs root, setpriv and /usr/bin/python3 to impersonate a user")
    if not runner.searchable(SRC_DIR):
        pytest.skip("the source tree is not readable by other users")
    uid = 1_400_000_000 + secrets.randbelow(1_000_000)
    as_user = ["setpriv", "--reuid", str(uid), "--regid", str(uid), "--clear-groups"]
    userns = subprocess.run([*as_user, "unshare", "--user", "--map-current-user", "--pid", "--fork", "true"],
                            capture_output=True, timeout=30)
    if userns.returncode != 0:  # without them kill(-1) would reach this very test's processes: nothing to show
        pytest.skip("user namespaces are disabled here")
    programs = {name: HOSTILE[name][0] for name in ("kill_everything", "fork_bomb", "daemonize", "chmod_everything")}
    script = f"""
import json, os, sys
from pathlib import Path
sys.path.insert(0, {str(SRC_DIR)!r})
from nanophi.sandbox import run_program, detect_protections
out = {{"protections": detect_protections()}}
for name, code in {programs!r}.items():
    out[name] = run_program(code, timeout={HOSTILE_TIMEOUT_S}, memory_mb={HOSTILE_MEMORY_MB}).status
out["workdirs_left"] = sum(p.stat().st_uid == os.getuid() for p in Path("/tmp").glob("nanophi-sandbox-*"))
print(json.dumps(out))
"""
    proc = subprocess.run([*as_user, "/usr/bin/python3", "-c", script], capture_output=True, text=True, timeout=30,
                          cwd="/")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.splitlines()[-1])
    assert out["fork_bomb"] == "timeout" and out["daemonize"] == "passed"
    assert out["kill_everything"] == "passed"  # and the caller lived to print it
    assert out["chmod_everything"] == "passed" and out["workdirs_left"] == 0
    assert "pid-namespace" in out["protections"] and "unprivileged-uid" not in out["protections"]
    assert sandbox_processes() == []


def test_cli_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    program = tmp_path / "p.py"
    program.write_text("import sys\nprint('hi')\nsys.exit(4)\n")
    assert main(["sandbox", "run", str(program), "--json", "--timeout", "2"]) == 4  # the program's own code
    result = json.loads(capsys.readouterr().out)
    assert (result["status"], result["returncode"], result["stdout"]) == ("failed", 4, "hi\n")
    assert main(["sandbox", "run", str(program)]) == 4
    assert capsys.readouterr().out.startswith("failed: exit code 4")
    assert main(["sandbox", "run", str(tmp_path / "missing.py")]) == 2
    assert main(["sandbox", "info", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == sandbox.detect_protections()


@pytest.mark.parametrize("code, expected", [
    ("print('ok')\n", 0),
    ("raise SystemExit(3)\n", 3),
    ("raise ValueError('boom')\n", 1),
    ("import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)\n", 128 + 11),
    ("import time\ntime.sleep(60)\n", EXIT_TIMEOUT),
])
def test_cli_run_exit_status(tmp_path: Path, capsys: pytest.CaptureFixture[str], code: str, expected: int) -> None:
    """The exit status says how the program ended (documented in `sandbox run --help`); the JSON stays."""
    program = tmp_path / "p.py"
    program.write_text(code)
    assert main(["sandbox", "run", str(program), "--json", "--timeout", "1.5"]) == expected
    assert json.loads(capsys.readouterr().out)["status"] == {0: "passed", EXIT_TIMEOUT: "timeout"}.get(
        expected, "failed")


def test_cli_run_help_documents_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["sandbox", "run", "--help"])
    help_text = capsys.readouterr().out
    assert "124" in help_text and "125" in help_text and "128+N" in help_text


@pytest.mark.parametrize("flags", [
    ["--timeout", "nan"], ["--timeout", "inf"], ["--timeout", "-1"], ["--timeout", "0"], ["--timeout", "1e9"],
    ["--memory", "0"], ["--memory", "-5"], ["--memory", str(1 << 40)],
])
def test_cli_run_bad_values(tmp_path: Path, flags: list[str]) -> None:
    """Nonsense limits: one line on stderr, exit 2, no traceback (a real `nanophi` process)."""
    program = tmp_path / "p.py"
    program.write_text("print(1)\n")
    proc = subprocess.run([sys.executable, "-m", "nanophi", "sandbox", "run", str(program), *flags],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_cli_run_on_a_directory(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "nanophi", "sandbox", "run", str(tmp_path)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "is a directory" in proc.stderr and len(proc.stderr.splitlines()) == 1


# A process that runs one long-sleeping sandboxed program (which also forks a child that leaves its group), in the
# given mode, and says when the program is running.
OWNER = """
import sys, time
sys.path.insert(0, {src!r})
from nanophi.sandbox import runner
mode = runner.active_mode() if {mode!r} == "active" else runner.mode_named("plain")
program = "import os, time\\nif os.fork() == 0:\\n    os.setsid()\\ntime.sleep(1000)\\n"
runner.execute(program, mode=mode, timeout=60, memory_mb=256, max_output=1000, files=None)
"""


def _left_by(pid: int) -> tuple[list[str], list[str], list[int]]:
    """(work dirs, cgroups, live processes) of the sandbox runs of process `pid`."""
    prefix = f"{sandbox.SANDBOX_PREFIX}{pid}."
    dirs = [str(p) for base in {Path(tempfile.gettempdir()), Path("/tmp")} for p in base.glob(prefix + "*")]
    cgroups = [str(p) for p in Path("/sys/fs/cgroup").glob(f"*/{prefix}*")] + [
        str(p) for p in Path("/sys/fs/cgroup").glob(f"{prefix}*")]
    ids = {Path(name).name[len(prefix):].split(".")[1].split("-")[0] for name in dirs + cgroups}
    procs = [p for i in ids for p in processes.processes_with_marker(i)]
    return dirs, cgroups, procs


@pytest.mark.parametrize("mode", ["active", "plain"])
def test_sigkill_of_the_caller_leaves_nothing(mode: str) -> None:
    """SIGKILL the process running a sandbox: no finally clause runs. The kernel takes the program down at once
    (parent-death signal; PID 1 of the namespace), and the next run removes the work dir and cgroups left."""
    owner = subprocess.Popen([sys.executable, "-c", OWNER.format(src=str(SRC_DIR), mode=mode)])
    try:
        deadline = time.monotonic() + 30
        while True:  # until the program (and its forked child) run
            dirs, cgroups, procs = _left_by(owner.pid)
            if len(procs) >= 2 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert len(procs) >= 2, "the sandboxed program never started"
    finally:
        owner.kill()
        owner.wait()
    if mode == "active" and "pid-namespace" in sandbox.detect_protections():
        deadline = time.monotonic() + 5  # well inside the 60 s timeout and its watchdog: the kernel did it
        while _left_by(owner.pid)[2] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _left_by(owner.pid)[2] == [], "the program outlived its caller"
        assert _left_by(owner.pid)[0] == [], "a host work dir was used although the run had a private tmpfs"
    assert run_program("print('next')\n").stdout == "next\n"  # the next run reaps what is stale
    assert _left_by(owner.pid) == ([], [], [])


def test_reap_stale_spares_live_owners(tmp_path: Path) -> None:
    """A work dir of a live process (this one), or of one whose pid was reused, is judged by the start time."""
    mine = Path(tempfile.mkdtemp(prefix=f"{sandbox.SANDBOX_PREFIX}{processes.owner_tag()}.{'0' * 16}-"))
    pid, start = processes.owner_tag().split(".")
    reused = Path(tempfile.mkdtemp(prefix=f"{sandbox.SANDBOX_PREFIX}{pid}.{int(start) + 1}.{'1' * 16}-"))
    other = Path(tempfile.mkdtemp(prefix="nanophi-sandbox-notarun-"))  # not our naming: never touched
    try:
        reaped = sandbox.reap_stale()
        assert mine.exists() and not reused.exists() and other.exists()
        assert str(reused) in reaped
    finally:
        for d in (mine, reused, other):
            shutil.rmtree(d, ignore_errors=True)
