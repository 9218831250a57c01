"""The case study report's tables: per-arm results, the arms' data, beside phi-1, the ablation, the
directions, the teacher's fine-tune, and the wall time. Markdown, from results.json."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from nanophi.textbook.experiment.stats import PAPER_ABLATION, PAPER_MODELS, wilson


# ------------------------------------------------------------------------------------------------ formatting

def fmt_pct(x: float | None) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{100 * x:.1f}"


def fmt_num(x: float | None, digits: int = 3) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def _cell(arm: dict[str, Any], metric: str) -> str:
    m, ci = arm["mean"][metric], arm["ci95"][metric]
    pct = "pass@" in metric or metric.endswith("_rate")
    fmt = fmt_pct if pct else fmt_num
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
                     f"{_cell(arm, 'humaneval_bpb')} | {fmt_pct(arm['mean']['parse_rate'])} | "
                     f"{fmt_pct(arm['mean']['run_rate'])} |")
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
        seen = arms[name].get("data", {}).get("tokens_seen") or tokens_seen(arms[name]["seeds"][0])
        lines.append(f"| ours: {name} | {params / 1e6:.2f}M | {ARM_DATA_WORDS.get(name, name)} | {seen / 1e6:.2f}M | "
                     f"{_cell(arms[name], 'humaneval_pass@1')} (greedy) | not measured |")
    return "\n".join(lines)


ARM_DATA_WORDS = {"B+C": "CPython stdlib, filtered + teacher textbooks", "(B+C)->D": "as B+C, then verified exercises"}


def tokens_seen(row: dict[str, Any]) -> int:
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
                 f"training and evaluation, sum to {models_s(results):.0f} s)")
    return text + "."


def teacher_rows(t: dict[str, Any]) -> list[str]:
    if "before" not in t:
        return [f"The teacher experiment was skipped ({t.get('skipped', 'no teacher')})."]
    rows = ["| | HumanEval pass@1 | 95 % Wilson | held-out exercises pass@1 | parses % | runs % |",
            "|---|---|---|---|---|---|"]
    for when in ("before", "after"):
        he, ho = t[when]["humaneval"], t[when]["heldout"]
        lo, hi = wilson(he["passed"], he["n"])
        rows.append(f"| {when} | {he['passed']}/{he['n']} ({fmt_pct(he['pass@1'])} %) | {fmt_pct(lo)}–{fmt_pct(hi)} % | "
                    f"{ho['passed']}/{ho['n']} | {fmt_pct(he['parse_rate'])} | {fmt_pct(he['run_rate'])} |")
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
                     f"first {sampled['problems']} problems): pass@1 {fmt_pct(sampled['pass@1'])} %, pass@10 "
                     f"{fmt_pct(sampled['pass@10'])} %.")
    if t.get("source"):
        rows[-1] += (f" Run separately (`python -m nanophi.textbook.experiment.finetune`); its metrics and every "
                     f"completion with its verdict: `{Path(t['source']).parent}`.")
    return rows


def compute_s(results: dict[str, Any]) -> float:
    """This invocation's wall time, or the models' own seconds when they were measured by an earlier one."""
    return max(results["timings"]["total_s"], models_s(results))


def models_s(results: dict[str, Any]) -> float:
    return sum(r.get("seconds", 0) for a in results["arms"].values() for r in a["seeds"])
