"""The figures of docs/article.md and the slides, made from real runs (docs/img/article_*.png).

    python scripts/article_figures.py ../shared/data/pride_and_prejudice.txt        # ~3 min on a quiet CPU core
    python scripts/article_figures.py book.txt --steps 300 --runs /tmp/runs           # shorter, for a check

Trains two char-level models on the book with the project's two CPU recipes (recipes/nanogpt-cpu.toml, nanoGPT's
baseline, here 1000 steps with network-health diagnostics every 50; recipes/cpu-fast.toml, the fastest to a low
loss: about as many tokens in 390 steps of batch 24), runs
the offline textbook pipeline on a slice of the standard library, and draws:

    article_loss.png       train and val loss of both recipes against tokens seen
    article_updates.png    update/data ratio of every parameter over the baseline run
    article_health.png     residual-stream scale, attention entropy and dead MLP units per block
    article_attention.png  every head's attention on a prompt, from the baseline's best checkpoint
    article_funnel.png     documents kept by each textbook stage
    article_figures.json   the numbers behind them (final losses, steps, stage counts)

Runs count steps, not seconds, so a busy machine changes how long this takes, not the figures.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
IMG = ROOT / "docs" / "img"
PROMPT = "It is a truth universally"
POOL_DOCS = 2000
LABELS = 600
DPI = 110


def train_run(book: Path, out: Path, recipe: str, extra: list[str]) -> dict[str, Any]:
    from nanophi import train

    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    flags = ["--data", str(book.resolve()), "--tokenizer", "char", "--out", str(out), "--config",
             str(ROOT / "recipes" / recipe), "--dashboard", "off", *extra]
    shutil.rmtree(out, ignore_errors=True)
    return train.train(train.config_from_args(parser.parse_args(flags)))


def save(fig: Any, name: str, img: Path) -> Path:
    path = img / name
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    return path


def loss_figure(runs: dict[str, Path]) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from nanophi.debug.report import read_metrics

    fig = Figure(figsize=(8, 4))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for (label, run), color in zip(runs.items(), ("tab:blue", "tab:orange")):
        cfg = json.loads((run / "config.json").read_text())
        per_step = cfg["train"]["batch_size"] * cfg["train"]["grad_accum"] * cfg["model"]["block_size"]
        m = read_metrics(run)
        ax.plot([r["step"] * per_step / 1e3 for r in m.train], [r["loss"] for r in m.train], color=color, lw=1,
                alpha=0.5, label=f"{label}, train")
        ax.plot([r["step"] * per_step / 1e3 for r in m.eval], [r["val_loss"] for r in m.eval], "o-", color=color,
                ms=4, label=f"{label}, val (final {m.eval[-1]['val_loss']:.3f})")
    ax.set(xlabel="thousands of tokens seen", ylabel="loss (nats / char)", ylim=(1.0, 3.5),
           title="Pride and Prejudice, char-level: two CPU recipes")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def funnel(work: Path) -> tuple[Any, dict[str, int]]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from nanophi.textbook import annotate
    from nanophi.textbook.decontaminate import decontaminate
    from nanophi.textbook.dedup import dedup
    from nanophi.textbook.filter import train_filter
    from nanophi.textbook.pool import build_pool

    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    counts = {"pool": build_pool(None, work / "pool.jsonl", split="function", max_docs=POOL_DOCS)["n_out"]}
    annotate.annotate(work / "pool.jsonl", work / "labels.jsonl", n=LABELS, seed=0)
    counts["filter"] = train_filter(work / "labels.jsonl", work / "pool.jsonl", work / "filtered.jsonl")["n_out"]
    counts["dedup"] = dedup(work / "filtered.jsonl", work / "dedup.jsonl")["n_out"]
    counts["decontaminate"] = decontaminate(work / "dedup.jsonl", work / "clean.jsonl")["n_out"]
    fig = Figure(figsize=(7, 3))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.barh(list(counts)[::-1], list(counts.values())[::-1], color="tab:green")
    for i, v in enumerate(list(counts.values())[::-1]):
        ax.text(v, i, f" {v}", va="center")
    ax.set(xlabel="documents", title=f"textbook pipeline on {POOL_DOCS} standard-library functions")
    ax.set_xlim(0, max(counts.values()) * 1.15)
    return fig, counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("book", help="a local text file (the article uses Pride and Prejudice)")
    parser.add_argument("--runs", default=str(ROOT / "runs" / "article"), help="where the runs go")
    parser.add_argument("--baseline-steps", type=int, default=1000,
                        help="max_iters of the nanoGPT recipe (its own is 2000; 1000 sees as many tokens as cpu-fast)")
    parser.add_argument("--steps", type=int, default=None, help="override both recipes' max_iters (a quick check)")
    parser.add_argument("--img", default=str(IMG), help="where the figures go (default: docs/img)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    import torch

    from nanophi.debug import report
    from nanophi.refs import load_model

    torch.set_num_threads(1)  # deterministic either way; one thread degrades gracefully on a shared machine
    runs_dir = Path(args.runs)
    steps = ["--max-iters", str(args.steps)] if args.steps else []
    base_steps = steps or ["--max-iters", str(args.baseline_steps)]
    base, fast = runs_dir / "nanogpt-cpu", runs_dir / "cpu-fast"
    summary = {
        "nanogpt-cpu": train_run(Path(args.book), base, "nanogpt-cpu.toml", ["--debug-interval", "50", *base_steps]),
        "cpu-fast": train_run(Path(args.book), fast, "cpu-fast.toml", ["--eval-interval", "50", *steps]),
    }
    img = Path(args.img)
    img.mkdir(parents=True, exist_ok=True)
    written = [save(loss_figure({"nanoGPT CPU recipe": base, "cpu-fast recipe": fast}), "article_loss.png", img)]
    metrics = report.read_metrics(base)
    written.append(save(report.fig_updates(metrics), "article_updates.png", img))
    written.append(save(report.fig_health(metrics), "article_health.png", img))
    model, tokenizer = load_model(str(base / "best"))
    ids = tokenizer.encode(PROMPT)
    written.append(save(report.fig_attention(model, ids, [tokenizer.decode([i]) for i in ids]),
                        "article_attention.png", img))
    fig, counts = funnel(runs_dir / "textbook")
    written.append(save(fig, "article_funnel.png", img))
    numbers = {"runs": {k: {"step": v["step"], "best_val_loss": v["best_val_loss"], "tokens_seen": v["tokens_seen"]}
                        for k, v in summary.items()}, "textbook_funnel": counts}
    (img / "article_figures.json").write_text(json.dumps(numbers, indent=2) + "\n")
    for p in written:
        print(p)
    print(json.dumps(numbers))
    return 0


if __name__ == "__main__":
    sys.exit(main())
