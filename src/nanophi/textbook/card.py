"""Stage 6: a dataset card for the finished data, and packing it into token files for `nanophi train`.

The card says what a reader needs before training on the data: how much there is (documents, characters,
tokens), what each stage kept (from the `*.stats.json` each stage writes beside its output), where the text
came from (sources, teachers, template versions, seeds, from every record's provenance), its licences, and what
it was decontaminated against.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import statistics
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nanophi.errors import UserError
from nanophi.textbook.records import read_jsonl, read_stats, stats_path, write_stats

log = logging.getLogger(__name__)

CHARS_PER_TOKEN = 4  # the usual English/code rule of thumb when no tokenizer is given
STAGE_ORDER = ("pool", "annotate", "filter", "generate", "verify", "dedup", "decontaminate", "pack")
PROVENANCE_KEYS = ("stage", "source", "teacher", "template_version", "seed", "split")
LICENCE_KEYS = ("licence", "license")
TOP = 10  # values listed per provenance key


def _stage_rank(stats: dict[str, Any]) -> int:
    stage = stats.get("stage")
    return STAGE_ORDER.index(stage) if stage in STAGE_ORDER else len(STAGE_ORDER)


def _count_tokens(tokenizer: Any, text: str) -> int:
    ids = tokenizer.encode(text)
    return len(getattr(ids, "ids", ids))  # nanophi tokenizers return lists; HF `tokenizers` an Encoding


def summarise(data_path: str | os.PathLike, tokenizer: Any = None) -> dict[str, Any]:
    """Counts, lengths and provenance tallies over a records file (one streaming pass)."""
    n = chars = tokens = 0
    lengths: list[int] = []
    tallies: dict[str, Counter] = {k: Counter() for k in (*PROVENANCE_KEYS, "licence")}
    for rec in read_jsonl(data_path):
        text = rec.get("text") or ""
        n += 1
        chars += len(text)
        lengths.append(len(text))
        if tokenizer is not None:
            tokens += _count_tokens(tokenizer, text)
        prov = rec.get("provenance") or {}
        for k in PROVENANCE_KEYS:
            if prov.get(k) is not None:
                tallies[k][str(prov[k])] += 1
        licence = next((prov[k] for k in LICENCE_KEYS if prov.get(k)), None)
        tallies["licence"][str(licence) if licence else "unstated"] += 1
    return {
        "documents": n,
        "characters": chars,
        "tokens": tokens if tokenizer is not None else chars // CHARS_PER_TOKEN,
        "tokens_exact": tokenizer is not None,
        "median_chars": int(statistics.median(lengths)) if lengths else 0,
        "max_chars": max(lengths, default=0),
        "provenance": {k: dict(c.most_common(TOP)) for k, c in tallies.items() if c},
    }


def _stage_row(path: Path, s: dict[str, Any]) -> str:
    extras = []
    m = s.get("metrics")
    if isinstance(m, dict):
        extras.append(f"held-out P/R/F1 {m.get('precision', 0):.2f}/{m.get('recall', 0):.2f}/{m.get('f1', 0):.2f}")
    for key in ("embedder", "threshold", "removed_exact", "removed_near", "removed_ngram", "removed_ast", "tau",
                "labeler", "positive_rate", "skipped_non_utf8", "skipped_unparsable"):
        if s.get(key) is not None and not (key == "threshold" and s.get("stage") == "dedup"):
            v = s[key]
            extras.append(f"{key} {v:.3g}" if isinstance(v, float) else f"{key} {v}")
    y = s.get("yield")
    n_in, n_out = s.get("n_in", ""), s.get("n_out", "")
    return (f"| {s.get('stage', '?')} | `{path.name}` | {n_in} | {n_out} | "
            f"{'' if y is None else f'{100 * y:.1f} %'} | {'; '.join(extras)} |")


def write_card(
    data_path: str | os.PathLike,
    out_md: str | os.PathLike,
    *,
    stats_paths: Sequence[str | os.PathLike] | None = None,
    tokenizer: Any = None,
    title: str | None = None,
) -> dict[str, Any]:
    """Write a markdown dataset card for `data_path`; returns the summary it was written from.

    `stats_paths`: the stages' stats files (default: every `*.stats.json` beside the data, in pipeline order).
    `tokenizer`: anything with `encode(text)` for exact token counts; else characters / 4.
    """
    data_path = Path(data_path)
    summary = summarise(data_path, tokenizer)
    paths = [Path(p) for p in stats_paths] if stats_paths is not None else sorted(data_path.parent.glob("*.stats.json"))
    stages = sorted(((p, read_stats(p)) for p in paths), key=lambda ps: (_stage_rank(ps[1]), ps[0].name))
    prov = summary["provenance"]
    lines = [
        f"# {title or data_path.stem}",
        "",
        f"Dataset card written by nanophi on {datetime.date.today().isoformat()} for `{data_path.name}`.",
        "",
        "## Size",
        "",
        f"- documents: {summary['documents']:,}",
        f"- characters: {summary['characters']:,} (median {summary['median_chars']:,} per document, "
        f"max {summary['max_chars']:,})",
        f"- tokens: {summary['tokens']:,}" + ("" if summary["tokens_exact"] else " (estimated as characters / 4)"),
        "",
        "## Pipeline yields",
        "",
    ]
    if stages:
        lines += ["| stage | stats | in | out | yield | notes |", "|---|---|---|---|---|---|"]
        lines += [_stage_row(p, s) for p, s in stages]
    else:
        lines.append("No stage statistics were found beside the data.")
    lines += ["", "## Provenance", ""]
    for key in PROVENANCE_KEYS:
        if key in prov:
            lines.append(f"- {key}: " + ", ".join(f"`{v}` ({c:,})" for v, c in prov[key].items()))
    lines += ["", "## Licences", ""]
    lines += [f"- {lic}: {c:,} documents" for lic, c in prov.get("licence", {}).items()]
    lines += ["", "Documents written by a teacher model inherit the terms of that model and of its prompts' "
              "sources; check them before redistributing.", ""]
    decon = [s for _, s in stages if s.get("stage") == "decontaminate"]
    lines += ["## Decontamination", ""]
    if decon:
        d = decon[-1]
        lines.append(f"Checked against {d.get('benchmark', 'HumanEval')}: {d.get('ngram')}-gram overlap and "
                     f"renaming-robust AST similarity at τ = {d.get('tau')}; removed {d.get('removed_ngram', 0)} "
                     f"by n-gram and {d.get('removed_ast', 0)} by AST.")
        if "tau_sweep" in d:
            sweep = sorted(d["tau_sweep"].items(), key=lambda tn: -float(tn[0]))  # stats.json sorts keys as text
            lines.append("τ sweep (removals): " + ", ".join(f"{t}: {n}" for t, n in sweep))
    else:
        lines.append("**Not decontaminated**: run `nanophi textbook decontaminate` before evaluating on HumanEval.")
    out_md = Path(out_md)
    out_md.parent.mkdir(parents=True, exist_ok=True)
    out_md.write_text("\n".join(lines) + "\n", encoding="utf-8")
    log.info("card: %s (%d documents, %d tokens)", out_md, summary["documents"], summary["tokens"])
    return summary


def pack(
    data_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    tokenizer: str = "bpe",
    vocab_size: int = 8192,
    val_fraction: float = 0.1,
) -> dict[str, Any]:
    """Tokenize the records' `text` into train/val memmaps (via `nanophi.prepare`) for `nanophi train`."""
    from nanophi.prepare import prepare

    data_path = Path(data_path)
    if data_path.suffix != ".jsonl":
        raise UserError(f"{data_path}: pack reads a .jsonl of records; give the pipeline's final .jsonl")
    if not data_path.is_file():
        raise UserError(f"{data_path}: no such file; run the pipeline stages first")
    prepared = prepare(str(data_path), tokenizer=tokenizer, vocab_size=vocab_size, val_fraction=val_fraction,
                       out_dir=Path(out_dir))
    stats = {"stage": "pack", "input": str(data_path), "dir": str(prepared.dir), "tokenizer": tokenizer,
             "vocab_size": prepared.vocab_size, "train_tokens": int(len(prepared.train)),
             "val_tokens": int(len(prepared.val))}
    write_stats(stats_path(data_path.with_name(f"{data_path.stem}.pack.jsonl")), stats)
    return stats


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", help="the final records JSONL")
    parser.add_argument("--out", required=True, help="markdown file to write")
    parser.add_argument("--stats", nargs="*", default=None,
                        help="stats.json files of the stages (default: every *.stats.json beside the data)")
    parser.add_argument("--title", default=None, help="card title (default: the data file's name)")


def run(args: argparse.Namespace) -> int:
    summary = write_card(args.data, args.out, stats_paths=args.stats, title=args.title)
    print(f"card: {args.out} ({summary['documents']} documents, ~{summary['tokens']} tokens)")
    return 0
