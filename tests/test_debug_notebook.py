"""LivePlot in a real Jupyter kernel (nbclient): one image output, redrawn in place while a tiny model trains."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")
pytest.importorskip("ipykernel")

CELL = """
import os
os.environ["NANOPHI_CACHE"] = {cache!r}
from nanophi.config import resolve
from nanophi.train import Trainer, prepare_data
from nanophi.debug.notebook import LivePlot

cfg = resolve({{"data": {data!r}, "out": {out!r}, "n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 16,
               "batch_size": 4, "max_iters": 6, "eval_interval": 3, "eval_iters": 2, "log_interval": 1,
               "warmup_iters": 2}})
trainer = Trainer(cfg, prepare_data(cfg))
plot = LivePlot(min_redraw_s=0)
trainer.callbacks.append(plot)
trainer.fit()
print("enabled", plot.enabled, "logged", len(plot.train))
"""


@pytest.mark.slow
def test_liveplot_updates_one_image_in_a_kernel(tmp_path: Path) -> None:
    rng = random.Random(0)
    data = tmp_path / "tiny.txt"
    data.write_text("\n".join(" ".join(rng.choice(["the", "cat", "sat", "on", "a", "mat"]) for _ in range(10))
                              for _ in range(300)))
    code = CELL.format(cache=str(tmp_path / "cache"), data=str(data), out=str(tmp_path / "run"))
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(code)])
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3").execute()
    outputs = nb.cells[0].outputs
    images = [o for o in outputs if o.get("output_type") == "display_data" and "image/png" in o.get("data", {})]
    assert len(images) == 1  # updated in place, not appended once per redraw
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert "enabled True logged 6" in text
