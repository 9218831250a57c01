"""The textbook-quality data pipeline of phi-1 ("Textbooks Are All You Need"), one module per stage.

Offline stages, each a function from a JSONL of records to a JSONL of records that writes `<out>.stats.json`
beside its output and can be rerun:

    pool.py           raw code pool (the CPython standard library stands in for The Stack)
    annotate.py       educational-value labels on a sample (a transparent rubric, or an LLM judge)
    filter.py         random forest on embeddings, trained on those labels, applied to the whole pool
    dedup.py          exact + MinHash-LSH near-duplicate removal
    decontaminate.py  13-gram overlap and renaming-robust AST similarity against HumanEval
    card.py           dataset card, and packing into token memmaps for `nanophi train`

Stages that need a teacher model, which append per batch and resume:

    teacher.py        the teacher client: a local model on nanophi's Engine, or any OpenAI-compatible endpoint
    generate.py       synthetic textbooks and exercises, diversity from a topic tree and constrained names
    verify.py         run exercises against their tests in the sandbox; parse-check textbook code

`records.py` holds the shared record I/O, `templates/` the versioned prompts, `pipeline.py` the
`run --preset` driver over all stages, and `cli.py` the `nanophi textbook <stage>` subcommands.
"""
