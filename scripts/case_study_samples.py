"""The case-study students' own completions, published: artifacts/case-study/{samples.md,samples.jsonl,metrics.json}.

    nanophi textbook run --preset tiny --out runs/cs-data
    nanophi textbook experiment --preset tiny --seeds 1 --out runs/cs-tiny --data-dir runs/cs-data --teacher none
    python scripts/case_study_samples.py runs/cs-tiny --data-dir runs/cs-data

The experiment keeps no student weights, but it writes every completion it checked, with the sandbox's verdict,
beside each model (OUT/runs/<arm>/seed<k>/{humaneval,heldout}_samples.jsonl). This script reuses those verdicts
rather than generating again: the first `--problems` HumanEval problems and `--problems` held-out exercises, for
every arm, with their prompts, into one folder of a few tens of kB. The teacher's before/after counterpart is
artifacts/teacher/ (`scripts/artifacts.py --teacher`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
N_PROBLEMS = 10  # per split: enough to see what the students write, small enough to read
SPLITS = {"humaneval": "HumanEval", "heldout": "held-out exercises"}
VERDICT_KEYS = ("passed", "parses", "runs", "status", "reason")
PHI1_SMALL_PARAMS = 350e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a `nanophi textbook experiment` output folder (results.json, runs/)")
    parser.add_argument("--data-dir", help="the pipeline folder the experiment read (for pipeline-written held-out "
                                           "exercises; the stdlib's are in RUN/stdlib_exercises.jsonl)")
    parser.add_argument("--out", default=str(ROOT / "artifacts" / "case-study"), help="where to write")
    parser.add_argument("--seed", type=int, default=0, help="which seed's models (k in runs/<arm>/seed<k>)")
    parser.add_argument("--problems", type=int, default=N_PROBLEMS, help="prompts per split")
    args = parser.parse_args(argv)

    from nanophi.errors import UserError

    try:
        out = build(Path(args.run), Path(args.out), data_dir=Path(args.data_dir) if args.data_dir else None,
                    seed=args.seed, problems=args.problems, argv=sys.argv[1:] if argv is None else argv)
    except UserError as e:
        print(f"case_study_samples: error: {e}", file=sys.stderr)
        return 2
    print(out / "samples.md")
    return 0


def build(run: Path, out: Path, *, data_dir: Path | None, seed: int, problems: int, argv: list[str]) -> Path:
    """Write samples.jsonl, samples.md and metrics.json for every arm of `run`'s seed `seed`; returns `out`."""
    from nanophi.errors import UserError
    from nanophi.textbook.experiment import ARM_DIRS, ARMS

    results_path = run / "results.json"
    if not results_path.is_file():
        raise UserError(f"{results_path} does not exist; run `nanophi textbook experiment --out {run}` first")
    if problems < 1:
        raise UserError(f"--problems must be >= 1, got {problems}")
    results = json.loads(results_path.read_text(encoding="utf-8"))
    prompts = _prompts(run, data_dir)
    rows: list[dict[str, Any]] = []
    arms: dict[str, Any] = {}
    for arm in ARMS:
        model_dir = run / "runs" / ARM_DIRS[arm] / f"seed{seed}"
        if not (model_dir / "eval.json").is_file():
            raise UserError(f"{model_dir}/eval.json is missing: the experiment has not measured arm {arm} seed "
                            f"{seed}; rerun it (it resumes) or pick another --seed")
        ev = json.loads((model_dir / "eval.json").read_text(encoding="utf-8"))
        shown: dict[str, Any] = {}
        with_code: dict[str, int] = {}
        for split in SPLITS:
            checked = [json.loads(x) for x in (model_dir / f"{split}_samples.jsonl").read_text().splitlines()]
            picked = checked[:problems]
            with_code[split] = sum(r["parses"] and _has_code(r["completion"]) for r in checked)
            for r in picked:
                if r["task_id"] not in prompts:
                    raise UserError(f"no prompt for {r['task_id']}: pass the pipeline folder the experiment read "
                                    "with --data-dir")
                rows.append({"arm": arm, "seed": ev["seed"], "split": split, "task_id": r["task_id"],
                             "prompt": prompts[r["task_id"]], "completion": r["completion"],
                             **{k: r[k] for k in VERDICT_KEYS}})
            shown[split] = {"n": len(picked), "passed": sum(r["passed"] for r in picked),
                            "parses": sum(r["parses"] for r in picked), "runs": sum(r["runs"] for r in picked)}
        arms[arm] = {"dir": ARM_DIRS[arm], "seed": ev["seed"], "params": ev["params"],
                     "pretrain_tokens": ev["pretrain_tokens"], "finetune_tokens": ev["finetune_tokens"],
                     "all": {k: ev[k] for k in ("humaneval_passed", "humaneval_n", "heldout_passed", "heldout_n",
                                                "parse_rate", "run_rate", "heldout_parse_rate", "heldout_run_rate",
                                                "code_bpb", "humaneval_bpb")},
                     # a body of comments parses (the docstring is the body): parses that write a statement
                     "parses_with_code": with_code,
                     "shown": shown}
    cfg = results["config"]
    metrics = {
        "preset": results["preset"], "seed_index": seed, "problems_per_split": problems,
        "student": {k: cfg[k] for k in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")},
        "decode": {"greedy": True, "max_new_tokens": cfg["max_new_tokens"]},
        "humaneval_problems": results["humaneval_problems"],
        "heldout_exercises": results["data"]["n_heldout_exercises"],
        "train_exercises": results["data"]["n_train_exercises"], "budget": results["budget"],
        "arms": arms, "timings": results["timings"], "machine": {**_machine(), **results["machine"]},
        "made_by": _commands(run, data_dir, results),
        "command": ["python", "scripts/case_study_samples.py", *argv],
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "samples.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                       encoding="utf-8")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / "samples.md").write_text(markdown(rows, metrics), encoding="utf-8")
    return out


def _has_code(completion: str) -> bool:
    """Whether a completion has a line that is not blank and not a comment."""
    return any(line.strip() and not line.lstrip().startswith("#") for line in completion.splitlines())


def _commands(run: Path, data_dir: Path | None, results: dict[str, Any]) -> list[str]:
    """The commands that made `run`, as far as its files say (the pipeline's summary.json and results.json)."""
    teacher = results["teacher"] or "none"
    experiment = (f"nanophi textbook experiment --preset {results['preset']} --seeds {results['config']['seeds']} "
                  f"--out {_portable(run)} --teacher {teacher}")
    if data_dir is None:
        return [experiment]
    summary_path = data_dir / "summary.json"
    summary = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.is_file() else {}
    pipeline = (f"nanophi textbook run --preset {summary.get('preset', '?')} --seed {summary.get('seed', 0)} "
                f"--out {_portable(data_dir)}")
    return [pipeline, f"{experiment} --data-dir {_portable(data_dir)}"]


def _machine() -> dict[str, Any]:
    """This machine, in the keys artifacts/INDEX.md reads: scripts/artifacts.py's own `machine()`, loaded by path
    (scripts/ is not a package) so both folders describe the machine the same way."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("nanophi_scripts_artifacts", Path(__file__).with_name("artifacts.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.machine()


def _portable(path: Path) -> str:
    """A path inside the repository as a repository-relative one (metrics.json is committed)."""
    try:
        return path.resolve().relative_to(ROOT).as_posix()
    except ValueError:
        return str(path)


def _prompts(run: Path, data_dir: Path | None) -> dict[str, str]:
    """task_id -> prompt: HumanEval's, the stdlib doctest exercises the run kept, and the pipeline's verified ones
    (the held-out exercises are drawn from the last two)."""
    from nanophi.humaneval import load_problems
    from nanophi.textbook.experiment.data import parse_exercise
    from nanophi.textbook.records import read_jsonl

    prompts = {p["task_id"]: p["prompt"] for p in load_problems()}
    stdlib = run / "stdlib_exercises.jsonl"
    if stdlib.is_file():
        prompts |= {f"exercise/{r['id']}": r["prompt"] for r in read_jsonl(stdlib)}
    verified = data_dir / "exercises.verified.jsonl" if data_dir else None
    if verified and verified.is_file():
        for record in read_jsonl(verified):
            ex = parse_exercise(record)
            if ex is not None:
                prompts[f"exercise/{ex.id}"] = ex.prompt
    return prompts


def markdown(rows: list[dict[str, Any]], m: dict[str, Any]) -> str:
    s, arms = m["student"], m["arms"]
    any_arm = next(iter(arms.values()))
    lines = [
        f"# Samples: the case-study students, `{m['preset']}` preset, one seed", "",
        f"Every arm of `nanophi textbook experiment --preset {m['preset']}` (docs/case_study.md): a "
        f"{any_arm['params'] / 1e6:.2f}M-parameter student ({s['n_layer']} layers x {s['n_head']} heads x "
        f"{s['n_embd']}, context {s['block_size']}, {s['vocab_size']}-token BPE) pretrained from scratch on "
        f"{m['budget']['pretrain_tokens']:,} tokens of its arm's corpus, seed {any_arm['seed']}; the ->D arms then "
        f"take {m['budget']['finetune_steps']} masked fine-tune steps on {m['train_exercises']} verified exercises. "
        f"Each completion is greedy, at most {m['decode']['max_new_tokens']} tokens, cut at HumanEval's stop "
        "sequences and run against the problem's tests in the sandbox. Shown: the first "
        f"{m['problems_per_split']} HumanEval problems and the first {m['problems_per_split']} held-out exercises "
        "(all of them, if fewer), with each arm's completion and verdict; the counts over everything measured are "
        f"in the table. The experiment took {m['timings']['total_s']:.0f} s on {m['machine']['cpus']} CPU cores "
        f"(5-minute load average {m['machine']['load_avg_5min_start']} at the start, "
        f"{m['machine']['load_avg_5min_end']} at the end). The weights are not kept: rerun the commands in "
        "`metrics.json` (`made_by`) to get them.", "",
        "| arm | HumanEval (all) | held-out (all) | HumanEval parses | ... with a statement | code bits/byte | "
        "HumanEval bits/byte |", "|---|---|---|---|---|---|---|"]
    for arm, a in arms.items():
        x = a["all"]
        lines.append(f"| {arm} | {x['humaneval_passed']}/{x['humaneval_n']} | {x['heldout_passed']}/{x['heldout_n']} "
                     f"| {x['parse_rate']:.0%} | {a['parses_with_code']['humaneval']}/{x['humaneval_n']} "
                     f"| {x['code_bpb']:.3f} | {x['humaneval_bpb']:.3f} |")
    passed = sum(a["all"]["humaneval_passed"] + a["all"]["heldout_passed"] for a in arms.values())
    if passed == 0:
        lines += ["", "No completion of any arm passes at this scale: phi-1's smallest model has 350M parameters, "
                  f"{PHI1_SMALL_PARAMS / any_arm['params']:.0f} times these students'. The exercise fine-tune (->D) "
                  "taught the format before the content: its completions are indented lines under the docstring, "
                  "so many parse, but most of those are comment lines (a function whose body is its docstring "
                  "parses and returns None); the pretrained arms write blank lines until a stop sequence. The "
                  "bits per byte are where the arms differ measurably."]
    lines.append("")
    by_task: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        by_task.setdefault((r["split"], r["task_id"]), []).append(r)
    for split, title in SPLITS.items():
        lines += [f"## {title}", ""]
        for (sp, task_id), group in by_task.items():
            if sp != split:
                continue
            lines += [f"### {task_id}", "", "````python", group[0]["prompt"].rstrip("\n"), "````", ""]
            for r in group:
                mark = "pass" if r["passed"] else f"fail ({(r['reason'] or r['status']).splitlines()[0][:160]})"
                shown = r["completion"].strip("\n") if r["completion"].strip() else "# (empty completion)"
                lines += [f"**{r['arm']}**: {mark}", "", "````python", shown, "````", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
