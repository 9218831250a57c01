"""The textbook stages on datatrove (`--tasks N --workers W`): the same records as `--tasks 1`, shard-level resume."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

pytest.importorskip("datatrove", reason="optional: pip install 'nanophi[data]'")

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
