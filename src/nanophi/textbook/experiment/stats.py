"""The case study's statistics: per-arm means with 95 % intervals over seeds, and the paper's directions
tested as paired differences and per-problem sign tests; the paper's own numbers they are set beside.

Intervals over seeds are Student-t intervals (with 2 seeds the t quantile is 12.7: honest, and wide). A direction
"held" when the paired-difference interval lies entirely on the paper's side of zero, is "reversed" when it lies
entirely on the other side, and is "inconclusive" otherwise; when every model scores the same (all zero, say)
there is "no signal". With few seeds, pass@k directions are also tested per problem: each problem's solved count
summed over seeds, better arm against worse, by an exact two-sided sign test over the problems where they differ
(McNemar's exact test when the counts are 0/1, as greedy ones are with one seed).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
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
