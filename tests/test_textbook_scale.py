"""The textbook stages on datatrove (`--tasks N --workers W`): the same records as `--tasks 1`, shard-level resume."""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import pytest

pytest.importorskip("datatrove", reason="optional: pip install 'nanophi[data]'")

from nanophi.errors import UserError  # noqa: E402
from nanophi.textbook import decontaminate as dec  # noqa: E402
from nanophi.textbook.records import make_record, read_records  # noqa: E402
from nanophi.textbook.scale import read_removed  # noqa: E402


@pytest.fixture
def mixed(tmp_path) -> Path:
    """HumanEval copies shuffled among distinct little functions."""
    problems = dec.load_humaneval()
    texts = [p["prompt"] + p["canonical_solution"] for p in problems[:8]]
    texts += [f"def add_{i}(x: int) -> int:\n    return x + {i} * {i % 7}\n" for i in range(120)]
    random.Random(0).shuffle(texts)
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(make_record(t, {"stage": "test"})) + "\n" for t in texts))
    return path


def ids(path: Path) -> list[str]:
    return [r["id"] for r in read_records(path)]


def test_decontaminate_four_tasks_two_workers_equals_one_task(tmp_path, mixed):
    dec.decontaminate(mixed, tmp_path / "one.jsonl")
    stats = dec.decontaminate_sharded(mixed, tmp_path / "four", tasks=4, workers=2)
    assert ids(tmp_path / "four") == ids(tmp_path / "one.jsonl") and len(ids(tmp_path / "one.jsonl")) == 120
    assert sorted(p.name for p in (tmp_path / "four").glob("0*.jsonl")) == [f"{i:05d}.jsonl" for i in range(4)]
    assert (stats["n_in"], stats["n_out"]) == (128, 120)
    assert json.loads((tmp_path / "four" / "stats.json").read_text())["n_out"] == 120
    assert sorted(r["id"] for r in read_removed(tmp_path / "four")) == sorted(
        r["id"] for r in read_records(tmp_path / "one.removed.jsonl"))


def test_a_lost_shard_is_redone_without_loss_or_duplicates(tmp_path, mixed):
    out = tmp_path / "four"
    dec.decontaminate_sharded(mixed, out, tasks=4, workers=2)
    want = ids(out)
    # what a kill -9 in task 2 leaves: no completion marker and no shard (shards are renamed into place whole)
    (out / ".datatrove" / "completions" / "00002").unlink()
    (out / "00002.jsonl").unlink()
    before = {p: p.stat().st_mtime_ns for p in out.glob("0*.jsonl")}
    dec.decontaminate_sharded(mixed, out, tasks=4, workers=2)
    assert ids(out) == want and len(set(want)) == len(want)
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())  # finished shards were not redone


def code_pool(tmp_path) -> Path:
    """Little functions of mixed quality (some documented, typed, some not) and one text twice."""
    texts = []
    for i in range(48):
        doc = f'    """Scale x by {i} and shift it."""\n' if i % 3 else ""
        hint = ("x: int", " -> int") if i % 2 else ("x", "")
        texts.append(f"def f_{i}({hint[0]}){hint[1]}:\n{doc}    y = x * {i}  # scale\n    return y + {i % 5}\n")
    texts.append(texts[5])
    paths = [f"test_m{i}.py" if i % 4 == 0 else f"m{i}.py" for i in range(len(texts))]  # tests score low
    path = tmp_path / "pool.jsonl"
    path.write_text("".join(json.dumps(make_record(t, {"stage": "pool", "path": p})) + "\n"
                            for t, p in zip(texts, paths)))
    return path


def test_annotate_four_tasks_two_workers_equals_one_task(tmp_path):
    from nanophi.textbook import annotate as ann

    pool = code_pool(tmp_path)
    one = ann.annotate(pool, tmp_path / "one.jsonl", n=40, seed=1)
    four = ann.annotate_sharded(pool, tmp_path / "four", tasks=4, workers=2, n=40, seed=1)
    labels = lambda p: [(r["id"], r["label"], r["score"], r["provenance"]["pool"]["path"])  # noqa: E731
                        for r in read_records(p)]
    assert labels(tmp_path / "four") == labels(tmp_path / "one.jsonl") and 0 < one["n_positive"] < one["n_out"]
    assert {k: four[k] for k in ("n_out", "n_positive", "n_negative")} == {
        k: one[k] for k in ("n_out", "n_positive", "n_negative")}


def test_annotate_cli_keeps_the_judge_on_one_process(tmp_path, capsys):
    from nanophi.cli import main as nanophi_main

    pool = code_pool(tmp_path)
    rc = nanophi_main(["textbook", "annotate", str(pool), "--out", str(tmp_path / "j"), "--tasks", "2",
                       "--labeler", "llm"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1 and "--tasks 1" in err[0]


EXERCISE = '''```python
def {name}(x):
    """Twice x."""
    return 2 * x

assert {name}(2) == {want}
```'''


def test_verify_four_tasks_two_workers_equals_one_task(tmp_path):
    from nanophi.textbook import verify as ver

    recs = [make_record(EXERCISE.format(name="double", want=4), {"function_name": "double"}, kind="exercises"),
            make_record(EXERCISE.format(name="twice", want=4), {"function_name": "twice"}, kind="exercises"),
            make_record(EXERCISE.format(name="wrong", want=5), {"function_name": "wrong"}, kind="exercises"),
            make_record("```python\ndef f(x):\n    return x\n```", {"function_name": "f"}, kind="exercises")]
    recs += [make_record(f"Lists keep order, lesson {i}. " * 12 + ("```python\nxs = [1]\n```" if i % 2 else
                         "```python\nfor x in xs\n```"), {}, kind="textbook") for i in range(6)]
    src = tmp_path / "gen.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in recs))
    ver.verify(src, tmp_path / "one.jsonl", timeout=2.0, workers=2)
    stats = ver.verify_sharded(src, tmp_path / "four", tasks=4, workers=2, timeout=2.0)
    rows = lambda p: [(r["id"], r["text"]) for r in read_records(p)]  # noqa: E731
    assert rows(tmp_path / "four") == rows(tmp_path / "one.jsonl") and len(rows(tmp_path / "four")) == 5
    assert (stats["n_in"], stats["n_out"]) == (10, 5)
    assert sorted((r["id"], r["reason"]) for r in read_removed(tmp_path / "four")) == sorted(
        (r["id"], r["reason"]) for r in read_records(tmp_path / "one.removed.jsonl"))


def test_pool_four_tasks_two_workers_equals_one_task_for_files_parquet_and_jsonl(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    from nanophi.textbook.pool import build_pool, build_pool_sharded

    texts = [f"def g_{i}(x):\n    '''Add {i} to x, return the sum.'''\n    total = x + {i}\n    return total\n"
             for i in range(30)]
    texts[7] = "def broken(:\n" * 10
    folder = tmp_path / "py"
    folder.mkdir()
    for i, t in enumerate(texts):
        (folder / f"m{i:02d}.py").write_text(t)
    rows = [{"content": t, "max_stars_repo_path": f"r/m{i}.py", "max_stars_repo_licenses": ["MIT"]}
            for i, t in enumerate(texts)]
    stack = tmp_path / "stack"
    stack.mkdir()
    pq.write_table(pa.Table.from_pylist(rows[:10]), stack / "a.parquet", row_group_size=3)
    pq.write_table(pa.Table.from_pylist(rows[10:]), stack / "b.parquet", row_group_size=7)
    jsonl = tmp_path / "stack.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    sources = [("py", folder), ("parquet", stack), ("jsonl", jsonl)]
    if importlib.util.find_spec("datasets") is not None:
        import datasets

        datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
        sources.append(("saved", tmp_path / "saved"))
    for name, src in sources:
        one = build_pool(str(src), tmp_path / f"{name}.jsonl", split="function", licence="x")
        four = build_pool_sharded(str(src), tmp_path / name, tasks=4, workers=2, split="function", licence="x")
        want = [(r["id"], r["provenance"]["path"], r["provenance"]["licence"])
                for r in read_records(tmp_path / f"{name}.jsonl")]
        assert [(r["id"], r["provenance"]["path"], r["provenance"]["licence"])
                for r in read_records(tmp_path / name)] == want and len(want) == 29, name
        assert (four["n_out"], four["n_files"], four["skipped_unparsable"]) == (29, 30, 1) == (
            one["n_out"], one["n_files"], one["skipped_unparsable"])
    gz = tmp_path / "stack.jsonl.gz"
    gz.write_bytes(b"")
    with pytest.raises(UserError, match="a stream is read by one task"):  # in this process, before any task
        build_pool_sharded(str(gz), tmp_path / "gz", tasks=2, workers=1)


def test_a_corrupt_line_is_one_clear_error_and_its_shard_is_not_marked_done(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id":"a","text":"x = 1"}\nnot json\n' + "".join(
        json.dumps(make_record(f"y = {i}", {})) + "\n" for i in range(6)))
    with pytest.raises(UserError, match=r"bad.jsonl: the line at byte 26 is not a JSON record"):
        dec.decontaminate_sharded(bad, tmp_path / "out", tasks=2, workers=2)
    assert not (tmp_path / "out" / "00000.jsonl").exists()
    assert not (tmp_path / "out" / ".datatrove" / "completions" / "00000").exists()


def test_filter_four_tasks_two_workers_equals_one_task(tmp_path):
    from nanophi.textbook import annotate as ann
    from nanophi.textbook.filter import filter_sharded, train_filter

    pool = code_pool(tmp_path)
    ann.annotate(pool, tmp_path / "labels.jsonl", n=48, seed=0)
    one = train_filter(tmp_path / "labels.jsonl", pool, tmp_path / "one.jsonl", n_trees=20)
    four = filter_sharded(tmp_path / "labels.jsonl", pool, tmp_path / "four", tasks=4, workers=2, n_trees=20)
    assert list(read_records(tmp_path / "four")) == list(read_records(tmp_path / "one.jsonl"))
    assert 0 < one["n_out"] < one["n_in"] == four["n_in"] == 49
    assert {k: four[k] for k in ("n_out", "metrics", "p_quantiles")} == {
        k: one[k] for k in ("n_out", "metrics", "p_quantiles")}
    scores = {r["id"]: r["p"] for r in read_records(tmp_path / "one.scores.jsonl")}
    assert {r["id"]: r["p"] for r in read_removed(tmp_path / "four")} == {
        i: p for i, p in scores.items() if p < 0.5}


def test_executor_options_reach_the_slurm_and_ray_executors(tmp_path, monkeypatch):
    """Constructed, not submitted: the options a user gives are the executors' settings."""
    import shutil

    from nanophi.textbook import scale

    opts = scale.ExecutorOptions(kind="slurm", partition="cpu", time="02:30:00", cpus_per_task=4, mem_per_cpu_gb=3,
                                 env_command="source /opt/env/bin/activate")
    with pytest.raises(UserError, match="sbatch, which is not on PATH"):
        monkeypatch.setattr(shutil, "which", lambda name: None)
        scale.make_executor(opts, [], tasks=8, workers=4, logging_dir=str(tmp_path / "logs"))
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}")
    first = scale.make_executor(opts, [], tasks=8, workers=4, logging_dir=str(tmp_path / "a"), job_name="sigs")
    slurm = scale.make_executor(opts, [], tasks=14, workers=4, logging_dir=str(tmp_path / "b"), depends=first)
    assert (slurm.partition, slurm.time, slurm.cpus_per_task, slurm.mem_per_cpu_gb, slurm.tasks, slurm.workers,
            slurm.env_command, slurm.depends) == ("cpu", "02:30:00", 4, 3, 14, 4, "source /opt/env/bin/activate",
                                                  first)
    assert first.job_name == "sigs"
    with pytest.raises(UserError, match="--partition"):
        scale.ExecutorOptions(kind="slurm")

    ray_opts = scale.ExecutorOptions(kind="ray", time="1:00:00", cpus_per_task=2, mem_per_cpu_gb=4)
    real_find_spec = scale.importlib.util.find_spec
    monkeypatch.setattr(scale.importlib.util, "find_spec", lambda name: None if name == "ray" else real_find_spec(name))
    with pytest.raises(UserError, match=r"pip install 'ray\[default\]'"):
        scale.make_executor(ray_opts, [], tasks=8, workers=2, logging_dir=str(tmp_path / "r"))
    monkeypatch.setattr(scale.importlib.util, "find_spec", lambda name: object() if name == "ray" else
                        real_find_spec(name))
    ray = scale.make_executor(ray_opts, [], tasks=8, workers=2, logging_dir=str(tmp_path / "r"))
    assert (ray.tasks, ray.workers, ray.cpus_per_task, ray.mem_per_cpu_gb, ray.time) == (8, 2, 2, 4, 3600)
    local = scale.make_executor(scale.LOCAL, [], tasks=2, workers=8, logging_dir=str(tmp_path / "l"))
    assert (type(local).__name__, local.tasks, local.workers) == ("LocalPipelineExecutor", 2, 2)


def test_executor_flags_reach_the_stage(tmp_path, monkeypatch):
    from nanophi.cli import main as nanophi_main
    from nanophi.textbook import dedup_scale

    seen = {}

    def fake(in_path, out, **kw):
        seen.update(kw)
        return {"stage": "dedup", "submitted": True, "executor": kw["executor"].kind}

    monkeypatch.setattr(dedup_scale, "dedup_sharded", fake)
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps(make_record("x = 1", {})) + "\n")
    rc = nanophi_main(["textbook", "dedup", str(src), "--out", str(tmp_path / "d"), "--tasks", "64", "--workers",
                       "32", "--executor", "slurm", "--partition", "cpu", "--time", "1:00:00", "--cpus-per-task", "2"])
    assert rc == 0 and (seen["tasks"], seen["workers"]) == (64, 32)
    assert seen["executor"] == dedup_scale.ExecutorOptions(kind="slurm", partition="cpu", time="1:00:00",
                                                           cpus_per_task=2)


@pytest.mark.slow  # ~20 s on 2 loaded cores: three runs of a 3,000-record stage, two of them CLI subprocesses
def test_kill_9_mid_stage_then_rerun_loses_and_duplicates_nothing(tmp_path):
    """A real SIGKILL of the whole stage (the CLI and its task processes) while some shards are done."""
    import os
    import signal
    import subprocess
    import sys
    import time

    texts = [f"def fn_{i}(values: list[int]) -> int:\n    total = 0\n    for v in values:\n"
             f"        if v % {i % 5 + 2} == 0:\n            total += v * {i}\n    return total - {i}\n"
             for i in range(3000)]
    texts += [p["prompt"] + p["canonical_solution"] for p in dec.load_humaneval()[:5]]
    random.Random(1).shuffle(texts)
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(make_record(t, {"stage": "pool"})) + "\n" for t in texts))
    out = tmp_path / "four"
    cmd = [sys.executable, "-m", "nanophi", "textbook", "decontaminate", str(src), "--out", str(out),
           "--tasks", "4", "--workers", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    done = out / ".datatrove" / "completions"
    deadline = time.monotonic() + 120
    while not (done.is_dir() and any(done.iterdir())) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the CLI and the task processes it forked
    proc.wait()
    finished = len(list(done.iterdir())) if done.is_dir() else 0
    assert 0 < finished < 4, f"the kill came with {finished} of 4 tasks done; the input is too small to catch it"
    rerun = subprocess.run(cmd, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    dec.decontaminate(src, tmp_path / "one.jsonl")
    got, want = ids(out), ids(tmp_path / "one.jsonl")
    assert got == want and len(set(got)) == len(got) == 3000
    assert not list(out.glob(".*.tmp"))  # what the killed tasks were writing is gone


def test_verify_takes_the_executor_options(tmp_path, monkeypatch):
    """verify --tasks N --executor slurm: the same options and the same one-line refusal as the other stages."""
    import argparse
    import shutil

    from nanophi.textbook.verify import add_verify_arguments, run_verify

    parser = argparse.ArgumentParser()
    add_verify_arguments(parser)
    args = parser.parse_args([str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "out"), "--tasks", "2",
                              "--executor", "slurm", "--partition", "cpu"])
    assert (args.executor, args.partition) == ("slurm", "cpu")
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(UserError, match="sbatch, which is not on PATH"):
        run_verify(args)
