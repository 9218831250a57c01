"""Benchmarks of the textbook stages on datatrove: commands that print numbers (nothing here is asserted).

    python -m nanophi.textbook.scale_bench cpu --docs 20000     # decontaminate, --workers 2 vs 1 (4 tasks)
    python -m nanophi.textbook.scale_bench dedup --docs 1000000 # peak RSS: in-memory datasketch vs datatrove

Every line says the load average (1, 5, 15 min) at the time: on a shared machine a ratio means little without it.
Each dedup path runs in its own process, so `ru_maxrss` is that path's own peak (and its task processes').
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from nanophi.textbook.records import make_record

WORDS = ("list dict set tuple sort key value index loop return yield class def import file path read write open "
         "close string bytes number float int sum min max map filter zip range len print error raise try except "
         "with lambda self cache queue stack tree graph node edge search binary merge heap hash table").split()


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3]) if Path("/proc/loadavg").exists() else "n/a"


def code_docs(path: Path, n: int, seed: int = 0) -> None:
    """`n` small distinct functions (the AST and 13-gram checks of decontaminate cost per document)."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            a, b = rng.sample(WORDS, 2)
            text = (f"def {a}_{b}_{i}(values: list[int]) -> int:\n    total = 0\n    for v in values:\n"
                    f"        if v % {i % 5 + 2} == 0:\n            total += v * {i}\n"
                    f"    return total - {rng.randrange(100)}\n")
            f.write(json.dumps(make_record(text, {"stage": "bench"})) + "\n")


def short_docs(path: Path, n: int, seed: int = 0) -> None:
    """`n` short documents (12-20 words): 5 % exact copies (respaced), 5 % near copies (one word changed)."""
    rng = random.Random(seed)
    recent: list[str] = []
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            r = rng.random()
            if recent and r < 0.05:
                text = "  ".join(rng.choice(recent).split(" "))
            elif recent and r < 0.10:
                words = rng.choice(recent).split()
                words[rng.randrange(len(words))] = rng.choice(WORDS)
                text = " ".join(words)
            else:
                text = " ".join(f"{rng.choice(WORDS)}{rng.randrange(100)}" for _ in range(rng.randint(12, 20)))
                recent = (recent + [text])[-1000:]
            f.write(json.dumps(make_record(text, {"stage": "bench"})) + "\n")


def bench_cpu(args: argparse.Namespace) -> None:
    from nanophi.textbook.decontaminate import decontaminate_sharded

    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        src = Path(tmp) / "in.jsonl"
        code_docs(src, args.docs)
        seconds = {}
        for workers in (1, 2):
            before = load()
            t0 = time.perf_counter()
            decontaminate_sharded(src, Path(tmp) / f"w{workers}", tasks=args.tasks, workers=workers)
            seconds[workers] = time.perf_counter() - t0
            print(f"decontaminate {args.docs} docs, --tasks {args.tasks} --workers {workers}: "
                  f"{seconds[workers]:.1f} s ({args.docs / seconds[workers]:.0f} docs/s); load before {before}, "
                  f"after {load()}; {os.cpu_count()} cores", flush=True)
        print(f"speed-up --workers 2 vs 1: {seconds[1] / seconds[2]:.2f}x (load {load()})")


def _dedup_one(args: argparse.Namespace) -> None:
    """One dedup path in this process; prints its seconds and peak RSS as JSON."""
    t0 = time.perf_counter()
    if args.path == "memory":
        from nanophi.textbook.dedup import dedup

        stats = dedup(args.input, Path(args.out) / "out.jsonl")
    else:
        from nanophi.textbook.dedup_scale import dedup_sharded

        stats = dedup_sharded(args.input, args.out, tasks=args.tasks, workers=args.workers)
    mb = lambda who: resource.getrusage(who).ru_maxrss / 1024  # noqa: E731  (Linux: KiB)
    print(json.dumps({"path": args.path, "seconds": round(time.perf_counter() - t0, 1), "n_in": stats["n_in"],
                      "n_out": stats["n_out"], "exact": stats["removed_exact"], "near": stats["removed_near"],
                      "rss_mb_main": round(mb(resource.RUSAGE_SELF)),
                      "rss_mb_tasks": round(mb(resource.RUSAGE_CHILDREN))}))


def bench_dedup(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        src = Path(tmp) / "in.jsonl"
        t0 = time.perf_counter()
        short_docs(src, args.docs)
        print(f"{args.docs} short documents ({src.stat().st_size / 2**20:.0f} MiB) written in "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
        results: dict[str, Any] = {}
        for path in args.paths.split(","):
            out = Path(tmp) / path
            out.mkdir()
            before = load()
            proc = subprocess.run([sys.executable, "-m", "nanophi.textbook.scale_bench", "_dedup-one", "--path", path,
                                   "--input", str(src), "--out", str(out), "--tasks", str(args.tasks),
                                   "--workers", str(args.workers)], capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"{path}: failed\n{proc.stderr[-3000:]}")
                continue
            r = results[path] = json.loads(proc.stdout.strip().splitlines()[-1])
            where = "1 process" if path == "memory" else f"--tasks {args.tasks} --workers {args.workers}"
            print(f"dedup {path} ({where}): {r['seconds']} s, kept {r['n_out']}/{r['n_in']} ({r['exact']} exact, "
                  f"{r['near']} near); peak RSS main {r['rss_mb_main']} MB, largest task process "
                  f"{r['rss_mb_tasks']} MB; load before {before}, after {load()}", flush=True)
        if len(results) == 2:
            m, d = results["memory"], results["datatrove"]
            print(f"same counts: {(m['n_out'], m['exact'], m['near']) == (d['n_out'], d['exact'], d['near'])}; "
                  f"peak RSS datatrove / memory: {max(d['rss_mb_main'], d['rss_mb_tasks']) / m['rss_mb_main']:.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nanophi.textbook.scale_bench", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    cpu = sub.add_parser("cpu", help="a CPU-bound stage (decontaminate), --workers 2 vs 1")
    cpu.add_argument("--docs", type=int, default=20_000)
    cpu.add_argument("--tasks", type=int, default=4)
    cpu.set_defaults(fn=bench_cpu)
    dd = sub.add_parser("dedup", help="dedup of many short documents: seconds and peak RSS per path")
    dd.add_argument("--docs", type=int, default=1_000_000)
    dd.add_argument("--tasks", type=int, default=4)
    dd.add_argument("--workers", type=int, default=2)
    dd.add_argument("--paths", default="memory,datatrove", help="which paths, comma-separated")
    dd.set_defaults(fn=bench_dedup)
    one = sub.add_parser("_dedup-one")  # the child process of `dedup`
    for flag in ("--path", "--input", "--out"):
        one.add_argument(flag, required=True)
    one.add_argument("--tasks", type=int, default=4)
    one.add_argument("--workers", type=int, default=2)
    one.set_defaults(fn=_dedup_one)
    for p in (cpu, dd):
        p.add_argument("--tmp", default=None, help="scratch folder (default: the system's)")
    args = parser.parse_args(argv)
    args.fn(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
