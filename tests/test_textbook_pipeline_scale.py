"""`textbook run --tasks N --workers W`: every datatrove stage gets the tasks; the dataset is that of --tasks 1."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("datatrove", reason="optional: pip install 'nanophi[data]'")

from nanophi.textbook.records import read_records  # noqa: E402


def code_source(tmp_path: Path) -> Path:
    """Functions of mixed quality in The Stack's JSONL shape, with a planted copy and a near copy."""
    rows = []
    for i in range(90):
        good = i % 3 != 0  # documented and typed, or neither (and a test file): the rubric labels both kinds
        doc = f'    """Return x scaled by {i} and shifted by {i % 7}; used by the report {i}."""\n' if good else ""
        body = "".join(f"    y{j} = x * {i + j}  # step {j}\n" for j in range(3 + i % 4))
        head = f"def f_{i}(x: int) -> int:" if good else f"def f_{i}(x):"
        rows.append({"content": f"{head}\n{doc}{body}    return y0 + {i % 7}\n",
                     "max_stars_repo_path": f"repo/m{i}.py" if good else f"tests/test_m{i}.py",
                     "max_stars_repo_licenses": ["MIT"]})
    rows.append(dict(rows[4]))
    rows.append({**rows[8], "content": rows[8]["content"].replace("step 1", "stage 1")})
    path = tmp_path / "stack.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.slow  # ~25 s on 2 loaded cores: two pipeline runs, the filter fit twice
def test_run_pipeline_four_tasks_two_workers_equals_one_task(tmp_path):
    from test_textbook_generate import ScriptedTeacher

    from nanophi.textbook.pipeline import Preset, run_pipeline

    preset = Preset(pool_max_docs=None, labels=60, textbooks=2, exercises=4, textbook_tokens=16, exercise_tokens=16,
                    teacher_batch=4, teacher_quantize=None, pack_tokenizer="char", pack_vocab=256)
    src = str(code_source(tmp_path))
    one = run_pipeline(tmp_path / "one", preset, teacher=ScriptedTeacher(), pool_source=src)
    four = run_pipeline(tmp_path / "four", preset, teacher=ScriptedTeacher(), pool_source=src, tasks=4, workers=2)
    for stage in ("pool", "labels", "filtered", "deduped", "decontaminated", "exercises.verified"):
        assert sorted(p.name for p in (tmp_path / "four" / stage).glob("0*.jsonl")) == [
            f"{i:05d}.jsonl" for i in range(4)], stage
    assert [r["id"] for r in read_records(tmp_path / "four" / "final.jsonl")] == [
        r["id"] for r in read_records(tmp_path / "one" / "final.jsonl")]
    keys = ("pool_docs", "labeled", "filtered_docs", "exercises_verified", "dedup_removed", "final_docs")
    assert {k: four[k] for k in keys} == {k: one[k] for k in keys} and one["dedup_removed"] >= 1
    assert "| dedup |" in (tmp_path / "four" / "CARD.md").read_text()
