"""`nanophi sandbox run FILE.py` and `nanophi sandbox info`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from nanophi.errors import UserError
from nanophi.sandbox.limits import DEFAULT_MEMORY_MB, DEFAULT_TIMEOUT_S, MAX_MEMORY_MB, MAX_TIMEOUT_S
from nanophi.sandbox.result import SandboxResult
from nanophi.sandbox.runner import detect_protections, run_program

# `nanophi sandbox run` exit codes beyond the program's own, as coreutils `timeout` has them.
EXIT_TIMEOUT = 124
EXIT_SANDBOX_ERROR = 125
EXIT_SIGNAL_BASE = 128  # killed by signal N: 128 + N, as a shell reports it


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
