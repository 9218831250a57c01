"""A live terminal dashboard for `nanophi train` on a TTY: curves, rates and the latest sample, redrawn in place.

    step 1200/2000 ━━━━━━━━━━━╸━━━━━━━  60%  elapsed 0:00:45  ETA 0:00:30
    ╭ loss (train · val) ───────────────────╮╭ lr ──────────╮
    │ 4.17 ⡇⠑⢄                               ││ ▁▃▆█████▇▆▅▄ │
    │      ⡇  ⠉⠢⣀⣀                            │╰──────────────╯
    │ 1.52 ⣇⣀⣀⣀⣀⣀⠉⠉⠒⠒⠤⠤⠤⣀⣀⣀⣀                  │╭ grad norm ───╮

The trainer picks it only when stdout is a terminal (or `--dashboard on`); logs, pipes and CI get `ConsoleLog`'s
plain lines instead. Charts are drawn with Unicode braille (2x4 dots per character), so no plotting library is
needed. Log lines emitted while it runs are printed above it instead of tearing it.
"""

from __future__ import annotations

import atexit
import logging
import math
import sys
import time
from typing import TYPE_CHECKING, Any, Sequence

from nanophi.callbacks import Callback

if TYPE_CHECKING:
    from rich.console import Console, RenderableType
    from rich.text import Text

    from nanophi.train import Trainer

BRAILLE_BASE = 0x2800
# bit of the braille dot at (row, col) of a character cell, rows top to bottom (Unicode's dot numbering)
BRAILLE_DOTS = ((0x01, 0x08), (0x02, 0x10), (0x04, 0x20), (0x40, 0x80))
SPARK_CHARS = "▁▂▃▄▅▆▇█"
CHART_HEIGHT = 12  # character rows of the loss chart
SIDE_WIDTH = 30  # characters of the right-hand column (lr, grad norm)
Y_LABEL_WIDTH = 7
TRAIN_STYLE, VAL_STYLE = "cyan", "magenta"
SAMPLE_CHARS = 400  # the sample panel shows the end of the latest sample, at most this much


def braille_chart(series: Sequence[tuple[Sequence[float], Sequence[float], str]], width: int, height: int,
                  x_range: tuple[float, float] | None = None) -> Text:
    """A line chart of `series` ((xs, ys, style) each) in `width` x `height` characters, with y labels.

    `x_range` fixes the x axis (e.g. 0..max_iters, so the curve grows across the chart as training goes).

    Each character holds 2x4 dots, so the plot has a resolution of (2*width) x (4*height); segments between
    consecutive points are interpolated so a curve stays connected. Where two series cross, the later wins."""
    from rich.text import Text

    plot_w = max(1, width - Y_LABEL_WIDTH - 1)
    points = [(x, y) for xs, ys, _ in series for x, y in zip(xs, ys) if math.isfinite(y)]
    if not points:
        return Text("(waiting for the first logged step)", style="dim")
    x_lo, x_hi = x_range or (min(p[0] for p in points), max(p[0] for p in points))
    y_lo, y_hi = min(p[1] for p in points), max(p[1] for p in points)
    if y_hi == y_lo:
        y_lo, y_hi = y_lo - 0.5, y_hi + 0.5
    if x_hi == x_lo:
        x_hi = x_lo + 1
    W, H = plot_w * 2, height * 4
    bits = [[0] * plot_w for _ in range(height)]
    # a cell has one colour: the series with the most dots in it (the later one on a tie) gets it
    votes: list[list[dict[str, int]]] = [[{} for _ in range(plot_w)] for _ in range(height)]

    def to_px(x: float, y: float) -> tuple[float, float]:
        return (x - x_lo) / (x_hi - x_lo) * (W - 1), (y_hi - y) / (y_hi - y_lo) * (H - 1)

    for xs, ys, style in series:
        pts = [to_px(x, y) for x, y in zip(xs, ys) if math.isfinite(y) and x_lo <= x <= x_hi]
        for (x0, y0), (x1, y1) in zip(pts, pts[1:] or pts):
            n = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
            for i in range(n + 1):
                px, py = round(x0 + (x1 - x0) * i / n), round(y0 + (y1 - y0) * i / n)
                mask = BRAILLE_DOTS[py % 4][px % 2]
                cell = votes[py // 4][px // 2]
                if not bits[py // 4][px // 2] & mask or style not in cell:
                    cell[style] = cell.get(style, 0) + 1
                bits[py // 4][px // 2] |= mask
    out = Text()
    labels = {0: y_hi, height // 2: (y_hi + y_lo) / 2, height - 1: y_lo}
    for r in range(height):
        label = f"{labels[r]:.3g}" if r in labels else ""
        out.append(label.rjust(Y_LABEL_WIDTH - 1) + " ┤" if r in labels else " " * (Y_LABEL_WIDTH) + "│", "dim")
        for c in range(plot_w):
            cell = votes[r][c]
            style = max(reversed(list(cell)), key=cell.__getitem__) if cell else ""
            out.append(chr(BRAILLE_BASE + bits[r][c]), style)
        out.append("\n")
    left, right = f"{x_lo:g}", f"{x_hi:g}"
    out.append(" " * Y_LABEL_WIDTH + "└" + "─" * plot_w + "\n", "dim")
    out.append(" " * (Y_LABEL_WIDTH + 1) + left + right.rjust(plot_w - len(left)), "dim")
    return out


def sparkline(values: Sequence[float], width: int) -> str:
    """The last values as a one-line bar chart of `width` characters (resampled when there are more)."""
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return ""
    if len(vals) > width:
        vals = [vals[int(i * len(vals) / width)] for i in range(width - 1)] + [vals[-1]]
    lo, hi = min(vals), max(vals)
    span = (hi - lo) or 1.0
    return "".join(SPARK_CHARS[int((v - lo) / span * (len(SPARK_CHARS) - 1))] for v in vals)


def _hms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Dashboard(Callback):
    """The live view (see the module doc). `console` is for tests; by default it draws on stdout."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console
        self.live: Any = None
        self.train: list[dict[str, Any]] = []
        self.evals: list[dict[str, Any]] = []
        self.sample: tuple[int, str] | None = None
        self.max_iters = 0
        self.run_name = ""
        self.t0 = time.perf_counter()
        self.start_step = 0
        self._swapped: list[tuple[logging.StreamHandler, Any]] = []

    # --- callbacks ---------------------------------------------------------------------------------------------
    def on_train_start(self, trainer: Trainer) -> None:
        from rich.console import Console
        from rich.live import Live

        self.console = self.console or Console()
        self.max_iters = trainer.cfg.train.max_iters
        self.run_name = str(trainer.run_dir)
        self.t0, self.start_step = time.perf_counter(), trainer.step
        self.live = Live(self.render(), console=self.console, auto_refresh=False, redirect_stdout=True,
                         redirect_stderr=True)
        self.live.start()
        self._route_logging()
        # a run that dies (TrainingDiverged, Ctrl-C) never reaches on_train_end: still restore the terminal
        atexit.register(self._close)

    def on_log(self, trainer: Trainer, record: dict[str, Any]) -> None:
        self.train.append(record)
        self._refresh()

    def on_eval(self, trainer: Trainer, record: dict[str, Any]) -> None:
        self.evals.append(record)
        self._refresh()

    def on_sample(self, trainer: Trainer, step: int, text: str) -> None:
        self.sample = (step, text)
        self._refresh()

    def on_train_end(self, trainer: Trainer, summary: dict[str, Any]) -> None:
        if self.live is None:
            return
        self._close()
        best = summary.get("best_val_loss")
        best_text = f"{best:.4f}" if isinstance(best, float) and math.isfinite(best) else "n/a"
        logging.getLogger("nanophi.train").info(
            f"done: {summary['step']} steps in {_hms(summary.get('train_time_s', 0))}, best val loss {best_text} "
            f"({summary.get('stop_reason')})")

    def _close(self) -> None:
        """Draw the last state, give the terminal back (cursor, stdout/stderr, log handlers). Idempotent."""
        if self.live is None:
            return
        atexit.unregister(self._close)
        self._refresh()
        self.live.stop()
        self.live = None
        self._restore_logging()

    def _refresh(self) -> None:
        if self.live is not None:
            self.live.update(self.render(), refresh=True)

    def _route_logging(self) -> None:
        """Point logging's console handlers at Live's redirected stderr, so log lines print above the view."""
        for handler in logging.getLogger().handlers:
            if (isinstance(handler, logging.StreamHandler) and handler.stream in (sys.__stderr__, sys.__stdout__)
                    and handler.stream is not sys.stderr):  # not redirected when the console is no terminal
                self._swapped.append((handler, handler.stream))
                handler.setStream(sys.stderr)

    def _restore_logging(self) -> None:
        for handler, stream in self._swapped:
            handler.setStream(stream)
        self._swapped = []

    # --- drawing -----------------------------------------------------------------------------------------------
    def render(self) -> RenderableType:
        from rich.console import Group
        from rich.panel import Panel
        from rich.table import Table
        from rich.text import Text

        width = self.console.size.width if self.console is not None else 100
        last = self.train[-1] if self.train else {}
        chart_w = max(30, width - SIDE_WIDTH - 4)
        chart = braille_chart(
            [([r["step"] for r in self.train], [r["loss"] for r in self.train], TRAIN_STYLE),
             ([r["step"] for r in self.evals], [r["val_loss"] for r in self.evals], VAL_STYLE)],
            chart_w, CHART_HEIGHT, x_range=(self.start_step, max(self.max_iters, self.start_step + 1)))
        title = Text.assemble("loss (", ("train", TRAIN_STYLE), " · ", ("val", VAL_STYLE), ")")
        side_w = SIDE_WIDTH - 4
        lr_vals = [r["lr"] for r in self.train]
        gn_vals = [r["grad_norm"] for r in self.train[-side_w:]]  # recent: the first steps' spike would flatten it
        side = Group(
            Panel(Text(sparkline(lr_vals, side_w), "green") + Text(f"\n{last.get('lr', 0):.2e}", "dim"),
                  title="lr", title_align="left"),
            Panel(Text(sparkline(gn_vals, side_w), "yellow") + Text(f"\n{last.get('grad_norm', 0):.3f}", "dim"),
                  title="grad norm (recent)", title_align="left"),
            Panel(self._evals_text(), title="evals", title_align="left"),
        )
        grid = Table.grid(expand=True)
        grid.add_column(ratio=1)
        grid.add_column(width=SIDE_WIDTH)
        grid.add_row(Panel(chart, title=title, title_align="left"), side)
        parts: list[Any] = [self._header(last, width), grid]
        if self.sample is not None:
            step, text = self.sample
            shown = text if len(text) <= SAMPLE_CHARS else "…" + text[-SAMPLE_CHARS:]
            parts.append(Panel(Text(shown), title=f"latest sample (step {step})", title_align="left"))
        return Group(*parts)

    def _header(self, last: dict[str, Any], width: int) -> RenderableType:
        from rich.progress_bar import ProgressBar
        from rich.table import Table
        from rich.text import Text

        step = max(last.get("step", self.start_step - 1) + 1, self.evals[-1]["step"] if self.evals else 0)
        done = step - self.start_step
        elapsed = time.perf_counter() - self.t0
        eta = (self.max_iters - step) * elapsed / done if done > 0 else math.inf
        head = Table.grid(padding=(0, 1))
        head.add_column()
        head.add_column()
        head.add_column()
        head.add_row(Text(f"step {step}/{self.max_iters}", "bold"),
                     ProgressBar(total=max(1, self.max_iters), completed=step, width=max(10, width // 3)),
                     Text(f"{100 * step / max(1, self.max_iters):3.0f}%  elapsed {_hms(elapsed)}  ETA {_hms(eta)}"))
        stats = [f"loss {last['loss']:.4f}" if "loss" in last else "loss …"]
        if self.evals:
            best = min(self.evals, key=lambda r: r["val_loss"])
            stats.append(f"val {self.evals[-1]['val_loss']:.4f} (best {best['val_loss']:.4f} @ {best['step']})")
        if "tokens_per_s" in last:
            stats.append(f"{last['tokens_per_s'] / 1e3:.1f}k tok/s")
            stats.append(f"{last['ms_per_iter']:.1f} ms/it")
        if last.get("mfu") is not None:
            stats.append(f"mfu {100 * last['mfu']:.1f}%")
        if "max_rss_mb" in last:
            stats.append(f"rss {last['max_rss_mb']:.0f} MB")
        from rich.console import Group

        return Group(Text(f"nanophi · {self.run_name}", "bold blue"), head, Text("  ·  ".join(stats)))

    def _evals_text(self) -> Text:
        from rich.text import Text

        if not self.evals:
            return Text("none yet", "dim")
        lines = [f"{r['step']:>6d}  {r['val_loss']:.4f}{' *' if r.get('is_best') else ''}" for r in self.evals[-4:]]
        return Text("\n".join(lines))
