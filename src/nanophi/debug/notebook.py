"""A live training plot in a Jupyter cell: train loss, val loss and learning rate, redrawn in place.

    from nanophi.debug.notebook import LivePlot
    trainer = Trainer(cfg, prepare_data(cfg))      # nanophi.train; builds the run's usual callbacks
    trainer.callbacks.append(LivePlot())
    trainer.fit()

The figure is drawn off-screen (matplotlib's Agg canvas, no pyplot state) and shown as a PNG through one IPython
display handle that is updated, so the cell holds a single image instead of a growing stack. Outside a Jupyter
kernel (a script, a terminal) it does nothing.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from nanophi.callbacks import Callback

if TYPE_CHECKING:
    from nanophi.train import Trainer

MIN_REDRAW_S = 1.0  # redraw at most this often on log steps: drawing costs ~50 ms, training steps can be faster
FIGSIZE = (10, 3.5)
DPI = 90


def in_notebook() -> bool:
    """True inside a Jupyter kernel (where display() shows images), False in scripts and terminal IPython."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


def render_png(train: list[dict[str, Any]], evals: list[dict[str, Any]]) -> bytes:
    """The two-panel figure (losses; learning rate) as PNG bytes."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    FigureCanvasAgg(fig)
    ax_loss, ax_lr = fig.subplots(1, 2, gridspec_kw={"width_ratios": [2, 1]})
    ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label="train", lw=1)
    if evals:
        ax_loss.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="val", ms=3)
    ax_loss.set(xlabel="step", ylabel="loss (nats/token)", title="loss")
    ax_loss.legend(loc="upper right")
    ax_loss.grid(alpha=0.3)
    ax_lr.plot([r["step"] for r in train], [r["lr"] for r in train], color="tab:green")
    ax_lr.set(xlabel="step", title="learning rate")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


class LivePlot(Callback):
    """Redraws the figure on logged steps (throttled to `min_redraw_s`) and on every eval."""

    def __init__(self, min_redraw_s: float = MIN_REDRAW_S) -> None:
        self.min_redraw_s = min_redraw_s
        self.enabled = in_notebook()
        self.handle: Any = None
        self.train: list[dict[str, Any]] = []
        self.evals: list[dict[str, Any]] = []
        self.last_draw = 0.0

    def on_log(self, trainer: Trainer, record: dict[str, Any]) -> None:
        self.train.append(record)
        if time.monotonic() - self.last_draw >= self.min_redraw_s:
            self.draw()

    def on_eval(self, trainer: Trainer, record: dict[str, Any]) -> None:
        self.evals.append(record)
        self.draw()

    def on_train_end(self, trainer: Trainer, summary: dict[str, Any]) -> None:
        self.draw()

    def draw(self) -> None:
        if not self.enabled or not self.train:
            return
        from IPython.display import Image, display

        image = Image(data=render_png(self.train, self.evals), format="png")
        if self.handle is None:
            self.handle = display(image, display_id=True)
        else:
            self.handle.update(image)
        self.last_draw = time.monotonic()
