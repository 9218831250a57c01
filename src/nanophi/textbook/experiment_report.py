"""The case study's statistics and report: per-arm means with 95 % intervals over seeds, the paper's directions
tested as paired differences, tables beside phi-1's numbers, plots, and the limitations (report.md + report.html).

Intervals over seeds are Student-t intervals (with 2 seeds the t quantile is 12.7: honest, and wide). A direction
"held" when the paired-difference interval lies entirely on the paper's side of zero, is "reversed" when it lies
entirely on the other side, and is "inconclusive" otherwise; when every model scores the same (all zero, say)
there is "no signal". With few seeds, pass@k directions are also tested per problem: each problem's solved count
summed over seeds, better arm against worse, by an exact two-sided sign test over the problems where they differ
(McNemar's exact test when the counts are 0/1, as greedy ones are with one seed).

Every number of report.md and of docs/case_study.md's results section comes from results.json through this
module (`python -m nanophi.textbook.experiment_report RESULTS --doc docs/case_study.md` rewrites both); the
tests check that the committed copies are what it writes.
"""

from __future__ import annotations

import base64
import html
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

METRICS = ("humaneval_pass@1", "heldout_pass@1", "humaneval_sampled_pass@1", "humaneval_pass@10",
           "heldout_sampled_pass@1", "heldout_pass@10", "code_bpb", "humaneval_bpb", "parse_rate", "run_rate")
LOWER_IS_BETTER = {"code_bpb", "humaneval_bpb"}
# (name, better arm, worse arm, what the paper says)
DIRECTIONS = (
    ("filtering helps", "B", "A", "350M ablation: unfiltered 12.19 % (96K steps) -> filtered 17.68 % (36K steps)"),
    ("filtering helps at equal repetition", "B", "A_small", "not run in the paper (its budgets were unequal)"),
    ("repetition hurts", "A", "A_small", "not run in the paper (phi-1-base: ~8 passes over 7B tokens)"),
    ("synthetic textbooks help", "B+C", "B", "filtered 17.68 % -> filtered + textbooks 20.12 %"),
    ("the exercise fine-tune helps", "(B+C)->D", "B+C", "phi-1-base 29 % -> phi-1 50.6 %: the largest jump"),
    ("textbooks still help after the fine-tune", "(B+C)->D", "A->D", "not run in the paper (our control)"),
    ("the fine-tune helps raw pretraining too", "A->D", "A", "not run in the paper (our control)"),
)
DIRECTION_METRICS = ("humaneval_pass@1", "humaneval_pass@10", "heldout_pass@1", "heldout_pass@10", "humaneval_bpb",
                     "parse_rate")
# The per-problem counts each pass@ metric's paired test compares (summed over seeds).
PROBLEM_COUNTS = {"humaneval_pass@1": "humaneval_greedy_solved", "heldout_pass@1": "heldout_greedy_solved",
                  "humaneval_pass@10": "humaneval_sampled_solved", "heldout_pass@10": "heldout_sampled_solved"}
SIGN_TEST_ALPHA = 0.05
# (model, params, parameters, data, tokens seen, tokens seen as a number or None, HumanEval %, MBPP %); tokens
# seen after the paper: phi-1-base made ~8 passes over its 7B-token CodeTextbook (a little over 50B tokens), phi-1
# then fine-tuned on CodeExercises (~180M tokens); the paper gives no token count for phi-1-small.
PAPER_MODELS = (
    ("phi-1", "1.3B", 1.3e9, "CodeTextbook 7B, then CodeExercises ~180M", "~50B + the fine-tune", 50.2e9, "50.6", "55.5"),
    ("phi-1-base", "1.3B", 1.3e9, "CodeTextbook 7B (6B filtered + <1B synthetic)", "~50B (~8 passes)", 50e9, "29", "–"),
    ("phi-1-small", "350M", 350e6, "as phi-1", "not stated", None, "45", "–"),
)
# The 350M ablation: (HumanEval %, training length). Budgets were not equal.
PAPER_ABLATION = {"A": (12.19, "96K steps (plateaued)"), "B": (17.68, "36K steps"), "B+C": (20.12, "not stated")}
PAPER_TAU = "pruning CodeExercises at τ = 0.95 … 0.8 and retraining: 45.1–50.6 % HumanEval (StarCoder-Prompted 41.5 %)"
HUMANEVAL_STEP = 100 / 164  # one problem, in points


PUBLISHED = ("small", "tiny")  # the committed runs, shipped as package data so a pip install (Colab) has them


def published_results(name: str = "small") -> dict[str, Any]:
    """The results.json of a committed case-study run (docs/case_study/, docs/case_study/tiny/), from package data.

    Shipped inside the package because a notebook on Colab has nanophi installed but no checkout of docs/;
    tests/test_experiment.py keeps these copies byte-identical to the ones beside the reports.
    """
    import json
    from importlib import resources

    if name not in PUBLISHED:
        raise ValueError(f"no published case-study run {name!r}; choose one of {', '.join(PUBLISHED)}")
    return json.loads((resources.files("nanophi.textbook") / "results" / f"{name}.json").read_text(encoding="utf-8"))


# ------------------------------------------------------------------------------------------------ statistics

def t_quantile(df: int) -> float:
    from scipy.stats import t

    return float(t.ppf(0.975, df))


def mean_ci(values: Sequence[float]) -> tuple[float, list[float] | None]:
    """Mean and 95 % Student-t interval; no interval from one value, a zero-width one when all values agree."""
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not xs:
        return float("nan"), None
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, None
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))
    half = t_quantile(len(xs) - 1) * sd / math.sqrt(len(xs))
    return m, [m - half, m + half]


def aggregate(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One arm: its per-seed records, mean / ci95 of each metric over seeds, and the mean curve with the seeds'
    range (min, max) as its band."""
    out: dict[str, Any] = {"seeds": rows, "mean": {}, "ci95": {},
                           "samples_per_problem": rows[0].get("samples_per_problem", 0) if rows else 0}
    for metric in METRICS:
        m, ci = mean_ci([r[metric] for r in rows if metric in r])
        out["mean"][metric], out["ci95"][metric] = m, ci
    curves = [r["curve"] for r in rows if r.get("curve")]
    if curves:
        out["curve"] = []
        for points in zip(*curves):  # point i of every seed: the same step, so the same tokens seen
            point: dict[str, Any] = {"tokens_seen": points[0]["tokens_seen"]}
            for key in ("humaneval_bpb", "heldout_bpb"):
                xs = [q[key] for q in points]
                point[key], point[f"{key}_range"] = sum(xs) / len(xs), [min(xs), max(xs)]
            out["curve"].append(point)
    return out


def sign_test(better: Sequence[int], worse: Sequence[int]) -> dict[str, Any]:
    """Exact two-sided sign test over paired per-problem counts: under the null a problem that differs is as
    likely to favour either arm. Ties (most problems, when both solve nothing) carry no information."""
    wins = sum(b > w for b, w in zip(better, worse))
    losses = sum(b < w for b, w in zip(better, worse))
    n = wins + losses
    tail = sum(math.comb(n, i) for i in range(min(wins, losses) + 1)) / 2 ** n if n else 1.0
    return {"better": wins, "worse": losses, "ties": len(better) - n, "p": min(1.0, 2 * tail)}


def problem_counts(rows: Sequence[dict[str, Any]], key: str) -> list[int] | None:
    """Per-problem solved counts summed over seeds; None when a seed lacks them."""
    lists = [r.get(key) for r in rows]
    if not lists or any(x is None for x in lists):
        return None
    return [sum(col) for col in zip(*lists)]


def wilson(passed: int, n: int) -> tuple[float, float]:
    """95 % Wilson interval of a proportion: sane at 0/164, where the normal interval collapses to a point."""
    if n == 0:
        return float("nan"), float("nan")
    z = 1.959964
    p = passed / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def direction(results: dict[str, Any], better: str, worse: str, metric: str) -> dict[str, Any]:
    """Paired (same seed index) differences better - worse, signed so that > 0 is the paper's direction."""
    a, b = results["arms"][better]["seeds"], results["arms"][worse]["seeds"]
    sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
    diffs = [sign * (x[metric] - y[metric]) for x, y in zip(a, b) if metric in x and metric in y]
    m, ci = mean_ci(diffs)
    test = None
    if metric in PROBLEM_COUNTS:
        ca, cb = problem_counts(a, PROBLEM_COUNTS[metric]), problem_counts(b, PROBLEM_COUNTS[metric])
        if ca is not None and cb is not None and len(ca) == len(cb):
            test = sign_test(ca, cb)
    if not diffs:
        verdict = "not measured"
    elif all(d == 0 for d in diffs):
        verdict = "no signal"
    elif ci is None:
        verdict = "held (1 seed)" if m > 0 else "reversed (1 seed)" if m < 0 else "no signal"
    elif ci[0] > 0:
        verdict = "held"
    elif ci[1] < 0:
        verdict = "reversed"
    else:
        verdict = "inconclusive"
    per_problem = "–"
    if test is not None:
        if not test["better"] + test["worse"]:
            per_problem = "no signal"
        elif test["p"] < SIGN_TEST_ALPHA:
            per_problem = "held" if test["better"] > test["worse"] else "reversed"
        else:
            per_problem = "inconclusive"
    return {"metric": metric, "diffs": diffs, "mean": m, "ci95": ci, "verdict": verdict,
            "seeds_in_direction": sum(d > 0 for d in diffs), "n": len(diffs), "per_problem": test,
            "per_problem_verdict": per_problem}


def directions(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Every direction of DIRECTIONS whose arms ran, on every metric both arms measured."""
    rows = []
    for name, better, worse, paper in DIRECTIONS:
        if better not in results["arms"] or worse not in results["arms"]:
            continue
        for metric in DIRECTION_METRICS:
            if not any(metric in r for r in results["arms"][better]["seeds"]):
                continue
            rows.append({"direction": name, "better": better, "worse": worse, "paper": paper,
                         **direction(results, better, worse, metric)})
    return rows


# ------------------------------------------------------------------------------------------------ formatting

def _pct(x: float | None) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{100 * x:.1f}"


def _num(x: float | None, digits: int = 3) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def _cell(arm: dict[str, Any], metric: str) -> str:
    m, ci = arm["mean"][metric], arm["ci95"][metric]
    pct = "pass@" in metric or metric.endswith("_rate")
    fmt = _pct if pct else _num
    if ci is None:
        return fmt(m)
    return f"{fmt(m)} [{fmt(ci[0])}, {fmt(ci[1])}]"


def _mean_cell(arm: dict[str, Any], metric: str) -> str:
    """A metric's mean, or – when the run did not measure it (pass@k without samples)."""
    return _cell(arm, metric) if metric in arm["mean"] else "–"


def summary_table(results: dict[str, Any]) -> str:
    """The arms as a Markdown table (also what the CLI prints)."""
    lines = ["| arm | seeds | HumanEval greedy pass@1 % | HumanEval pass@10 % | held-out greedy pass@1 % | "
             "held-out pass@10 % | code bpb | HumanEval bpb | parses % | runs % |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, arm in results["arms"].items():
        passed = sum(r["humaneval_passed"] for r in arm["seeds"])
        n = sum(r["humaneval_n"] for r in arm["seeds"])
        hp = sum(r["heldout_passed"] for r in arm["seeds"])
        hn = sum(r["heldout_n"] for r in arm["seeds"])
        lines.append(f"| {name} | {len(arm['seeds'])} | {_cell(arm, 'humaneval_pass@1')} ({passed}/{n}) | "
                     f"{_mean_cell(arm, 'humaneval_pass@10')} | {_cell(arm, 'heldout_pass@1')} ({hp}/{hn}) | "
                     f"{_mean_cell(arm, 'heldout_pass@10')} | {_cell(arm, 'code_bpb')} | "
                     f"{_cell(arm, 'humaneval_bpb')} | {_pct(arm['mean']['parse_rate'])} | "
                     f"{_pct(arm['mean']['run_rate'])} |")
    return "\n".join(lines)


def arm_data_table(results: dict[str, Any]) -> str:
    """What each arm trained on: unique tokens, tokens seen, passes over its pretraining corpus."""
    lines = ["| arm | data | unique tokens | tokens seen | passes over the pretraining corpus |", "|---|---|---|---|---|"]
    for name, arm in results["arms"].items():
        d = arm.get("data")
        if d is None:
            continue
        lines.append(f"| {name} | {d['source']} | {d['unique_tokens']:,} | {d['tokens_seen']:,} | {d['passes']:.2f} |")
    if len(lines) == 2:  # a run from before the arms reported their data
        tokens = results["data"].get("arm_tokens", {})
        return "Arm corpora (tokens): " + ", ".join(f"{a} {n:,}" for a, n in tokens.items()) + "."
    return "\n".join(lines)


def paper_table(results: dict[str, Any]) -> str:
    """phi-1's models beside ours, in parameters and tokens seen."""
    arms = results["arms"]
    lines = ["| model | params | data | tokens seen | HumanEval % | MBPP % |", "|---|---|---|---|---|---|"]
    lines += [f"| {m} (paper) | {p} | {data} | {seen} | {he} | {mb} |" for m, p, _, data, seen, _, he, mb in PAPER_MODELS]
    for name in ("B+C", "(B+C)->D"):
        if name not in arms or not arms[name]["seeds"]:
            continue
        params = arms[name]["seeds"][0]["params"]
        seen = arms[name].get("data", {}).get("tokens_seen") or _tokens_seen(arms[name]["seeds"][0])
        lines.append(f"| ours: {name} | {params / 1e6:.2f}M | {ARM_DATA_WORDS.get(name, name)} | {seen / 1e6:.2f}M | "
                     f"{_cell(arms[name], 'humaneval_pass@1')} (greedy) | not measured |")
    return "\n".join(lines)


ARM_DATA_WORDS = {"B+C": "CPython stdlib, filtered + teacher textbooks", "(B+C)->D": "as B+C, then verified exercises"}


def _tokens_seen(row: dict[str, Any]) -> int:
    return int(row["pretrain_tokens"]) + int(row.get("finetune_tokens", 0))


def ablation_table(results: dict[str, Any]) -> str:
    arms = results["arms"]
    lines = ["| arm | paper (350M): HumanEval % | paper: training length | ours: HumanEval greedy % | ours: pass@10 % | "
             "ours: passes | ours: HumanEval bpb |", "|---|---|---|---|---|---|---|"]
    for name, (paper, length) in PAPER_ABLATION.items():
        if name not in arms:  # left out of this run (--arms)
            lines.append(f"| {name} | {paper} | {length} | not run | – | – | – |")
            continue
        arm = arms[name]
        passes = arm.get("data", {}).get("passes")
        lines.append(f"| {name} | {paper} | {length} | {_cell(arm, 'humaneval_pass@1')} | "
                     f"{_mean_cell(arm, 'humaneval_pass@10')} | {'–' if passes is None else f'{passes:.2f}'} | "
                     f"{_cell(arm, 'humaneval_bpb')} |")
    return "\n".join(lines)


def directions_table(dirs: list[dict[str, Any]], paper: bool = True) -> str:
    head = "| direction | " + ("paper | " if paper else "") + ("metric | mean diff | 95 % interval | seeds in direction "
                                                                "| verdict (seeds) | problems better/worse (sign test p) "
                                                                "| verdict (problems) |")
    lines = [head, "|---|" + ("---|" if paper else "") + "---|---|---|---|---|---|---|"]
    for d in dirs:
        scale = 100 if ("pass@" in d["metric"] or d["metric"].endswith("_rate")) else 1
        ci = "–" if d["ci95"] is None else f"[{scale * d['ci95'][0]:+.3f}, {scale * d['ci95'][1]:+.3f}]"
        unit = " pts" if scale == 100 else ""
        t = d.get("per_problem")
        test = "–" if t is None else f"{t['better']}/{t['worse']} (p={t['p']:.3g})"
        lines.append(f"| {d['direction']} ({d['better']} vs {d['worse']}) | " + (f"{d['paper']} | " if paper else "")
                     + f"{d['metric']} | {scale * d['mean']:+.3f}{unit} | {ci} | {d['seeds_in_direction']}/{d['n']} | "
                     f"**{d['verdict']}** | {test} | {d.get('per_problem_verdict', '–')} |")
    return "\n".join(lines)


def wall_time(results: dict[str, Any]) -> str:
    t = results["timings"]
    text = ", ".join(f"{k.removesuffix('_s')} {v:.0f} s" for k, v in t.items())
    if (m := results.get("machine")):
        text += (f" on {m['cpus']} CPU cores with a 5-minute load average of {m['load_avg_5min_start']} at the start "
                 f"and {m['load_avg_5min_end']} at the end (other jobs shared the cores)")
    resumed = results.get("resumed_models")
    if resumed:
        text += (f"; {resumed} models were measured by an earlier invocation and resumed (the models' own times, "
                 f"training and evaluation, sum to {_models_s(results):.0f} s)")
    return text + "."


def _teacher_rows(t: dict[str, Any]) -> list[str]:
    if "before" not in t:
        return [f"The teacher experiment was skipped ({t.get('skipped', 'no teacher')})."]
    rows = ["| | HumanEval pass@1 | 95 % Wilson | held-out exercises pass@1 | parses % | runs % |",
            "|---|---|---|---|---|---|"]
    for when in ("before", "after"):
        he, ho = t[when]["humaneval"], t[when]["heldout"]
        lo, hi = wilson(he["passed"], he["n"])
        rows.append(f"| {when} | {he['passed']}/{he['n']} ({_pct(he['pass@1'])} %) | {_pct(lo)}–{_pct(hi)} % | "
                    f"{ho['passed']}/{ho['n']} | {_pct(he['parse_rate'])} | {_pct(he['run_rate'])} |")
    ft = t["finetune"]
    problems = t.get("problems", t["before"]["humaneval"]["n"])
    rows += ["", f"Fine-tune: {ft['steps']} steps × {ft['batch_size']} exercises, lr {ft['lr']:g}, "
                 f"{ft['tokens']:,} tokens ({ft['scored_tokens']:,} scored: the solutions), loss "
                 f"{ft['first_loss']:.3f} → {ft['last_loss']:.3f}, {ft['seconds']:.0f} s. Greedy, completion mode, "
                 f"{t['max_new_tokens']} new tokens, first {problems} HumanEval problems."]
    if "best_val_loss" in ft:
        rows[-1] += (f" Validation on {ft['val_examples']} exercises: best loss {ft['best_val_loss']:.3f} at step "
                     f"{ft['best_step']}{' (stopped early)' if ft.get('stopped_early') else ''}.")
    sampled = t["after"].get("humaneval_sampled")
    if sampled:
        rows[-1] += (f" Sampled after ({sampled['samples_per_problem']} per problem at T {sampled['temperature']}, "
                     f"first {sampled['problems']} problems): pass@1 {_pct(sampled['pass@1'])} %, pass@10 "
                     f"{_pct(sampled['pass@10'])} %.")
    if t.get("source"):
        rows[-1] += (f" Run separately (`python -m nanophi.textbook.experiment_finetune`); its metrics and every "
                     f"completion with its verdict: `{Path(t['source']).parent}`.")
    return rows


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
            seen = results["arms"][a].get("data", {}).get("tokens_seen") or _tokens_seen(rows[0])
            ax.scatter([rows[0]["params"]], [seen], color="#c33", s=20)
    if any(results["arms"][a]["seeds"] for a in arms):
        first = next(results["arms"][a]["seeds"][0] for a in arms if results["arms"][a]["seeds"])
        ax.annotate(f"our arms: {_pct(max(results['arms'][a]['mean']['humaneval_pass@1'] for a in arms))} % max",
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


# ------------------------------------------------------------------------------------------------ the report

def _setup(results: dict[str, Any]) -> list[str]:
    """The setup bullets (report.md and docs/case_study.md)."""
    cfg, data, arms = results["config"], results["data"], results["arms"]
    params = _params(arms)
    budget = results["budget"]
    samples = cfg.get("samples", 0)
    return [
        f"- Students: GPT, {cfg['n_layer']} layers × {cfg['n_embd']} dims, {cfg['n_head']} heads, context "
        f"{cfg['block_size']}, {params / 1e6:.2f}M parameters, one shared byte-level BPE of "
        f"{data['tokenizer_vocab']} tokens trained on the union of the arms' training text.",
        f"- Budget: every arm pretrains on **{budget['pretrain_tokens']:,} tokens** ({cfg['pretrain_iters']} steps × "
        f"{cfg['batch_size']} × {cfg['block_size']}); the D arms add the same **{budget['finetune_tokens']:,}-token** "
        f"exercise fine-tune ({budget.get('finetune_steps', cfg['ft_iters'])} steps × {cfg['ft_batch']} exercises, "
        f"problem tokens masked).",
        f"- Seeds: {cfg['seeds']} per arm (initialisation and batch order; the data split is fixed).",
        f"- Data ({data.get('data_dir')}): pool {data['n_pool']} documents ({data['chars']['pool']:,} chars), filtered "
        f"{data['n_filtered']} ({data['chars']['filtered']:,} chars), textbooks {data['n_textbooks']} "
        f"({data['chars']['textbooks']:,} chars, repeated ×{data['textbook_repeats']} in B+C), verified exercises "
        f"{data['n_train_exercises']} for training + {data['n_heldout_exercises']} held out (by source: training "
        f"{_sources(data, 'train')}; held out {_sources(data, 'heldout')}); held-out raw code "
        f"{data['n_heldout_code_docs']} documents ({data['chars']['heldout_code']:,} chars).",
        f"- Exercises from the teacher: {_teacher_exercises(data)}; "
        + (f"the rest are the mined exercise set (`experiment_exercises.exercise_set`: doctest exercises from the "
           f"stdlib and site-packages, each verified in the sandbox, decontaminated and deduplicated, "
           f"{data['exercise_set']['train']} + {data['exercise_set']['heldout']} split by a hash of the id; "
           f"training exercises within τ of a held-out one are dropped). " if data.get("exercise_set") else
           f"from the stdlib's doctests: {data.get('exercises', {}).get('extra', 0)} verified (see "
           f"`experiment_exercises.py`). ")
        + f"Arm B is the top "
        f"{_pct(data.get('filter_keep'))} % of the pool by the filter's score (P ≥ {_num(data.get('filter_p_cut'))}; "
        f"the pipeline's own threshold kept {data.get('filter_kept_by_pipeline', '–')} documents).",
        f"- Evaluation: greedy completions ({cfg['max_new_tokens']} new tokens max, HumanEval stop sequences) on "
        f"{results['humaneval_problems']} HumanEval problems and on the held-out exercises"
        + (f", and {samples} samples per problem at temperature 0.8 for pass@1 and pass@10 (the unbiased estimator "
           "of Chen et al. 2021)" if samples else "")
        + "; each program runs in nanophi's sandbox. Bits per byte on held-out raw code and on HumanEval's canonical "
        "solutions given their prompts" + (f", also at {cfg['curve_points']} points during pretraining (the curves)."
                                           if cfg.get("curve_points") else "."),
        f"- Wall time: {wall_time(results)}",
    ] + ([f"- **Arms not run here: {', '.join(results['arms_left_out'])}** (`--arms`); the directions that need "
          "them are not reported."] if results.get("arms_left_out") else [])


def _compute_s(results: dict[str, Any]) -> float:
    """This invocation's wall time, or the models' own seconds when they were measured by an earlier one."""
    return max(results["timings"]["total_s"], _models_s(results))


def _models_s(results: dict[str, Any]) -> float:
    return sum(r.get("seconds", 0) for a in results["arms"].values() for r in a["seeds"])


def _params(arms: dict[str, Any]) -> int:
    return next((a["seeds"][0]["params"] for a in arms.values() if a["seeds"]), 0)


def report_markdown(results: dict[str, Any], figs: dict[str, Path], root: Path) -> str:
    cfg, data, arms = results["config"], results["data"], results["arms"]
    params = _params(arms)
    dirs = directions(results)
    rel = {k: p.relative_to(root).as_posix() for k, p in figs.items()}
    t = results["teacher_finetune"]
    L: list[str] = []
    L += [f"# Case study: textbook-quality data at small scale ({results['preset']} preset)", "",
          f"Students trained from scratch on {len(arms)} arms at equal token budgets, after phi-1 (\"Textbooks Are "
          "All You Need\", arXiv 2306.11644). Every number below was measured by this run; `results.json` holds "
          "them all, and this file is written from it.", "", "## Setup", ""]
    L += _setup(results) + [""]
    L += ["## What each arm trained on", "",
          "Equal budgets mean unequal repetition: the smaller a corpus, the more passes the budget makes over it. "
          "A_small is a random sample of the raw pool as large as B, so B vs A_small compares filtering at equal "
          "repetition.", "", arm_data_table(results), ""]
    L += ["## Results by arm", "", "Mean over seeds [95 % t-interval over seeds]; counts are summed over seeds.", "",
          summary_table(results), ""]
    if "pass" in rel:
        L += [f"![pass@1 by arm]({rel['pass']})", "", f"![bits per byte by arm]({rel['bpb']})", ""]
    if "curves" in rel:
        L += ["## Curves", "", "Bits per byte during pretraining, mean over seeds with the seeds' range as a band; "
              "the D arms' last point is after the exercise fine-tune.", "", f"![bits per byte vs tokens seen]({rel['curves']})", ""]
    L += ["## Beside the paper", "", paper_table(results), ""]
    if "scale" in rel:
        L += [f"![our students and phi-1's models by parameters and tokens seen]({rel['scale']})", ""]
    L += ["The 350M ablation (paper) beside our arms A → B → B+C. The paper's budgets were not equal: the unfiltered "
          "model plateaued at 12.19 % after 96K steps, the filtered one reached 17.68 % after 36K.", "",
          ablation_table(results), ""]
    L += ["## Which of the paper's directions held here", "",
          "Paired by seed; the difference is signed so that > 0 is the paper's direction (for bits per byte: lower). "
          "Verdicts over seeds: *held* / *reversed* when the 95 % t-interval of the paired differences excludes zero, "
          "*inconclusive* when it does not, *no signal* when every model scored the same. Per problem (pass@ metrics): "
          "problems whose solved count, summed over seeds, is higher in the better / the worse arm, and an exact "
          f"two-sided sign test; *held* / *reversed* at p < {SIGN_TEST_ALPHA}.", "",
          directions_table(dirs), ""]
    L += ["", _directions_prose(dirs, results), ""]
    L += ["## Jina's experiment: fine-tuning the teacher", "",
          f"{t.get('model', 'The teacher')} fine-tuned on the "
          f"{t['exercises']['fit'] if 'exercises' in t else data['n_train_exercises']} verified training exercises "
          "with the problem tokens masked out of the loss (jina-ai/textbook fine-tuned starcoderbase-1b this way: "
          "about 15 % → 27.0 %).", ""] + _teacher_rows(t) + [""]
    L += ["## Decontamination: our τ sweep", "",
          f"Paper: {PAPER_TAU}. Ours: how many training documents each τ removes (13-gram overlap counts at every τ; "
          f"the run used τ = {cfg['tau']}). Retraining at each τ, as the paper did, is left to a larger run.", "",
          "| source | documents | " + " | ".join(f"τ={t_}" for t_ in _taus(data)) + " |",
          "|---|---|" + "---|" * len(_taus(data))]
    for name, row in data.get("humaneval_tau_sweep", {}).items():
        L.append(f"| {name} | {row['n']} | " + " | ".join(str(row[t_]) for t_ in _taus(data)) + " |")
    held = data.get("heldout_matches_removed", {})
    L += ["", "Also removed before training, as near-copies of a held-out exercise (13-gram or AST ≥ τ): "
          + ", ".join(f"{k} {v}" for k, v in held.items()) + "."]
    if "tau" in rel:
        L += ["", f"![τ sweep]({rel['tau']})"]
    L += ["", "## Limitations", ""]
    L += _limitations(results, params)
    return "\n".join(L) + "\n"


DOC_BEGIN = "<!-- begin: generated from docs/case_study/results.json by nanophi.textbook.experiment_report -->"
DOC_END = "<!-- end: generated -->"


def case_study_section(results: dict[str, Any], report_link: str = "case_study/report.md") -> str:
    """docs/case_study.md's results section: the same tables as report.md, from the same results.json."""
    dirs = [d for d in directions(results) if d["verdict"] != "no signal" or d.get("per_problem_verdict") not in
            ("no signal", "–")]
    L = [DOC_BEGIN, "", f"The committed `{results['preset']}` run ([report]({report_link})):", ""]
    L += _setup(results) + ["", arm_data_table(results), "", summary_table(results), "",
                            "Beside the paper:", "", paper_table(results), "", ablation_table(results), "",
                            "Directions with any signal (the report lists every metric):", "",
                            directions_table(dirs, paper=False), ""]
    L += ["Jina's experiment:", ""] + _teacher_rows(results["teacher_finetune"]) + ["", DOC_END]
    return "\n".join(L)


def update_case_study_doc(doc: Path, results: dict[str, Any]) -> None:
    """Replace the generated section of `doc` (between DOC_BEGIN and DOC_END) with `case_study_section`."""
    text = doc.read_text(encoding="utf-8")
    if DOC_BEGIN not in text or DOC_END not in text:
        raise ValueError(f"{doc} has no generated section; add the lines {DOC_BEGIN} and {DOC_END}")
    head, rest = text.split(DOC_BEGIN, 1)
    tail = rest.split(DOC_END, 1)[1]
    doc.write_text(head + case_study_section(results) + tail, encoding="utf-8")


def _teacher_exercises(data: dict[str, Any]) -> str:
    ex = data.get("exercises", {})
    if "verified_records" in ex:
        written = f"{ex['generated']} written, " if "generated" in ex else ""
        return f"{written}{ex['verified_records']} verified by the pipeline, {ex.get('parsed', 0)} usable here"
    if "generated" in ex:
        return (f"{ex['generated']} written, {ex['parsed']} with a documented function and asserts, "
                f"{ex['verified_here']} passing their own asserts in the sandbox")
    return "none"


def _sources(data: dict[str, Any], split: str) -> str:
    src = data.get("exercise_sources", {}).get(split, {})
    return ", ".join(f"{k} {v}" for k, v in sorted(src.items())) or "–"


def _taus(data: dict[str, Any]) -> list[str]:
    rows = list(data.get("humaneval_tau_sweep", {}).values())
    return [k for k in rows[0] if k != "n"] if rows else []


def _directions_prose(dirs: list[dict[str, Any]], results: dict[str, Any]) -> str:
    rows = [r for arm in results["arms"].values() for r in arm["seeds"]]
    parts = []
    if rows and not any(r["humaneval_passed"] or r["heldout_passed"] for r in rows):
        parts.append(f"No student solved a HumanEval problem or a held-out exercise ({len(rows)} models, "
                     f"{sum(r['humaneval_n'] for r in rows)} HumanEval completions in all), so pass@1 carries no "
                     "signal at this scale; the directions rest on bits per byte and on whether completions parse.")
    for name in dict.fromkeys(d["direction"] for d in dirs):
        said = [f"{d['metric']} {d['verdict']} ({d['seeds_in_direction']}/{d['n']} seeds in the paper's direction)"
                for d in dirs if d["direction"] == name and d["verdict"] != "no signal"]
        parts.append(f"*{name}*: " + ("; ".join(said) if said else "no signal in any metric"))
    return " ".join(p if p.endswith(".") else p + "." for p in parts)


def _limitations(results: dict[str, Any], params: int) -> list[str]:
    data, cfg = results["data"], results["config"]
    n_he = results["humaneval_problems"]
    tokens = results["budget"]["pretrain_tokens"]
    lo5, hi5 = wilson(round(0.05 * n_he), n_he)
    return [
        f"- **Teacher.** The textbooks and exercises come from {results.get('teacher') or 'a small teacher'} "
        "(SmolLM2-135M-Instruct, 135M parameters), not GPT-3.5 (textbooks) and GPT-4 (labels) as in phi-1. "
        f"Here its exercises: {_teacher_exercises(data)}; its textbook sections: {data['n_textbooks']} kept "
        f"({data['chars']['textbooks']:,} characters), so C is a thin slice of B+C even upsampled. A passing "
        "exercise can still be trivial or mis-documented.",
        f"- **Exercises.** With the teacher's yield this low, D is mostly docstring → function problems from the "
        f"stdlib's doctests ({_sources(data, 'train')} for training): real code by CPython's authors, verified by "
        "their own examples. The D arms therefore test fine-tuning on verified exercises, not on a teacher's "
        "synthetic ones, and the held-out exercises share that source.",
        f"- **Students.** {params / 1e6:.2f}M parameters and {tokens / 1e6:.2f}M pretraining "
        f"tokens, against 350M–1.3B parameters and ~50B tokens seen (8 passes over 7B) in the paper: about "
        f"10^{math.log10(350e6 / max(1, params)):.0f} times fewer parameters than phi-1-small and "
        f"10^{math.log10(50e9 / max(1, tokens)):.0f} times fewer tokens than phi-1-base. "
        "Models this size rarely complete a HumanEval problem, so pass@1 mostly reads 0 and the directions are judged "
        "on bits per byte and the held-out exercises as much as on pass@1.",
        f"- **Compute.** CPU only ({_compute_s(results) / 60:.0f} minutes in all for this run); the `full` "
        "preset is sized for one GPU and was not run here.",
        f"- **Resolution.** One HumanEval problem is {HUMANEVAL_STEP:.2f} points; with {n_he} problems a 95 % "
        f"interval around 5 % spans {100 * lo5:.1f}–{100 * hi5:.1f} %. The held-out exercise set is "
        f"{data['n_heldout_exercises']} problems: one problem moves it by {100 / max(1, data['n_heldout_exercises']):.1f} points. "
        f"With {cfg['seeds']} seeds the t quantile is {t_quantile(max(1, cfg['seeds'] - 1)):.1f}, so only large, "
        "consistent effects can be called.",
        "- **Generator/test overlap.** Held-out and training exercises come from the same generators (the teacher's "
        "template and topic tree; the stdlib's doctests), and each test is its generator's own (the teacher's "
        "asserts, the docstring's examples). Near-copies of held-out exercises were removed from everything that "
        f"trains ({', '.join(f'{k} {v}' for k, v in data.get('heldout_matches_removed', {}).items())}), but "
        "held-out pass@1 still measures in-distribution skill, and a test is only as right as its author.",
        "- **The pool.** The CPython standard library stands in for The Stack and StackOverflow; the filter's labels come "
        "from a transparent heuristic rubric (or a 135M judge), not from GPT-4.",
        "- **Decontamination.** Our τ sweep counts removals; it does not retrain at each τ as the paper did.",
    ]


def write_report(results: dict[str, Any], out: Path) -> tuple[Path, Path]:
    """OUT/report.md (figures under OUT/figures/) and OUT/report.html with the figures embedded."""
    figs = make_figures(results, out / "figures")
    md = report_markdown(results, figs, out)
    md_path, html_path = out / "report.md", out / "report.html"
    md_path.write_text(md, encoding="utf-8")
    html_path.write_text(to_html(md, out), encoding="utf-8")
    return md_path, html_path


def to_html(md: str, root: Path) -> str:
    """The Markdown report as one self-contained page: images inlined as data URIs."""
    try:
        import markdown

        body = markdown.markdown(md, extensions=["tables"])
    except ImportError:  # still readable without the markdown package
        body = f"<pre>{html.escape(md)}</pre>"

    def inline(m: re.Match[str]) -> str:
        path = root / html.unescape(m.group(1))
        if not path.is_file():
            return m.group(0)
        return f'src="data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}"'

    body = re.sub(r'src="([^"]+\.png)"', inline, body)
    style = ("body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;line-height:1.45}"
             "table{border-collapse:collapse;margin:1rem 0;font-size:.9rem}td,th{border:1px solid #ccc;padding:.25rem .5rem}"
             "img{max-width:100%}code{background:#f4f4f4}")
    return f"<!doctype html><html><head><meta charset='utf-8'><title>nanophi case study</title><style>{style}</style></head><body>{body}</body></html>\n"


def main(argv: list[str] | None = None) -> int:
    """Rewrite a run's report (and docs/case_study.md's generated section) from its results.json."""
    import argparse
    import json
    import sys

    parser = argparse.ArgumentParser(prog="python -m nanophi.textbook.experiment_report", description=main.__doc__)
    parser.add_argument("results", help="a case-study run's results.json; the report is written beside it")
    parser.add_argument("--doc", default=None, help="also rewrite this Markdown file's generated section "
                                                    "(docs/case_study.md)")
    args = parser.parse_args(argv)
    path = Path(args.results)
    if not path.is_file():
        print(f"error: {path} is not a file; pass a case-study run's results.json", file=sys.stderr)
        return 2
    results = json.loads(path.read_text(encoding="utf-8"))
    write_report(results, path.parent)
    if args.doc is not None:
        try:
            update_case_study_doc(Path(args.doc), results)
        except (OSError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
