"""The case study's report: per-arm means with 95 % intervals over seeds, the paper's directions
tested as paired differences, tables beside phi-1's numbers, plots, and the limitations (report.md + report.html).

The statistics (Student-t intervals over seeds, held / reversed / inconclusive directions, per-problem sign
tests) are `stats`'s, the tables `tables`', the plots `figures`'; this module assembles them.

Every number of report.md and of docs/case_study.md's results section comes from results.json through this
module (`python -m nanophi.textbook.experiment.report RESULTS --doc docs/case_study.md` rewrites both); the
tests check that the committed copies are what it writes.
"""

from __future__ import annotations

import base64
import html
import math
import re
from pathlib import Path
from typing import Any

from nanophi.textbook.experiment.figures import make_figures
from nanophi.textbook.experiment.stats import HUMANEVAL_STEP, PAPER_TAU, SIGN_TEST_ALPHA, directions, t_quantile, \
    wilson
from nanophi.textbook.experiment.tables import ablation_table, arm_data_table, compute_s, directions_table, fmt_num, \
    fmt_pct, paper_table, summary_table, teacher_rows, wall_time

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
        + (f"the rest are the mined exercise set (`experiment.exercises.exercise_set`: doctest exercises from the "
           f"stdlib and site-packages, each verified in the sandbox, decontaminated and deduplicated, "
           f"{data['exercise_set']['train']} + {data['exercise_set']['heldout']} split by a hash of the id; "
           f"training exercises within τ of a held-out one are dropped). " if data.get("exercise_set") else
           f"from the stdlib's doctests: {data.get('exercises', {}).get('extra', 0)} verified (see "
           f"`experiment/exercises.py`). ")
        + f"Arm B is the top "
        f"{fmt_pct(data.get('filter_keep'))} % of the pool by the filter's score (P ≥ {fmt_num(data.get('filter_p_cut'))}; "
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
          "about 15 % → 27.0 %).", ""] + teacher_rows(t) + [""]
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


DOC_BEGIN = "<!-- begin: generated from docs/case_study/results.json by nanophi.textbook.experiment.report -->"
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
    L += ["Jina's experiment:", ""] + teacher_rows(results["teacher_finetune"]) + ["", DOC_END]
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
        f"- **Compute.** CPU only ({compute_s(results) / 60:.0f} minutes in all for this run); the `full` "
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

    parser = argparse.ArgumentParser(prog="python -m nanophi.textbook.experiment.report", description=main.__doc__)
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
