"""The CLI imports only the command it runs: `nanophi --help` loads no torch, and every listed command resolves."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from nanophi.cli import COMMANDS, build_parser, main


def test_help_imports_no_command_module_and_no_torch() -> None:
    code = ("import sys\nfrom nanophi.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'numpy', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[-1] == "[]"
    assert all(name in out for name in COMMANDS)  # every command is still listed with its help line


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_command_builds_its_flags(name: str) -> None:
    """Each listed module exists and declares its flags (the old CLI skipped a module that failed to import)."""
    parser = build_parser(["-v", name])
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    chosen = subs.choices[name]
    assert callable(chosen.get_default("_run"))
    assert any(a.option_strings or a.dest != "help" for a in chosen._actions if a.dest != "help")
    # the others are listed but not built: their modules stay unimported
    assert all(p.get_default("_run") is None for n, p in subs.choices.items() if n != name)


def test_unknown_command_is_one_line(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        main(["no-such-command"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "invalid choice" in err[0]
