"""The case study experiment: exercise parsing, the masked fine-tune, statistics, and the whole run end to end on
constructed records (the `test` preset: micro students, a few HumanEval problems)."""

from __future__ import annotations

import dataclasses
import json
import math
import random
from pathlib import Path

import pytest
import torch

from nanophi.errors import UserError
from nanophi.textbook.experiment import ARMS, PRESETS, run_experiment, teacher_experiment
from nanophi.textbook.experiment.data import (Exercise, load_data, parse_exercise, textbook_mix, verify_exercises)
from nanophi.textbook.experiment.finetune import IGNORE, encode_examples, finetune_masked, make_batch
from nanophi.textbook.experiment.stats import aggregate, direction, mean_ci, sign_test, wilson
from nanophi.textbook.records import make_record, write_jsonl_atomic

EXERCISE = '''Here is the exercise.

```python
import math


def count_scores(scores, limit):
    """Count the scores at or above `limit`.

    Args: scores, a list of numbers; limit, a number. Returns an int."""
    total = 0
    for s in scores:
        if s >= limit:
            total += 1
    return total


assert count_scores([1, 5, 7], 5) == 2
assert count_scores([], 3) == 0
assert count_scores([9], 10) == 0
print("done")
```
'''

OPS = [("add", "+"), ("sub", "-"), ("mul", "*"), ("max", "max"), ("min", "min")]
NOUNS = ["prices", "scores", "weights", "votes", "steps", "grades", "orders", "digits", "names", "codes", "dates",
         "pairs"]


def _function(i: int, rng: random.Random) -> str:
    name, op = OPS[i % len(OPS)]
    noun = NOUNS[i % len(NOUNS)]
    body = f"a {op} b" if op in "+-*" else f"{op}(a, b)"
    return (f"def {name}_{noun}_{i}(items, start={rng.randint(0, 9)}):\n"
            f'    """Fold the {noun} with {name}, beginning at start."""\n'
            f"    result = start\n    for b in items:\n        a = result\n        result = {body}\n    return result\n")


def _exercise(i: int) -> str:
    noun = NOUNS[i % len(NOUNS)]
    k = i + 2
    return (f"```python\ndef scale_{noun}(values):\n"
            f'    """Multiply every one of the {noun} by {k} and return the new list."""\n'
            f"    return [v * {k} for v in values]\n\n\n"
            f"assert scale_{noun}([1, 2]) == [{k}, {2 * k}]\nassert scale_{noun}([]) == []\n```\n")


def make_data_dir(root: Path, n_pool: int = 80, n_exercises: int = 12) -> Path:
    """A pipeline-shaped data directory of constructed records: small, valid, and unlike HumanEval."""
    rng = random.Random(0)
    pool = [make_record(_function(i, rng), {"stage": "pool", "source": "test"}) for i in range(n_pool)]
    textbooks = [make_record(f"## Folding {n}\n\nA fold walks over the {n} and keeps a running result.\n\n"
                             f"```python\n{_function(i, rng)}```\n", {"stage": "generate", "kind": "textbook"})
                 for i, n in enumerate(NOUNS[:4])]
    exercises = [make_record(_exercise(i), {"stage": "generate", "kind": "exercises",
                                            "function_name": f"scale_{NOUNS[i % len(NOUNS)]}"})
                 for i in range(n_exercises)]
    write_jsonl_atomic(root / "pool.jsonl", pool)
    write_jsonl_atomic(root / "filtered.jsonl", pool[::2])
    # the filter's score for every pool document: the experiment's B keeps the top share of these
    write_jsonl_atomic(root / "filtered.scores.jsonl", ({"id": r["id"], "p": round(rng.random(), 3)} for r in pool))
    write_jsonl_atomic(root / "textbooks.jsonl", textbooks)
    write_jsonl_atomic(root / "verified.jsonl", exercises)
    return root


# ------------------------------------------------------------------------------------------------ units

def test_parse_exercise_splits_prompt_solution_and_asserts() -> None:
    ex = parse_exercise({"id": "x", "text": EXERCISE, "provenance": {"function_name": "count_scores"}})
    assert ex is not None and ex.name == "count_scores"
    assert ex.prompt.startswith("import math\n") and ex.prompt.rstrip().endswith('Returns an int."""')
    assert ex.solution.startswith("    total = 0") and "return total" in ex.solution
    assert ex.tests.count("assert") == 3 and "print" not in ex.tests
    # the pieces put back together are a program that passes its own tests, in the sandbox
    assert verify_exercises([ex]) == [True]
    broken = Exercise(ex.id, ex.name, ex.prompt, "    return -1\n", ex.tests)
    assert verify_exercises([broken]) == [False]


def test_parse_exercise_rejects_what_cannot_be_an_exercise() -> None:
    assert parse_exercise({"id": "a", "text": "def f(x):\n    return x\nassert f(1) == 1\n"}) is None  # no docstring
    assert parse_exercise({"id": "b", "text": 'def f(x):\n    """Id."""\n    return x\n'}) is None  # no asserts
    assert parse_exercise({"id": "c", "text": "```python\ndef f(:\n```"}) is None  # does not parse


def test_doctest_exercises_from_a_module(tmp_path: Path) -> None:
    from nanophi.textbook.experiment.exercises import verified_doctest_exercises

    (tmp_path / "mod.py").write_text(
        "import math\n\n\n"
        "def hyp(a, b):\n    \"\"\"Hypotenuse.\n\n    >>> hyp(3, 4)\n    5.0\n    \"\"\"\n    return math.hypot(a, b)\n\n\n"
        "def wrong(a):\n    \"\"\"Double.\n\n    >>> wrong(2)\n    4\n    \"\"\"\n    return a * 3\n\n\n"
        "def skipped(a):\n    \"\"\"Nothing checked.\n\n    >>> skipped(1)  # doctest: +SKIP\n    9\n    \"\"\"\n"
        "    return a\n")
    kept, counts = verified_doctest_exercises(tmp_path)
    assert counts == {"candidates": 3, "verified": 1}  # a wrong example fails; all-skipped examples test nothing
    [ex] = kept
    assert ex.name == "hyp" and ex.source == "stdlib-doctest" and ex.prompt.startswith("import math\n")
    assert ex.solution.strip() == "return math.hypot(a, b)"
    assert verify_exercises([Exercise(ex.id, ex.name, ex.prompt, "    return a + b\n", ex.tests)]) == [False]


def test_masked_batch_scores_only_the_solution() -> None:
    class Tok:
        eot_id = 99

        def encode(self, text: str) -> list[int]:
            return [ord(c) % 90 for c in text]

    ex = Exercise("i", "f", "abc", "de", "assert True\n")
    [(ids, n_prompt)] = encode_examples(Tok(), [ex], block_size=16)
    assert n_prompt == 3 and ids[-1] == 99 and len(ids) == 6
    x, y = make_batch([(ids, n_prompt), ([1, 2, 3], 1)], torch.device("cpu"))
    assert x.shape == y.shape == (2, 5)
    # targets: prompt tokens after the first are ignored; the solution tokens and the end token are scored
    assert y[0].tolist() == [IGNORE, IGNORE, ids[3], ids[4], ids[5]]
    assert y[1].tolist() == [2, 3, IGNORE, IGNORE, IGNORE]
    # a solution longer than the block keeps its start and one prompt token
    [(ids, n_prompt)] = encode_examples(Tok(), [Exercise("j", "f", "abc", "x" * 40, "")], block_size=8)
    assert len(ids) == 9 and n_prompt == 1


def test_finetune_masked_lowers_the_solution_loss() -> None:
    from nanophi.model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=32, vocab_size=40))
    examples = [([1, 2, 3, 4, 5, 6, 7, 8], 3), ([1, 2, 9, 10, 11, 12], 2)]
    stats = finetune_masked(model, examples, steps=40, batch_size=2, lr=1e-2, seed=0)
    assert stats["tokens"] == 40 * 2 * 7 and stats["scored_tokens"] == 40 * (5 + 4)  # 8-token example: 7 targets, 2 prompt
    assert stats["last_loss"] < stats["first_loss"] / 2


def test_exercise_fine_tune_is_capped_in_passes_over_the_exercises() -> None:
    small = PRESETS["small"]
    assert small.ft_steps(19) == math.ceil(small.ft_max_epochs * 19 / small.ft_batch)  # 19, not 150
    assert small.ft_steps(100_000) == small.ft_iters
    assert small.ft_steps(0) == 1


def test_check_all_parses_runs_and_passes() -> None:
    from nanophi.humaneval import load_problems
    from nanophi.textbook.experiment.eval import check_all, summarise_checks

    p = load_problems()[0]
    rows = check_all([p] * 4, [p["canonical_solution"], "    return False\n", "", "    return (\n"])
    assert [(r["passed"], r["parses"], r["runs"]) for r in rows] == [
        (True, True, True),  # right
        (False, True, True),  # runs, fails an assert
        (False, False, False),  # empty: the prompt alone parses, but nothing was written
        (False, False, False),  # a syntax error never reaches the sandbox
    ]
    assert summarise_checks(rows) == {"n": 4, "passed": 1, "pass@1": 0.25, "parse_rate": 0.5, "run_rate": 0.5}


def test_sampled_pass_at_k_is_seeded_and_takes_the_engine_settings(tmp_path: Path) -> None:
    """The one pass@k sampler (the students' arms and the teacher fine-tune both use it): n samples per problem,
    several problems per batch, int8 decoding and top-p passed to the engine, the same samples on a rerun."""
    from nanophi.humaneval import load_problems
    from nanophi.model import GPT, GPTConfig
    from nanophi.textbook.experiment.eval import sampled_pass_at_k
    from nanophi.tokenizer import BPETokenizer

    problems = load_problems()[:2]
    tok = BPETokenizer.train([p["prompt"] for p in problems], vocab_size=300)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=32, block_size=512)).eval()
    runs = []
    for name in ("a.jsonl", "b.jsonl"):
        res = sampled_pass_at_k(model, tok, problems, 6, n=3, seed=7, top_p=0.95, quantize="int8",
                                problems_per_batch=2, samples_path=tmp_path / name)
        runs.append([json.loads(line) for line in (tmp_path / name).read_text().splitlines()])
        assert res["n"] == 3 and res["top_p"] == 0.95 and len(res["solved"]) == 2
        assert res["pass@1"] == 0.0 and "pass@10" not in res  # an untrained model; k > n is not reported
    assert len(runs[0]) == 6 and [r["sample_idx"] for r in runs[0]] == [0, 1, 2, 0, 1, 2]
    assert [r["task_id"] for r in runs[0]] == [problems[0]["task_id"]] * 3 + [problems[1]["task_id"]] * 3
    assert runs[0] == runs[1]


def test_textbook_mix_upsamples_to_the_share() -> None:
    code = [{"id": f"c{i}", "text": "x" * 100} for i in range(10)]
    books = [{"id": "t", "text": "y" * 50}]
    mixed, repeats = textbook_mix(code, books, share=0.2, max_repeats=8, seed=0)
    assert repeats == 5 and len(mixed) == 15 and len({r["id"] for r in mixed}) == 15  # 250 of 1250 chars
    assert textbook_mix(code, books, share=0.9, max_repeats=3, seed=0)[1] == 3


def test_statistics() -> None:
    m, ci = mean_ci([1.0, 3.0])
    assert m == 2.0 and ci is not None and ci[0] == pytest.approx(2 - 12.7062, abs=1e-3)
    assert mean_ci([0.5])[1] is None
    lo, hi = wilson(0, 164)
    assert lo == 0.0 and 0.02 < hi < 0.03
    arm = aggregate([{"humaneval_pass@1": 0.0, "heldout_pass@1": 0.5, "code_bpb": 2.0, "humaneval_bpb": 3.0,
                      "parse_rate": 1.0, "run_rate": 0.5}] * 2)
    assert arm["mean"]["code_bpb"] == 2.0 and arm["ci95"]["code_bpb"] == [2.0, 2.0]
    rows = {"better": {"seeds": [{"humaneval_bpb": 2.0}, {"humaneval_bpb": 2.1}, {"humaneval_bpb": 2.05}]},
            "worse": {"seeds": [{"humaneval_bpb": 2.5}, {"humaneval_bpb": 2.6}, {"humaneval_bpb": 2.5}]}}
    assert direction({"arms": rows}, "better", "worse", "humaneval_bpb")["verdict"] == "held"
    assert direction({"arms": rows}, "worse", "better", "humaneval_bpb")["verdict"] == "reversed"


def test_sign_test_and_per_problem_directions() -> None:
    # 5 problems only the better arm solves, none the other way: p = 2 / 2**5
    t = sign_test([1, 1, 1, 1, 1, 0, 2], [0, 0, 0, 0, 0, 0, 2])
    assert (t["better"], t["worse"], t["ties"]) == (5, 0, 2) and t["p"] == pytest.approx(0.0625)
    assert sign_test([3, 0], [0, 3])["p"] == 1.0 and sign_test([0], [0])["p"] == 1.0
    assert sign_test([1] * 6, [0] * 6)["p"] == pytest.approx(2 / 64)
    seeds = lambda solved: [{"humaneval_pass@1": sum(s) / len(s), "humaneval_greedy_solved": s} for s in solved]  # noqa: E731
    results = {"arms": {"x": {"seeds": seeds([[1, 1, 1, 0, 1, 1, 1], [1, 0, 1, 1, 1, 1, 1]])},
                        "y": {"seeds": seeds([[0] * 7, [0] * 7])}}}
    d = direction(results, "x", "y", "humaneval_pass@1")
    assert d["per_problem"]["better"] == 7 and d["per_problem_verdict"] == "held"
    assert direction(results, "y", "x", "humaneval_pass@1")["per_problem_verdict"] == "reversed"


def test_curves_aggregate_with_seed_bands() -> None:
    rows = [{"humaneval_bpb": 2.0, "curve": [{"tokens_seen": 10, "humaneval_bpb": 3.0, "heldout_bpb": 2.0},
                                             {"tokens_seen": 20, "humaneval_bpb": 2.0, "heldout_bpb": 1.5}]},
            {"humaneval_bpb": 2.2, "curve": [{"tokens_seen": 10, "humaneval_bpb": 3.4, "heldout_bpb": 2.2},
                                             {"tokens_seen": 20, "humaneval_bpb": 2.2, "heldout_bpb": 1.7}]}]
    curve = aggregate(rows)["curve"]
    assert [p["tokens_seen"] for p in curve] == [10, 20]
    assert curve[0]["humaneval_bpb"] == pytest.approx(3.2) and curve[0]["humaneval_bpb_range"] == [3.0, 3.4]
    assert curve[1]["heldout_bpb_range"] == [1.5, 1.7]


def test_full_preset_is_a_real_gpu_run() -> None:
    """The full preset is not run in CI; its students must still build, and its sizes match their derivation."""
    from nanophi.config import resolve
    from nanophi.model import GPT
    from nanophi.textbook.experiment import FULL_PRESET_SIZING

    full = PRESETS["full"]
    assert full.device == "auto" and full.samples >= 20 and full.seeds >= 2 and full.curve_points >= 5
    assert full.pretrain_tokens() == FULL_PRESET_SIZING["pretrain_tokens_per_run"]
    cfg = resolve({"preset": "gpt2", "n_layer": full.n_layer, "n_head": full.n_head, "n_embd": full.n_embd,
                   "block_size": full.block_size, "vocab_size": full.vocab_size, "dropout": 0.0,
                   "batch_size": full.batch_size, "max_iters": full.pretrain_iters, "tokenizer": "bpe"})
    with torch.device("meta"):  # the shapes, without allocating 14M parameters
        model = GPT(dataclasses.replace(cfg.model, vocab_size=full.vocab_size))
    n = sum(p.numel() for p in model.parameters())
    flops = 6 * n + 12 * full.n_layer * full.n_embd * full.block_size
    assert flops / 1e6 == pytest.approx(FULL_PRESET_SIZING["student_mflop_per_token"], rel=0.1)


# ------------------------------------------------------------------------------------------------ end to end

@pytest.fixture(scope="module")
def experiment(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    root = tmp_path_factory.mktemp("experiment")
    data_dir = make_data_dir(root / "data")
    results = run_experiment("test", root / "out", data_dir=data_dir, teacher=None)
    return root / "out", data_dir, results


def test_experiment_end_to_end(experiment: tuple[Path, Path, dict]) -> None:
    out, _, results = experiment
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["arms"].keys() == set(ARMS) and on_disk == json.loads(json.dumps(results))
    preset = PRESETS["test"]
    for name, arm in on_disk["arms"].items():
        assert len(arm["seeds"]) == preset.seeds
        for metric in ("humaneval_pass@1", "heldout_pass@1", "code_bpb"):
            assert metric in arm["mean"] and metric in arm["ci95"]
        for row in arm["seeds"]:
            assert row["humaneval_n"] == preset.humaneval_limit
            assert 0 <= row["humaneval_passed"] <= row["humaneval_n"]
            assert row["humaneval_pass@1"] == row["humaneval_passed"] / row["humaneval_n"]
            assert row["heldout_n"] == on_disk["data"]["n_heldout_exercises"] >= 1
            assert 0.0 <= row["run_rate"] <= row["parse_rate"] <= 1.0
            # an untrained model of vocab V scores about log2(V) bits per token; trained ones do far better
            assert 0.1 < row["code_bpb"] < 20 and math.isfinite(row["humaneval_bpb"])
            # equal budgets: every arm pretrains on the same tokens; the D arms add the same fine-tune
            assert row["pretrain_tokens"] == preset.pretrain_tokens()
            assert row["finetune_tokens"] == (on_disk["budget"]["finetune_tokens"] if "->" in name else 0)
        samples = (out / "runs").rglob("humaneval_samples.jsonl")
        assert sum(1 for _ in samples) == preset.seeds * len(ARMS)
    assert on_disk["budget"]["finetune_tokens"] > 0
    # A_small: a raw-pool sample as large as B, so the same budget makes about as many passes over it as over B
    data_a, data_b, data_s = (on_disk["arms"][a]["data"] for a in ("A", "B", "A_small"))
    assert data_s["unique_tokens"] == pytest.approx(data_b["unique_tokens"], rel=0.2)
    assert data_s["unique_tokens"] < data_a["unique_tokens"]
    assert data_s["passes"] == pytest.approx(data_b["passes"], rel=0.2) and data_s["tokens_seen"] == data_b["tokens_seen"]
    for name, arm in on_disk["arms"].items():
        assert arm["data"]["passes"] == pytest.approx(preset.pretrain_tokens() / (
            arm["data"]["unique_tokens"] - arm["data"].get("exercise_tokens", 0)))
        assert arm["samples_per_problem"] == preset.samples and "humaneval_pass@10" in arm["mean"]
        # curves: curve_points probes during pretraining (the D arms add the fine-tune's end), tokens increasing
        assert len(arm["curve"]) == preset.curve_points + ("->" in name)
        assert [p["tokens_seen"] for p in arm["curve"]] == sorted({p["tokens_seen"] for p in arm["curve"]})
        for row in arm["seeds"]:
            assert len(row["humaneval_sampled_solved"]) == preset.humaneval_limit
            assert all(0 <= c <= preset.samples for c in row["humaneval_sampled_solved"])
            assert row["humaneval_sampled_pass@1"] <= row["humaneval_pass@10"] <= 1.0
            # the last probe is the trained model itself: the same bits per byte `measure` reports
            assert row["curve"][-1]["humaneval_bpb"] == pytest.approx(row["humaneval_bpb"], rel=1e-5)
            assert row["curve"][-1]["heldout_bpb"] == pytest.approx(row["code_bpb"], rel=1e-5)
        sampled = (out / "runs").rglob("humaneval_sampled.jsonl")
        assert sum(1 for _ in sampled) == preset.seeds * len(ARMS)
    from nanophi.textbook.experiment.stats import directions
    names = {(d["better"], d["worse"]) for d in directions(on_disk)}
    assert {("B", "A_small"), ("A", "A_small"), ("B", "A")} <= names
    assert on_disk["data"]["filter_keep"] == preset.filter_keep and on_disk["data"]["n_filtered"] < on_disk["data"]["n_pool"]
    assert on_disk["teacher_finetune"] == {"skipped": "no teacher given"}
    # the data were split before training: held-out code and exercises never reach an arm's corpus
    data = load_data(experiment[1], seed=0, heldout_code_fraction=preset.heldout_code_fraction,
                     heldout_exercise_fraction=preset.heldout_exercise_fraction, tau=preset.tau)
    corpus_a = [json.loads(line)["text"] for line in (out / "arms" / "A" / "corpus.jsonl").read_text().splitlines()]
    assert len(corpus_a) == on_disk["data"]["n_pool"] and data.heldout_code
    assert not set(data.heldout_code) & set(corpus_a)
    assert not {e.id for e in data.heldout_exercises} & {e.id for e in data.train_exercises}
    report = (out / "report.md").read_text()
    for heading in ("## What each arm trained on", "## Results by arm", "## Curves", "## Beside the paper",
                    "## Which of the paper's directions held here",
                    "## Decontamination: our τ sweep", "## Limitations"):
        assert heading in report
    assert "50.6" in report and "12.19" in report and "20.12" in report and "96K steps" in report
    assert "~50B" in report and "A_small" in report and "pass@10" in report
    assert {p.name for p in (out / "figures").glob("*.png")} >= {"curves.png", "scale.png"}
    html = (out / "report.html").read_text()
    assert "<table>" in html and "data:image/png;base64," in html
    # a rerun finds every model measured and only rebuilds the summary
    again = run_experiment("test", out, data_dir=experiment[1], teacher=None)
    assert again["arms"] == results["arms"]


def test_teacher_experiment_on_a_student(experiment: tuple[Path, Path, dict], tmp_path: Path) -> None:
    """Jina's experiment, with a trained student standing in for the 135M teacher (same code path)."""
    out, data_dir, _ = experiment
    preset = PRESETS["test"]
    data = load_data(data_dir, seed=0, heldout_code_fraction=preset.heldout_code_fraction,
                     heldout_exercise_fraction=preset.heldout_exercise_fraction, tau=preset.tau)
    result = teacher_experiment(str(out / "runs" / "A" / "seed0"), data, preset, tmp_path)
    for when in ("before", "after"):
        assert result[when]["humaneval"]["n"] == preset.teacher_limit
        assert result[when]["heldout"]["n"] == len(data.heldout_exercises)
    assert result["finetune"]["steps"] == preset.teacher_ft_steps and result["finetune"]["scored_tokens"] > 0
    assert (tmp_path / "after_humaneval.jsonl").read_text().count("\n") == preset.teacher_limit


class ScriptedTeacher:
    """Answers every exercise prompt with a correct exercise for the function it asks for, and every textbook
    prompt with a short section: the pipeline's logic runs for real, only the model is scripted."""

    name = "scripted"

    def chat(self, prompts: list[str], max_tokens: int, temperature: float, seed: int | None = None) -> list[str]:
        import re

        out = []
        for p in prompts:
            names = re.findall(r"`(\w+)`", p)  # the template names the function last
            if "exercise" in p and names:
                f = names[-1]
                out.append(f'```python\ndef {f}(xs):\n    """Return the items of xs doubled."""\n'
                           f"    return [2 * x for x in xs]\n\n\nassert {f}([1, 2]) == [2, 4]\nassert {f}([]) == []\n```")
            else:
                out.append("## Lists\n\nA list holds items in order; a loop visits each one.\n\n```python\n"
                           "total = 0\nfor x in [1, 2, 3]:\n    total += x\n```\n" + "More prose. " * 20)
        return out

    def complete(self, prompts: list[str], max_tokens: int, temperature: float, seed: int | None = None) -> list[str]:
        return self.chat(prompts, max_tokens, temperature, seed)


def test_build_data_dir_runs_the_pipeline(tmp_path: Path) -> None:
    """Without --data-dir the experiment runs `nanophi textbook run` and reads what it wrote."""
    from nanophi.textbook.experiment.data import DataSpec, build_data_dir

    spec = DataSpec(pool_docs=80, labels=40, textbooks=2, exercises=6, teacher_batch=4)
    data_dir = build_data_dir(tmp_path / "data", spec, teacher_ref="scripted", seed=0, teacher=ScriptedTeacher())
    data = load_data(data_dir, seed=0, heldout_code_fraction=0.1, heldout_exercise_fraction=0.25, tau=0.9,
                     filter_keep=0.3)
    assert data.stats["exercises"]["verified_records"] == 6 and data.stats["exercises"]["parsed"] == 6
    assert len(data.train_exercises) + len(data.heldout_exercises) == 6 and data.heldout_exercises
    assert len(data.textbooks) == 2 and 0 < len(data.filtered) < len(data.pool) + len(data.heldout_code)


@pytest.mark.parametrize("name,docs", [("small", "docs/case_study/results.json"),
                                       ("tiny", "docs/case_study/tiny/results.json")])
def test_published_results_match_the_committed_reports(name: str, docs: str) -> None:
    """The package-data copies (what a Colab install reads) are the reports' own results, byte for byte."""
    from nanophi.textbook.experiment import report as experiment_report

    root = Path(__file__).resolve().parents[1]
    shipped = root / "src" / "nanophi" / "textbook" / "results" / f"{name}.json"
    assert shipped.read_bytes() == (root / docs).read_bytes(), f"copy {docs} to {shipped} after a new run"
    assert experiment_report.published_results(name) == json.loads((root / docs).read_text())


def test_committed_report_and_doc_are_generated_from_results() -> None:
    """report.md and docs/case_study.md's results section are what experiment.report writes from results.json:
    no number typed by hand (rewrite both with `python -m nanophi.textbook.experiment.report
    docs/case_study/results.json --doc docs/case_study.md`)."""
    from nanophi.textbook.experiment.report import DOC_BEGIN, DOC_END, case_study_section, report_markdown

    root = Path(__file__).resolve().parents[1]
    run = root / "docs" / "case_study"
    results = json.loads((run / "results.json").read_text())
    figs = {p.stem: p for p in (run / "figures").glob("*.png")}
    names = {"pass_at_1": "pass", "bits_per_byte": "bpb", "tau_sweep": "tau", "curves": "curves", "scale": "scale"}
    figs = {names[k]: p for k, p in figs.items() if k in names}
    assert (run / "report.md").read_text(encoding="utf-8") == report_markdown(results, figs, run)
    doc = (root / "docs" / "case_study.md").read_text(encoding="utf-8")
    section = doc[doc.index(DOC_BEGIN):doc.index(DOC_END) + len(DOC_END)]
    assert section == case_study_section(results)


def test_a_given_exercise_split_replaces_the_coin(tmp_path: Path) -> None:
    """The mined exercise set brings its own 100 held-out problems: load_data hands the teacher's verified
    exercises to the split function and trains and tests on what it returns (decontaminated as before)."""
    data_dir = make_data_dir(tmp_path / "data")
    seen: list[list[Exercise]] = []
    mined = parse_exercise({"id": "mined-1", "source": "doctest:x", "text": (
        "```python\ndef triple(x):\n    \"\"\"Three times x.\"\"\"\n    return 3 * x\n\n\nassert triple(2) == 6\n```")})
    assert mined is not None

    def split(teacher: list[Exercise]) -> tuple[list[Exercise], list[Exercise]]:
        seen.append(teacher)
        return teacher, [mined]
    data = load_data(data_dir, seed=0, heldout_code_fraction=0.15, heldout_exercise_fraction=0.25, tau=0.9,
                     exercise_split=split)
    assert len(seen) == 1 and seen[0] and data.heldout_exercises == [mined]
    assert {e.id for e in data.train_exercises} <= {e.id for e in seen[0]}
    assert data.stats["exercises"]["split"] == "exercise_set" and data.stats["n_heldout_exercises"] == 1


def test_a_separate_teacher_run_is_reported_with_its_sampled_pass_at_10() -> None:
    """`--teacher-result`: the committed Jina's-experiment run, read as the report reads its own."""
    from nanophi.textbook.experiment.tables import teacher_rows

    path = Path(__file__).parents[1] / "artifacts" / "teacher" / "full" / "metrics.json"
    rows = "\n".join(teacher_rows({**json.loads(path.read_text()), "source": str(path)}))
    assert "| before | 0/164" in rows and "| after | 3/164" in rows and "pass@10 5.0 %" in rows
    assert "artifacts/teacher/full" in rows and "best loss" in rows
    with pytest.raises(UserError, match="--teacher-result"):
        run_experiment("test", "/nonexistent/out", teacher=None, teacher_result="/nonexistent/metrics.json")


def test_a_subset_of_arms_resumes_and_reports_only_those(experiment: tuple[Path, Path, dict], tmp_path: Path) -> None:
    """`--arms A,A_small,B`: the measured arms are read back, the report says which arms were left out, and only
    the directions between arms that ran are given."""
    import shutil

    from nanophi.textbook.experiment.stats import directions

    out = tmp_path / "out"
    shutil.copytree(experiment[0], out)
    results = run_experiment("test", out, data_dir=experiment[1], teacher=None, arms=["B", "A", "A_small"])
    assert list(results["arms"]) == ["A", "A_small", "B"] and results["resumed_models"] == 3 * PRESETS["test"].seeds
    assert results["arms"]["B"] == experiment[2]["arms"]["B"]
    assert results["arms_left_out"] == ["B+C", "(B+C)->D", "A->D"]
    assert {(d["better"], d["worse"]) for d in directions(results)} == {("B", "A"), ("B", "A_small"), ("A", "A_small")}
    assert "Arms not run here: B+C, (B+C)->D, A->D" in (out / "report.md").read_text()
    with pytest.raises(UserError, match="add B\\+C to --arms"):
        run_experiment("test", out, data_dir=experiment[1], teacher=None, arms=["A", "(B+C)->D"])
    with pytest.raises(UserError, match="unknown arm"):
        run_experiment("test", out, data_dir=experiment[1], teacher=None, arms=["C"])
