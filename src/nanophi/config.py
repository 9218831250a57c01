"""Run configuration: typed dataclasses, one per concern, whose fields are also the CLI flags.

Precedence, lowest first: field defaults < `--preset` < the checkpoint's config (with `--resume`) < `--config
FILE.toml` < flags given on the command line. The resolved config is saved as JSON with every checkpoint.

A TOML recipe holds overrides only, in sections named after the dataclasses:

    [model]
    n_layer = 4
    [train]
    lr = 2e-3
"""

from __future__ import annotations

import argparse
import dataclasses
import tomllib
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from nanophi.errors import UserError
from nanophi.model import PRESETS, GPTConfig


@dataclass
class DataConfig:
    data: str | None = field(
        default=None,
        metadata={"help": "corpus: pydoc (default), FILE, DIR, FILE.jsonl or gutenberg:ID"},
    )
    glob: str = field(default="**/*.txt", metadata={"help": "file pattern when --data is a directory"})
    tokenizer: Literal["char", "bpe", "gpt2"] = field(default="char", metadata={"help": "tokenizer kind"})
    vocab_size: int = field(default=4096, metadata={"help": "BPE vocabulary size (ignored for char/gpt2)"})
    val_fraction: float = field(default=0.1, metadata={"help": "last fraction of the tokens held out for eval"})

    def __post_init__(self) -> None:
        if not 0.0 < self.val_fraction < 1.0:
            raise UserError(f"--val-fraction must be between 0 and 1, got {self.val_fraction}")
        if self.vocab_size < 2:
            raise UserError(f"--vocab-size must be >= 2, got {self.vocab_size}")


@dataclass
class TrainConfig:
    out: str = field(default="runs/default", metadata={"help": "run directory (checkpoints, metrics, report)"})
    preset: Literal["gpt2", "llama"] = field(default="gpt2", metadata={"help": "block family: switches for pos/norm/mlp"})
    batch_size: int = field(default=12, metadata={"help": "sequences per micro-batch"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate"})
    min_lr: float = field(default=1e-4, metadata={"help": "learning rate at the end of the decay"})
    schedule: Literal["cosine", "wsd", "constant"] = field(
        default="cosine", metadata={"help": "lr schedule after warmup: cosine, warmup-stable-decay or constant"}
    )
    warmup_iters: int = field(default=100, metadata={"help": "linear warmup steps"})
    decay_frac: float = field(default=0.2, metadata={"help": "wsd: share of steps spent decaying at the end"})
    max_iters: int = field(default=2000, metadata={"help": "optimizer steps in total (also with --resume)"})
    decay_iters: int | None = field(
        default=None, metadata={"help": "step where the lr schedule ends (default: max_iters), as nanoGPT's lr_decay_iters"}
    )
    max_time: float | None = field(default=None, metadata={"help": "stop training after this many seconds"})
    optimizer: Literal["adamw", "muon"] = field(
        default="adamw", metadata={"help": "adamw, or muon for hidden matrices with adamw for the rest"}
    )
    muon_lr: float = field(default=0.02, metadata={"help": "learning rate of Muon's matrices"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay on matrices"})
    beta1: float = field(default=0.9, metadata={"help": "AdamW beta1"})
    beta2: float = field(default=0.99, metadata={"help": "AdamW beta2"})
    grad_clip: float = field(default=1.0, metadata={"help": "clip the gradient norm to this (0 = off)"})
    eval_interval: int = field(default=250, metadata={"help": "steps between evaluations and checkpoints"})
    eval_iters: int | None = field(
        default=None, metadata={"help": "cap eval at this many batches (default: the whole split)"}
    )
    eval_batch_size: int = field(default=64, metadata={"help": "sequences per eval batch"})
    log_interval: int = field(default=10, metadata={"help": "steps between log lines"})
    sample_interval: int = field(default=0, metadata={"help": "steps between sample texts in the log (0 = off)"})
    early_stop: int | None = field(
        default=None, metadata={"help": "stop after this many evals without a better val loss"}
    )
    device: Literal["auto", "cpu", "cuda", "mps"] = field(default="auto", metadata={"help": "where to train"})
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        default="auto", metadata={"help": "autocast dtype (auto: bf16 on GPUs that have it and on CPUs with AMX, else fp32)"}
    )
    compile: bool = field(default=False, metadata={"help": "torch.compile the model"})
    parallel: Literal["ddp", "fsdp"] = field(
        default="ddp", metadata={"help": "under torchrun: ddp (replicate the model) or fsdp (shard it, FSDP2)"}
    )
    seed: int = field(default=1337, metadata={"help": "seed for init, batches and dropout"})
    resume: bool = field(default=False, metadata={"help": "continue from OUT/last exactly"})
    init_from: str | None = field(
        default=None, metadata={"help": "start from a pretrained model (run dir, GGUF, HF dir, alias)"}
    )
    checks: Literal["on", "off"] = field(
        default="on", metadata={"help": "data/shape/finite-loss checks (off: zero cost)"}
    )
    debug_interval: int = field(default=0, metadata={"help": "steps between network-health diagnostics (0 = off)"})
    dashboard: Literal["auto", "on", "off"] = field(
        default="auto", metadata={"help": "live terminal dashboard (auto: only on a TTY)"}
    )
    tensorboard: bool = field(default=False, metadata={"help": "also write TensorBoard event files under OUT/"})
    wandb: bool = field(default=False, metadata={"help": "also log to Weights & Biases (WANDB_MODE=offline works)"})

    def __post_init__(self) -> None:
        for name in ("batch_size", "grad_accum", "max_iters", "eval_interval", "log_interval", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.min_lr < 0:
            raise UserError(f"--lr must be > 0 and --min-lr >= 0, got {self.lr} and {self.min_lr}")
        if self.warmup_iters < 0:
            raise UserError(f"--warmup-iters must be >= 0, got {self.warmup_iters}")
        if not 0.0 <= self.decay_frac <= 1.0:
            raise UserError(f"--decay-frac must be in [0, 1], got {self.decay_frac}")
        if self.max_time is not None and self.max_time <= 0:
            raise UserError(f"--max-time must be > 0 seconds, got {self.max_time}")


@dataclass
class RunConfig:
    model: GPTConfig = field(default_factory=lambda: GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=64))
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        return cls(
            model=GPTConfig.from_dict(d.get("model", {})),
            train=_build(TrainConfig, d.get("train", {}), "train"),
            data=_build(DataConfig, d.get("data", {}), "data"),
        )


SECTIONS: dict[str, type] = {"model": GPTConfig, "train": TrainConfig, "data": DataConfig}


def _build(cls: type, values: dict[str, Any], section: str) -> Any:
    known = {f.name for f in fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise UserError(f"unknown key(s) {sorted(unknown)} in [{section}]; known keys: {sorted(known)}")
    return cls(**values)


def cli_fields(cls: type) -> list[tuple[dataclasses.Field, Any]]:
    """The fields of `cls` that are flags, with their resolved types."""
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in fields(cls) if f.metadata.get("cli", True)]


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """Add one flag per field. Defaults are SUPPRESSed so that only flags the user typed override lower layers."""
    group = parser.add_argument_group(cls.__name__)
    # The help shows what a run gets when the flag is absent: RunConfig's model is smaller than GPTConfig's own.
    shown = RunConfig().model if cls is GPTConfig else None
    for f, tp in cli_fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = getattr(shown, f.name) if shown is not None else f.default
        help_line = f"{f.metadata.get('help', '')} (default: {default})"
        base, optional = _unwrap_optional(tp)
        if base is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_line)
        elif typing.get_origin(base) is Literal:
            group.add_argument(flag, choices=list(typing.get_args(base)), default=argparse.SUPPRESS, help=help_line)
        else:
            group.add_argument(flag, type=_parser_for(base, optional, flag), default=argparse.SUPPRESS,
                               help=help_line, metavar=base.__name__.upper())


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    args = typing.get_args(tp)
    if type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return tp, False


def _parser_for(base: type, optional: bool, flag: str):
    def parse(text: str) -> Any:
        if optional and text.lower() in ("none", "null", ""):
            return None
        try:
            return base(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} expects {base.__name__}, got {text!r}") from None

    return parse


def load_toml(path: str | Path) -> dict[str, dict[str, Any]]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file {p} does not exist; pass a TOML file such as recipes/cpu-fast.toml")
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"config file {p} is not valid TOML: {e}") from None
    unknown = set(raw) - set(SECTIONS)
    if unknown:
        raise UserError(f"{p}: unknown section(s) {sorted(unknown)}; use [model], [train] and [data]")
    return raw


def resolve(
    flags: dict[str, Any],
    toml: dict[str, dict[str, Any]] | None = None,
    saved: dict[str, Any] | None = None,
) -> RunConfig:
    """Merge the layers into a validated RunConfig. `flags` holds only what was typed (flat names)."""
    layers: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    preset = flags.get("preset") or (toml or {}).get("train", {}).get("preset")
    if saved is None:
        layers["model"].update(RunConfig().model.to_dict() | PRESETS[preset or "gpt2"])
        layers["model"].pop("mlp_hidden"), layers["model"].pop("n_kv_head")  # derived unless set
    else:
        for name in SECTIONS:
            layers[name].update(saved.get(name, {}))
        if preset:
            layers["model"].update(PRESETS[preset])
    for name, values in (toml or {}).items():
        layers[name].update(values)
    owner = {f.name: section for section, cls in SECTIONS.items() for f in fields(cls)}
    for key, value in flags.items():
        if key in owner:
            layers[owner[key]][key] = value
    return RunConfig(
        model=GPTConfig.from_dict(layers["model"]),
        train=_build(TrainConfig, layers["train"], "train"),
        data=_build(DataConfig, layers["data"], "data"),
    )
