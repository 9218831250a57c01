"""Run configuration: typed dataclasses, one per concern, whose fields are also the CLI flags.

Precedence, lowest first: field defaults < `--preset` < the checkpoint's config (with `--resume`) < `--config
FILE.toml` < flags given on the command line. The resolved config is saved as JSON with every checkpoint.

A TOML recipe holds overrides only, in sections named after the dataclasses:

    [model]
    n_layer = 4
    [train]
    lr = 2e-3

`--config` takes a TOML file, or the bare name of a recipe shipped inside the package (`--config cpu-fast`, from
src/nanophi/recipes/; the repository's recipes/ is a link to that folder).

Every value is checked before anything is written, wherever it came from (flag, TOML, a checkpoint's
config.json): its type against the field's annotation (a bool is not an int, a string is not a float), every
float finite, every integer within what torch and a machine can hold, every field within its range.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.resources
import math
import tomllib
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from nanophi.errors import UserError
from nanophi.model import PRESETS, GPTConfig

# Integers are stored in torch int64 tensors (loader state, RNG seeds, step counters): nothing may exceed it.
MAX_INT = 2**63 - 1
# Shape limits far above any model this package trains, low enough that a typo (--n-embd 10**30) is refused here
# instead of as an allocation failure minutes later. GPT-3 175B is 96 layers x 12288 wide; Llama 3.1's context
# is 131072 tokens; the largest common vocabularies are ~256K.
MAX_WIDTH = 1 << 16
MAX_LAYERS = 1 << 12
MAX_CONTEXT = 1 << 20
MAX_VOCAB = 1 << 22
MAX_BATCH = 1 << 20  # sequences per micro-batch, micro-batches per step


def check_range(name: str, value: float | None, lo: float | None = None, hi: float | None = None,
                lo_open: bool = False, hi_open: bool = False) -> None:
    """Raise a UserError unless `value` (None passes: an unset optional) lies in the interval given."""
    if value is None:
        return
    too_low = lo is not None and (value <= lo if lo_open else value < lo)
    too_high = hi is not None and (value >= hi if hi_open else value > hi)
    if too_low or too_high or (isinstance(value, float) and not math.isfinite(value)):
        def num(x: float) -> str:
            return "2**63 - 1" if x == MAX_INT else f"{x:g}" if isinstance(x, float) else str(x)

        if lo is not None and hi is not None:
            interval = f"in {'(' if lo_open else '['}{num(lo)}, {num(hi)}{')' if hi_open else ']'}"
        elif lo is not None:
            interval = f"{'>' if lo_open else '>='} {num(lo)}"
        else:
            interval = f"{'<' if hi_open else '<='} {num(hi)}"
        raise UserError(f"--{name.replace('_', '-')} must be {interval}, got {value!r}")


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
        check_range("val_fraction", self.val_fraction, 0.0, 1.0, lo_open=True, hi_open=True)
        check_range("vocab_size", self.vocab_size, 2, MAX_VOCAB)


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
    max_time: float | None = field(default=None, metadata={
        "help": "time budget in seconds (a resumed run's included): training stops within it, and the lr "
                "schedule follows whichever of steps and time is further along, so it still ends at min_lr"})
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
        for name in ("batch_size", "grad_accum", "eval_batch_size"):
            check_range(name, getattr(self, name), 1, MAX_BATCH)
        for name in ("max_iters", "eval_interval", "log_interval", "decay_iters", "eval_iters", "early_stop"):
            check_range(name, getattr(self, name), 1, MAX_INT)
        for name in ("warmup_iters", "sample_interval", "debug_interval", "seed"):
            check_range(name, getattr(self, name), 0, MAX_INT)
        check_range("lr", self.lr, 0.0, lo_open=True)
        check_range("min_lr", self.min_lr, 0.0)
        check_range("muon_lr", self.muon_lr, 0.0, lo_open=True)
        check_range("weight_decay", self.weight_decay, 0.0)
        check_range("beta1", self.beta1, 0.0, 1.0, hi_open=True)
        check_range("beta2", self.beta2, 0.0, 1.0, hi_open=True)
        check_range("grad_clip", self.grad_clip, 0.0)
        check_range("decay_frac", self.decay_frac, 0.0, 1.0)
        check_range("max_time", self.max_time, 0.0, lo_open=True)
        if not self.out:
            raise UserError("--out must name a run directory, got an empty string")


@dataclass
class RunConfig:
    model: GPTConfig = field(default_factory=lambda: GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=64))
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "the run config") -> RunConfig:
        d = check_sections(d, source)
        model = GPTConfig.from_dict(d.get("model", {}))
        check_model(model)
        return cls(model=model, train=_build(TrainConfig, d.get("train", {}), "train"),
                   data=_build(DataConfig, d.get("data", {}), "data"))


SECTIONS: dict[str, type] = {"model": GPTConfig, "train": TrainConfig, "data": DataConfig}


def check_model(m: GPTConfig) -> None:
    """Ranges GPTConfig's own __post_init__ leaves open: sizes torch can allocate, finite positive scales."""
    check_range("n_layer", m.n_layer, 1, MAX_LAYERS)
    for name in ("n_head", "n_kv_head", "n_embd"):
        check_range(name, getattr(m, name), 1, MAX_WIDTH)
    check_range("mlp_hidden", m.mlp_hidden, 1, 4 * MAX_WIDTH)
    check_range("block_size", m.block_size, 1, MAX_CONTEXT)
    check_range("vocab_size", m.vocab_size, 0, MAX_VOCAB)
    check_range("dropout", m.dropout, 0.0, 1.0, hi_open=True)
    check_range("rope_theta", m.rope_theta, 0.0, lo_open=True)
    check_range("norm_eps", m.norm_eps, 0.0, 1.0, lo_open=True)
    check_range("logit_softcap", m.logit_softcap, 0.0, lo_open=True)


def check_value(tp: Any, value: Any, where: str) -> Any:
    """`value` checked against the field type `tp` (int → float widened); UserError naming `where` otherwise.
    bool is a subclass of int in Python, so it is tested first: `n_layer = true` is not 1 layer."""
    base, optional = _unwrap_optional(tp)
    if value is None and optional:
        return None
    if typing.get_origin(base) is Literal:
        choices = typing.get_args(base)
        if not isinstance(value, str) or value not in choices:
            raise UserError(f"{where} must be one of {', '.join(map(str, choices))}; got {value!r}")
        return value
    if base is bool:
        if not isinstance(value, bool):
            raise UserError(f"{where} expects true or false, got {value!r}")
        return value
    if base is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{where} expects an integer, got {value!r}")
        if abs(value) > MAX_INT:
            raise UserError(f"{where} is {value}, beyond the largest integer torch holds (2**63 - 1)")
        return value
    if base is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{where} expects a number, got {value!r}")
        if isinstance(value, int) and abs(value) > MAX_INT:
            raise UserError(f"{where} is {value}, far beyond any sensible value")
        if not math.isfinite(value):
            raise UserError(f"{where} must be a finite number, got {value!r}")
        return float(value)
    if base is str:
        if not isinstance(value, str):
            raise UserError(f"{where} expects a string, got {value!r}")
        return value
    raise TypeError(f"no check for field type {tp!r}")  # a new field type: a bug, not the user's


def check_section(cls: type, values: Any, where: str) -> dict[str, Any]:
    """The values of one section, type-checked against `cls`'s fields; `where` names the section for errors."""
    if not isinstance(values, dict):
        raise UserError(f"{where} must be a table of keys, got {type(values).__name__} {values!r:.60}")
    hints = typing.get_type_hints(cls)
    unknown = set(values) - set(hints)
    if unknown:
        raise UserError(f"{where}: unknown key(s) {sorted(unknown)}; known keys: {sorted(hints)}")
    return {k: check_value(hints[k], v, f"{where} {k}") for k, v in values.items()}


def check_sections(d: Any, source: str) -> dict[str, dict[str, Any]]:
    """A whole {model, train, data} mapping checked section by section; `source` names the file it came from."""
    if not isinstance(d, dict):
        raise UserError(f"{source} must hold a table with [model], [train] and [data] sections, "
                        f"got {type(d).__name__}")
    unknown = set(d) - set(SECTIONS)
    if unknown:
        raise UserError(f"{source}: unknown section(s) {sorted(unknown)}; use [model], [train] and [data]")
    return {name: check_section(SECTIONS[name], values, f"{source}: [{name}]") for name, values in d.items()}


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
            # Kept as text: resolve() refuses it in one line ("--lr expects a number, got 'fast'"), where an
            # argparse error would print the whole usage of a command with sixty flags first.
            return text

    return parse


def recipes() -> list[str]:
    """Names of the recipes shipped inside the package (`--config NAME`)."""
    folder = importlib.resources.files("nanophi") / "recipes"
    return sorted(p.name.removesuffix(".toml") for p in folder.iterdir() if p.name.endswith(".toml"))


def load_toml(path: str | Path) -> dict[str, dict[str, Any]]:
    """A TOML file's overrides, type-checked. A bare name (`cpu-fast`) that is not a file is a packaged recipe."""
    p = Path(path)
    if p.is_file():
        source, read = str(p), lambda: p.read_text(encoding="utf-8")
    elif p.parent == Path(".") and p.name.removesuffix(".toml") in recipes():
        packaged = importlib.resources.files("nanophi") / "recipes" / (p.name.removesuffix(".toml") + ".toml")
        source, read = f"recipe {p.name.removesuffix('.toml')}", lambda: packaged.read_text(encoding="utf-8")
    elif p.exists():
        raise UserError(f"config {p} is not a file; pass a TOML file or one of the recipes: {', '.join(recipes())}")
    elif p.parent != Path("."):
        raise UserError(f"config file {p} does not exist; pass a TOML file or one of the recipes: "
                        f"{', '.join(recipes())}")
    else:
        raise UserError(f"config {p} is neither a file nor a recipe; pass a TOML file or one of the recipes: "
                        f"{', '.join(recipes())}")
    try:
        raw = tomllib.loads(read())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"config file {source} is not valid TOML: {e}") from None
    except OSError as e:
        raise UserError(f"config file {source} cannot be read: {e.strerror}") from None
    return check_sections(raw, source)


def resolve(
    flags: dict[str, Any],
    toml: dict[str, dict[str, Any]] | None = None,
    saved: dict[str, Any] | None = None,
) -> RunConfig:
    """Merge the layers into a validated RunConfig. `flags` holds only what was typed (flat names)."""
    hints = {name: typing.get_type_hints(cls) for name, cls in SECTIONS.items()}
    flags = {k: check_value(next(h[k] for h in hints.values() if k in h), v, "--" + k.replace("_", "-"))
             if any(k in h for h in hints.values()) else v for k, v in flags.items()}
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
    model = GPTConfig.from_dict(layers["model"])
    check_model(model)
    return RunConfig(model=model, train=_build(TrainConfig, layers["train"], "train"),
                     data=_build(DataConfig, layers["data"], "data"))
