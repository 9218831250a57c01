"""The training loop: `Trainer` (one step, evaluation, checkpoint state) and `train(cfg)` around it.

    cfg = config.resolve({"data": "book.txt", "max_iters": 500})
    summary = train(cfg)

Everything is deterministic given the seed on CPU: the batch sampler, dropout and init draw from seeded
generators whose states go into every checkpoint, so `--resume` continues bit for bit.

`--out` must be new, empty, or a nanophi run (it holds `nanophi-run.json`, or is a run from before that marker
with a `last` checkpoint): an existing directory of anything else is refused before any work starts, so training
never overwrites a `config.json` or prunes a `ckpt-*` folder that is not its own (see nanophi.checkpoint).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import resource
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from nanophi import checkpoint, distributed
from nanophi.callbacks import Callback, ConsoleLog, MetricsFile
from nanophi.config import DataConfig, RunConfig, TrainConfig, add_dataclass_arguments, load_toml, resolve
from nanophi.dataloader import BatchLoader, eval_batches
from nanophi.device import autocast, pick_device, pick_dtype
from nanophi.errors import UserError
from nanophi.model import GPT, GPTConfig
from nanophi.optim import build_optimizer, lr_multiplier, schedule_warnings

log = logging.getLogger("nanophi.train")

# A loss at step 0 further than this from ln(vocab) (in nats) means the init is not giving uniform logits.
INIT_LOSS_TOLERANCE = 0.5
# Model fields that may change on --resume without making the checkpoint incompatible.
RESUMABLE_MODEL_FIELDS = {"dropout"}


class TrainingDiverged(UserError):
    """The loss or a gradient went non-finite; the message names where and the last good checkpoint."""


def build_callbacks(trainer: Trainer) -> list[Callback]:
    """The callbacks a run's config asks for, in the order nanophi.callbacks' contract needs (diagnostics before
    the sinks that write their keys). Here, not in callbacks.py: the debug tools subclass Callback, so callbacks.py
    importing them would make a cycle."""
    tc = trainer.cfg.train
    run_dir = trainer.run_dir
    cbs: list[Callback] = []
    if tc.debug_interval > 0:
        from nanophi.debug.diagnostics import HealthMonitor

        cbs.append(HealthMonitor(tc.debug_interval))
    cbs.append(MetricsFile(run_dir / "metrics.jsonl"))
    if tc.tensorboard:
        from nanophi.debug.sinks import TensorBoardSink

        cbs.append(TensorBoardSink(run_dir / "tensorboard"))
    if tc.wandb:
        from nanophi.debug.sinks import WandbSink

        cbs.append(WandbSink(run_dir, trainer.cfg.to_dict()))
    want_dashboard = tc.dashboard == "on" or (tc.dashboard == "auto" and sys.stdout.isatty())
    if want_dashboard:
        from nanophi.debug.dashboard import Dashboard

        cbs.append(Dashboard())
    else:
        cbs.append(ConsoleLog())
    return cbs


class Trainer:
    def __init__(
        self,
        cfg: RunConfig,
        data: Any,  # nanophi.prepare.PreparedData
        callbacks: Sequence[Callback] | None = None,
        model: GPT | None = None,
        rank: int = 0,
    ) -> None:
        self.cfg, self.data, self.rank = cfg, data, rank
        tc = cfg.train
        self.run_dir = Path(tc.out)
        self.device = pick_device(tc.device)
        self.dtype = pick_dtype(tc.dtype, self.device)
        torch.manual_seed(tc.seed)
        if model is None:
            cfg.model.vocab_size = data.vocab_size
            model = GPT(cfg.model)
        elif model.config.vocab_size < data.vocab_size:
            raise UserError(f"the data has {data.vocab_size} token ids but the model only {model.config.vocab_size}")
        self.model = model.to(self.device)
        self.raw_model = self.model  # the module whose weights we save, whatever wraps it for speed
        if tc.compile:
            self.model = torch.compile(self.model)
        self.world_size = distributed.world_size()  # > 1 under torchrun (see nanophi.distributed)
        if self.world_size > 1:
            self.rank = distributed.rank()
            distributed.check_config(tc)
            torch.manual_seed(tc.seed + self.rank)  # same initial weights on every rank, own dropout masks
            self.model = distributed.wrap(self.model, tc.parallel, self.device)
        self.optimizer = build_optimizer(self.raw_model, tc, self.device.type)
        self.loader = BatchLoader(data.train, cfg.model.block_size, tc.batch_size, tc.seed, self.device,
                                  self.rank, self.world_size)
        self.step = 0
        self.best_val = math.inf
        self.evals_since_best = 0
        self.tokens_seen = 0
        self.train_time_s = 0.0  # seconds in fit() so far, earlier sessions of a resumed run included
        self.last_good: Path | None = None
        self.callbacks: list[Callback] = list(callbacks) if callbacks is not None else build_callbacks(self)
        if self.rank != 0:
            self.callbacks = []  # rank 0 alone logs, writes metrics and reports
        if tc.checks == "on":
            self._check_data()
            from nanophi.debug.guards import install_checks

            self.check_hooks = install_checks(self.raw_model)  # shape/dtype/id-range asserts; none when off

    # --- one step -------------------------------------------------------------------------------------------
    def train_step(self, time_frac: float | None = None) -> dict[str, Any]:
        """One optimizer step over `grad_accum` micro-batches; returns the step's record. `time_frac`: the share
        of --max-time spent when this step ends (the lr schedule follows it, see nanophi.optim.lr_multiplier)."""
        tc = self.cfg.train
        mult = lr_multiplier(self.step, tc, time_frac)
        for g in self.optimizer.param_groups:
            g["lr"] = g["base_lr"] * mult
        for cb in self.callbacks:
            cb.on_step_begin(self, self.step)
        self.model.train()
        loss_sum = 0.0
        for micro in range(tc.grad_accum):
            x, y = self.loader.next()
            # data-parallel: average gradients across ranks once per step, after the last micro-batch
            with distributed.no_sync(self.model, micro < tc.grad_accum - 1):
                with autocast(self.device, self.dtype):
                    _, loss = self.model(x, y)
                if tc.checks == "on" and not torch.isfinite(loss):
                    self._diverged(x, y, "loss")
                (loss / tc.grad_accum).backward()
            loss_sum += loss.item()
        for cb in self.callbacks:
            cb.on_after_backward(self, self.step)
        if tc.grad_clip > 0:
            total_norm = torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), tc.grad_clip)
            grad_norm = distributed.to_float(total_norm)  # (a DTensor under FSDP)
        else:
            grad_norm = _grad_norm(self.raw_model)
        if tc.checks == "on" and not math.isfinite(grad_norm):
            self._diverged(x, y, "gradient")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.tokens_seen += tc.batch_size * tc.grad_accum * self.cfg.model.block_size * self.world_size
        record = {"kind": "train", "step": self.step,
                  "loss": distributed.all_reduce_mean(loss_sum / tc.grad_accum, self.device),  # global batch's
                  "lr": tc.lr * mult, "grad_norm": grad_norm}
        self.step += 1
        return record

    # --- evaluation ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, split: str = "val") -> dict[str, float]:
        tokens = self.data.val if split == "val" else self.data.train
        n_bytes = self.data.val_bytes if split == "val" else self.data.meta.get("train_bytes")
        args = (tokens, n_bytes, self.cfg.model.block_size, self.cfg.train.eval_batch_size, self.device, self.dtype,
                self.cfg.train.eval_iters)
        if self.world_size == 1:
            return evaluate_tokens(self.model, *args)
        if distributed.is_sharded(self.raw_model):  # FSDP: every rank runs the forward (it all-gathers)
            metrics = evaluate_tokens(self.model, *args)
            distributed.reshard(self.raw_model)  # a forward without backward leaves the root unsharded
            return metrics
        # DDP: rank 0 evaluates the unwrapped module alone and shares the result, so all ranks stop alike
        metrics = evaluate_tokens(distributed.unwrap(self.model), *args) if self.rank == 0 else None
        return distributed.broadcast_object(metrics)

    # --- state -----------------------------------------------------------------------------------------------
    def trainer_state(self) -> dict[str, Any]:
        """Optimizer and RNG states: tensors and plain containers only, loadable with weights_only=True.
        Under torchrun every rank must call it (it gathers per-rank RNG states); rank 0's copy is complete.
        The loader's state is the same on every rank (they share one sampler), so rank 0's stands for all."""
        sharded = distributed.is_sharded(self.raw_model)
        optimizer = (distributed.full_optimizer_state(self.raw_model, self.optimizer) if sharded
                     else self.optimizer.state_dict())
        state = {"optimizer": optimizer, "loader": self.loader.state_dict(), "torch_rng": torch.get_rng_state()}
        if self.world_size > 1:
            state["world_size"] = self.world_size
            state["rank_torch_rng"] = distributed.gather_object(torch.get_rng_state())
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        return state

    def load_trainer_state(self, state: dict[str, Any]) -> None:
        saved_world = state.get("world_size", 1)
        if saved_world != self.world_size:
            raise UserError(f"--resume: the checkpoint was written by {saved_world} process(es) and this run has "
                            f"{self.world_size}; resume with the same torchrun --nproc_per_node/--nnodes")
        if distributed.is_sharded(self.raw_model):
            distributed.load_full_optimizer_state(self.raw_model, self.optimizer, state["optimizer"])
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        for g in self.optimizer.param_groups:  # base_lr is not a tensor: restore it from the config
            g.setdefault("base_lr", self.cfg.train.lr)
        self.loader.load_state_dict(state["loader"])
        torch.set_rng_state(state["rank_torch_rng"][self.rank] if "rank_torch_rng" in state else state["torch_rng"])
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])

    def save(self, links: tuple[str, ...] = ("last",)) -> Path | None:
        """Checkpoint the run. Under torchrun every rank calls this (gathering states is collective); rank 0
        writes and the others return None."""
        trainer = self.trainer_state()
        sharded = distributed.is_sharded(self.raw_model)
        model = distributed.FullStateDict(self.raw_model) if sharded else self.raw_model
        if self.rank != 0:
            return None
        state = {"best_val": self.best_val if math.isfinite(self.best_val) else None,
                 "evals_since_best": self.evals_since_best, "tokens_seen": self.tokens_seen,
                 "train_time_s": self.train_time_s,
                 "data_sha256": self.data.meta.get("sha256"), "data_dir": str(self.data.dir)}
        path = checkpoint.save(self.run_dir, self.step, model, self.cfg.to_dict(), state,
                               trainer, self.data.dir / "tokenizer", links)
        self.last_good = path
        return path

    def resume(self) -> None:
        ckpt = checkpoint.load(self.run_dir / "last")
        if distributed.is_sharded(self.raw_model):
            distributed.load_full_model_state(self.raw_model, ckpt.weights)
        else:
            checkpoint.load_weights_into(self.raw_model, ckpt.weights, ckpt.path)
        self.load_trainer_state(ckpt.trainer)
        self.step = ckpt.state["step"]
        self.best_val = ckpt.state.get("best_val") or math.inf
        self.evals_since_best = ckpt.state.get("evals_since_best", 0)
        self.tokens_seen = ckpt.state.get("tokens_seen", 0)
        self.train_time_s = ckpt.state.get("train_time_s", 0.0)
        self.last_good = ckpt.path
        log.info(f"resumed from {ckpt.path} at step {self.step}")

    # --- the loop --------------------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        tc = self.cfg.train
        for warning in schedule_warnings(tc):
            log.warning(f"warning: {warning}")
        for cb in self.callbacks:
            cb.on_train_start(self)
        self.mfu(1.0)  # measure the device's peak now (a ~0.5 s probe on CPUs), not on the training clock
        log.info(f"mfu: against a peak of {self._peak / 1e12:.3g} TFLOP/s per device ({self._peak_source})")
        t_start = time.perf_counter() - self.train_time_s  # a resumed run continues its time budget
        t_window, window_steps = time.perf_counter(), 0
        stop_reason = "max_iters"
        step_s = 0.0  # the last step's duration: how far one more step moves the clock
        while self.step < tc.max_iters:
            first = self.step == 0
            time_frac = self._time_frac(time.perf_counter() - t_start, step_s)
            t_step = time.perf_counter()
            record = self.train_step(time_frac)
            step_s = time.perf_counter() - t_step
            window_steps += 1
            if first and tc.checks == "on":
                self._check_init_loss(record["loss"])
            for cb in self.callbacks:
                cb.on_step_end(self, record)
            debug_step = tc.debug_interval > 0 and record["step"] % tc.debug_interval == 0
            if record["step"] % tc.log_interval == 0 or debug_step or self.step == tc.max_iters:
                elapsed = time.perf_counter() - t_window
                ms = 1000 * elapsed / window_steps
                tokens_per_iter = tc.batch_size * tc.grad_accum * self.cfg.model.block_size * self.world_size
                record |= {"ms_per_iter": ms, "tokens_per_s": tokens_per_iter * window_steps / elapsed,
                           "max_rss_mb": _max_rss_mb(), "elapsed_s": time.perf_counter() - t_start}
                record["mfu"] = self.mfu(record["tokens_per_s"])
                if self.device.type == "cuda":
                    record["cuda_max_alloc_mb"] = torch.cuda.max_memory_allocated() / 2**20
                for cb in self.callbacks:
                    cb.on_log(self, record)
                t_window, window_steps = time.perf_counter(), 0
            done = self.step == tc.max_iters
            out_of_time = time_frac is not None and time_frac >= 1.0  # that was the budget's last step
            self.train_time_s = time.perf_counter() - t_start
            if self.step % tc.eval_interval == 0 or done or out_of_time:
                if self._eval_and_checkpoint():
                    stop_reason = "early_stop"
                    break
                t_window, window_steps = time.perf_counter(), 0  # eval time is not training throughput
            if tc.sample_interval and self.step % tc.sample_interval == 0 and self.world_size == 1:
                text = self.sample_text()
                for cb in self.callbacks:
                    cb.on_sample(self, self.step, text)
                t_window, window_steps = time.perf_counter(), 0  # nor is sampling
            if out_of_time:
                stop_reason = "max_time"
                break
        summary = {"step": self.step, "best_val_loss": self.best_val, "stop_reason": stop_reason,
                   "train_time_s": time.perf_counter() - t_start,  # resumed runs: all sessions together
                   "tokens_seen": self.tokens_seen,
                   "run_dir": str(self.run_dir)}
        for cb in self.callbacks:
            cb.on_train_end(self, summary)
        return summary

    def _time_frac(self, elapsed: float, step_s: float) -> float | None:
        """Under --max-time, the share of the budget spent when the next step ends (that step's duration taken
        as the last one's); >= 1 makes it the last step, run at the schedule's floor. Rank 0's clock decides for
        all ranks, so every rank uses the same lr and stops at the same step. None without --max-time."""
        max_time = self.cfg.train.max_time
        if max_time is None:
            return None
        frac = min(1.0, (elapsed + step_s) / max_time)
        if self.world_size > 1:
            frac = distributed.broadcast_object(frac)
        return frac

    def _eval_and_checkpoint(self) -> bool:
        """Evaluate, checkpoint `last` (and `best` if improved). Returns True when early stopping fires."""
        metrics = self.evaluate()
        is_best = metrics["val_loss"] < self.best_val
        if is_best:
            self.best_val, self.evals_since_best = metrics["val_loss"], 0
        else:
            self.evals_since_best += 1
        record = {"kind": "eval", "step": self.step, **metrics, "is_best": is_best}
        for cb in self.callbacks:
            cb.on_eval(self, record)
        self.save(("last", "best") if is_best else ("last",))  # every rank: see save()
        patience = self.cfg.train.early_stop
        if patience is not None and self.evals_since_best >= patience:
            log.info(f"early stop: no better val loss in {patience} evals (best {self.best_val:.4f})")
            return True
        return False

    def mfu(self, tokens_per_s: float) -> float:
        """Model FLOPs utilisation against one device's peak (see nanophi.mfu; table for known GPUs, else a
        measured matmul probe at the run's dtype); `tokens_per_s` is the whole job's, over all ranks."""
        if not hasattr(self, "_peak"):
            from nanophi.mfu import peak_flops

            self._peak, self._peak_source = peak_flops(self.device, self.dtype)
        return self.raw_model.flops_per_token() * tokens_per_s / (self._peak * self.world_size)  # per device

    def sample_text(self, max_new_tokens: int = 120) -> str:
        """A short sample for the log, drawn with its own generator so training's RNG streams are untouched."""
        from nanophi.engine import Engine

        engine = Engine(self.raw_model, self.data.tokenizer, device=self.device)
        prompt = self.data.tokenizer.decode(self.data.val[:8].tolist())
        return prompt + engine.generate([prompt], max_new_tokens=max_new_tokens, temperature=0.8, top_k=50,
                                        seed=self.step)[0]

    # --- checks ----------------------------------------------------------------------------------------------
    def _check_data(self) -> None:
        vocab = self.raw_model.config.vocab_size
        for name, arr in (("train", self.data.train), ("val", self.data.val)):
            if len(arr) == 0:
                raise UserError(f"the {name} split is empty; use a bigger corpus")
            top = int(arr.max())
            if top >= vocab:
                raise UserError(f"the {name} split holds token id {top} but the model's vocabulary has {vocab} "
                                "entries; prepare the data with the model's tokenizer")

    def _check_init_loss(self, loss: float) -> None:
        expected = math.log(self.raw_model.config.vocab_size)
        if self.cfg.train.init_from is None and abs(loss - expected) > INIT_LOSS_TOLERANCE:
            log.warning(f"warning: loss at step 0 is {loss:.3f}, expected about ln(vocab) = {expected:.3f} "
                        "for a fresh model: the initialisation is not giving near-uniform predictions")

    def _diverged(self, x: torch.Tensor, y: torch.Tensor, what: str) -> None:
        from nanophi.debug.guards import locate_nonfinite

        where = locate_nonfinite(self.raw_model, x, y, self.device, self.dtype)
        last = f"last good checkpoint: {self.last_good}" if self.last_good else "no checkpoint was saved yet"
        raise TrainingDiverged(f"the {what} became non-finite at step {self.step}; {where}; {last}; "
                               "lower --lr or raise --warmup-iters and --resume")


@torch.no_grad()
def evaluate_tokens(
    model: torch.nn.Module,
    tokens: Any,
    n_bytes: int | None,
    block_size: int,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    max_batches: int | None = None,
) -> dict[str, float]:
    """Mean loss (nats/token) over a whole split, and bits per byte when the split's byte count is known."""
    was_training = model.training
    model.eval()
    total_nats, total_targets = 0.0, 0
    for x, y in eval_batches(tokens, block_size, batch_size, device, max_batches):
        with autocast(device, dtype):
            _, loss = model(x, y)
        n = int((y != -1).sum())
        total_nats += loss.item() * n
        total_targets += n
    model.train(was_training)
    mean = total_nats / total_targets
    out = {"val_loss": mean, "val_tokens": total_targets}
    if n_bytes:
        # bytes per scored token is taken from the whole split: exact for the full split up to its first token
        out["val_bpb"] = total_nats / math.log(2) / (n_bytes * total_targets / max(1, len(tokens) - 1))
    else:
        out["val_bpb"] = float("nan")
    return out


def _grad_norm(model: torch.nn.Module) -> float:
    grads = [p.grad.detach().norm() for p in model.parameters() if p.grad is not None]
    return torch.stack(grads).norm().item() if grads else 0.0


def _max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def prepare_data(cfg: RunConfig, tokenizer: Any = None) -> Any:
    """The run's tokens. `--data` may also name an already prepared directory (`nanophi prepare --out`, or
    `nanophi textbook pack`): its own tokenizer is used as is, so `--tokenizer`/`--vocab-size` do not apply."""
    from nanophi.prepare import META_FILE, open_prepared, prepare

    dc = cfg.data
    if dc.data and (Path(dc.data) / META_FILE).is_file() and (Path(dc.data) / "train.bin").is_file():
        data = open_prepared(Path(dc.data))
        if tokenizer is not None and _tokenizer_probe(tokenizer) != _tokenizer_probe(data.tokenizer):
            raise UserError(f"{dc.data} was tokenized with a different tokenizer than the model's; pass the raw "
                            "text as --data so it is tokenized with the model's own tokenizer")
        log.info(f"data: prepared tokens in {dc.data} ({data.meta.get('tokenizer')} tokenizer, "
                 f"vocab {data.meta.get('vocab_size')})")
        return data
    return prepare(dc.data, tokenizer=dc.tokenizer, vocab_size=dc.vocab_size, val_fraction=dc.val_fraction,
                   glob=dc.glob, tokenizer_obj=tokenizer)


def _tokenizer_probe(tokenizer: Any) -> tuple[int, list[int]]:
    """Two tokenizers that agree on the vocabulary size and on a mixed probe text are taken to be the same."""
    try:
        ids = list(tokenizer.encode("def f(x):\n    return x  # The end.\n"))
    except UserError:  # a char tokenizer refuses unseen characters: the refusal itself is the fingerprint
        ids = []
    return tokenizer.vocab_size, ids


def check_out(out: Path, resume: bool) -> None:
    """Refuse an --out nanophi may not write into: a file, or an existing directory that is not a nanophi run
    (training there would overwrite its config.json and mix checkpoints into the user's files)."""
    kind = checkpoint.run_kind(out)
    last = out / "last"
    if kind == "not-dir":
        raise UserError(f"--out {out} is a file, not a directory; choose a directory (it is created if missing)")
    if resume:
        if kind not in ("run", "legacy") or not (last / checkpoint.CONFIG).exists():
            raise UserError(f"--resume: no checkpoint in {last}; train without --resume first (or fix --out)")
    elif kind == "legacy" or (kind == "run" and (last.exists() or last.is_symlink())):
        raise UserError(f"{out} already holds a checkpoint; pass --resume to continue it, or choose another --out")
    elif kind == "foreign":
        entries = sorted(p.name for p in out.iterdir())
        raise UserError(f"--out {out} is a directory that is not a nanophi run (it holds {len(entries)} entries, "
                        f"e.g. {entries[0]!r}) and nanophi writes only into its own runs; choose a new or empty "
                        "directory")


def _claim(run_dir: Path) -> None:
    try:
        checkpoint.claim(run_dir)
    except OSError as e:
        raise UserError(f"cannot write to --out {run_dir}: {e.strerror}; choose a writable directory") from None


def train(cfg: RunConfig, callbacks: Sequence[Callback] | None = None) -> dict[str, Any]:
    """Prepare the data (cached), build or resume the model, train, and return the run's summary."""
    tc = cfg.train
    run_dir = Path(tc.out)
    check_out(run_dir, tc.resume)
    model, tokenizer = None, None
    if tc.init_from and not tc.resume:
        from nanophi.refs import load_model

        model, tokenizer = load_model(tc.init_from)
        cfg.model = model.config
    elif tc.resume:
        saved = checkpoint.load(run_dir / "last", with_trainer=False)
        if tc.init_from:
            from nanophi.tokenizer import load_tokenizer

            tokenizer = load_tokenizer(saved.path / "tokenizer")
    env = distributed.init(pick_device(tc.device).type)  # a no-op unless launched by torchrun
    if env.rank != 0:
        logging.getLogger("nanophi").setLevel(logging.ERROR)  # rank 0 alone reports (warnings too)
        distributed.barrier()  # rank 0 tokenizes first; the others then find the result in the cache
    data = prepare_data(cfg, tokenizer)
    if env.rank == 0:
        distributed.barrier()
    if tc.resume and saved.state.get("data_sha256") not in (None, data.meta.get("sha256")):
        raise UserError(f"--resume: the corpus differs from the one {run_dir} was trained on "
                        f"({saved.config.get('data', {}).get('data')}); pass the same --data")
    if model is None and cfg.model.block_size + 1 > len(data.train):
        raise UserError(f"the corpus has {len(data.train)} training tokens, fewer than block_size + 1 = "
                        f"{cfg.model.block_size + 1}; use more text or a smaller --block-size")
    if env.rank == 0:
        _claim(run_dir)  # the marker first, so everything written below is in a directory provably nanophi's
    trainer = Trainer(cfg, data, callbacks, model=model)
    if tc.resume:
        trainer.resume()
    if env.rank == 0:
        checkpoint.write_json_atomic(run_dir / checkpoint.CONFIG, cfg.to_dict())
    log.info(f"model: {trainer.raw_model.num_params() / 1e6:.2f}M parameters, vocab {cfg.model.vocab_size}, "
             f"{len(data.train):,} train / {len(data.val):,} val tokens, device {trainer.device}, "
             f"{str(trainer.dtype).removeprefix('torch.')}")
    return trainer.fit()


# --- CLI -----------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    from nanophi.config import recipes

    parser.add_argument("--config", metavar="FILE.toml|NAME", help="TOML recipe of overrides: a file, or a recipe "
                        f"shipped with nanophi ({', '.join(recipes())})")
    add_dataclass_arguments(parser, DataConfig)
    add_dataclass_arguments(parser, GPTConfig)
    add_dataclass_arguments(parser, TrainConfig)


def config_from_args(args: argparse.Namespace) -> RunConfig:
    flags = {k: v for k, v in vars(args).items() if not k.startswith("_") and k not in ("command", "verbose", "config")}
    toml = load_toml(args.config) if args.config else None
    out = Path(flags.get("out") or (toml or {}).get("train", {}).get("out") or TrainConfig().out)
    saved = None
    check_out(out, bool(flags.get("resume")))  # before anything is read or written
    if flags.get("resume"):
        saved = checkpoint.load(out / "last", with_trainer=False).config
    cfg = resolve(flags, toml, saved)
    if saved is not None:
        _check_compatible(saved["model"], cfg.model.to_dict(), out / "last")
    return cfg


def _check_compatible(saved: dict[str, Any], new: dict[str, Any], where: Path) -> None:
    diffs = [f"{k}: checkpoint {saved.get(k)!r}, now {v!r}" for k, v in new.items()
             if k not in RESUMABLE_MODEL_FIELDS and saved.get(k) != v]
    if diffs:
        raise UserError(f"--resume: the model config differs from the checkpoint in {where} ({'; '.join(diffs)}); "
                        "drop those flags or train into a new --out")


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    try:
        summary = train(cfg)
    except OSError as e:
        if e.errno not in checkpoint.DISK_ERRNOS:
            raise
        last = Path(cfg.train.out) / "last"
        kept = f"the last checkpoint {last.resolve()} is intact" if last.is_symlink() else "no checkpoint was written"
        what = e.filename or f"into {cfg.train.out}"
        raise UserError(f"cannot write {what}: {e.strerror}; {kept}; free space or fix permissions and --resume"
                        ) from None
    if distributed.rank() == 0:
        print(json.dumps({k: summary[k] for k in ("run_dir", "step", "best_val_loss", "stop_reason")}))
    distributed.shutdown()
    return 0
