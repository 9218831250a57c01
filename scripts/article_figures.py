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
    article_figures.json   the numbers behind them (final losses, steps, stage counts, corpus facts)

    python scripts/article_figures.py book.txt --facts-only                            # seconds: no training

`--facts-only` recomputes only the "corpus" and "vocab_cost" entries of article_figures.json (sizes of the
default corpus and the book, tokens per character of a 512-token BPE, the output head's share of the FLOPs per
vocabulary size) and keeps the rest. Runs count steps, not seconds, so a busy machine changes how long this takes,
not the figures. tests/test_article.py checks the article's and the slides' numbers against this file.
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
BPE_VOCAB = 512
# nanoGPT's CPU model (4 layers x 4 heads x 128, context 64) at three vocabulary sizes: a book's characters,
# an 8192-token BPE and GPT-2's padded 50304
VOCAB_COST_SIZES = (8192, 50304)


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


def corpus_facts(book: Path) -> dict[str, Any]:
    """Sizes of the default corpus (the CPython docs) and of `book`, and what a 512-token BPE does to them."""
    from nanophi.sources import iter_documents, read_text
    from nanophi.tokenizer import BPETokenizer, CharTokenizer

    from nanophi.textbook.pool import SKIP_DIRS, stdlib_dir

    stdlib = [p for p in stdlib_dir().rglob("*.py") if not SKIP_DIRS & set(p.parts)]  # what the pool reads
    pydoc = read_text(None)
    bpe = BPETokenizer.train([pydoc], vocab_size=BPE_VOCAB)
    text = read_text(str(book))
    return {
        "pydoc": {"articles": sum(1 for _ in iter_documents(None)), "chars": len(pydoc),
                  "char_vocab": CharTokenizer.train([pydoc]).vocab_size,
                  "bpe512_vocab": bpe.vocab_size, "bpe512_tokens_per_char": len(bpe.encode(pydoc)) / len(pydoc)},
        "book": {"chars": len(text), "char_vocab": CharTokenizer.train([text]).vocab_size},
        "stdlib": {"py_files": len(stdlib), "py_megabytes": sum(p.stat().st_size for p in stdlib) / 1e6},
    }


def vocab_cost(char_vocab: int) -> dict[str, Any]:
    """The output head's share of training FLOPs per token (PaLM's count, GPT.flops_per_token) per vocab size."""
    from nanophi.model import GPT, GPTConfig

    out = {}
    for vocab in (char_vocab, *VOCAB_COST_SIZES):
        model = GPT(GPTConfig(vocab_size=vocab, n_layer=4, n_head=4, n_embd=128, block_size=64))
        total = model.flops_per_token()
        head = 6 * model.lm_head.weight.numel()
        out[str(vocab)] = {"flops_per_token": total, "head_share": head / total}
    return out


def facts(book: Path) -> dict[str, Any]:
    corpus = corpus_facts(book)
    return {"corpus": corpus, "vocab_cost": vocab_cost(corpus["book"]["char_vocab"])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("book", help="a local text file (the article uses Pride and Prejudice)")
    parser.add_argument("--runs", default=str(ROOT / "runs" / "article"), help="where the runs go")
    parser.add_argument("--baseline-steps", type=int, default=1000,
                        help="max_iters of the nanoGPT recipe (its own is 2000; 1000 sees as many tokens as cpu-fast)")
    parser.add_argument("--steps", type=int, default=None, help="override both recipes' max_iters (a quick check)")
    parser.add_argument("--img", default=str(IMG), help="where the figures go (default: docs/img)")
    parser.add_argument("--facts-only", action="store_true",
                        help="recompute only the corpus and vocabulary facts in article_figures.json; no training")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    img = Path(args.img)
    numbers_file = img / "article_figures.json"
    if args.facts_only:
        numbers = json.loads(numbers_file.read_text()) if numbers_file.is_file() else {}
        numbers.update(facts(Path(args.book)))
        img.mkdir(parents=True, exist_ok=True)
        numbers_file.write_text(json.dumps(numbers, indent=2) + "\n")
        print(json.dumps(numbers))
        return 0
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
                        for k, v in summary.items()}, "textbook_funnel": counts, **facts(Path(args.book))}
    numbers_file.write_text(json.dumps(numbers, indent=2) + "\n")
    for p in written:
        print(p)
    print(json.dumps(numbers))
    return 0


if __name__ == "__main__":
    sys.exit(main())
