"""`textbook dedup --tasks N` on datatrove's MinHash pipeline: the kept ids and removals of `--tasks 1`."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

pytest.importorskip("datatrove", reason="optional: pip install 'nanophi[data]'")

from nanophi.textbook.dedup import dedup  # noqa: E402
from nanophi.textbook.dedup_scale import dedup_sharded, lsh_bands  # noqa: E402
from nanophi.textbook.records import make_record, read_records  # noqa: E402
from nanophi.textbook.scale import read_removed  # noqa: E402


def planted(tmp_path: Path) -> Path:
    """Distinct documents with planted copies: reformatted (exact), two words changed (near), copies of copies,
    and short snippets (character shingles)."""
    rng = random.Random(0)
    words = "alpha beta gamma delta list dict sort key value index loop return yield class def import".split()
    texts = []
    for i in range(120):
        base = " ".join(rng.choice(words) + str(rng.randrange(50)) for _ in range(60))
        texts.append(base)
        if i % 5 == 0:
            texts.append(base.replace(" ", "\n  ", 4))
        if i % 7 == 0:
            w = base.split()
            w[10], w[30] = "changed", "again"
            texts.append(" ".join(w))
            w[50] = "thrice"  # a near copy of the near copy
            texts.append(" ".join(w))
        if i % 11 == 0:
            texts += [f"def f{i}(x): return x + {i}", f"def f{i}(x):  return x + {i}  # plus"]
    rng.shuffle(texts)
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(make_record(t, {"stage": "pool", "licence": "MIT", "n": i})) + "\n"
                            for i, t in enumerate(texts)))
    return path


def test_dedup_four_tasks_two_workers_equals_one_task(tmp_path):
    src = planted(tmp_path)
    one = dedup(src, tmp_path / "one.jsonl")
    four = dedup_sharded(src, tmp_path / "four", tasks=4, workers=2)
    kept = [r for r in read_records(tmp_path / "four")]
    assert [r["id"] for r in kept] == [r["id"] for r in read_records(tmp_path / "one.jsonl")]
    assert kept == list(read_records(tmp_path / "one.jsonl"))  # provenance carried through unchanged
    assert one["removed_exact"] >= 20 and one["removed_near"] >= 30  # the planted copies were found
    assert {k: four[k] for k in ("n_in", "n_out", "removed_exact", "removed_near")} == {
        k: one[k] for k in ("n_in", "n_out", "removed_exact", "removed_near")}
    row = lambda r: (r["id"], r["reason"], r["duplicate_of"], r["jaccard"])  # noqa: E731
    assert sorted(map(row, read_removed(tmp_path / "four"))) == sorted(
        map(row, read_records(tmp_path / "one.removed.jsonl")))
    assert sorted(p.name for p in (tmp_path / "four").glob("0*.jsonl")) == [f"{i:05d}.jsonl" for i in range(4)]
    assert json.loads((tmp_path / "four" / "stats.json").read_text())["n_out"] == one["n_out"]
    assert (four["bands"], four["rows"]) == lsh_bands(0.7, 128)


def test_dedup_cli_tasks_writes_shards(tmp_path, capsys):
    from nanophi.cli import main as nanophi_main

    src = planted(tmp_path)
    rc = nanophi_main(["textbook", "dedup", str(src), "--out", str(tmp_path / "d"), "--tasks", "2",
                       "--threshold", "0.8"])
    assert rc == 0 and "2 shards" in capsys.readouterr().out
    dedup(src, tmp_path / "one.jsonl", threshold=0.8)
    assert [r["id"] for r in read_records(tmp_path / "d")] == [r["id"] for r in read_records(tmp_path / "one.jsonl")]
