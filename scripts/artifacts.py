"""`make artifacts`: train the showcase e-book model and write everything worth publishing into artifacts/.

    python scripts/artifacts.py ../shared/data/pride_and_prejudice.txt               # ~2 min on 2 CPU cores
    python scripts/artifacts.py book.txt -- --max-iters 5000 --device cuda            # extra `nanophi train` flags
    python scripts/artifacts.py book.txt --textbook runs/textbook-experiment          # also index the case study
    python scripts/artifacts.py book.txt --smoke                                      # tiny settings, seconds

writes

    artifacts/INDEX.md              what each file is, how it was made, sizes and sha256 of the weights
    artifacts/ebook/run/            the nanophi run: checkpoints (safetensors + config + tokenizer), metrics.jsonl
    artifacts/ebook/report.html     `nanophi report` of the run (self-contained), figures in run/figures/
    artifacts/ebook/inputs.jsonl    input samples: prompts cut from the held-out split, with the book's continuation
    artifacts/ebook/samples.jsonl   generated outputs for those prompts (temperature, top-k, seed recorded)
    artifacts/ebook/metrics.json    train summary, full-split val loss and bits per byte, parameters, timings
    artifacts/ebook/hf/             the model in Hugging Face format (when transformers is installed)
    artifacts/textbook/             a copy of a `nanophi textbook experiment` output directory (with --textbook)

The model is nanoGPT's CPU recipe (recipes/nanogpt-cpu.toml: 4 layers x 4 heads x 128, char-level, GPT-2 blocks)
so it exports to GPT2LMHeadModel; anything after `--` overrides it as on the `nanophi train` command line.
The e-book's text is not copied into artifacts/ (only short excerpts in inputs.jsonl): check its licence first.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "nanogpt-cpu.toml"
# The showcase run's own flags, on top of the recipe: diagnostics for the report, samples in the log.
SHOWCASE_FLAGS = ["--tokenizer", "char", "--debug-interval", "50", "--sample-interval", "500", "--dashboard", "off"]
SMOKE_FLAGS = ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "32", "--max-iters", "20",
               "--warmup-iters", "2", "--eval-interval", "10", "--eval-iters", "2", "--debug-interval", "5",
               "--sample-interval", "0", "--log-interval", "5"]
N_PROMPTS = 4
PROMPT_TOKENS = 64  # each prompt is this many tokens of the held-out split (characters, for a char model)
NEW_TOKENS = 400
SAMPLING = [dict(temperature=0.0, top_k=None), dict(temperature=0.8, top_k=40)]
SEED = 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra: list[str] = []
    if "--" in argv:
        argv, extra = argv[: argv.index("--")], argv[argv.index("--") + 1 :]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("book", help="a local UTF-8 text file (e.g. a Project Gutenberg e-book)")
    parser.add_argument("--out", default=str(ROOT / "artifacts"), help="where to write (default: artifacts/)")
    parser.add_argument("--config", default=str(RECIPE), help="TOML recipe for the model and training")
    parser.add_argument("--textbook", default=None, help="a `nanophi textbook experiment` output dir to include")
    parser.add_argument("--smoke", action="store_true", help="tiny settings, to check the script in seconds")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)

    from nanophi.errors import UserError

    try:
        build(args, extra)
    except UserError as e:
        print(f"artifacts: error: {e}", file=sys.stderr)
        return 2
    return 0


def build(args: argparse.Namespace, extra: list[str]) -> None:
    from nanophi.errors import UserError

    book = Path(args.book)
    if not book.is_file():
        raise UserError(f"{book} is not a file; pass the path of a local text file, e.g. pride_and_prejudice.txt")
    out = Path(args.out)
    ebook = out / "ebook"
    shutil.rmtree(ebook, ignore_errors=True)  # a build output: always rebuilt whole
    ebook.mkdir(parents=True)
    run_dir = ebook / "run"

    flags = ["--data", str(book.resolve()), "--out", str(run_dir), "--config", args.config, *SHOWCASE_FLAGS]
    flags += (SMOKE_FLAGS if args.smoke else []) + extra
    t0 = time.perf_counter()
    summary = train_run(flags)
    train_s = time.perf_counter() - t0

    from nanophi.evaluate import evaluate_model

    val = evaluate_model(str(run_dir / "best"), split="val")
    inputs, samples = write_samples(run_dir, ebook)
    report = write_report(run_dir, ebook, inputs[0]["prompt"])
    hf_note = export_hf(run_dir, ebook / "hf")
    metrics = {"summary": summary, "val": val, "train_wall_s": round(train_s, 1),
               "command": ["python", "scripts/artifacts.py", *sys.argv[1:]], "train_flags": flags,
               "environment": environment()}
    (ebook / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str) + "\n")
    textbook = copy_textbook(Path(args.textbook), out / "textbook") if args.textbook else None
    index = write_index(out, ebook, metrics, report, hf_note, textbook, book)
    print(index)


def train_run(flags: list[str]) -> dict[str, Any]:
    """`nanophi train FLAGS`, in process, through the same parser and config resolution as the CLI."""
    from nanophi import train

    parser = argparse.ArgumentParser(prog="nanophi train")
    train.add_arguments(parser)
    cfg = train.config_from_args(parser.parse_args(flags))
    return train.train(cfg)


def write_samples(run_dir: Path, ebook: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Prompts cut from the held-out split (with the text that really follows) and the model's continuations."""
    from nanophi.config import RunConfig
    from nanophi.generate import Engine
    from nanophi.refs import load_model
    from nanophi.train import prepare_data

    model, tokenizer = load_model(str(run_dir / "best"))
    cfg = RunConfig.from_dict(json.loads((run_dir / "config.json").read_text()))
    val = prepare_data(cfg).val
    n = PROMPT_TOKENS
    starts = [int(i * (len(val) - n - NEW_TOKENS) / N_PROMPTS) for i in range(N_PROMPTS)]
    inputs = []
    for i, s in enumerate(starts):
        prompt = tokenizer.decode(val[s : s + n].tolist())
        truth = tokenizer.decode(val[s + n : s + n + NEW_TOKENS].tolist())
        inputs.append({"id": i, "source": "val split", "offset_tokens": s, "prompt": prompt, "continuation": truth})
    engine = Engine(model, tokenizer)
    samples = []
    for setting in SAMPLING:
        texts = engine.generate([r["prompt"] for r in inputs], max_new_tokens=NEW_TOKENS, seed=SEED, **setting)
        samples += [{"id": r["id"], "prompt": r["prompt"], **setting, "seed": SEED, "max_new_tokens": NEW_TOKENS,
                     "output": t} for r, t in zip(inputs, texts)]
    for name, rows in (("inputs.jsonl", inputs), ("samples.jsonl", samples)):
        (ebook / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return inputs, samples


def write_report(run_dir: Path, ebook: Path, prompt: str) -> Path:
    from nanophi.debug.report import write_report as report

    page = report(run_dir, prompt=prompt[:32])
    return Path(shutil.copy2(page, ebook / "report.html"))


def export_hf(run_dir: Path, dest: Path) -> str:
    """Export to Hugging Face format; a note instead when transformers is missing or the model has no HF twin."""
    from nanophi.errors import UserError

    try:
        from nanophi.export import export

        export(str(run_dir / "best"), "hf", dest)
    except ImportError as e:
        return f"not exported: {e.name} is not installed (pip install 'nanophi[hf]')"
    except UserError as e:
        return f"not exported: {e}"
    return "exported"


def copy_textbook(src: Path, dest: Path) -> list[Path]:
    from nanophi.errors import UserError

    if not src.is_dir():
        raise UserError(f"--textbook {src} is not a directory; pass the --out of `nanophi textbook experiment`")
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(src, dest, symlinks=True)
    return sorted(p for p in dest.rglob("*") if p.is_file())


def environment() -> dict[str, str]:
    import torch

    import nanophi

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {"nanophi": getattr(nanophi, "__version__", "unknown"), "git_commit": commit or "unknown",
            "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"}


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _size(path: Path) -> str:
    n = path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def write_index(out: Path, ebook: Path, metrics: dict[str, Any], report: Path, hf_note: str,
                textbook: list[Path] | None, book: Path) -> Path:
    best = (ebook / "run" / "best").resolve()
    weights = best / "model.safetensors"
    s, v, env = metrics["summary"], metrics["val"], metrics["environment"]

    def rel(p: Path) -> str:
        return Path(p).relative_to(out).as_posix()

    lines = [
        "# nanophi artifacts",
        "",
        f"Built by `{' '.join(metrics['command'])}` with nanophi {env['nanophi']} (commit {env['git_commit'][:12]}),",
        f"torch {env['torch']}, Python {env['python']}, device: {env['cuda'] if env['cuda'] != 'none' else 'CPU'}.",
        "",
        "## The e-book model",
        "",
        f"A character-level GPT trained on `{book.name}` "
        f"({s['step']} steps, {s['tokens_seen']:,} tokens seen, {metrics['train_wall_s']} s wall).",
        f"Validation (the held-out end of the book, every token): loss {v['loss']:.4f} nats/token, "
        f"{v['bpb']:.4f} bits per byte.",
        "",
        "| file | what it is | size |",
        "|---|---|---|",
        f"| `{rel(best)}/` | the best checkpoint (`run/best` links to it): `model.safetensors` "
        f"(sha256 `{sha256(weights)[:16]}…`), `config.json`, `tokenizer/`; load with "
        f"`nanophi sample {rel(ebook / 'run')}` | {_size(best)} |",
        f"| `{rel(ebook / 'run' / 'metrics.jsonl')}` | every logged step, eval and sample of training, "
        f"with the network-health diagnostics | {_size(ebook / 'run' / 'metrics.jsonl')} |",
        f"| `{rel(report)}` | `nanophi report`: curves, diagnostics, attention maps, embeddings, samples "
        f"(self-contained HTML) | {_size(report)} |",
        f"| `{rel(ebook / 'inputs.jsonl')}` | input samples: {N_PROMPTS} prompts of {PROMPT_TOKENS} tokens cut "
        f"from the held-out split, with the book's real continuation | {_size(ebook / 'inputs.jsonl')} |",
        f"| `{rel(ebook / 'samples.jsonl')}` | generated outputs for those prompts: greedy and temperature 0.8 / "
        f"top-k 40, seed {SEED} | {_size(ebook / 'samples.jsonl')} |",
        f"| `{rel(ebook / 'metrics.json')}` | train summary, val loss and bits per byte, the exact flags, "
        f"the environment | {_size(ebook / 'metrics.json')} |",
    ]
    if (ebook / "hf").is_dir():
        lines.append(f"| `{rel(ebook / 'hf')}/` | the same model in Hugging Face format "
                     f"(`AutoModelForCausalLM.from_pretrained`) | {_size(ebook / 'hf')} |")
    else:
        lines.append(f"| `ebook/hf/` | Hugging Face export: {hf_note} | |")
    lines += ["", "## The textbook case study", ""]
    if textbook:
        lines += ["Copied from a `nanophi textbook experiment` run:", "", "| file | size |", "|---|---|"]
        lines += [f"| `{rel(p)}` | {_size(p)} |" for p in textbook]
    else:
        lines.append("Not included: run `nanophi textbook experiment` and pass its output with `--textbook DIR`.")
    lines += ["", "## Publishing", "",
              "```bash",
              f"nanophi export {rel(ebook / 'run')} --format hf --out ebook-hf   # then upload ebook-hf/ to a hub",
              f"nanophi export {rel(ebook / 'run')} --format gguf --out ebook.gguf",
              "```", ""]
    index = out / "INDEX.md"
    index.write_text("\n".join(lines), encoding="utf-8")
    return index


if __name__ == "__main__":
    sys.exit(main())
