"""Checkpoints: one directory each, written atomically, never unpickled.

    RUN/ckpt-000500/model.safetensors   weights (tied tensors stored once)
                   /config.json         the resolved RunConfig
                   /state.json          step, best val loss, tokens seen, data source hash ...
                   /trainer.pt          optimizer and RNG states (torch.load(weights_only=True): tensors only)
                   /tokenizer/          the tokenizer, so the checkpoint samples on its own
    RUN/last -> ckpt-000500             symlinks, swapped with os.replace (atomic on POSIX)
    RUN/best -> ckpt-000250

A checkpoint directory is filled under a temporary name and renamed when complete; the `last`/`best` links
are then swapped atomically. A `kill -9` at any moment therefore leaves the previous checkpoint loadable.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
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
    """Write checkpoint `ckpt-{step}` atomically, point `links` at it, and prune unreferenced ones."""
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / f"ckpt-{step:07d}"
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-ckpt-", dir=run_dir))
    tmp.chmod(0o755)  # mkdtemp makes it private; a checkpoint is as readable as the run directory
    try:
        save_safetensors(model_state_dict(model), tmp / WEIGHTS, metadata={"format": "pt"})
        _write_json(tmp / CONFIG, config)
        _write_json(tmp / STATE, state | {"step": step})
        if trainer is not None:
            torch.save(trainer, tmp / TRAINER)
        if tokenizer_dir is not None:
            shutil.copytree(tokenizer_dir, tmp / TOKENIZER)
        _fsync_tree(tmp)
        if final.exists():  # the same step saved twice (e.g. eval then end of training): replace it
            old = run_dir / f".old-{final.name}"
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
    _prune(run_dir)
    return final


def _point(link: Path, target: str) -> None:
    tmp = link.with_name(f".tmp-link-{link.name}-{os.getpid()}")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(target, tmp)  # relative, so a run directory can be moved or copied
    os.replace(tmp, link)
    _fsync_dir(link.parent)


def _prune(run_dir: Path) -> None:
    """Delete checkpoint directories no link points at, and leftovers of interrupted saves."""
    keep = {os.readlink(run_dir / l) for l in LINKS if (run_dir / l).is_symlink()}
    for p in run_dir.iterdir():
        if p.name.startswith(".tmp-ckpt-") or p.name.startswith(".old-"):
            shutil.rmtree(p, ignore_errors=True)
        elif p.name.startswith("ckpt-") and p.is_dir() and p.name not in keep:
            shutil.rmtree(p, ignore_errors=True)


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
    config = _read_json(ckpt / CONFIG)
    state = _read_json(ckpt / STATE)
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


def _read_json(p: Path) -> dict[str, Any]:
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"checkpoint file {p} is missing; the checkpoint is incomplete") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"checkpoint file {p} is corrupt ({e}); use another checkpoint") from None


def _write_json(p: Path, obj: Any) -> None:
    p.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


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
