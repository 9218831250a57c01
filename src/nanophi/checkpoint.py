"""Checkpoints: one directory each, written atomically, never unpickled.

    RUN/ckpt-000500/model.safetensors   weights (tied tensors stored once)
                   /config.json         the resolved RunConfig
                   /state.json          step, best val loss, tokens seen, data source hash ...
                   /trainer.pt          optimizer and RNG states (torch.load(weights_only=True): tensors only)
                   /tokenizer/          the tokenizer, so the checkpoint samples on its own
    RUN/last -> ckpt-000500             symlinks, swapped with os.replace (atomic on POSIX)
    RUN/best -> ckpt-000250
    RUN/nanophi-run.json                the marker: this directory is a nanophi run; the checkpoints it wrote

A checkpoint directory is filled under a temporary name and renamed when complete; the `last`/`best` links
are then swapped atomically. A `kill -9` at any moment therefore leaves the previous checkpoint loadable.

nanophi deletes or replaces only what it can prove it wrote: a checkpoint is pruned only when the marker lists
it, a link is swapped only when it is a symlink, and a half-written leftover is removed only when it holds
nothing but checkpoint files. A run written before the marker existed is adopted on its next save: the
checkpoints its `last`/`best` links point at are listed, nothing else. A disk that is full or read-only is one
line, and the previous checkpoint stays as it was.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from nanophi.errors import UserError

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
STATE = "state.json"
TRAINER = "trainer.pt"
TOKENIZER = "tokenizer"
LINKS = ("last", "best")
RUN_MARKER = "nanophi-run.json"
MARKER_FORMAT = "nanophi-run"
CHECKPOINT_FILES = frozenset({WEIGHTS, CONFIG, STATE, TRAINER, TOKENIZER})
_CKPT_NAME = re.compile(r"ckpt-\d{7,}")
# Write failures that are the user's disk, not a bug: full, over quota, read-only, not permitted, file too big.
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG})
# The model config keys without which a checkpoint's weights cannot be given a shape.
REQUIRED_MODEL_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")
# state.json: key -> accepted types (bool is excluded from the ints below by hand).
STATE_TYPES: dict[str, tuple[type, ...]] = {
    "step": (int,), "best_val": (int, float, type(None)), "evals_since_best": (int,), "tokens_seen": (int,),
    "data_sha256": (str, type(None)), "data_dir": (str, type(None)),
}


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]) -> None:
    """safetensors' save_file creates the file with mode 0600; give it the permissions any file written here
    gets (0666 minus the umask), so shared checkpoints and exports are readable by the group like their JSON."""
    save_file(tensors, str(path), metadata=metadata)
    os.chmod(path, 0o666 & ~_umask())


def _umask() -> int:
    """The process umask. Linux reports it in /proc; os.umask can only read it by setting it, which briefly
    changes it for every thread (a data loader or server thread creating a file then would get mode 0666)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@dataclass
class Checkpoint:
    """What `load` returns: everything but the model object, which the caller builds from `config`."""

    path: Path
    config: dict[str, Any]
    state: dict[str, Any]
    weights: dict[str, torch.Tensor]
    trainer: dict[str, Any] | None  # optimizer + RNG states; None when loaded for inference


def model_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Weights with tied tensors stored once (safetensors refuses shared storage) and made contiguous."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in model.state_dict().items():
        if t.data_ptr() in seen:
            continue  # e.g. lm_head.weight tied to transformer.wte.weight
        seen.add(t.data_ptr())
        out[name] = t.detach().contiguous().cpu()
    return out


def save(
    run_dir: Path,
    step: int,
    model: torch.nn.Module,
    config: dict[str, Any],
    state: dict[str, Any],
    trainer: dict[str, Any] | None,
    tokenizer_dir: Path | None,
    links: tuple[str, ...] = ("last",),
) -> Path:
    """Write checkpoint `ckpt-{step}` atomically, point `links` at it, and prune the ones nanophi wrote that no
    link points at. A full or read-only disk is a UserError; the previous checkpoint is left as it was."""
    try:
        return _save(run_dir, step, model, config, state, trainer, tokenizer_dir, links)
    except OSError as e:
        if e.errno not in DISK_ERRNOS:
            raise
        last = run_dir / "last"
        kept = f"the previous checkpoint {last.resolve()} is intact" if last.is_symlink() else "no checkpoint was lost"
        raise UserError(f"cannot write checkpoint {run_dir / f'ckpt-{step:07d}'}: {e.strerror}; {kept}; free space "
                        "or fix permissions and --resume") from None


def _save(
    run_dir: Path,
    step: int,
    model: torch.nn.Module,
    config: dict[str, Any],
    state: dict[str, Any],
    trainer: dict[str, Any] | None,
    tokenizer_dir: Path | None,
    links: tuple[str, ...],
) -> Path:
    marker = claim(run_dir)
    final = run_dir / f"ckpt-{step:07d}"
    if (final.exists() or final.is_symlink()) and final.name not in marker["checkpoints"]:
        raise UserError(f"{final} exists and nanophi did not write it; move it out of {run_dir} or train into "
                        "another --out")
    for link in links:
        if (run_dir / link).exists() and not (run_dir / link).is_symlink():
            raise UserError(f"{run_dir / link} is not a link nanophi made; move it out of {run_dir} or train into "
                            "another --out")
    # Listed before it exists: a kill between the two leaves a name to forget, never a checkpoint nobody owns.
    if final.name not in marker["checkpoints"]:
        marker["checkpoints"].append(final.name)
        write_marker(run_dir, marker)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-ckpt-", dir=run_dir))
    tmp.chmod(0o755)  # mkdtemp makes it private; a checkpoint is as readable as the run directory
    try:
        save_safetensors(model_state_dict(model), tmp / WEIGHTS, metadata={"format": "pt"})
        write_json(tmp / CONFIG, config)
        write_json(tmp / STATE, state | {"step": step})
        if trainer is not None:
            with open(tmp / TRAINER, "wb") as f:  # a Python file, so a full disk is an OSError, not torch's own
                torch.save(trainer, f)
        if tokenizer_dir is not None:
            shutil.copytree(tokenizer_dir, tmp / TOKENIZER)
        _fsync_tree(tmp)
        if final.exists():  # the same step saved twice (e.g. eval then end of training): replace it
            old = run_dir / f".old-{final.name}"
            if old.exists() and not _holds_only_checkpoint_files(old):
                raise UserError(f"{old} is in the way and nanophi did not write it; move it out of {run_dir}")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for link in links:
        _point(run_dir / link, final.name)
    _prune(run_dir, marker)
    return final


# --- the run marker ------------------------------------------------------------------------------------------
def read_marker(run_dir: Path) -> dict[str, Any] | None:
    """The run's marker, or None when `run_dir` has none. A marker nanophi cannot read is a UserError: guessing
    which checkpoints are nanophi's is exactly what it must not do."""
    p = Path(run_dir) / RUN_MARKER
    if not p.is_file():
        return None
    fix = f"restore it, or move {run_dir}'s checkpoints into a new run directory"
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"run marker {p} is corrupt ({e}); {fix}") from None
    if (not isinstance(d, dict) or d.get("format") != MARKER_FORMAT or not isinstance(d.get("checkpoints"), list)
            or not all(isinstance(c, str) and _CKPT_NAME.fullmatch(c) for c in d["checkpoints"])):
        raise UserError(f"run marker {p} is not one nanophi wrote (expected format {MARKER_FORMAT!r} and a list of "
                        f"ckpt-NNNNNNN names); {fix}")
    return d


def write_marker(run_dir: Path, marker: dict[str, Any]) -> None:
    write_json_atomic(Path(run_dir) / RUN_MARKER, marker)


def legacy_checkpoints(run_dir: Path) -> list[str]:
    """Checkpoints of a run written before the marker existed: what its `last`/`best` links point at, when
    that is a checkpoint directory of this run holding nothing but checkpoint files."""
    names = set()
    for link in LINKS:
        p = Path(run_dir) / link
        if p.is_symlink():
            target = os.readlink(p)
            if _CKPT_NAME.fullmatch(target) and _holds_only_checkpoint_files(p.parent / target, complete=True):
                names.add(target)
    return sorted(names)


def run_kind(run_dir: Path) -> str:
    """What `run_dir` is: 'missing', 'not-dir', 'empty', 'run' (has a marker), 'legacy' (a run from before the
    marker: a `last` link to a checkpoint of its own) or 'foreign' (anything else: not nanophi's to touch)."""
    run_dir = Path(run_dir)
    if not run_dir.exists() and not run_dir.is_symlink():
        return "missing"
    if not run_dir.is_dir():
        return "not-dir"
    if read_marker(run_dir) is not None:
        return "run"
    last = run_dir / "last"
    if last.is_symlink() and os.readlink(last) in legacy_checkpoints(run_dir):
        return "legacy"
    return "empty" if not any(run_dir.iterdir()) else "foreign"


def claim(run_dir: Path) -> dict[str, Any]:
    """Make `run_dir` a marked nanophi run (creating it if needed) and return its marker. A run from before the
    marker is adopted with only the checkpoints its links provably point at."""
    run_dir = Path(run_dir)
    marker = read_marker(run_dir) if run_dir.is_dir() else None
    if marker is None:
        run_dir.mkdir(parents=True, exist_ok=True)
        marker = {"format": MARKER_FORMAT, "version": 1, "run": run_dir.resolve().name,
                  "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  "checkpoints": legacy_checkpoints(run_dir)}
        write_marker(run_dir, marker)
    return marker


def _holds_only_checkpoint_files(d: Path, complete: bool = False) -> bool:
    """True for a real directory whose entries are all checkpoint files (and, if `complete`, has the ones a
    checkpoint cannot do without)."""
    if d.is_symlink() or not d.is_dir():
        return False
    entries = set(os.listdir(d))
    return entries <= CHECKPOINT_FILES and (not complete or {WEIGHTS, CONFIG, STATE} <= entries)


def _point(link: Path, target: str) -> None:
    tmp = link.with_name(f".tmp-link-{link.name}-{os.getpid()}")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(target, tmp)  # relative, so a run directory can be moved or copied
    os.replace(tmp, link)
    _fsync_dir(link.parent)


def _prune(run_dir: Path, marker: dict[str, Any]) -> None:
    """Delete the checkpoints the marker lists that no link points at, and leftovers of interrupted saves that
    hold nothing but checkpoint files. Nothing else in the directory is touched."""
    keep = {os.readlink(run_dir / l) for l in LINKS if (run_dir / l).is_symlink()}
    listed = []
    for name in marker["checkpoints"]:
        p = run_dir / name
        if name in keep:
            listed.append(name)
        elif p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        elif p.exists() or p.is_symlink():
            listed.append(name)  # replaced by something that is not a checkpoint directory: leave it be
    for p in run_dir.iterdir():
        if p.name.startswith((".tmp-ckpt-", ".old-ckpt-")) and _holds_only_checkpoint_files(p):
            shutil.rmtree(p, ignore_errors=True)
    if listed != marker["checkpoints"]:
        marker["checkpoints"] = listed
        write_marker(run_dir, marker)


def find(path: Path) -> Path:
    """Resolve a run directory (-> its `best`, else `last`) or a checkpoint directory."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist; pass a run directory (e.g. runs/default) or a checkpoint")
    if (path / STATE).exists() or (path / WEIGHTS).exists():
        return path
    for link in ("best", "last"):
        if (path / link / STATE).exists():
            return (path / link).resolve()
    raise UserError(f"{path} holds no checkpoint (no best/ or last/ with {CONFIG}); train into it first")


def load(path: Path, with_trainer: bool = True) -> Checkpoint:
    """Load a checkpoint; any missing or corrupt file is a UserError naming it."""
    ckpt = find(path)
    config = check_config_file(_read_checkpoint_json(ckpt / CONFIG), ckpt / CONFIG)
    state = check_state_file(_read_checkpoint_json(ckpt / STATE), ckpt / STATE)
    try:
        weights = load_file(str(ckpt / WEIGHTS))
    except FileNotFoundError:
        raise UserError(f"checkpoint {ckpt} has no {WEIGHTS}; it is incomplete — use another checkpoint") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"checkpoint file {ckpt / WEIGHTS} is corrupt ({e}); use another checkpoint") from None
    trainer = None
    if with_trainer:
        try:
            trainer = torch.load(ckpt / TRAINER, weights_only=True, map_location="cpu")
        except FileNotFoundError:
            raise UserError(f"checkpoint {ckpt} has no {TRAINER} (optimizer state), so it cannot resume") from None
        except Exception as e:  # torch raises a zoo of types for a truncated or foreign file
            raise UserError(f"checkpoint file {ckpt / TRAINER} is corrupt ({type(e).__name__}); "
                            "use another checkpoint") from None
    return Checkpoint(path=ckpt, config=config, state=state, weights=weights, trainer=trainer)


def load_weights_into(model: torch.nn.Module, weights: dict[str, torch.Tensor], where: Path) -> None:
    missing, unexpected = model.load_state_dict(weights, strict=False)
    # a tied head is stored once, under the embedding's name
    missing = [k for k in missing if not (k == "lm_head.weight" and getattr(model.config, "tie_embeddings", False))]
    if missing or unexpected:
        raise UserError(
            f"checkpoint {where} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )


def check_config_file(config: Any, p: Path) -> dict[str, Any]:
    """A checkpoint's config.json, checked for shape, types and ranges (it may have been edited by hand)."""
    from nanophi.config import check_model, check_sections
    from nanophi.model import GPTConfig

    fix = "restore the file from a copy or use another checkpoint"
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise UserError(f"checkpoint file {p} must be a JSON object with a \"model\" object; {fix}")
    missing = [k for k in REQUIRED_MODEL_KEYS if k not in config["model"]]
    if missing:
        raise UserError(f"checkpoint file {p} lacks model key(s) {', '.join(missing)}; {fix}")
    try:
        checked = config | check_sections(config, str(p))
    except UserError as e:
        raise UserError(f"{e}; {fix}") from None
    try:  # the ranges too: a shape torch cannot allocate is refused here, with the file named
        check_model(GPTConfig.from_dict(checked["model"]))
    except UserError as e:
        raise UserError(f"checkpoint file {p}: {e}; {fix}") from None
    return checked




def check_state_file(state: Any, p: Path) -> dict[str, Any]:
    """A checkpoint's state.json, checked for shape and types."""
    fix = "restore the file from a copy or use another checkpoint"
    if not isinstance(state, dict):
        raise UserError(f"checkpoint file {p} must be a JSON object, got {type(state).__name__}; {fix}")
    if "step" not in state:
        raise UserError(f"checkpoint file {p} lacks \"step\"; {fix}")
    for key, types in STATE_TYPES.items():
        if key in state and (not isinstance(state[key], types) or isinstance(state[key], bool)):
            raise UserError(f"checkpoint file {p}: \"{key}\" is {state[key]!r:.40}, expected "
                            f"{' or '.join('null' if t is type(None) else t.__name__ for t in types)}; {fix}")
    if state["step"] < 0:
        raise UserError(f"checkpoint file {p}: \"step\" is {state['step']}, expected >= 0; {fix}")
    return state


def read_json(p: Path, missing: str = "{p} is missing", corrupt: str = "{p} is not valid JSON ({e})") -> Any:
    """The JSON in `p`; a missing or unparsable file is a UserError with the line `missing` or `corrupt` (templates
    with {p}, and {e} for the parser's complaint), so each caller says what the file is and what to do."""
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(missing.format(p=p)) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(corrupt.format(p=p, e=e)) from None


def _read_checkpoint_json(p: Path) -> dict[str, Any]:
    return read_json(p, missing="checkpoint file {p} is missing; the checkpoint is incomplete",
                     corrupt="checkpoint file {p} is corrupt ({e}); use another checkpoint")


def write_json(p: Path, obj: Any, sort_keys: bool = True) -> None:
    """`obj` as indented JSON with a final newline (sorted keys unless a format fixes their order)."""
    p.write_text(json.dumps(obj, indent=2, sort_keys=sort_keys) + "\n", encoding="utf-8")


def write_json_atomic(p: Path, obj: Any) -> None:
    """Write `p` under a temporary name and rename it over: a crash or full disk leaves the old file whole."""
    tmp = p.with_name(f".tmp-{p.name}-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(p.parent)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for f in files:
            fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
