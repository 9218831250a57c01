"""The case study report's figures (matplotlib, PNG): pass@k and bits per byte per arm, the curves over
pretraining, the tau sweep, and the students beside the paper's models by tokens seen."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nanophi.textbook.experiment.stats import PAPER_MODELS
from nanophi.textbook.experiment.tables import fmt_pct, tokens_seen


# ------------------------------------------------------------------------------------------------ figures

def make_figures(results: dict[str, Any], fig_dir: Path) -> dict[str, Path]:
    """PNG plots; returns {name: path}. Needs matplotlib (the viz extra); none without it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {}
    fig_dir.mkdir(parents=True, exist_ok=True)
    arms = list(results["arms"])
    figs: dict[str, Path] = {}

    def bars(ax: Any, metric: str, title: str, scale: float) -> None:
        means = [scale * results["arms"][a]["mean"][metric] for a in arms]
        ax.bar(range(len(arms)), means, color="#9ab", edgecolor="#345")
        for i, a in enumerate(arms):
            ys = [scale * r[metric] for r in results["arms"][a]["seeds"]]
            ax.scatter([i] * len(ys), ys, color="#c33", s=14, zorder=3)
        ax.set_xticks(range(len(arms)), arms, rotation=20)
        ax.set_title(title, fontsize=10)

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    bars(axes[0], "humaneval_pass@1", "HumanEval pass@1 (%)", 100)
    bars(axes[1], "heldout_pass@1", "held-out exercises pass@1 (%)", 100)
    fig.tight_layout()
    figs["pass"] = fig_dir / "pass_at_1.png"
    fig.savefig(figs["pass"], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    bars(axes[0], "code_bpb", "bits per byte, held-out raw code (lower is better)", 1)
    bars(axes[1], "humaneval_bpb", "bits per byte, HumanEval canonical solutions", 1)
    for ax, metric in zip(axes, ("code_bpb", "humaneval_bpb")):
        vals = [r[metric] for a in arms for r in results["arms"][a]["seeds"]]
        lo, hi = min(vals), max(vals)
        ax.set_ylim(max(0.0, lo - 0.3 * (hi - lo + 0.05)), hi + 0.3 * (hi - lo + 0.05))
    fig.tight_layout()
    figs["bpb"] = fig_dir / "bits_per_byte.png"
    fig.savefig(figs["bpb"], dpi=110)
    plt.close(fig)

    if any("curve" in results["arms"][a] for a in arms):
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        for ax, key, title in ((axes[0], "humaneval_bpb", "HumanEval canonical solutions"),
                               (axes[1], "heldout_bpb", "held-out raw code")):
            for a in arms:
                curve = results["arms"][a].get("curve")
                if not curve:
                    continue
                xs = [p["tokens_seen"] / 1e6 for p in curve]
                line, = ax.plot(xs, [p[key] for p in curve], marker="o", ms=3, label=a)
                ax.fill_between(xs, [p[f"{key}_range"][0] for p in curve], [p[f"{key}_range"][1] for p in curve],
                                color=line.get_color(), alpha=0.2)
            ax.set_xlabel("tokens seen (M)")
            ax.set_ylabel("bits per byte")
            ax.set_title(title, fontsize=10)
        axes[1].legend(fontsize=8)
        fig.tight_layout()
        figs["curves"] = fig_dir / "curves.png"
        fig.savefig(figs["curves"], dpi=110)
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, _, n_params, _, _, seen, he, _ in PAPER_MODELS:
        if seen is not None:
            ax.scatter([n_params], [seen], color="#345", s=30)
            ax.annotate(f"{name}: {he} %", (n_params, seen), fontsize=8, xytext=(5, -10), textcoords="offset points")
    for a in arms:
        rows = results["arms"][a]["seeds"]
        if rows:
            seen = results["arms"][a].get("data", {}).get("tokens_seen") or tokens_seen(rows[0])
            ax.scatter([rows[0]["params"]], [seen], color="#c33", s=20)
    if any(results["arms"][a]["seeds"] for a in arms):
        first = next(results["arms"][a]["seeds"][0] for a in arms if results["arms"][a]["seeds"])
        ax.annotate(f"our arms: {fmt_pct(max(results['arms'][a]['mean']['humaneval_pass@1'] for a in arms))} % max",
                    (first["params"], first["pretrain_tokens"]), fontsize=8, xytext=(5, 5), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("tokens seen")
    ax.set_title("scale: our students and phi-1 (HumanEval pass@1)", fontsize=10)
    fig.tight_layout()
    figs["scale"] = fig_dir / "scale.png"
    fig.savefig(figs["scale"], dpi=110)
    plt.close(fig)

    sweep = results["data"].get("humaneval_tau_sweep", {})
    if sweep:
        fig, ax = plt.subplots(figsize=(5.5, 3.6))
        for name, row in sweep.items():
            taus = sorted(float(t) for t in row if t != "n")
            ax.plot(taus, [100 * row[str(t)] / max(1, row["n"]) for t in taus], marker="o", label=f"{name} (n={row['n']})")
        ax.set_xlabel("τ (AST match threshold)")
        ax.set_ylabel("% of documents removed")
        ax.invert_xaxis()
        ax.legend(fontsize=8)
        ax.set_title("decontamination against HumanEval", fontsize=10)
        fig.tight_layout()
        figs["tau"] = fig_dir / "tau_sweep.png"
        fig.savefig(figs["tau"], dpi=110)
        plt.close(fig)
    return figs
