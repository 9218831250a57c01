"""Debugging and live visualisation: guards against silent failure, network-health diagnostics, sinks and views.

    guards.py       where a NaN came from (`locate_nonfinite`), shape/dtype/range checks at module boundaries
    diagnostics.py  `HealthMonitor`: activations, attention entropy, dead units, grad norms, update/data ratios
    sinks.py        TensorBoard and Weights & Biases as trainer callbacks
    dashboard.py    a live terminal dashboard (rich), only on a TTY
    notebook.py     a live matplotlib plot in a Jupyter cell
    report.py       `nanophi report RUN`: one self-contained HTML page of plots
    sanity.py       `nanophi overfit`: can the model memorise one batch?
    lr_find.py      `nanophi lr-find`: the learning-rate range test

Nothing here is imported by the core unless a flag asks for it.
"""
