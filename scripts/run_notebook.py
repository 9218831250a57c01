"""Execute a notebook top to bottom with this interpreter as its kernel, and time it.

    python scripts/run_notebook.py notebooks/01_gpt_from_scratch.ipynb            # full settings
    NANOPHI_SMOKE=1 python scripts/run_notebook.py notebooks/01_gpt_from_scratch.ipynb
    python scripts/run_notebook.py NB --cwd /tmp/nb --executed /tmp/nb/out.ipynb --results docs/notebook01_results.json

The kernel runs in `--cwd` (default: the notebook's folder), where the notebook writes runs/. `--executed` keeps a
copy with outputs (the committed notebook stays stripped). `--results` copies the `runs/notebook01/results.json`
that notebook 01 writes (settings, corpus, per-step losses) to a file, with the wall time added.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

KERNEL = "nanophi-run"
CELL_TIMEOUT_S = 1800


def kernel_spec(root: Path) -> None:
    """A kernel spec that runs this interpreter, so no `ipykernel install` is needed (as in tests/test_notebooks.py)."""
    spec = root / "kernels" / KERNEL
    spec.mkdir(parents=True, exist_ok=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "nanophi run", "language": "python"}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebook", type=Path)
    parser.add_argument("--cwd", type=Path, help="working directory of the kernel (default: the notebook's folder)")
    parser.add_argument("--executed", type=Path, help="write the executed notebook, outputs included, here")
    parser.add_argument("--results", type=Path, help="copy runs/notebook01/results.json here, with the wall time")
    args = parser.parse_args(argv)

    import nbclient
    import nbformat

    cwd = (args.cwd or args.notebook.resolve().parent).resolve()
    cwd.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as jupyter:
        kernel_spec(Path(jupyter))
        os.environ["JUPYTER_PATH"] = jupyter
        os.environ.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
        nb = nbformat.read(args.notebook, as_version=4)
        client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name=KERNEL,
                                         resources={"metadata": {"path": str(cwd)}})
        t0 = time.perf_counter()
        client.execute()
        seconds = time.perf_counter() - t0
    print(f"{args.notebook}: ran in {seconds:.1f} s (cwd {cwd})")
    if args.executed:
        args.executed.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, args.executed)
    if args.results:
        results = json.loads((cwd / "runs" / "notebook01" / "results.json").read_text())
        results["seconds"] = round(seconds, 1)
        args.results.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
