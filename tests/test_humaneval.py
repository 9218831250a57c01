"""HumanEval scoring: the problems load, right answers pass, wrong and sneaky ones fail, pass@k is exact."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from nanophi import humaneval
from nanophi.cli import main
from nanophi.errors import UserError
from nanophi.humaneval import (
    N_PROBLEMS,
    STOP_SEQUENCES,
    canonical_bpb,
    check_completion,
    load_problems,
    pass_at_k,
    score_samples,
    truncate_completion,
)

# Wrong completions for HumanEval/0 (has_close_elements), each with the status it must get.
WRONG = {
    "return_none": ("    return None\n", "failed"),
    "syntax_error": ("    return (\n", "failed"),
    "sys_exit_in_body": ("    import sys\n    sys.exit(0)\n", "failed"),
    "os_exit_in_body": ("    import os\n    os._exit(0)\n", "failed"),
    "exit_at_module_level": ("    return True\nimport sys\nsys.exit(0)\n", "failed"),
    "hide_stdout": ("    import sys, io\n    sys.stdout = io.StringIO()\n    sys.exit(0)\n", "failed"),
    "infinite_loop": ("    while True:\n        pass\n", "timeout"),
}


@pytest.fixture(scope="module")
def problems() -> list[dict[str, str]]:
    return load_problems()


def test_load_problems(problems: list[dict[str, str]]) -> None:
    assert len(problems) == N_PROBLEMS
    assert [p["task_id"] for p in problems[:2]] == ["HumanEval/0", "HumanEval/1"]
    assert set(problems[0]) >= {"task_id", "prompt", "canonical_solution", "test", "entry_point"}


def test_truncate_completion() -> None:
    body = "    return x + 1"
    for stop in STOP_SEQUENCES:
        assert truncate_completion(body + stop + " rest\n") == body
    assert truncate_completion(body + "\n") == body + "\n"
    assert truncate_completion("    a = 1\n\ndef g():\n    pass\nclass C: pass\n") == "    a = 1\n"
    assert truncate_completion("    if x:\n        return 1\n") == "    if x:\n        return 1\n"  # indented


@pytest.mark.parametrize("n,c,k", [(1, 0, 1), (1, 1, 1), (10, 3, 1), (10, 3, 5), (20, 0, 10), (20, 15, 10),
                                   (200, 7, 100), (5, 5, 3)])
def test_pass_at_k_matches_binomials(n: int, c: int, k: int) -> None:
    exact = 1 - math.comb(n - c, k) / math.comb(n, k)
    assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)


def test_pass_at_k_rejects_nonsense() -> None:
    for n, c, k in [(5, 6, 1), (5, -1, 1), (5, 2, 0), (5, 2, 6)]:
        with pytest.raises(ValueError):
            pass_at_k(n, c, k)


def test_canonical_passes_and_wrong_fails(problems: list[dict[str, str]]) -> None:
    problem = problems[0]
    ok = check_completion(problem, problem["canonical_solution"])
    assert ok.passed and ok.status == "passed", ok.sandbox.stderr
    for name, (completion, expected) in WRONG.items():
        timeout = 1.0 if expected == "timeout" else 3.0
        result = check_completion(problem, completion, timeout=timeout)
        assert not result.passed and result.status == expected, (name, result.status, result.reason)
        if "exit" in name or name == "hide_stdout":
            assert result.sandbox.status == "passed"  # exit code 0: only the sentinel tells
            assert "sentinel" in result.reason


def test_score_samples(tmp_path: Path, problems: list[dict[str, str]]) -> None:
    chosen = problems[:10]
    samples = [{"task_id": p["task_id"], "completion": p["canonical_solution"]} for p in chosen]
    # Task 0 gets two more samples, one wrong: 2 of 3 pass.
    samples += [{"task_id": "HumanEval/0", "completion": WRONG["os_exit_in_body"][0]},
                {"task_id": "HumanEval/0", "completion": chosen[0]["canonical_solution"]}]
    path = tmp_path / "samples.jsonl"
    path.write_text("".join(json.dumps(s) + "\n" for s in samples))
    summary = score_samples(path, workers=2)
    assert summary["n_problems"] == 10 and summary["n_samples"] == 12 and summary["passed"] == 11
    assert summary["pass@1"] == pytest.approx((9 + 2 / 3) / 10)
    assert "pass@10" not in summary and "pass@100" not in summary
    rows = [json.loads(line) for line in humaneval.results_path(path).read_text().splitlines()]
    assert len(rows) == 12 and [r["passed"] for r in rows].count(False) == 1
    failed = next(r for r in rows if not r["passed"])
    assert (failed["task_id"], failed["sample_idx"], failed["status"]) == ("HumanEval/0", 1, "failed")
    assert set(failed) == {"task_id", "sample_idx", "passed", "status", "reason"}


def test_score_rejects_bad_samples(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    with pytest.raises(UserError):
        score_samples(path)
    path.write_text('{"task_id": "HumanEval/999", "completion": "x"}\n')
    with pytest.raises(UserError, match="unknown task_id"):
        score_samples(path)
    path.write_text('{"task_id": "HumanEval/0"\n')
    with pytest.raises(UserError, match="not JSON"):
        score_samples(path)
    path.write_text('{"task_id": "HumanEval/0"}\n')
    with pytest.raises(UserError, match="completion"):
        score_samples(path)


def test_cli_score_and_selftest(tmp_path: Path, problems: list[dict[str, str]],
                                capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "samples.jsonl"
    path.write_text(json.dumps({"task_id": "HumanEval/2", "completion": "    return 0.0\n"}) + "\n")
    assert main(["humaneval", "score", str(path), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["pass@1"], summary["n_samples"]) == (0.0, 1)
    assert main(["humaneval", "score", str(tmp_path / "missing.jsonl")]) == 2
    assert main(["humaneval", "selftest", "--limit", "3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["passed"] == 3
    with pytest.raises(SystemExit) as e:  # the generate subcommand exists (its test comes with the engine)
        main(["humaneval", "generate", "--help"])
    assert e.value.code == 0


def test_all_canonical_solutions_pass() -> None:
    """The harness itself is sound: all 164 reference solutions pass (about 30 s with 2 workers)."""
    summary = humaneval.selftest(workers=2)
    assert summary["failures"] == [] and summary["passed"] == N_PROBLEMS
    assert summary["pass@1"] == 1.0


def test_resume_cuts_a_partial_line(tmp_path: Path) -> None:
    out = tmp_path / "samples.jsonl"
    out.write_text(json.dumps({"task_id": "HumanEval/0", "completion": "x", "sample_idx": 0}) + "\n"
                   + '{"task_id": "HumanEval/0", "compl')
    assert humaneval._read_resumable(out) == {("HumanEval/0", 0)}
    assert out.read_text().endswith("}\n")


def test_canonical_bpb_windows_score_every_token_once() -> None:
    """With a bigram model (prediction depends on the last token only) a short context changes nothing, so
    sliding windows over a small block must give exactly the bpb of one pass over a big block."""
    torch = pytest.importorskip("torch")

    class ByteTokenizer:
        def encode(self, text: str) -> list[int]:
            return list(text.encode("utf-8"))

    class Bigram(torch.nn.Module):
        def __init__(self, block_size: int) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.table = torch.nn.Embedding(256, 256)
            self.config = type("Config", (), {"block_size": block_size})()

        def forward(self, idx, targets=None, all_logits=False):
            assert all_logits and idx.shape[1] <= self.config.block_size
            return self.table(idx), None

    problems = [{"prompt": "def f(x):\n    ", "canonical_solution": "return x * 2  # é\n" * 5},
                {"prompt": "", "canonical_solution": "pass\n"}]
    small, big = Bigram(8), Bigram(4096)
    big.load_state_dict(small.state_dict())
    bpb_small = canonical_bpb(small, ByteTokenizer(), problems)
    assert bpb_small == pytest.approx(canonical_bpb(big, ByteTokenizer(), problems), rel=1e-6)
    # A uniform model pays log2(256) = 8 bits per byte-token; the first byte of an empty prompt is not scored.
    torch.nn.init.zeros_(big.table.weight)
    n_bytes = sum(len(p["canonical_solution"].encode()) for p in problems)
    assert canonical_bpb(big, ByteTokenizer(), problems) == pytest.approx(8 * (n_bytes - 1) / n_bytes)


def assert_one_line_error(argv: list[str], capsys: pytest.CaptureFixture[str], *needles: str) -> str:
    """The CLI refuses `argv` with exit 2 and one stderr line (no traceback: main would have raised)."""
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and captured.out == "", captured.err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("content, needles", [
    (b'{"task_id": "HumanEval/0", "completion": "    return 1\\n"}\n\xff\xfe bad\n', [":2 ", "UTF-8"]),
    ('{"task_id": "HumanEval/0", "completion": "    return 1"}\n{"task_id": "Human\n'.encode(), [":2 ", "not JSON"]),
    (b'[1, 2]\n', [":1 ", "task_id"]),
    (b'{"task_id": 0, "completion": "x"}\n', [":1 ", "task_id"]),
    (b'{"task_id": "HumanEval/0", "completion": null}\n', [":1 ", "completion"]),
    (b'{"task_id": "HumanEval/0", "completion": "x", "sample_idx": "two"}\n', [":1", "sample_idx"]),
    (b'\n\n', ["no samples"]),
])
def test_cli_score_bad_samples_file(tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes,
                                    needles: list[str]) -> None:
    """A samples file that is not UTF-8, not JSON or of the wrong shape: one line naming file and line."""
    path = tmp_path / "samples.jsonl"
    path.write_bytes(content)
    line = assert_one_line_error(["humaneval", "score", str(path)], capsys, *needles)
    assert str(path) in line
    assert not humaneval.results_path(path).exists()


@pytest.mark.parametrize("argv", [
    ["score", "{samples}", "--timeout", "nan"],
    ["score", "{samples}", "--timeout", "inf"],
    ["score", "{samples}", "--timeout", "-1"],
    ["score", "{samples}", "--timeout", "1e9"],
    ["score", "{samples}", "--workers", "0"],
    ["score", "{tmp}"],  # a directory
    ["selftest", "--timeout", "nan"],
    ["selftest", "--limit", "0"],
    ["selftest", "--limit", "-3"],
    ["generate", "no-such-model", "--out", "{tmp}/s.jsonl", "--temperature", "nan"],
    ["generate", "no-such-model", "--out", "{tmp}/s.jsonl", "--temperature", "inf"],
    ["generate", "no-such-model", "--out", "{tmp}/s.jsonl", "--temperature", "-0.5"],
    ["generate", "no-such-model", "--out", "{tmp}/s.jsonl", "--limit", "0"],
    ["generate", "no-such-model", "--out", "{tmp}/s.jsonl", "--n", "0"],
    ["generate", "no-such-model", "--out", "{tmp}"],  # a directory
    ["generate", "no-such-model", "--out", "{samples}/s.jsonl"],  # below a file
    ["generate", "no-such-model", "--out", "{notes}"],  # a file that is not a samples file
])
def test_cli_bad_values(tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    samples = tmp_path / "samples.jsonl"
    samples.write_text(json.dumps({"task_id": "HumanEval/0", "completion": "    return True\n"}) + "\n")
    notes = tmp_path / "notes.txt"
    notes.write_bytes(b"my notes\n\xff\n")
    before = sorted(tmp_path.rglob("*"))
    argv = [a.format(samples=samples, tmp=tmp_path, notes=notes) for a in argv]
    assert_one_line_error(["humaneval", *argv], capsys)
    assert sorted(tmp_path.rglob("*")) == before and notes.read_bytes() == b"my notes\n\xff\n"  # nothing written


def test_cli_score_read_only_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The verdicts cannot be written: refused before any program runs, not after."""
    import os
    import subprocess

    path = tmp_path / "samples.jsonl"
    path.write_text(json.dumps({"task_id": "HumanEval/0", "completion": "    return True\n"}) + "\n")
    mnt = tmp_path / "ro"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "--bind", "-o", "ro", str(tmp_path), str(mnt)],
                                           capture_output=True).returncode != 0:
        tmp_path.chmod(0o500)  # without root a read-only mode stands in for a read-only filesystem
        mnt = tmp_path
        if os.access(tmp_path, os.W_OK):
            pytest.skip("cannot make a read-only folder here")
    try:
        assert_one_line_error(["humaneval", "score", str(mnt / "samples.jsonl")], capsys, "read-only")
    finally:
        if mnt != tmp_path:
            subprocess.run(["umount", str(mnt)], capture_output=True)
        tmp_path.chmod(0o700)


def test_cli_score_non_utf8_in_a_real_process(tmp_path: Path) -> None:
    """The same through `python -m nanophi`: exit 2, one line, no traceback."""
    import subprocess
    import sys

    path = tmp_path / "samples.jsonl"
    path.write_bytes(b"\xff\xfe{}\n")
    proc = subprocess.run([sys.executable, "-m", "nanophi", "humaneval", "score", str(path)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and f"{path}:1" in proc.stderr
