"""`make artifacts`: train the showcase e-book model and publish it, with its samples, into artifacts/ (committed).

    python scripts/artifacts.py                                  # data/pride_and_prejudice.txt, ~2 min on 2 CPU cores
    python scripts/artifacts.py gutenberg:1342                   # any nanophi source: a Gutenberg id, a file, a dir
    python scripts/artifacts.py book.txt --name my-book -- --max-iters 5000   # extra `nanophi train` flags after --
    python scripts/artifacts.py --teacher                        # the teacher before/after its fine-tune (~15 min)
    python scripts/artifacts.py book.txt --smoke --out /tmp/a    # tiny settings, to check the script in seconds
    python scripts/artifacts.py --index                          # only INDEX.md (after scripts/case_study_samples.py)

writes

    artifacts/INDEX.md                       every file: size, sha256, the command that made it
    artifacts/<name>/model.safetensors       the final checkpoint, flat: `nanophi sample artifacts/<name>` loads it
                    /config.json, state.json, tokenizer/
                    /metrics.json            val loss and bits per byte on the whole held-out split, parameters,
                                             steps, time, machine, the exact command and flags
                    /metrics.jsonl           the training log the report is drawn from
                    /report.html             `nanophi report` (self-contained: figures inline)
                    /samples.md, .jsonl      prompts cut from the held-out split: the model's continuation beside
                                             the book's own
    artifacts/teacher/samples.md, .jsonl     SmolLM2-135M-Instruct on HumanEval problems before and after the case
                     /metrics.json           study's masked exercise fine-tune: completions and pass/fail (the
                                             fine-tuned weights are not kept: 540 MB)

The model is nanoGPT's CPU recipe (recipes/nanogpt-cpu.toml: char-level, 4 layers x 4 heads x 128, GPT-2 blocks);
anything after `--` overrides it as on the `nanophi train` command line. The training run itself (with the
optimizer state) stays in runs/artifacts/<name>; only the weights, config and tokenizer are published.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "nanogpt-cpu.toml"
DEFAULT_BOOK = str(ROOT / "data" / "pride_and_prejudice.txt")  # from any working directory
DEFAULT_NAME = "pride-and-prejudice"
# The showcase run's own flags, on top of the recipe: diagnostics for the report, no live dashboard.
SHOWCASE_FLAGS = ["--tokenizer", "char", "--debug-interval", "100", "--sample-interval", "500", "--dashboard", "off"]
SMOKE_FLAGS = ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "32", "--max-iters", "20",
               "--warmup-iters", "2", "--eval-interval", "10", "--eval-iters", "2", "--debug-interval", "5",
               "--sample-interval", "0", "--log-interval", "5"]
# What is copied from the checkpoint into the published folder: enough to load and sample, no optimizer state.
CHECKPOINT_FILES = ("model.safetensors", "config.json", "state.json", "tokenizer")
N_PROMPTS = 12
PROMPT_CHARS = 200  # each prompt: about this much of the held-out text, cut at a paragraph start and a word end
NEW_TOKENS = 300
SAMPLING = {"temperature": 0.8, "top_k": 40, "seed": 1}
TEACHER_PRESET = "small"  # docs/case_study/results.json's teacher_finetune ran with this preset's settings
TEACHER_PROBLEMS = 10
FILE_NOTES = {
    "model.safetensors": "weights (fp32; the tied head is stored once)",
    "config.json": "the resolved run config: model, data, training",
    "state.json": "step, best val loss, tokens seen, sha256 of the training tokens",
    "tokenizer/vocab.json": "the tokenizer's vocabulary (loaded with the checkpoint)",
    "tokenizer/tokenizer_config.json": "the tokenizer's kind",
    "tokenizer/tokenizer.json": "the BPE tokenizer",
    "metrics.json": "the numbers: loss, bits per byte, parameters, steps, time, machine, command",
    "metrics.jsonl": "the training log: every logged step, eval, diagnostic and sample",
    "report.html": "`nanophi report`: curves, diagnostics, attention maps, embeddings (self-contained HTML)",
    "samples.md": "the samples, to read",
    "samples.jsonl": "the same samples, one JSON object per line",
}
# artifacts/case-study/ is written by scripts/case_study_samples.py; its metrics.json has the arms' counts
FILE_NOTES_BY_FOLDER = {"case-study": {"metrics.json": "every arm's counts over all problems, bits per byte, the "
                                                       "preset, the commands that made the run"}}

log = logging.getLogger("artifacts")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra: list[str] = []
    if "--" in argv:
        argv, extra = argv[: argv.index("--")], argv[argv.index("--") + 1 :]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("book", nargs="?", default=DEFAULT_BOOK,
                        help="any nanophi data source: a text file, gutenberg:<id>, a folder "
                             "(default data/pride_and_prejudice.txt)")
    parser.add_argument("--name", default=DEFAULT_NAME, help=f"the published folder's name (default {DEFAULT_NAME})")
    parser.add_argument("--out", default=str(ROOT / "artifacts"), help="where to publish (default: artifacts/)")
    parser.add_argument("--runs", default=str(ROOT / "runs" / "artifacts"), help="where the training run goes")
    parser.add_argument("--config", default=str(RECIPE), help="TOML recipe for the model and training")
    parser.add_argument("--teacher", action="store_true",
                        help="instead of training: the teacher's HumanEval completions before and after fine-tuning")
    parser.add_argument("--problems", type=int, default=TEACHER_PROBLEMS, help="HumanEval problems for --teacher")
    parser.add_argument("--smoke", action="store_true", help="tiny settings, to check the script in seconds")
    parser.add_argument("--index", action="store_true",
                        help="only rewrite INDEX.md from the folders in --out (after scripts/case_study_samples.py)")
    args = parser.parse_args(argv)
    if args.index:
        print(write_index(Path(args.out)))
        return 0

    from nanophi.errors import UserError

    try:
        if args.teacher:
            _logging()
            folder = build_teacher(Path(args.out), args.problems, args.smoke)
        else:
            check_source(args.book)  # before logging is set up: an offline gutenberg:ID fails in one line
            _logging()
            folder = build_book(args, extra)
        print(write_index(Path(args.out)))
        print(folder / "samples.md")
    except UserError as e:
        print(f"artifacts: error: {e}", file=sys.stderr)
        return 2
    return 0


def _logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr, force=True)


def check_source(spec: str) -> None:
    """Read the source once (downloading a Gutenberg book into the cache), so a bad one fails before training."""
    from nanophi.sources import iter_documents

    for _ in iter_documents(spec):
        pass


# ---------------------------------------------------------------------------------------------- the e-book model

def build_book(args: argparse.Namespace, extra: list[str]) -> Path:
    from nanophi.evaluate import evaluate_model

    source = _portable(args.book)
    data = args.book if args.book.startswith("gutenberg:") or args.book == "pydoc" else str(Path(args.book).resolve())
    run_dir = Path(args.runs) / args.name
    shutil.rmtree(run_dir, ignore_errors=True)  # a build output: always rebuilt whole
    flags = ["--data", data, "--out", str(run_dir), "--config", args.config, *SHOWCASE_FLAGS]
    flags += (SMOKE_FLAGS if args.smoke else []) + extra
    t0 = time.perf_counter()
    summary = train_run(flags)
    wall_s = time.perf_counter() - t0

    from nanophi.checkpoint import find

    folder = Path(args.out) / args.name
    publish_checkpoint(find(run_dir), folder, source)  # the best checkpoint (the final one, when it is the best)
    shutil.copy2(run_dir / "metrics.jsonl", folder / "metrics.jsonl")
    val = evaluate_model(str(folder), data=data, split="val")
    samples = write_book_samples(folder, data)
    write_report(run_dir, folder, samples[0]["prompt"])

    from nanophi.refs import load_model

    model, _ = load_model(folder)
    metrics = {
        "model": args.name, "source": source, "recipe": _portable(args.config),
        "val": {"loss": round(val["loss"], 4), "bpb": round(val["bpb"], 4), "tokens": val["tokens"],
                "note": "every token of the held-out split (the last 10 % of the text)"},
        "best_val_loss_during_training": round(summary["best_val_loss"], 4),
        "params": model.num_params(), "steps": summary["step"], "tokens_seen": summary["tokens_seen"],
        "train_time_s": round(summary["train_time_s"], 1), "wall_s": round(wall_s, 1),
        "ms_per_step": round(1000 * summary["train_time_s"] / max(1, summary["step"]), 1),
        "sampling": SAMPLING, "machine": machine(),
        "command": _command(), "train_flags": [_portable(f) for f in flags],
    }
    _write_json(folder / "metrics.json", metrics)
    return folder


def train_run(flags: list[str]) -> dict[str, Any]:
    """`nanophi train FLAGS`, in process, through the same parser and config resolution as the CLI."""
    from nanophi import train

    parser = argparse.ArgumentParser(prog="nanophi train")
    train.add_arguments(parser)
    cfg = train.config_from_args(parser.parse_args(flags))
    return train.train(cfg)


def publish_checkpoint(ckpt: Path, folder: Path, source: str) -> None:
    """Copy one checkpoint flat into `folder` (refs loads a directory holding state.json + model.safetensors),
    with this machine's paths replaced by portable ones: the published config names the source as the user
    would type it, and the prepared-data cache (a local path) is left out of the state."""
    ckpt = ckpt.resolve()
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for name in CHECKPOINT_FILES:
        src = ckpt / name
        if src.is_dir():
            shutil.copytree(src, folder / name)
        elif src.is_file():
            shutil.copy2(src, folder / name)
    config = json.loads((folder / "config.json").read_text())
    config["data"]["data"] = source
    config["train"]["out"] = _portable(str(folder))
    _write_json(folder / "config.json", config)
    state = json.loads((folder / "state.json").read_text())
    state.pop("data_dir", None)
    _write_json(folder / "state.json", state)


def book_prompts(text: str, n: int = N_PROMPTS, prompt_chars: int = PROMPT_CHARS,
                 truth_chars: int = NEW_TOKENS) -> list[dict[str, Any]]:
    """`n` prompts spread evenly over `text`, each starting at a paragraph and ending at a word, with the
    `truth_chars` characters that really follow."""
    room = len(text) - prompt_chars - truth_chars
    if room <= 0:
        from nanophi.errors import UserError

        raise UserError(f"the held-out split has {len(text)} characters, too few for {n} prompts; use a longer text")
    rows = []
    for i in range(n):
        at = int(i * room / n)
        para = text.find("\n\n", at, at + room // n)
        start = para + 2 if para >= 0 else at
        while start < len(text) and text[start].isspace():
            start += 1
        end = text.rfind(" ", start, start + prompt_chars)
        end = end if end > start + prompt_chars // 2 else start + prompt_chars
        rows.append({"id": i, "offset_chars": start, "prompt": text[start:end],
                     "book": text[end:end + truth_chars]})
    return rows


def write_book_samples(folder: Path, data: str) -> list[dict[str, Any]]:
    """The held-out split's prompts with the model's continuation and the book's; samples.md and samples.jsonl."""
    from nanophi.engine import Engine
    from nanophi.prepare import prepare
    from nanophi.refs import load_model

    model, tokenizer = load_model(folder)
    config = json.loads((folder / "config.json").read_text())
    dc = config["data"]
    val = prepare(data, tokenizer=dc["tokenizer"], val_fraction=dc["val_fraction"], glob=dc["glob"],
                  tokenizer_obj=tokenizer).val
    rows = book_prompts(tokenizer.decode(val.tolist()))
    outputs = Engine(model, tokenizer).generate([r["prompt"] for r in rows], max_new_tokens=NEW_TOKENS,
                                                temperature=SAMPLING["temperature"], top_k=SAMPLING["top_k"],
                                                seed=SAMPLING["seed"])
    for r, out in zip(rows, outputs):
        r["model"] = out
        r |= {"source": "val split", **SAMPLING, "max_new_tokens": NEW_TOKENS}
    _write_jsonl(folder / "samples.jsonl", rows)
    lines = [f"# Samples: `{folder.name}`", "",
             f"{len(rows)} prompts cut from the held-out split (the last 10 % of the book, never trained on). Beside "
             f"each, the model's continuation ({NEW_TOKENS} tokens, temperature {SAMPLING['temperature']}, top-k "
             f"{SAMPLING['top_k']}, seed {SAMPLING['seed']}) and the book's own. Reproduce one:", "",
             "```bash", f"nanophi sample {_portable(str(folder))} --prompt \"...\" --max-new-tokens {NEW_TOKENS} "
             f"--temperature {SAMPLING['temperature']} --top-k {SAMPLING['top_k']} --seed {SAMPLING['seed']}", "```", ""]
    for r in rows:
        lines += [f"## {r['id'] + 1}. at character {r['offset_chars']:,} of the held-out split", "",
                  *[f"> {line}" if line else ">" for line in r["prompt"].splitlines()], "",
                  "| the model | the book |", "|---|---|", f"| {_cell(r['model'])} | {_cell(r['book'])} |", ""]
    (folder / "samples.md").write_text("\n".join(lines), encoding="utf-8")
    return rows


def write_report(run_dir: Path, folder: Path, prompt: str) -> None:
    from nanophi.debug.report import write_report as report

    shutil.copy2(report(run_dir, prompt=prompt[-48:]), folder / "report.html")


# ---------------------------------------------------------------------------------------------- the teacher

def build_teacher(out: Path, problems: int, smoke: bool) -> Path:
    """The case study's teacher experiment (`teacher_experiment`, the code `nanophi textbook experiment` runs)
    on the first `problems` HumanEval problems, with the small preset's fine-tune: its training exercises are
    the verified stdlib doctest exercises, as in docs/case_study/results.json (the teacher's own exercises did
    not pass their asserts). The completions before and after go to samples.md / samples.jsonl."""
    from nanophi.textbook.experiment import DEFAULT_TEACHER, PRESETS, SPLIT_SEED, teacher_experiment
    from nanophi.textbook.experiment.data import load_data
    from nanophi.textbook.experiment.exercises import verified_doctest_exercises

    preset = dataclasses.replace(PRESETS["test" if smoke else TEACHER_PRESET], teacher_limit=problems)
    folder = out / "teacher"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    t0 = time.perf_counter()
    exercises, counts = verified_doctest_exercises()
    with tempfile.TemporaryDirectory(prefix="artifacts-teacher-") as tmp:
        data_dir = Path(tmp) / "data"  # no pool or textbooks: only the exercises matter to the teacher
        data_dir.mkdir()
        for name in ("pool.jsonl", "filtered.jsonl", "textbooks.jsonl", "exercises.verified.jsonl"):
            (data_dir / name).write_text("")
        data = load_data(data_dir, seed=SPLIT_SEED, extra_exercises=exercises, tau=preset.tau,
                         heldout_code_fraction=preset.heldout_code_fraction,
                         heldout_exercise_fraction=preset.heldout_exercise_fraction)
        result = teacher_experiment(DEFAULT_TEACHER, data, preset, Path(tmp) / "teacher")
        rows = []
        for split in ("humaneval", "heldout"):
            before = [json.loads(x) for x in (Path(tmp) / "teacher" / f"before_{split}.jsonl").read_text().splitlines()]
            after = [json.loads(x) for x in (Path(tmp) / "teacher" / f"after_{split}.jsonl").read_text().splitlines()]
            probs = ({p["task_id"]: p for p in _humaneval()} if split == "humaneval"
                     else {e.as_problem()["task_id"]: e.as_problem() for e in data.heldout_exercises})
            rows += [{"split": split, "task_id": b["task_id"], "prompt": probs[b["task_id"]]["prompt"],
                      "before": _verdict(b), "after": _verdict(a)} for b, a in zip(before, after)]
    _write_jsonl(folder / "samples.jsonl", rows)
    metrics = {"model": DEFAULT_TEACHER, "preset": TEACHER_PRESET if not smoke else "test",
               "settings": {"problems": problems, "max_new_tokens": preset.teacher_max_new_tokens,
                            "decode": result["decode"], "ft_steps": preset.teacher_ft_steps,
                            "ft_batch": preset.teacher_ft_batch, "ft_lr": preset.teacher_ft_lr,
                            "ft_block": preset.teacher_block},
               "train_exercises": len(data.train_exercises), "heldout_exercises": len(data.heldout_exercises),
               "stdlib_doctests": counts, "before": result["before"], "after": result["after"],
               "finetune": result["finetune"], "wall_s": round(time.perf_counter() - t0, 1),
               "machine": machine(), "command": _command()}
    _write_json(folder / "metrics.json", metrics)
    write_teacher_markdown(folder, rows, metrics)
    return folder


def _humaneval() -> list[dict[str, str]]:
    from nanophi.humaneval import load_problems

    return load_problems()


def _verdict(row: dict[str, Any]) -> dict[str, Any]:
    return {"completion": row["completion"], "passed": row["passed"], "parses": row["parses"], "runs": row["runs"],
            "status": row["status"], "reason": row["reason"]}


def write_teacher_markdown(folder: Path, rows: list[dict[str, Any]], m: dict[str, Any]) -> None:
    s, ft = m["settings"], m["finetune"]

    def tally(split: str, when: str) -> str:
        r = m[when][split]
        return f"{r['passed']}/{r['n']} pass, {r['parse_rate']:.0%} parse, {r['run_rate']:.0%} run"

    lines = [f"# Samples: the teacher ({m['model']}) before and after the exercise fine-tune", "",
             f"The case study's teacher experiment (`nanophi textbook experiment`'s `teacher_experiment`), on the "
             f"first {s['problems']} HumanEval problems and the {m['heldout_exercises']} held-out exercises: greedy "
             f"completions of at most {s['max_new_tokens']} tokens ({s['decode']} decoding), cut at HumanEval's stop "
             f"sequences and run against the tests in the sandbox; then {ft['steps']} AdamW steps of batch "
             f"{ft['batch_size']} at lr {ft['lr']} on {m['train_exercises']} verified exercises with the prompt "
             f"masked out of the loss (loss {ft['first_loss']:.2f} -> {ft['last_loss']:.2f}, {ft['seconds']:.0f} s), "
             "and the same problems again. The fine-tuned weights are not kept.", "",
             "| | before | after |", "|---|---|---|",
             f"| HumanEval | {tally('humaneval', 'before')} | {tally('humaneval', 'after')} |",
             f"| held-out exercises | {tally('heldout', 'before')} | {tally('heldout', 'after')} |", ""]
    for r in rows:
        lines += [f"## {r['task_id']}", "", "````python", r["prompt"].rstrip("\n"), "````", ""]
        for when in ("before", "after"):
            v = r[when]
            mark = "pass" if v["passed"] else f"fail ({v['reason'] or v['status']})"
            lines += [f"**{when}**: {mark.splitlines()[0][:160]}", "", "````python",
                      v["completion"].rstrip("\n") or "# (empty completion)", "````", ""]
    (folder / "samples.md").write_text("\n".join(lines), encoding="utf-8")


# ---------------------------------------------------------------------------------------------- the index

def write_index(out: Path) -> Path:
    """INDEX.md: every published file with its size and sha256, grouped by folder, with the command that made it."""
    lines = ["# nanophi artifacts", "",
             "Made by `scripts/artifacts.py` (`make artifacts`); docs/artifacts.md says how to rebuild and publish.",
             "`tests/test_scripts.py` checks the weights against the sha256 given here.", ""]
    for folder in sorted(p for p in out.iterdir() if p.is_dir() and (p / "metrics.json").is_file()):
        m = json.loads((folder / "metrics.json").read_text())
        lines += [f"## {folder.name}/", "", _headline(folder, m), "",
                  f"Made by `{' '.join(m['command'])}` on {m['machine']['cpu']} ({m['machine']['cpus']} CPUs), "
                  f"torch {m['machine']['torch']}, nanophi commit {m['machine']['git_commit'][:12]}.", "",
                  "| file | what it is | size | sha256 |", "|---|---|---|---|"]
        for p in sorted(q for q in folder.rglob("*") if q.is_file()):
            rel = p.relative_to(folder).as_posix()
            note = FILE_NOTES_BY_FOLDER.get(folder.name, {}).get(rel, FILE_NOTES.get(rel, ""))
            lines.append(f"| `{folder.name}/{rel}` | {note} | {_size(p.stat().st_size)} | "
                         f"`{sha256(p)}` |")
        lines.append("")
    index = out / "INDEX.md"
    index.write_text("\n".join(lines), encoding="utf-8")
    return index


def _headline(folder: Path, m: dict[str, Any]) -> str:
    if "val" in m:
        return (f"A {m['params'] / 1e6:.2f}M-parameter character-level GPT trained on `{m['source']}` "
                f"({m['recipe']}, {m['steps']} steps, {m['train_time_s']} s of training at load average "
                f"{m['machine']['load_avg_1min']}): held-out loss "
                f"{m['val']['loss']} nats/token, {m['val']['bpb']} bits per byte. Load it with "
                f"`nanophi sample artifacts/{folder.name} --prompt \"...\"`.")
    if "arms" in m:  # artifacts/case-study (scripts/case_study_samples.py)
        a = next(iter(m["arms"].values()))
        passed = sum(x["all"]["humaneval_passed"] for x in m["arms"].values())
        return (f"The case study's {len(m['arms'])} student arms ({m['preset']} preset, seed {a['seed']}, "
                f"{a['params'] / 1e6:.2f}M parameters each): the first {m['problems_per_split']} HumanEval problems and "
                f"held-out exercises with every arm's completion and the sandbox's verdict; {passed} of "
                f"{len(m['arms']) * m['humaneval_problems']} HumanEval completions pass. The weights are not kept.")
    b, a = m["before"]["humaneval"], m["after"]["humaneval"]
    return (f"{m['model']} on the first {b['n']} HumanEval problems before and after the case study's exercise "
            f"fine-tune: {b['passed']}/{b['n']} -> {a['passed']}/{a['n']} pass, parse rate {b['parse_rate']:.0%} -> "
            f"{a['parse_rate']:.0%}. The fine-tuned weights are not kept (540 MB).")


# ---------------------------------------------------------------------------------------------- helpers

def machine() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {"cpu": cpu, "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_avg_1min": round(os.getloadavg()[0], 2), "gpu": torch.cuda.get_device_name(0)
            if torch.cuda.is_available() else "none", "torch": torch.__version__,
            "python": platform.python_version(), "git_commit": commit or "unknown"}


def _command() -> list[str]:
    return ["python", "scripts/artifacts.py", *[_portable(a) for a in sys.argv[1:]]]


def _portable(arg: str) -> str:
    """A path inside the repository as a repository-relative path; anything else unchanged."""
    try:
        # absolute(), not resolve(): recipes/ is a link into the package, and the path the user typed is the one to keep
        return Path(arg).absolute().relative_to(ROOT).as_posix() if Path(arg).exists() else arg
    except ValueError:
        return arg


def _cell(text: str) -> str:
    """Text as one Markdown table cell: newlines as <br>, pipes escaped."""
    return text.replace("|", "\\|").replace("\n", "<br>")


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _size(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


if __name__ == "__main__":
    sys.exit(main())
