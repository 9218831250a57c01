"""`nanophi report RUN`: one self-contained HTML page about a run, plus its figures as PNGs.

    nanophi report runs/book --prompt "It is a truth"     # -> runs/book/report.html, runs/book/figures/*.png

The page holds the config, the parameter count, the curves from metrics.jsonl (loss, val loss, lr, grad norms,
and the diagnostics of `--debug-interval`: update/data ratios, activation scale, attention entropy, dead units),
figures computed now from the best checkpoint (activation histograms on a val batch, attention maps for a
prompt, a PCA of the token embeddings), the samples logged during training and the final metrics.

Every figure is embedded as a base64 PNG and the CSS is inline: the file has no external reference, so it can be
mailed, attached to an issue or opened offline.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from nanophi.checkpoint import read_json
from nanophi.errors import UserError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from nanophi.model import GPT

log = logging.getLogger(__name__)

DPI = 100
HIST_BATCH = 8  # val sequences the activation histograms are computed on
PROMPT_TOKENS = 48  # default prompt: this many tokens from the start of the val split
LABELLED_TOKENS = 32  # attention maps of longer prompts get no token labels: they would be too small to read
MAX_ATTN_LAYERS, MAX_ATTN_HEADS = 8, 8
PCA_MAX_POINTS = 2000  # embedding rows shown in the PCA (the most frequent tokens when the vocabulary is larger)
PCA_LABELS = 40  # the most frequent tokens get their text written next to their point
MAX_SAMPLES = 12  # samples shown, spread evenly over training
HEALTHY_UPDATE_LOG10 = -3.0  # Karpathy's rule of thumb: updates about 1e-3 of the weights' scale


@dataclass
class Metrics:
    """metrics.jsonl split by record kind."""

    train: list[dict[str, Any]] = field(default_factory=list)
    eval: list[dict[str, Any]] = field(default_factory=list)
    sample: list[dict[str, Any]] = field(default_factory=list)
    end: list[dict[str, Any]] = field(default_factory=list)


def read_metrics(run_dir: Path) -> Metrics:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{path} does not exist; pass a run directory that `nanophi train --out` wrote")
    m = Metrics()
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            log.warning(f"warning: {path}:{i} is not JSON (a crash mid-write?); skipped")
            continue
        getattr(m, rec.get("kind", "train"), m.train).append(rec)
    return m


# --- figures from the metrics -------------------------------------------------------------------------------------
def _figure(w: float, h: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=DPI)
    FigureCanvasAgg(fig)  # Agg, not pyplot: no global backend, no GUI, nothing kept alive
    return fig


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def fig_loss(m: Metrics) -> Figure | None:
    if not m.train:
        return None
    fig = _figure(7, 3.6)
    ax = fig.subplots()
    ax.plot(*_series(m.train, "loss"), lw=1, label="train loss")
    if m.eval:
        ax.plot(*_series(m.eval, "val_loss"), "o-", ms=3, label="val loss")
    ax.set(xlabel="step", ylabel="loss (nats / token)", title="loss")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def fig_lr(m: Metrics) -> Figure | None:
    if not m.train:
        return None
    fig = _figure(4.6, 3.6)
    ax = fig.subplots()
    ax.plot(*_series(m.train, "lr"), color="tab:green")
    ax.set(xlabel="step", ylabel="learning rate", title="learning-rate schedule")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    ax.grid(alpha=0.3)
    return fig


def fig_grad_norms(m: Metrics) -> Figure | None:
    if not m.train:
        return None
    fig = _figure(9, 4)
    ax = fig.subplots()
    ax.plot(*_series(m.train, "grad_norm"), color="black", lw=1.5, label="total")
    groups = sorted({k for r in m.train for k in r if k.startswith("grad/")}, key=_natural)
    for k in groups:
        ax.plot(*_series(m.train, k), lw=1, label=k.split("/")[1])
    ax.set(xlabel="step", ylabel="gradient norm (before clipping)", title="gradient norms", yscale="log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return fig


def fig_updates(m: Metrics) -> Figure | None:
    keys = list(dict.fromkeys(k for r in m.train for k in r if k.startswith("update/")))  # model order
    if not keys:
        return None
    import matplotlib

    fig = _figure(9, 4.5)
    ax = fig.subplots()
    cmap = matplotlib.colormaps["viridis"]
    for i, k in enumerate(keys):
        name = k.removeprefix("update/").removesuffix("/log10")
        ax.plot(*_series(m.train, k), lw=1, color=cmap(i / max(1, len(keys) - 1)),
                label=name if len(keys) <= 16 else None)
    ax.axhline(HEALTHY_UPDATE_LOG10, color="red", ls="--", lw=1, label="1e-3 (rule of thumb)")
    ax.set(xlabel="step", ylabel="log10(std(update) / std(weight))", title="update / data ratio per parameter")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    return fig


def fig_health(m: Metrics) -> Figure | None:
    """Activation scale, attention entropy and dead MLP units per block over training."""
    blocks = sorted({k.split("/")[1] for r in m.train for k in r if re.fullmatch(r"act/block\d+/std", k)}, key=_natural)
    if not blocks:
        return None
    fig = _figure(12, 3.5)
    ax_std, ax_ent, ax_dead = fig.subplots(1, 3)
    for b in blocks:
        ax_std.plot(*_series(m.train, f"act/{b}/std"), label=b)
        heads = sorted({k for r in m.train for k in r if k.startswith(f"attn/{b}/")})
        steps = [r["step"] for r in m.train if heads and heads[0] in r]
        ent = [np.mean([r[h] for h in heads if h in r]) for r in m.train if heads and heads[0] in r]
        ax_ent.plot(steps, ent, label=b)
        ax_dead.plot(*_series(m.train, f"mlp/{b}/dead_frac"), label=b)
    ax_std.set(title="residual stream std after each block", xlabel="step")
    ax_ent.set(title="attention entropy (nats, mean over heads)", xlabel="step")
    ax_dead.set(title="share of dead MLP units", xlabel="step", ylim=(-0.02, 1.02))
    for ax in (ax_std, ax_ent, ax_dead):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


# --- figures from the checkpoint -----------------------------------------------------------------------------------
@torch.no_grad()
def fig_act_hist(model: GPT, x: torch.Tensor) -> Figure:
    """Histograms of the residual stream after each block and of each MLP's hidden activations."""
    resid: dict[int, torch.Tensor] = {}
    hidden: dict[int, torch.Tensor] = {}
    handles = []
    for i, block in enumerate(model.transformer.h):
        handles.append(block.register_forward_hook(lambda mod, a, out, i=i: resid.__setitem__(i, out)))
        # c_proj's input is the MLP's hidden activation, after the nonlinearity
        handles.append(block.mlp.c_proj.register_forward_pre_hook(lambda mod, a, i=i: hidden.__setitem__(i, a[0])))
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    fig = _figure(11, 4)
    ax_r, ax_h = fig.subplots(1, 2)
    for i in sorted(resid):
        r = resid[i].float().flatten().cpu().numpy()
        ax_r.hist(r, bins=100, histtype="step", density=True, label=f"block{i} (std {r.std():.2f})")
        h = hidden[i].float().flatten().cpu().numpy()
        ax_h.hist(h, bins=100, histtype="step", density=True, label=f"block{i} ({np.mean(h > 0):.0%} > 0)")
    ax_r.set(title="residual stream after each block", yscale="log", xlabel="value")
    ax_h.set(title="MLP hidden activations", yscale="log", xlabel="value")
    for ax in (ax_r, ax_h):
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


@torch.no_grad()
def fig_attention(model: GPT, ids: list[int], labels: list[str]) -> Figure:
    """Every head's attention pattern (rows: query position, columns: key position) for one prompt."""
    from matplotlib.colors import PowerNorm

    from nanophi.debug.diagnostics import attention_probs

    blocks = list(model.transformer.h)[:MAX_ATTN_LAYERS]
    probs: dict[int, torch.Tensor] = {}
    handles = [b.attn.register_forward_pre_hook(  # args: (x, rope, ...), the attention's own inputs
        lambda attn, args, i=i: probs.__setitem__(i, attention_probs(attn, args[0][0], args[1])))
        for i, b in enumerate(blocks)]
    try:
        model(torch.tensor([ids], device=model.lm_head.weight.device))
    finally:
        for h in handles:
            h.remove()
    n_head = min(model.config.n_head, MAX_ATTN_HEADS)
    cell = min(3.0, max(1.9, 11 / n_head))  # inches per map: few heads get bigger, readable maps
    fig = _figure(cell * n_head + 1, cell * len(blocks) + 0.6)
    axes = np.array(fig.subplots(len(blocks), n_head, squeeze=False))
    T = len(ids)
    for i in range(len(blocks)):
        for h in range(n_head):
            ax = axes[i, h]
            # a square-root colour scale: diffuse heads spread ~1/T per key, which a linear scale paints black
            ax.imshow(probs[i][h].cpu().numpy(), cmap="magma", norm=PowerNorm(0.5, vmin=0, vmax=1),
                      interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(f"head {h}", fontsize=8)
            if h == 0:
                ax.set_ylabel(f"block {i}", fontsize=8)
    if T <= LABELLED_TOKENS:  # label the first column's rows and the last row's columns with the tokens
        size = min(8.0, 160 / T)
        for i in range(len(blocks)):
            axes[i, 0].set_yticks(range(T), labels, fontsize=size)
        for h in range(n_head):
            axes[-1, h].set_xticks(range(T), labels, fontsize=size, rotation=90)
    fig.tight_layout()
    return fig


@torch.no_grad()
def fig_embedding_pca(model: GPT, tokenizer: Any, counts: np.ndarray | None) -> Figure:
    """The token embeddings projected on their first two principal components; frequent tokens labelled."""
    w = model.transformer.wte.weight.float().cpu()
    V = w.size(0)
    order = np.argsort(-counts) if counts is not None else np.arange(V)
    shown = order[:PCA_MAX_POINTS]
    x = w[torch.from_numpy(shown.copy())]
    x = x - x.mean(0)
    _, s, vt = torch.linalg.svd(x, full_matrices=False)
    xy = (x @ vt[:2].T).numpy()
    explained = (s[:2] ** 2 / (s**2).sum()).numpy()
    fig = _figure(8, 6.5)
    ax = fig.subplots()
    ax.scatter(xy[:, 0], xy[:, 1], s=8, alpha=0.6)
    for j in range(min(PCA_LABELS, len(shown))):
        ax.annotate(_token_label(tokenizer, int(shown[j])), xy[j], fontsize=8, xytext=(2, 2),
                    textcoords="offset points")
    labelled = "all labelled" if len(shown) <= PCA_LABELS else f"the {PCA_LABELS} most frequent labelled"
    ax.set(title=f"token embeddings, PCA ({len(shown)} of {V} tokens, {labelled})",
           xlabel=f"PC1 ({explained[0]:.0%} of variance)", ylabel=f"PC2 ({explained[1]:.0%})")
    ax.grid(alpha=0.3)
    return fig


def _token_label(tokenizer: Any, i: int) -> str:
    text = tokenizer.decode([i])
    return {"\n": "\\n", " ": "␣", "\t": "\\t"}.get(text, text.replace("\n", "\\n")) or f"#{i}"


def _natural(s: str) -> list[Any]:
    """Sort key putting block2 before block10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    return buf.getvalue()


# --- the page ------------------------------------------------------------------------------------------------------
CSS = """
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1d2330; max-width: 1200px;
       margin: 2em auto; padding: 0 1.5em; }
h1 { font-size: 1.7em; margin-bottom: 0.1em; } h2 { border-bottom: 1px solid #dde1e8; padding-bottom: 0.2em;
margin-top: 2em; }
.sub { color: #667; margin-top: 0; }
table { border-collapse: collapse; font-size: 13px; } td, th { padding: 2px 10px; border-bottom: 1px solid #eef0f3;
text-align: left; vertical-align: top; }
.cfg { display: flex; gap: 2em; flex-wrap: wrap; align-items: flex-start; }
.cards { display: flex; gap: 1em; flex-wrap: wrap; } .card { background: #f4f6f9; border-radius: 8px;
padding: 0.6em 1em; min-width: 9em; } .card b { display: block; font-size: 1.4em; } .card span { color: #667;
font-size: 12px; }
.row { display: flex; gap: 1em; flex-wrap: wrap; align-items: flex-start; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #eef0f3; }
figcaption { color: #556; font-size: 13px; }
pre { background: #f4f6f9; padding: 0.6em; white-space: pre-wrap; word-break: break-word; font-size: 12px;
margin: 0; }
.note { color: #a05a00; }
"""


def write_report(run_dir: Path, prompt: str | None = None, device: str = "cpu") -> Path:
    """Write RUN/report.html and RUN/figures/*.png; returns the HTML's path."""
    run_dir = Path(run_dir)
    metrics = read_metrics(run_dir)
    fig_dir = run_dir / "figures"
    fig_dir.mkdir(exist_ok=True)
    sections: list[str] = []
    notes: list[str] = []

    def figure(name: str, fig: Figure | None, caption: str) -> str:
        if fig is None:
            return ""
        data = _png(fig)
        (fig_dir / f"{name}.png").write_bytes(data)
        src = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
        return (f'<figure><img src="{src}" alt="{html.escape(name)}">'
                f"<figcaption>{html.escape(caption)}</figcaption></figure>")

    model, tokenizer, ckpt = _load(run_dir, device, notes)
    config = ckpt.config if ckpt is not None else _read_json_or_empty(run_dir / "config.json")
    val = _val_tokens(ckpt, notes) if ckpt is not None else None

    # overview
    cards = _cards(metrics, model)
    sections.append(f"<h2>Summary</h2><div class='cards'>{cards}</div>")
    sections.append("<h2>Training curves</h2><div class='row'>" + "".join([
        figure("loss", fig_loss(metrics), "Train loss at every logged step; val loss at every eval."),
        figure("lr", fig_lr(metrics), "The learning rate the optimizer used at each logged step."),
    ]) + "</div>" + figure("grad_norms", fig_grad_norms(metrics),
                           "Total gradient norm, and per parameter group on diagnostic steps (--debug-interval)."))
    diag = "".join([
        figure("update_ratio", fig_updates(metrics),
               "log10 of std(update)/std(weight) per parameter at each diagnostic step, coloured from the "
               "embeddings (dark) to the last block (light). Far above -3: the lr is too high for that tensor; "
               "far below: it barely learns."),
        figure("health", fig_health(metrics),
               "Per block: residual-stream scale; attention entropy (0: every query looks at one token; "
               "ln(T!)/T: uniform over the causal window); share of dead MLP units."),
    ])
    sections.append("<h2>Network health</h2>" + (diag or "<p class='note'>No diagnostics in metrics.jsonl: train "
                                                          "with --debug-interval N to record them.</p>"))
    if model is not None:
        parts = []
        if val is not None and len(val) > model.config.block_size:
            T = model.config.block_size
            n = min(HIST_BATCH, (len(val) - 1) // T)
            x = torch.from_numpy(np.asarray(val[: n * T], dtype=np.int64).reshape(n, T)).to(device)
            parts.append(figure("activations", fig_act_hist(model, x),
                                f"Computed now: the checkpoint run on {n} val sequences of {T} tokens."))
        if prompt is None:
            prompt = tokenizer.decode(np.asarray(val[:PROMPT_TOKENS]).tolist()) if val is not None else "\n"
        ids = tokenizer.encode(prompt)[: model.config.block_size] or [0]
        labels = [_token_label(tokenizer, i) for i in ids]
        parts.append(figure("attention", fig_attention(model, ids, labels),
                            f"Attention of every head for the prompt {prompt[:80]!r} ({len(ids)} tokens); rows are "
                            "query positions, columns the positions attended to."))
        counts = None if val is None else np.bincount(np.asarray(val[:1_000_000]), minlength=model.config.vocab_size)
        parts.append(figure("embeddings", fig_embedding_pca(model, tokenizer, counts),
                            "Tokens that the model uses alike end up close together."))
        sections.append("<h2>Inside the model (checkpoint " + html.escape(ckpt.path.name) + ")</h2>" + "".join(parts))
    sections.append("<h2>Samples during training</h2>" + _samples_html(metrics))
    sections.append("<h2>Final metrics</h2>" + _final_html(metrics))
    if config:
        sections.append("<h2>Config</h2><div class='cfg'>" + "".join(
            _table(name, values) for name, values in config.items() if isinstance(values, dict)) + "</div>")

    note_html = "".join(f"<p class='note'>{html.escape(n)}</p>" for n in notes)
    page = (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>nanophi report: "
            f"{html.escape(run_dir.name)}</title><style>{CSS}</style></head><body>"
            f"<h1>nanophi report: {html.escape(run_dir.name)}</h1>"
            f"<p class='sub'>{html.escape(str(run_dir.resolve()))}</p>"
            f"{note_html}{''.join(sections)}</body></html>\n")
    out = run_dir / "report.html"
    out.write_text(page, encoding="utf-8")
    return out


def _load(run_dir: Path, device: str, notes: list[str]) -> tuple[Any, Any, Any]:
    from nanophi import checkpoint
    from nanophi.refs import load_model

    try:
        model, tokenizer = load_model(run_dir, device)
        ckpt = checkpoint.load(run_dir, with_trainer=False)
    except UserError as e:
        notes.append(f"No checkpoint could be loaded ({e}); the figures computed from the model are left out.")
        return None, None, None
    return model.float().eval(), tokenizer, ckpt


def _val_tokens(ckpt: Any, notes: list[str]) -> np.ndarray | None:
    from nanophi.prepare import open_prepared

    data_dir = ckpt.state.get("data_dir")
    try:
        return open_prepared(Path(data_dir)).val if data_dir else None
    except UserError:
        notes.append(f"The prepared data ({data_dir}) is gone (cache cleared?): activation histograms are left "
                     "out and the attention prompt defaults to a newline; prepare the corpus again to get them.")
        return None


def _read_json_or_empty(path: Path) -> dict[str, Any]:
    """The run's JSON file, or {} when it is missing or unreadable: the report shows what there is."""
    try:
        return read_json(path)
    except (UserError, OSError):
        return {}


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    return str(v)


def _cards(m: Metrics, model: GPT | None) -> str:
    items: list[tuple[str, str]] = []
    if model is not None:
        items.append((f"{model.num_params() / 1e6:.2f}M", "parameters (non-embedding)"))
        items.append((f"{model.num_params(non_embedding=False) / 1e6:.2f}M", "parameters (all)"))
    if m.eval:
        best = min((r for r in m.eval if isinstance(r.get("val_loss"), (int, float))),
                   key=lambda r: r["val_loss"], default=None)
        if best:
            items.append((f"{best['val_loss']:.4f}", f"best val loss (step {best['step']})"))
            if isinstance(best.get("val_bpb"), (int, float)):
                items.append((f"{best['val_bpb']:.4f}", "val bits per byte"))
    if m.train:
        last = m.train[-1]
        items.append((str(last["step"] + 1), "steps trained"))
        if isinstance(last.get("tokens_per_s"), (int, float)):
            items.append((f"{last['tokens_per_s'] / 1e3:.1f}k", "tokens / s (last window)"))
    if m.end and isinstance(m.end[-1].get("train_time_s"), (int, float)):
        items.append((f"{m.end[-1]['train_time_s']:.0f} s", f"training time ({m.end[-1].get('stop_reason')})"))
    return "".join(f"<div class='card'><b>{html.escape(a)}</b><span>{html.escape(b)}</span></div>" for a, b in items)


def _samples_html(m: Metrics) -> str:
    if not m.sample:
        return "<p class='note'>No samples logged: train with --sample-interval N to record some.</p>"
    pick = m.sample
    if len(pick) > MAX_SAMPLES:
        pick = [pick[round(i * (len(pick) - 1) / (MAX_SAMPLES - 1))] for i in range(MAX_SAMPLES)]
    rows = "".join(f"<tr><td>{r['step']}</td><td><pre>{html.escape(r.get('text', ''))}</pre></td></tr>" for r in pick)
    return f"<table><tr><th>step</th><th>sample</th></tr>{rows}</table>"


def _final_html(m: Metrics) -> str:
    tables = [_table(title, {k: v for k, v in recs[-1].items() if k != "kind" and "/" not in k})
              for title, recs in (("last logged step", m.train), ("last eval", m.eval), ("end of run", m.end)) if recs]
    return f"<div class='cfg'>{''.join(tables)}</div>" if tables else "<p class='note'>Nothing logged yet.</p>"


def _table(title: str, values: dict[str, Any]) -> str:
    rows = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(_fmt(v))}</td></tr>" for k, v in values.items())
    head = f"<tr><th colspan='2'>{html.escape(title)}</th></tr>" if title else ""
    return f"<table>{head}{rows}</table>"


# --- CLI -----------------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="run directory (holds metrics.jsonl and checkpoints)")
    parser.add_argument("--prompt", default=None, help="text whose attention maps to draw (default: start of val)")
    parser.add_argument("--device", default="cpu", help="where to run the checkpoint for the figures")


def run(args: argparse.Namespace) -> int:
    out = write_report(Path(args.run), prompt=args.prompt, device=args.device)
    print(out)
    return 0
