"""The case study: does textbook-quality data win at small scale? Students trained from scratch, arm by arm.

    nanophi textbook experiment --preset tiny --out runs/case-tiny [--data-dir DATA]

Arms, all with one shared BPE tokenizer trained on the union of their data, and the same pretraining budget
(optimizer steps x batch x block tokens, the smaller corpora repeated to fill it):

    A          the raw pool
    A_small    a random sample of the raw pool with B's number of unique tokens: at the same budget it is
               repeated as often as B, so B vs A_small is filtering at equal repetition and A vs A_small is
               repetition at equal (unfiltered) quality
    B          the filtered pool
    B+C        filtered + synthetic textbooks
    (B+C)->D   B+C, then fine-tuned on verified exercises (problem tokens masked out of the loss)
    A->D       A, then the same fine-tune: the control phi-1 never ran, separating the textbook effect from the
               fine-tune effect

The D arms add the same fine-tune budget (same steps, same batches for a given seed) to their base, so A, B and
B+C compare at P tokens and A->D and (B+C)->D at P + F. Seeds vary the initialisation and batch order; the data
split is fixed. Every pretraining run is probed at `curve_points` evenly spaced steps (bits per byte on HumanEval's
canonical solutions and on held-out raw code: the curves of results.json), then each trained model is measured by
`experiment.eval.measure` (greedy pass@1, and pass@k from `samples` completions per problem), and Jina's experiment
fine-tunes the teacher on the same training exercises. Results go to OUT/results.json, OUT/report.md and
OUT/report.html.

Without --data-dir the data is built into OUT/data by `nanophi textbook run` (the stdlib pool, the heuristic
rubric and random-forest filter, then textbooks and exercises from the teacher, verified in the sandbox). The
exercises of a 135M teacher rarely pass their own asserts, so the verified stdlib doctest exercises of
`experiment/exercises.py` join them (presets' `stdlib_exercises`); the report counts the two sources apart.
A killed run resumes: finished models keep their measurements in OUT/runs/<arm>/seed<k>/eval.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nanophi.callbacks import Callback
from nanophi.errors import UserError
from nanophi.textbook.experiment.data import ExperimentData, build_data_dir, load_data, textbook_mix, write_corpus
from nanophi.textbook.experiment.presets import ARM_DIRS, ARM_SOURCES, ARMS, BASE_OF, DEFAULT_TEACHER, PRESETS, \
    SPLIT_SEED, Preset

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------- students

class CurveProbe(Callback):
    """A trainer callback: at `points` evenly spaced steps (the last one at the end) it measures bits per byte
    on HumanEval's canonical solutions and on held-out raw code, without touching training (no checkpoint, no
    optimizer state; the model is put back in train mode)."""

    def __init__(self, tokenizer: Any, humaneval: list[dict[str, str]], heldout_code: list[str], max_iters: int,
                 points: int) -> None:
        self.tokenizer, self.humaneval, self.heldout_code = tokenizer, humaneval, heldout_code
        n = max(1, min(points, max_iters))
        self.steps = {round(max_iters * (i + 1) / n) for i in range(n)}
        self.curve: list[dict[str, Any]] = []

    def on_step_end(self, trainer: Any, record: dict[str, Any]) -> None:
        from nanophi.humaneval import canonical_bpb
        from nanophi.textbook.experiment.eval import code_bpb

        if trainer.step not in self.steps:
            return
        model = trainer.raw_model
        self.curve.append({"step": trainer.step, "tokens_seen": trainer.tokens_seen,
                           "humaneval_bpb": canonical_bpb(model, self.tokenizer, self.humaneval),
                           "heldout_bpb": code_bpb(model, self.tokenizer, self.heldout_code)})
        model.train()


def _train_student(preset: Preset, prepared: Any, run_dir: Path, seed: int,
                   probe: CurveProbe | None = None) -> tuple[Any, dict[str, Any]]:
    """Pretrain one student from scratch on a prepared arm corpus; returns (model, trainer summary)."""
    from nanophi.callbacks import MetricsFile
    from nanophi.config import resolve
    from nanophi.train import Trainer

    if run_dir.exists():  # a run killed before it was measured: start it again rather than resume half of it
        shutil.rmtree(run_dir)
    flags = {"preset": "gpt2", "n_layer": preset.n_layer, "n_head": preset.n_head, "n_embd": preset.n_embd,
             "block_size": preset.block_size, "batch_size": preset.batch_size, "max_iters": preset.pretrain_iters,
             "lr": preset.lr, "min_lr": preset.lr / 10, "warmup_iters": preset.warmup_iters,
             "eval_interval": preset.pretrain_iters, "eval_iters": 4, "log_interval": 50, "seed": seed,
             "out": str(run_dir), "dashboard": "off", "device": preset.device, "tokenizer": "bpe",
             "vocab_size": preset.vocab_size, "dropout": 0.0}
    cfg = resolve(flags)
    trainer = Trainer(cfg, prepared, callbacks=[MetricsFile(run_dir / "metrics.jsonl"), *([probe] if probe else [])])
    (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2, sort_keys=True) + "\n")
    summary = trainer.fit()
    summary["params"] = trainer.raw_model.num_params()
    return trainer.raw_model.eval(), summary


def _load_student(run_dir: Path, device: str) -> Any:
    from nanophi.device import pick_device
    from nanophi.refs import load_model

    return load_model(run_dir, pick_device(device))[0]


# ---------------------------------------------------------------------------------------------- the run

def run_experiment(preset: str | Preset, out: str | Path, *, data_dir: str | Path | None = None,
                   teacher: str | None = DEFAULT_TEACHER, seeds: int | None = None,
                   teacher_result: str | Path | None = None, arms: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the whole experiment into `out`; returns the results (also written to OUT/results.json).

    `teacher`: the model that writes the data when `data_dir` is None, and the one Jina's experiment
    fine-tunes; None skips the teacher experiment (then `data_dir` is required). `teacher_result`: the
    metrics.json of a separate Jina's-experiment run (`python -m nanophi.textbook.experiment.finetune`, on the
    same mined exercise set) reported in place of running the fine-tune here, which is hours on a CPU. `arms`: a
    subset of ARMS to train and report (a fine-tuned arm needs its base); the rest are left out of results.json
    and the directions that need them are not reported. A later call with more arms resumes the measured ones."""
    from nanophi.textbook.experiment.eval import measure
    from nanophi.textbook.experiment.finetune import encode_examples, finetune_masked
    from nanophi.textbook.experiment.report import write_report
    from nanophi.textbook.experiment.stats import aggregate

    name = preset if isinstance(preset, str) else "custom"
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise UserError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        preset = PRESETS[preset]
    if seeds is not None:
        if seeds < 1:
            raise UserError(f"--seeds must be >= 1, got {seeds}")
        preset = dataclasses.replace(preset, seeds=seeds)
    chosen = tuple(ARMS if arms is None else arms)
    unknown = [a for a in chosen if a not in ARMS]
    if unknown or not chosen:
        raise UserError(f"unknown arm(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(ARMS)}")
    orphans = [a for a in chosen if a in BASE_OF and BASE_OF[a] not in chosen]
    if orphans:
        raise UserError(f"arm {orphans[0]} fine-tunes {BASE_OF[orphans[0]]}; add {BASE_OF[orphans[0]]} to --arms")
    chosen = tuple(a for a in ARMS if a in chosen)  # bases before the arms fine-tuned from them
    if teacher_result is not None and not Path(teacher_result).is_file():
        raise UserError(f"--teacher-result {teacher_result} is not a file; give the metrics.json written by "
                        "`python -m nanophi.textbook.experiment.finetune OUT CACHE`")
    if data_dir is not None and not Path(data_dir).is_dir():
        raise UserError(f"--data-dir {data_dir} is not a folder; run `nanophi textbook run --out DIR` first, or leave "
                        "out --data-dir to build the data here")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    load_start = os.getloadavg()[1]  # 5-minute load: other work on the machine stretches every wall time here

    t0 = time.perf_counter()
    if data_dir is None:
        if teacher is None:
            raise UserError("without --data-dir the experiment builds its data with a teacher; pass --teacher REF")
        data_dir = build_data_dir(out / "data", preset.data, teacher_ref=teacher, seed=SPLIT_SEED,
                                  device=_teacher_device(preset))
    extra: list[Any] = []
    if preset.stdlib_exercises and not preset.mined_exercises:
        extra = _stdlib_exercises(out / "stdlib_exercises.jsonl")
    split = None
    exercise_counts: dict[str, Any] | None = None
    if preset.mined_exercises:
        from nanophi.textbook.experiment.exercises import exercise_set

        def split(teacher_exercises: list[Any]) -> tuple[list[Any], list[Any]]:
            nonlocal exercise_counts
            train_ex, held_ex, exercise_counts = exercise_set(out / "exercises.jsonl", extra=teacher_exercises)
            return train_ex, held_ex
    data = load_data(Path(data_dir), seed=SPLIT_SEED, extra_exercises=extra, tau=preset.tau,
                     heldout_code_fraction=preset.heldout_code_fraction, filter_keep=preset.filter_keep,
                     heldout_exercise_fraction=preset.heldout_exercise_fraction, exercise_split=split)
    if exercise_counts is not None:
        data.stats["exercise_set"] = exercise_counts
    timings["data_s"] = round(time.perf_counter() - t0, 1)
    log.info("experiment: %s", json.dumps({k: v for k, v in data.stats.items() if k.startswith("n_")}))

    t0 = time.perf_counter()
    tokenizer = _shared_tokenizer(data, preset.vocab_size, out / "tokenizer")
    prepared, mix = _prepare_arms(data, preset, tokenizer, out / "arms")
    timings["tokenize_s"] = round(time.perf_counter() - t0, 1)

    from nanophi.humaneval import load_problems

    humaneval = load_problems()[:preset.humaneval_limit]
    heldout = [e.as_problem() for e in data.heldout_exercises]
    ft_examples = encode_examples(tokenizer, data.train_exercises, preset.block_size)
    ft_steps = preset.ft_steps(len(ft_examples))

    t0 = time.perf_counter()
    per_arm: dict[str, list[dict[str, Any]]] = {arm: [] for arm in chosen}
    resumed = 0  # models measured by an earlier invocation: their time is not in this one's timings
    for k in range(preset.seeds):
        seed = 1000 + k
        for arm in chosen:
            run_dir = out / "runs" / ARM_DIRS[arm] / f"seed{k}"
            done = run_dir / "eval.json"
            if done.is_file():
                per_arm[arm].append(json.loads(done.read_text()))
                resumed += 1
                continue
            t_arm = time.perf_counter()
            if arm in BASE_OF:
                base_dir = out / "runs" / ARM_DIRS[BASE_OF[arm]] / f"seed{k}"
                model = _load_student(base_dir, preset.device)
                ft = finetune_masked(model, ft_examples, steps=ft_steps, batch_size=preset.ft_batch,
                                     lr=preset.ft_lr, seed=seed, warmup=max(1, ft_steps // 10))
                base = json.loads((base_dir / "eval.json").read_text())
                train = {"pretrain_tokens": base["pretrain_tokens"], "finetune_tokens": ft["tokens"],
                         "finetune": ft, "params": base["params"]}
            else:
                probe = CurveProbe(tokenizer, humaneval, data.heldout_code, preset.pretrain_iters, preset.curve_points)
                model, summary = _train_student(preset, prepared[arm], run_dir, seed, probe)
                train = {"pretrain_tokens": summary["tokens_seen"], "finetune_tokens": 0, "params": summary["params"],
                         "final_train_val_loss": summary["best_val_loss"], "curve": probe.curve}
            metrics = measure(model, tokenizer, humaneval=humaneval, heldout=heldout, heldout_code=data.heldout_code,
                              max_new_tokens=preset.max_new_tokens, out_dir=run_dir, samples=preset.samples, seed=seed,
                              problems_per_batch=preset.sample_problems_per_batch)
            if arm in BASE_OF and base.get("curve"):  # the base's pretraining curve, then the fine-tune's end
                train["curve"] = base["curve"] + [{
                    "step": base["curve"][-1]["step"] + ft_steps, "tokens_seen": train["pretrain_tokens"]
                    + train["finetune_tokens"], "humaneval_bpb": metrics["humaneval_bpb"],
                    "heldout_bpb": metrics["code_bpb"], "finetune": True}]
            record = {"seed": seed, **metrics, **train, "seconds": round(time.perf_counter() - t_arm, 1)}
            run_dir.mkdir(parents=True, exist_ok=True)
            done.write_text(json.dumps(record, indent=2) + "\n")
            per_arm[arm].append(record)
            log.info("experiment: %s seed %d: HumanEval %d/%d, held-out %d/%d, code bpb %.3f, HumanEval bpb %.3f",
                     arm, seed, metrics["humaneval_passed"], metrics["humaneval_n"], metrics["heldout_passed"],
                     metrics["heldout_n"], metrics["code_bpb"], metrics["humaneval_bpb"])
    timings["students_s"] = round(time.perf_counter() - t0, 1)

    t0 = time.perf_counter()
    teacher_ft: dict[str, Any]
    if teacher_result is not None:
        teacher_ft = {**json.loads(Path(teacher_result).read_text()), "source": str(teacher_result)}
    elif teacher is None:
        teacher_ft = {"skipped": "no teacher given"}
    else:
        teacher_ft = teacher_experiment(teacher, data, preset, out / "teacher")
    timings["teacher_s"] = round(time.perf_counter() - t0, 1)
    timings["total_s"] = round(time.perf_counter() - t_start, 1)
    machine = {"cpus": os.cpu_count(), "load_avg_5min_start": round(load_start, 2),
               "load_avg_5min_end": round(os.getloadavg()[1], 2)}

    results = {
        "preset": name, "config": dataclasses.asdict(preset), "teacher": teacher,
        "arms": {arm: {**aggregate(rows), "data": _arm_data(arm, prepared, rows, ft_examples)}
                 for arm, rows in per_arm.items()},
        "teacher_finetune": teacher_ft,
        "data": {**data.stats, "textbook_repeats": mix["repeats"], "arm_chars": mix["chars"],
                 "tokenizer_vocab": tokenizer.vocab_size,
                 "arm_tokens": {arm: int(p.meta["train_tokens"]) for arm, p in prepared.items()}},
        "budget": {"pretrain_tokens": preset.pretrain_tokens(), "finetune_steps": ft_steps,
                   "finetune_tokens": next((rows[0]["finetune_tokens"] for arm, rows in per_arm.items()
                                            if arm in BASE_OF and rows), 0)},
        "humaneval_problems": len(humaneval), "arms_left_out": [a for a in ARMS if a not in chosen],
        "timings": timings, "machine": machine, "resumed_models": resumed,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    write_report(results, out)
    log.info("experiment: done in %.0f s; report in %s", timings["total_s"], out / "report.md")
    return results


def _stdlib_exercises(path: Path) -> list[Any]:
    """The stdlib's verified doctest exercises, kept in OUT: a resumed run must train and test on the same ones
    (a doctest near the sandbox's time limit can pass once and time out the next time on a busy machine)."""
    from nanophi.textbook.experiment.data import Exercise
    from nanophi.textbook.experiment.exercises import verified_doctest_exercises
    from nanophi.textbook.records import read_jsonl, write_jsonl_atomic

    if path.is_file():
        return [Exercise(**{k: v for k, v in r.items() if k != "text"}) for r in read_jsonl(path)]
    exercises, _ = verified_doctest_exercises()
    write_jsonl_atomic(path, ({**dataclasses.asdict(e), "text": e.program()} for e in exercises))
    return exercises


def _teacher_device(preset: Preset) -> str:
    from nanophi.device import pick_device

    return str(pick_device(preset.device))


def _shared_tokenizer(data: ExperimentData, vocab_size: int, directory: Path) -> Any:
    """One BPE for every arm, trained on the union of their training text (held-out sets excluded)."""
    from nanophi.tokenizer import BPETokenizer

    texts = ([r["text"] for r in data.pool] + [r["text"] for r in data.textbooks]
             + [e.program() for e in data.train_exercises])  # the filtered pool is a subset of the pool
    tok = BPETokenizer.train(texts, vocab_size)
    tok.save(directory)
    return tok


def _prepare_arms(data: ExperimentData, preset: Preset, tokenizer: Any, root: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Write and tokenize the three pretraining corpora; returns ({arm: PreparedData}, mixing facts)."""
    from nanophi.prepare import prepare

    mixed, repeats = textbook_mix(data.filtered, data.textbooks, preset.textbook_share, preset.max_textbook_repeats,
                                  SPLIT_SEED)
    corpora = {"A": data.pool, "A_small": _sample_like(data.pool, data.filtered, tokenizer, SPLIT_SEED),
               "B": data.filtered, "B+C": mixed}
    prepared, chars = {}, {}
    for arm, recs in corpora.items():
        if not recs:
            raise UserError(f"arm {arm} has no training documents after the split; build more data")
        d = root / ARM_DIRS[arm]
        corpus = write_corpus(d / "corpus.jsonl", recs)
        # A small validation tail: the trainer needs one; the experiment's held-out sets are separate.
        prepared[arm] = prepare(str(corpus), tokenizer="bpe", val_fraction=0.02, out_dir=d / "prepared",
                                tokenizer_obj=tokenizer)
        chars[arm] = sum(len(r["text"]) for r in recs)
    return prepared, {"repeats": repeats, "chars": chars}


def _sample_like(pool: list[dict[str, Any]], like: list[dict[str, Any]], tokenizer: Any,
                 seed: int) -> list[dict[str, Any]]:
    """A seeded random sample of `pool` documents with (just over) as many tokens as `like` has: arm A_small."""
    import random

    want = sum(map(len, tokenizer.encode_batch([r["text"] for r in like])))
    order = list(pool)
    random.Random(seed).shuffle(order)
    lengths = tokenizer.encode_batch([r["text"] for r in order])
    picked, total = [], 0
    for rec, ids in zip(order, lengths):
        if total >= want:
            break
        picked.append(rec)
        total += len(ids)
    return picked


def _arm_data(arm: str, prepared: dict[str, Any], rows: list[dict[str, Any]],
              ft_examples: list[tuple[list[int], int]]) -> dict[str, Any]:
    """What an arm trained on: source, unique tokens, tokens seen, and passes over its pretraining corpus."""
    base = BASE_OF.get(arm, arm)
    unique = int(prepared[base].meta["train_tokens"])
    pretrain = rows[0]["pretrain_tokens"] if rows else 0
    out = {"source": ARM_SOURCES[arm], "unique_tokens": unique, "tokens_seen": pretrain, "passes": pretrain / unique}
    if arm in BASE_OF and rows:
        exercise_tokens = sum(len(ids) for ids, _ in ft_examples)
        out |= {"unique_tokens": unique + exercise_tokens, "exercise_tokens": exercise_tokens,
                "tokens_seen": pretrain + rows[0]["finetune_tokens"],
                "finetune_passes": rows[0]["finetune"]["steps"] * rows[0]["finetune"]["batch_size"]
                / max(1, len(ft_examples))}
    return out


def teacher_experiment(ref: str, data: ExperimentData, preset: Preset, out_dir: Path) -> dict[str, Any]:
    """Jina's experiment: the teacher's HumanEval pass@1 (greedy, completion mode) before and after fine-tuning
    on the verified training exercises with the problem tokens masked out of the loss."""
    from nanophi.device import pick_device
    from nanophi.humaneval import load_problems
    from nanophi.refs import load_model
    from nanophi.textbook.experiment.eval import pass_at_1
    from nanophi.textbook.experiment.finetune import encode_examples, finetune_masked

    model, tokenizer = load_model(ref, pick_device(preset.device))
    problems = load_problems()[:preset.teacher_limit]
    heldout = [e.as_problem() for e in data.heldout_exercises]
    n_new = preset.teacher_max_new_tokens
    result: dict[str, Any] = {"model": ref, "problems": len(problems), "max_new_tokens": n_new}
    # int8 decoding on a CPU halves the teacher's generation time; before and after decode the same way.
    quantize = "int8" if next(model.parameters()).device.type == "cpu" else None
    result["decode"] = quantize or "float32"

    def measure_teacher(when: str) -> dict[str, Any]:
        return {name: pass_at_1(model, tokenizer, probs, n_new, out_dir / f"{when}_{name}.jsonl", batch_size=8,
                                quantize=quantize)
                for name, probs in (("humaneval", problems), ("heldout", heldout))}

    result["before"] = measure_teacher("before")
    examples = encode_examples(tokenizer, data.train_exercises, min(preset.teacher_block, model.config.block_size - 1))
    result["finetune"] = finetune_masked(model, examples, steps=preset.teacher_ft_steps,
                                         batch_size=preset.teacher_ft_batch, lr=preset.teacher_ft_lr, seed=SPLIT_SEED,
                                         warmup=max(1, preset.teacher_ft_steps // 10))
    result["after"] = measure_teacher("after")
    log.info("experiment: teacher HumanEval %d/%d before, %d/%d after", result["before"]["humaneval"]["passed"],
             len(problems), result["after"]["humaneval"]["passed"], len(problems))
    return result


# ---------------------------------------------------------------------------------------------- CLI

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=[p for p in PRESETS if p != "test"], default="tiny",
                        help="size of the experiment: tiny (<= 30 min on 2 CPU cores), small (~1 h of students on 2 "
                             "CPU cores), full (sized for <= 10 min on one H100-class GPU)")
    parser.add_argument("--out", required=True, help="output folder: results.json, report.md/html, runs, data")
    parser.add_argument("--data-dir", default=None,
                        help="a pipeline output folder (pool/filtered/textbooks/exercises[/verified].jsonl); "
                             "default: build the data into OUT/data with the teacher")
    parser.add_argument("--teacher", default=DEFAULT_TEACHER,
                        help=f"model that writes the data and is fine-tuned in Jina's experiment (default "
                             f"{DEFAULT_TEACHER}); 'none' skips the teacher experiment")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per arm (default: the preset's)")
    parser.add_argument("--arms", default=None, metavar="A,B,...",
                        help=f"train and report only these arms (default: all of {', '.join(ARMS)})")
    parser.add_argument("--teacher-result", default=None, metavar="METRICS_JSON",
                        help="report this Jina's-experiment run (metrics.json of `python -m "
                             "nanophi.textbook.experiment.finetune`) instead of fine-tuning the teacher here")


def run(args: argparse.Namespace) -> int:
    teacher = None if str(args.teacher).lower() == "none" else args.teacher
    results = run_experiment(args.preset, args.out, data_dir=args.data_dir, teacher=teacher, seeds=args.seeds,
                             teacher_result=args.teacher_result,
                             arms=None if args.arms is None else [a.strip() for a in args.arms.split(",") if a.strip()])
    from nanophi.textbook.experiment.tables import summary_table

    print(summary_table(results))
    print(f"report: {Path(args.out) / 'report.md'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    import sys

    parser = argparse.ArgumentParser(prog="python -m nanophi.textbook.experiment", description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
