"""`nanophi lr-find`: the learning-rate range test (Smith 2015, "Cyclical Learning Rates", section 3.3).

    nanophi lr-find --data book.txt --n-layer 4 --n-embd 128       # -> runs/lr-find/lr_find.png

One short run from a fresh model whose learning rate grows exponentially from --start to --end, one new batch
per step. The loss first barely moves (lr too small), then falls fastest, then blows up. The run stops once the
smoothed loss exceeds DIVERGE_FACTOR x its best. Suggested: the lr where the smoothed loss falls fastest per
decade of lr (steepest descent); also printed, a tenth of the lr at the minimum (the other common rule).
Flags are `nanophi train`'s, so the suggestion is for the same model, batch size and optimizer settings.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nanophi.errors import UserError

DIVERGE_FACTOR = 4.0  # stop when the smoothed loss is this many times its best: it has blown up
EMA_BETA = 0.9  # smoothing for the stop rule; the suggestion uses a centred average, which has no lag
SKIP_START = 0.1  # the first share of the sweep is ignored for the suggestion: the EMA and Adam are warming up
MIN_POINTS = 5  # with fewer usable points the steepest slope is noise: fall back to min/10


@dataclass
class LRFindResult:
    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    suggestion: float  # steepest descent (or min/10 when the curve is too short)
    min_over_10: float
    stopped_early: bool


def centred_average(values: list[float], window: int) -> np.ndarray:
    """Moving average with the window centred on each point (shrinking at the ends), so it does not lag."""
    v = np.asarray(values, dtype=float)
    half = window // 2
    return np.array([v[max(0, i - half): i + half + 1].mean() for i in range(len(v))])


def suggest(lrs: list[float], losses: list[float]) -> tuple[float, float]:
    """(lr of steepest descent of the smoothed loss per log-lr, a tenth of the lr at its minimum)."""
    smooth = centred_average(losses, max(3, len(losses) // 10))
    lo = int(np.argmin(smooth))
    min_over_10 = lrs[lo] / 10
    start = int(len(losses) * SKIP_START)
    if lo - start < MIN_POINTS:
        return min_over_10, min_over_10
    slope = np.gradient(smooth[start: lo + 1], np.log10(lrs[start: lo + 1]))
    return float(lrs[start + int(np.argmin(slope))]), min_over_10


def lr_find(s, start: float, end: float, steps: int) -> LRFindResult:
    """Run the sweep on the setup `s` (see nanophi.debug.sanity.build_setup)."""
    from nanophi.debug.sanity import train_step

    lrs, losses, smoothed = [], [], []
    avg, best, stopped = 0.0, math.inf, False
    s.model.train()
    for i in range(steps):
        lr = start * (end / start) ** (i / max(1, steps - 1))
        x, y = s.loader.next()
        loss = train_step(s, x, y, lr)
        if not math.isfinite(loss):
            stopped = True
            break
        avg = EMA_BETA * avg + (1 - EMA_BETA) * loss
        debiased = avg / (1 - EMA_BETA ** (i + 1))
        lrs.append(lr), losses.append(loss), smoothed.append(debiased)
        best = min(best, debiased)
        if debiased > DIVERGE_FACTOR * best:
            stopped = True
            break
    if len(losses) < 2:
        raise UserError(f"the loss diverged at once (lr {start:g}); pass a smaller --start")
    suggestion, min_over_10 = suggest(lrs, losses)
    return LRFindResult(lrs, losses, smoothed, suggestion, min_over_10, stopped)


def plot(result: LRFindResult, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.plot(result.lrs, result.losses, color="tab:blue", alpha=0.3, lw=1, label="loss")
    ax.plot(result.lrs, centred_average(result.losses, max(3, len(result.losses) // 10)), color="tab:blue",
            label="smoothed")
    ax.axvline(result.suggestion, color="tab:red", ls="--", label=f"steepest descent {result.suggestion:.1e}")
    ax.axvline(result.min_over_10, color="tab:orange", ls=":", label=f"min / 10 {result.min_over_10:.1e}")
    ax.set(xscale="log", xlabel="learning rate", ylabel="training loss", title="learning-rate range test")
    top = min(max(result.losses), DIVERGE_FACTOR * min(result.losses))  # keep the blow-up from flattening the rest
    ax.set_ylim(min(result.losses) * 0.95, top * 1.05)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from nanophi.debug.sanity import add_setup_arguments

    add_setup_arguments(parser)
    parser.add_argument("--start", type=float, default=1e-6, help="learning rate of the first step")
    parser.add_argument("--end", type=float, default=1.0, help="learning rate of the last step")
    parser.add_argument("--steps", type=int, default=100, help="steps of the sweep (one batch each)")
    parser.add_argument("--out", default="runs/lr-find", help="directory for lr_find.png and lr_find.json")


def run(args: argparse.Namespace) -> int:
    from nanophi.debug.sanity import build_setup, config_from_args

    if not 0 < args.start < args.end:
        raise UserError(f"need 0 < --start < --end, got {args.start:g} and {args.end:g}")
    if args.steps < 2:
        raise UserError(f"--steps must be >= 2, got {args.steps}")
    s = build_setup(config_from_args(args))
    result = lr_find(s, args.start, args.end, args.steps)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot(result, out / "lr_find.png")
    (out / "lr_find.json").write_text(json.dumps({
        "lrs": result.lrs, "losses": result.losses, "smoothed": result.smoothed, "suggestion": result.suggestion,
        "min_over_10": result.min_over_10, "stopped_early": result.stopped_early}) + "\n")
    end = f"stopped at lr {result.lrs[-1]:.1e}: the loss blew up" if result.stopped_early else \
        f"reached --end {args.end:g} (the smoothed loss never exceeded {DIVERGE_FACTOR:g}x its best)"
    print(f"swept {len(result.lrs)} steps from {args.start:.0e}; {end}")
    print(f"suggested --lr {result.suggestion:.1e} (steepest descent); min-loss lr / 10: {result.min_over_10:.1e}")
    print(f"plot: {out / 'lr_find.png'}")
    return 0
