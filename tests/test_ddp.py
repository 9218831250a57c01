"""Data parallelism on CPU (gloo): 2 processes under torchrun train exactly like 1 process with the same global
batch, resume exactly, and FSDP2 matches too. Each test launches the real CLI (`python -m nanophi`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nanophi import distributed
from nanophi.cli import main
from nanophi.config import TrainConfig
from nanophi.dataloader import BatchLoader
from nanophi.errors import UserError

TOL = 1e-5
LAUNCH_TIMEOUT_S = 240


@pytest.fixture()
def corpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("NANOPHI_CACHE", str(tmp_path / "cache"))
    words = "the cat sat on a mat and then the dog ran far away from it all".split()
    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(len(words), (6000,), generator=gen).tolist()
    path = tmp_path / "corpus.txt"
    path.write_text(" ".join(words[i] for i in idx))
    return path


def common_args(corpus: Path, out: Path, **overrides: object) -> list[str]:
    args = {"data": corpus, "n-layer": 2, "n-head": 2, "n-embd": 32, "block-size": 32, "grad-accum": 2,
            "max-iters": 4, "decay-iters": 4, "warmup-iters": 1, "eval-interval": 2, "eval-iters": 2,
            "log-interval": 1, "dashboard": "off", "dtype": "float32", "out": out} | overrides  # fp32: 1e-5 parity
    return [x for k, v in args.items() for x in (f"--{k}", str(v))]


def torchrun(args: list[str], nproc: int = 2) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "nanophi", "train", *args]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=LAUNCH_TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def losses(run: Path) -> list[float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r.get("kind") == "train"]


def assert_same_run(a: Path, b: Path) -> None:
    la, lb = losses(a), losses(b)
    assert len(la) == len(lb) > 0
    assert max(abs(x - y) for x, y in zip(la, lb)) < TOL, (la, lb)
    wa, wb = load_file(str(a / "last" / "model.safetensors")), load_file(str(b / "last" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=TOL, rtol=0), k


def test_two_process_ddp_matches_one_process_with_the_same_global_batch(corpus: Path, tmp_path: Path) -> None:
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    assert main(["train", *common_args(corpus, single, **{"batch-size": 4})]) == 0
    torchrun(common_args(corpus, ddp, **{"batch-size": 2}))
    assert_same_run(single, ddp)
    saved = torch.load(ddp / "last" / "trainer.pt", weights_only=True)
    assert saved["world_size"] == 2 and len(saved["rank_torch_rng"]) == 2


@pytest.mark.slow
def test_ddp_resume_is_exact_with_dropout(corpus: Path, tmp_path: Path) -> None:
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    args = {"batch-size": 2, "dropout": 0.1}  # dropout: each rank's own RNG stream must be restored
    torchrun(common_args(corpus, whole, **args))
    torchrun(common_args(corpus, resumed, **args, **{"max-iters": 2}))
    torchrun(common_args(corpus, resumed, **args) + ["--resume"])
    assert_same_run(whole, resumed)


@pytest.mark.slow
def test_fsdp_matches_one_process(corpus: Path, tmp_path: Path) -> None:
    single, fsdp = tmp_path / "single", tmp_path / "fsdp"
    assert main(["train", *common_args(corpus, single, **{"batch-size": 4})]) == 0
    torchrun(common_args(corpus, fsdp, **{"batch-size": 2, "parallel": "fsdp"}))
    assert_same_run(single, fsdp)


def test_ranks_slice_the_global_batch() -> None:
    tokens = torch.arange(1000).numpy()
    whole = BatchLoader(tokens, 8, 6, seed=3, device=torch.device("cpu"))
    parts = [BatchLoader(tokens, 8, 2, seed=3, device=torch.device("cpu"), rank=r, world_size=3) for r in range(3)]
    for _ in range(3):
        x, y = whole.next()
        xs, ys = zip(*(p.next() for p in parts))
        assert torch.equal(x, torch.cat(xs)) and torch.equal(y, torch.cat(ys))


def test_single_process_helpers_are_no_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    env = distributed.init("cpu")
    assert (env.rank, env.world_size, env.enabled) == (0, 1, False)
    assert distributed.all_reduce_mean(1.5, torch.device("cpu")) == 1.5
    assert distributed.broadcast_object({"a": 1}) == {"a": 1}
    assert distributed.gather_object(7) == [7]
    model = torch.nn.Linear(2, 2)
    with distributed.no_sync(model, skip=True):
        pass
    assert not distributed.is_sharded(model)


def test_fsdp_with_muon_is_refused_clearly() -> None:
    with pytest.raises(UserError, match="muon"):
        distributed.check_config(TrainConfig(parallel="fsdp", optimizer="muon"))
