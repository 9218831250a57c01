"""`nanophi textbook run --preset tiny|small|full --out DIR`: every stage, in order, into one folder.

    DIR/pool.jsonl               raw code documents (the stdlib, split into top-level functions/classes)
    DIR/labels.jsonl             educational-value labels on a sample
    DIR/filtered.jsonl           pool documents the classifier keeps
    DIR/textbooks.jsonl          teacher-written textbook sections   -> DIR/textbooks.verified.jsonl
    DIR/exercises.jsonl          teacher-written exercises           -> DIR/exercises.verified.jsonl
    DIR/combined.jsonl           filtered + verified textbooks + verified exercises
    DIR/deduped.jsonl            without exact and near duplicates
    DIR/final.jsonl              without HumanEval look-alikes: the dataset
    DIR/CARD.md, DIR/packed/     its card, and its tokens for `nanophi train --data DIR/packed`
    DIR/summary.json             the headline numbers;  DIR/pipeline.json  what ran, with which settings

Each stage writes `*.stats.json` beside its output. A stage whose settings match what `pipeline.json` says it
finished with is skipped, so a rerun after a kill starts at the stage that was interrupted, and the two stages
that pay per record (annotate with a judge, generate) resume inside the stage from their append-only files.

`--tasks N --workers W [--executor local|slurm|ray]` (N > 1) runs pool (when the preset takes the whole source),
annotate (rubric), filter, verify, dedup and decontaminate as datatrove tasks: their outputs are folders of
shards (DIR/pool/, DIR/labels/, DIR/filtered/, DIR/*.verified/, DIR/deduped/, DIR/decontaminated/), resumed
per shard, and DIR/final.jsonl gathers the last one. With --executor slurm a stage returns once its jobs are
submitted; rerun the command after they finish to go on to the next stage (verify and the teacher stay here).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

from nanophi.errors import UserError
from nanophi.textbook.records import read_records, write_jsonl_atomic, write_stats

log = logging.getLogger(__name__)

STATE = "pipeline.json"
SUMMARY = "summary.json"


@dataclass(frozen=True)
class Preset:
    """The sizes of one pipeline run. Every field is a setting of one stage."""

    pool_max_docs: int | None  # documents taken from the pool source (None: all)
    labels: int  # documents labelled for the classifier (phi-1: ~100k GPT-4 labels)
    textbooks: int  # textbook sections to generate
    exercises: int  # exercises to generate
    textbook_tokens: int  # teacher tokens per textbook section
    exercise_tokens: int  # teacher tokens per exercise
    teacher_batch: int  # local teacher: rows per batch
    teacher_quantize: str | None  # local CPU teacher: "int8" doubles decoding speed
    pack_tokenizer: str  # tokenizer trained by `pack`
    pack_vocab: int
    pool_split: str = "function"  # functions/classes are the size of a textbook example; files are not
    labeler: str = "heuristic"  # or "llm": the teacher judges (slow on a CPU)


PRESETS: dict[str, Preset] = {
    # ≤ 15 minutes on 2 CPU cores with SmolLM2-135M: generation is nearly all of it.
    "tiny": Preset(pool_max_docs=3000, labels=400, textbooks=6, exercises=24, textbook_tokens=256,
                   exercise_tokens=200, teacher_batch=8, teacher_quantize="int8", pack_tokenizer="bpe",
                   pack_vocab=1024),
    # an hour or two on a CPU, minutes on a GPU
    "small": Preset(pool_max_docs=None, labels=2000, textbooks=200, exercises=1000, textbook_tokens=512,
                    exercise_tokens=320, teacher_batch=16, teacher_quantize="int8", pack_tokenizer="bpe",
                    pack_vocab=8192),
    # one GPU or a remote endpoint (--teacher openai:...): ~10M tokens of synthetic text
    "full": Preset(pool_max_docs=None, labels=2000, textbooks=10_000, exercises=50_000, textbook_tokens=1024,
                   exercise_tokens=384, teacher_batch=64, teacher_quantize=None, pack_tokenizer="bpe",
                   pack_vocab=16384),
}


class StageSubmitted(Exception):
    """A stage's tasks were submitted (Slurm), not run: the pipeline stops there until they finish."""


class _State:
    """`pipeline.json`: per stage, the settings it finished with and its stats."""

    def __init__(self, out: Path) -> None:
        self.path = out / STATE
        self.data: dict[str, Any] = json.loads(self.path.read_text()) if self.path.exists() else {}

    def done(self, stage: str, params: dict[str, Any], outputs: list[Path]) -> dict[str, Any] | None:
        entry = self.data.get(stage)
        if entry and entry["params"] == params and all(p.exists() for p in outputs):
            return entry["stats"]
        return None

    def finish(self, stage: str, params: dict[str, Any], stats: dict[str, Any]) -> None:
        self.data[stage] = {"params": params, "stats": stats}
        write_stats(self.path, self.data)  # atomic: a kill never leaves half a state file


def run_pipeline(out: str | os.PathLike, preset: str | Preset = "tiny", *, seed: int = 0,
                 teacher: Any = None, teacher_ref: str | None = None, teacher_model: str | None = None,
                 teacher_device: str = "cpu", pool_source: str | None = None, name: str | None = None,
                 tasks: int = 1, workers: int = 1, executor: Any = None) -> dict[str, Any]:
    """Run (or resume) every stage into `out`; returns the summary also written to `out/summary.json`.

    `teacher`: a teacher object to use (tests); otherwise one is made from `teacher_ref`/`teacher_model`
    (default: the local SmolLM2-135M-Instruct), loaded only if a stage needs it. `tasks`/`workers`/`executor`
    (a `scale.ExecutorOptions`): the stages that run on datatrove run as `tasks` tasks (module docstring).
    Raises StageSubmitted when a stage's tasks were only submitted (rerun after they finish)."""
    from nanophi.textbook import annotate, card, decontaminate, dedup, filter, pool, synthesize, verify
    from nanophi.textbook.dedup_scale import dedup_sharded
    from nanophi.textbook.teacher import DEFAULT_TEACHER, make_teacher

    if tasks < 1 or workers < 1:
        raise UserError(f"--tasks and --workers must be at least 1, got {tasks} and {workers}")
    if tasks > 1:
        from nanophi.textbook.scale import LOCAL, require_datatrove

        require_datatrove()
        executor = executor or LOCAL
        executor.check_available()
    sharded = tasks > 1

    if isinstance(preset, str):
        if preset not in PRESETS:
            raise UserError(f"--preset must be one of {', '.join(PRESETS)}, got {preset!r}")
        name, p = name or preset, PRESETS[preset]
    else:
        name, p = name or "custom", preset
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = _State(out)
    t_start = time.perf_counter()
    made: dict[str, Any] = {}

    def get_teacher() -> Any:
        if teacher is not None:
            return teacher
        if "t" not in made:
            made["t"] = make_teacher(teacher_ref or DEFAULT_TEACHER, model=teacher_model, device=teacher_device,
                                     quantize=p.teacher_quantize if teacher_device == "cpu" else None,
                                     batch_size=p.teacher_batch)
        return made["t"]

    teacher_name = getattr(teacher, "name", None) or (teacher_ref or DEFAULT_TEACHER)
    seconds: dict[str, float] = {}

    def stage(name_: str, params: dict[str, Any], outputs: list[Path], fn: Callable[[], dict[str, Any]]
              ) -> dict[str, Any]:
        prior = state.done(name_, params, outputs)
        if prior is not None:
            log.info("textbook run: %s already done, skipping", name_)
            seconds[name_] = 0.0
            return prior
        log.info("textbook run: %s ...", name_)
        t0 = time.perf_counter()
        stats = fn()
        if stats.get("submitted"):
            raise StageSubmitted(f"textbook run: {name_} submitted to {executor.kind}; rerun this command when "
                                 "its jobs finish (finished stages and tasks are skipped)")
        seconds[name_] = round(time.perf_counter() - t0, 2)
        if outputs[0].is_dir():  # a folder of shards: its stats beside it too, where the card looks
            write_stats(outputs[0].with_name(f"{outputs[0].name}.stats.json"), stats)
        state.finish(name_, params, stats)
        return stats

    def at(name_: str, shards: bool = sharded) -> Path:
        """A stage's output: a folder of shards with --tasks > 1, else one JSONL."""
        return out / name_ if shards else out / f"{name_}.jsonl"

    ex = {"tasks": tasks, "workers": workers, "executor": executor}  # for the stages that run on datatrove
    # --max-docs stops one pass at a count: such a pool is one task (the tiny preset's 3000 documents)
    pool_sharded = sharded and p.pool_max_docs is None
    pool_path = at("pool", pool_sharded)
    st_pool = stage("pool", {"source": pool_source, "split": p.pool_split, "max_docs": p.pool_max_docs,
                             "tasks": tasks if pool_sharded else 1}, [pool_path],
                    lambda: pool.build_pool_sharded(pool_source, pool_path, split=p.pool_split, **ex)
                    if pool_sharded else pool.build_pool(pool_source, pool_path, split=p.pool_split,
                                                         max_docs=p.pool_max_docs))
    ann_sharded = sharded and p.labeler == "heuristic"  # the judge waits on a server: one process
    labels_path = at("labels", ann_sharded)
    st_ann = stage("annotate", {"n": p.labels, "seed": seed, "labeler": p.labeler,
                                "teacher": teacher_name if p.labeler == "llm" else None,
                                "tasks": tasks if ann_sharded else 1}, [labels_path],
                   lambda: annotate.annotate_sharded(pool_path, labels_path, n=p.labels, seed=seed, **ex)
                   if ann_sharded else annotate.annotate(pool_path, labels_path, n=p.labels, seed=seed,
                                                         labeler=p.labeler,
                                                         teacher=get_teacher() if p.labeler == "llm" else None))
    filtered_path = at("filtered")
    st_filt = stage("filter", {"seed": seed, "embedder": "hashing", "tasks": tasks}, [filtered_path],
                    lambda: filter.filter_sharded(labels_path, pool_path, filtered_path, seed=seed, **ex)
                    if sharded else filter.train_filter(labels_path, pool_path, filtered_path, seed=seed))
    gen: dict[str, dict[str, Any]] = {}
    ver: dict[str, dict[str, Any]] = {}
    for kind, n, tokens in (("textbook", p.textbooks, p.textbook_tokens),
                            ("exercises", p.exercises, p.exercise_tokens)):
        raw = synthesize.output_path(out, kind)
        checked = at(f"{raw.stem}.verified")
        gen[kind] = stage(f"generate-{kind}", {"n": n, "seed": seed, "max_tokens": tokens, "teacher": teacher_name},
                          [raw], lambda kind=kind, n=n, tokens=tokens: synthesize.generate(
                              kind, n, out, get_teacher(), seed=seed, max_tokens=tokens))
        # verify's --workers is programs at once: with --tasks, datatrove tasks at once, each one program at a time
        ver[kind] = stage(f"verify-{kind}", {"version": verify.VERIFY_VERSION, "input_n": gen[kind]["n_out"],
                                             "tasks": tasks}, [checked],
                          lambda raw=raw, checked=checked: verify.verify_sharded(
                              raw, checked, tasks=tasks, workers=workers, executor=executor)
                          if sharded else verify.verify(raw, checked))

    combined, deduped, final = out / "combined.jsonl", at("deduped"), out / "final.jsonl"
    parts = [filtered_path, *(at(f"{synthesize.output_path(out, k).stem}.verified") for k in gen)]

    def combine() -> dict[str, Any]:
        n = write_jsonl_atomic(combined, (rec for part in parts for rec in read_records(part)))
        return {"stage": "combine", "inputs": [str(x) for x in parts], "n_out": n}

    sizes = {"filtered": st_filt["n_out"], **{k: v["n_out"] for k, v in ver.items()}}
    stage("combine", sizes, [combined], combine)
    st_dedup = stage("dedup", {"input": sizes, "threshold": 0.7, "tasks": tasks}, [deduped],
                     lambda: dedup_sharded(combined, deduped, threshold=0.7, **ex)
                     if sharded else dedup.dedup(combined, deduped, threshold=0.7))

    def decontaminate_gathered() -> dict[str, Any]:
        """Sharded: the shards, then final.jsonl gathered from them (the card and pack read one file)."""
        shards = at("decontaminated")
        stats = decontaminate.decontaminate_sharded(deduped, shards, tau=decontaminate.TAU, **ex)
        if not stats.get("submitted"):
            write_jsonl_atomic(final, read_records(shards))
            write_stats(final.with_name("final.stats.json"), stats)
        return stats

    st_dec = stage("decontaminate", {"input": st_dedup["n_out"], "tau": decontaminate.TAU, "tasks": tasks},
                   [final], decontaminate_gathered if sharded else lambda: decontaminate.decontaminate(
                       deduped, final, tau=decontaminate.TAU, sweep=decontaminate.SWEEP_TAUS))
    packed = out / "packed"
    st_pack = stage("pack", {"input": st_dec["n_out"], "tokenizer": p.pack_tokenizer, "vocab": p.pack_vocab},
                    [packed], lambda: card.pack(final, packed, tokenizer=p.pack_tokenizer, vocab_size=p.pack_vocab))
    stage("card", {"input": st_dec["n_out"]}, [out / "CARD.md"],
          lambda: card.write_card(final, out / "CARD.md", title=f"nanophi textbook data ({name} preset)"))

    usage = getattr(made.get("t") or teacher, "usage", None)
    summary = {
        "preset": name, "settings": asdict(p), "seed": seed, "teacher": teacher_name,
        "pool_docs": st_pool["n_out"], "labeled": st_ann["n_out"], "labeled_positive": st_ann.get("n_positive"),
        "filtered_docs": st_filt["n_out"], "classifier_f1": round(st_filt["metrics"]["f1"], 4),
        "classifier_precision": round(st_filt["metrics"]["precision"], 4),
        "classifier_recall": round(st_filt["metrics"]["recall"], 4),
        "textbooks_generated": gen["textbook"]["n_out"], "textbooks_verified": ver["textbook"]["n_out"],
        "exercises_generated": gen["exercises"]["n_out"], "exercises_verified": ver["exercises"]["n_out"],
        "exercise_rejections": ver["exercises"].get("by_kind", {}).get("exercises", {}).get("reasons", {}),
        "dedup_removed": st_dedup["n_in"] - st_dedup["n_out"], "decontam_removed": st_dec["n_in"] - st_dec["n_out"],
        "final_docs": st_dec["n_out"], "train_tokens": st_pack["train_tokens"], "val_tokens": st_pack["val_tokens"],
        "teacher_tokens_this_run": usage.to_dict() if usage is not None and usage.requests else None,
        "stage_seconds_this_run": seconds, "wall_seconds_this_run": round(time.perf_counter() - t_start, 1),
    }
    write_stats(out / SUMMARY, summary)
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from nanophi.textbook.teacher import DEFAULT_TEACHER

    parser.add_argument("--preset", choices=list(PRESETS), default="tiny",
                        help="tiny: <= 15 min on 2 CPU cores; small: hours on a CPU; full: a GPU or an endpoint")
    parser.add_argument("--out", required=True, help="output folder (rerun to resume)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every stage")
    parser.add_argument("--source", default=None, help="pool source: a folder of .py files or a JSONL "
                        "(default: this Python's standard library)")
    parser.add_argument("--teacher", default=DEFAULT_TEACHER,
                        help="local model reference or openai:http://host:port/v1")
    parser.add_argument("--teacher-model", default=None, help="model name at an openai: endpoint")
    parser.add_argument("--teacher-device", default="cpu", help="local teacher: cpu, cuda or mps")
    parser.add_argument("--labeler", choices=("heuristic", "llm"), default=None,
                        help="override the preset's labeler (llm: the teacher judges)")
    parser.add_argument("--textbooks", type=int, default=None, help="override the preset's textbook count")
    parser.add_argument("--exercises", type=int, default=None, help="override the preset's exercise count")
    parser.add_argument("--tasks", type=int, default=1,
                        help="> 1: pool, annotate, filter, verify, dedup, decontaminate run as datatrove tasks "
                             "into folders of shards (needs nanophi[data])")
    parser.add_argument("--workers", type=int, default=1, help="with --tasks: tasks run at once")
    from nanophi.textbook.scale import add_executor_arguments

    add_executor_arguments(parser)


def run(args: argparse.Namespace) -> int:
    p = PRESETS[args.preset]
    overrides = {k: v for k, v in (("labeler", args.labeler), ("textbooks", args.textbooks),
                                   ("exercises", args.exercises)) if v is not None}
    preset: str | Preset = replace(p, **overrides) if overrides else args.preset
    executor = None
    if args.tasks > 1:
        from nanophi.textbook.scale import executor_from_args

        executor = executor_from_args(args)
    try:
        summary = run_pipeline(args.out, preset, seed=args.seed, teacher_ref=args.teacher,
                               teacher_model=args.teacher_model, teacher_device=args.teacher_device,
                               pool_source=args.source,
                               name=args.preset + "".join(f"+{k}={v}" for k, v in overrides.items()),
                               tasks=args.tasks, workers=args.workers, executor=executor)
    except StageSubmitted as e:
        print(e)
        return 0
    keys = ("pool_docs", "labeled", "filtered_docs", "classifier_f1", "textbooks_generated", "textbooks_verified",
            "exercises_generated", "exercises_verified", "dedup_removed", "decontam_removed", "final_docs",
            "train_tokens", "wall_seconds_this_run")
    print(f"textbook run ({args.preset}): " + ", ".join(f"{k}={summary[k]}" for k in keys))
    print(f"summary: {Path(args.out) / SUMMARY}; card: {Path(args.out) / 'CARD.md'}")
    return 0

