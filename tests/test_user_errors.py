"""Nothing a user owns is lost, and every mistake is one line (issue 14): run directories, flag and TOML values,
hand-edited run files, pickled HF weights, packaged recipes. Real CLI calls; exit code 2; nothing written.

Read-only and full disks are real: a tiny tmpfs mounted for the test (remounted read-only, then filled). chmod
does not stop root, and a tmpfs behaves the same for every user; where `mount` is not allowed the test skips.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
from pathlib import Path

import pytest

from nanophi import checkpoint
from nanophi.cli import main

TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16", "--batch-size", "2",
        "--eval-interval", "3", "--log-interval", "3", "--warmup-iters", "1", "--dashboard", "off"]
REPO = Path(__file__).resolve().parents[1]


def snapshot(root: Path) -> dict[str, bytes | str]:
    """Every path under `root` with its bytes (files) or link target (symlinks): to prove nothing changed."""
    out: dict[str, bytes | str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            rel = str(p.relative_to(root))
            out[rel] = ("-> " + os.readlink(p)) if p.is_symlink() else p.read_bytes() if p.is_file() else "dir"
    return out


def refused(capsys: pytest.CaptureFixture, argv: list[str], expect: str) -> str:
    """Run the CLI; assert exit 2 and exactly one error line, containing `expect`, with no traceback."""
    code = main(argv)
    err = capsys.readouterr().err
    errors = [l for l in err.splitlines() if ": error: " in l]
    assert code == 2, err
    assert "Traceback" not in err and len(errors) == 1 and expect in errors[0], err
    assert err.strip().splitlines()[-1] == errors[0], err  # the error is the last thing said
    return errors[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(run, corpus): one tiny run for the module, copied by tests that change it."""
    from conftest import CORPUS

    root = tmp_path_factory.mktemp("trained")
    corpus = root / "corpus.txt"
    corpus.write_text(CORPUS * 40, encoding="utf-8")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NANOPHI_CACHE", str(root / "cache"))
        assert main(["train", "--data", str(corpus), "--out", str(root / "run"), *TINY, "--max-iters", "3"]) == 0
    return root / "run", corpus


def copy_run(trained: tuple[Path, Path], dst: Path) -> Path:
    shutil.copytree(trained[0], dst, symlinks=True)
    return dst


# --- 1. --out: nanophi writes only into its own runs ---------------------------------------------------------
def test_train_refuses_a_directory_that_is_not_a_run(trained, tmp_path: Path, capsys, monkeypatch) -> None:
    corpus = trained[1]
    foreign = tmp_path / "notes"
    (foreign / "ckpt-notes").mkdir(parents=True)
    (foreign / "ckpt-notes" / "todo.txt").write_text("mine\n")
    (foreign / "config.json").write_text('{"theme": "dark"}\n')
    before = snapshot(foreign)
    refused(capsys, ["train", "--data", str(corpus), "--out", str(foreign), *TINY], "not a nanophi run")
    refused(capsys, ["train", "--data", str(corpus), "--out", str(foreign), *TINY, "--resume"], "no checkpoint")
    assert snapshot(foreign) == before
    monkeypatch.chdir(foreign)  # the worst case: `--out .` in a folder of one's own
    refused(capsys, ["train", "--data", str(corpus), "--out", ".", *TINY], "not a nanophi run")
    assert snapshot(foreign) == before
    a_file = tmp_path / "out.txt"
    a_file.write_text("keep me\n")
    refused(capsys, ["train", "--data", str(corpus), "--out", str(a_file), *TINY], "is a file")
    assert a_file.read_text() == "keep me\n"


def test_an_empty_directory_becomes_a_marked_run(trained, tmp_path: Path) -> None:
    out = tmp_path / "empty"
    out.mkdir()
    assert main(["train", "--data", str(trained[1]), "--out", str(out), *TINY, "--max-iters", "3"]) == 0
    marker = json.loads((out / checkpoint.RUN_MARKER).read_text())
    assert marker["format"] == "nanophi-run" and marker["checkpoints"] == [os.readlink(out / "last")]


def test_pruning_deletes_only_the_checkpoints_nanophi_wrote(trained, tmp_path: Path) -> None:
    run = copy_run(trained, tmp_path / "run")
    (run / "ckpt-notes").mkdir()
    (run / "ckpt-notes" / "a.txt").write_text("mine\n")
    (run / "ckpt-0000001").mkdir()  # looks like a checkpoint name, but the marker does not list it
    (run / "ckpt-0000001" / "model.safetensors").write_text("not nanophi's\n")
    (run / ".old-ckpt-mine").mkdir()
    (run / ".old-ckpt-mine" / "x.txt").write_text("mine\n")
    old = os.readlink(run / "last")
    assert main(["train", "--out", str(run), "--max-iters", "6", "--resume", "--dashboard", "off"]) == 0
    assert not (run / old).exists()  # nanophi's own superseded checkpoint is pruned
    for mine in ("ckpt-notes/a.txt", "ckpt-0000001/model.safetensors", ".old-ckpt-mine/x.txt"):
        assert (run / mine).is_file(), mine
    assert json.loads((run / checkpoint.RUN_MARKER).read_text())["checkpoints"] == [os.readlink(run / "last")]


def test_save_never_replaces_what_it_did_not_write(tmp_path: Path) -> None:
    from nanophi.errors import UserError
    from nanophi.model import GPT, GPTConfig

    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=8, block_size=8, vocab_size=11))
    run = tmp_path / "run"
    (run / "ckpt-0000005").mkdir(parents=True)
    (run / "ckpt-0000005" / "mine.txt").write_text("mine\n")
    with pytest.raises(UserError, match="did not write it"):
        checkpoint.save(run, 5, model, {}, {}, None, None)
    (run / "best").mkdir()
    with pytest.raises(UserError, match="not a link nanophi made"):
        checkpoint.save(run, 6, model, {}, {}, None, None, ("last", "best"))
    assert (run / "ckpt-0000005" / "mine.txt").read_text() == "mine\n" and (run / "best").is_dir()


def test_a_run_from_before_the_marker_still_resumes(trained, tmp_path: Path, capsys) -> None:
    run = copy_run(trained, tmp_path / "old")
    (run / checkpoint.RUN_MARKER).unlink()  # as written by nanophi before the marker existed
    (run / "ckpt-notes").mkdir()  # and something of the user's that happens to look like a checkpoint name
    (run / "ckpt-notes" / "a.txt").write_text("mine\n")
    old = os.readlink(run / "last")
    refused(capsys, ["train", "--data", str(trained[1]), "--out", str(run), *TINY], "--resume")
    assert main(["train", "--out", str(run), "--max-iters", "6", "--resume", "--dashboard", "off"]) == 0
    marker = json.loads((run / checkpoint.RUN_MARKER).read_text())
    assert marker["checkpoints"] == [os.readlink(run / "last")] and not (run / old).exists()  # adopted, pruned
    assert (run / "ckpt-notes" / "a.txt").read_text() == "mine\n"


@pytest.fixture
def tmpfs(tmp_path: Path):
    """A 2 MiB tmpfs at tmp_path/mnt, unmounted afterwards; skips where mounting is not allowed."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.decode().strip()[:80]})")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_read_only_and_full_disks_keep_the_old_checkpoint(trained, tmpfs: Path, capsys) -> None:
    corpus = trained[1]
    run = copy_run(trained, tmpfs / "run")
    before = snapshot(run)
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    refused(capsys, ["train", "--out", str(run), "--max-iters", "6", "--resume", "--dashboard", "off"],
            "Read-only file system")
    refused(capsys, ["train", "--data", str(corpus), "--out", str(tmpfs / "new"), *TINY], "Read-only file system")
    assert snapshot(run) == before
    subprocess.run(["mount", "-o", "remount,rw", str(tmpfs)], check=True)
    # fill the disk but for a few KiB: the run's small files still fit, a checkpoint (~100 KiB) does not
    fd = os.open(tmpfs / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)
    os.truncate(tmpfs / "filler", os.path.getsize(tmpfs / "filler") - 32 * 1024)
    line = refused(capsys, ["train", "--out", str(run), "--max-iters", "6", "--resume", "--dashboard", "off"],
                   "No space left on device")
    assert "checkpoint" in line and "intact" in line
    assert os.readlink(run / "last") == before["last"].removeprefix("-> ")
    ckpt = checkpoint.load(run / "last")  # the old checkpoint, complete, with its optimizer state
    assert ckpt.trainer is not None and ckpt.state["step"] == 3
    assert not [p for p in run.iterdir() if p.name.startswith(".tmp-")]  # no half-written leftovers


# --- 2. values are checked when parsed, before anything is written --------------------------------------------
BAD_FLAGS = [
    (["--lr", "nan"], "--lr must be a finite number"),
    (["--lr", "inf"], "--lr must be a finite number"),
    (["--lr", "0"], "--lr must be > 0"),
    (["--lr", "fast"], "--lr expects a number, got 'fast'"),
    (["--min-lr=-1e-4"], "--min-lr must be >= 0"),
    (["--beta1", "1.0"], "--beta1 must be in [0, 1)"),
    (["--beta2", "nan"], "--beta2 must be a finite number"),
    (["--weight-decay", "-0.1"], "--weight-decay must be >= 0"),
    (["--grad-clip", "inf"], "--grad-clip must be a finite number"),
    (["--max-time", "nan"], "--max-time must be a finite number"),
    (["--max-time", "0"], "--max-time must be > 0"),
    (["--muon-lr", "-1"], "--muon-lr must be > 0"),
    (["--decay-frac", "1.5"], "--decay-frac must be in [0, 1]"),
    (["--logit-softcap", "0"], "--logit-softcap must be > 0"),
    (["--logit-softcap", "nan"], "--logit-softcap must be a finite number"),
    (["--dropout", "nan"], "--dropout must be a finite number"),
    (["--rope-theta", "-1"], "--rope-theta must be > 0"),
    (["--norm-eps", "0"], "--norm-eps must be in (0, 1]"),
    (["--val-fraction", "1"], "--val-fraction must be in (0, 1)"),
    (["--n-embd", str(10**30)], "beyond the largest integer torch holds"),
    (["--n-embd", str(2**20), "--n-head", "1"], "--n-embd must be in [1, 65536]"),
    (["--n-layer", "100000"], "--n-layer must be in [1, 4096]"),
    (["--block-size", str(2**40)], "--block-size must be in [1, 1048576]"),
    (["--max-iters", "1e30"], "--max-iters expects an integer, got '1e30'"),
    (["--max-iters", str(10**30)], "beyond the largest integer torch holds"),
    (["--batch-size", str(2**40)], "--batch-size must be in [1, 1048576]"),
    (["--seed", "-1"], "--seed must be in [0, 2**63 - 1]"),
    (["--vocab-size", str(10**9)], "--vocab-size must be in [2,"),
    (["--eval-iters", "0"], "--eval-iters must be in [1,"),
]


@pytest.mark.parametrize("flags,expect", BAD_FLAGS, ids=[" ".join(f)[:40] for f, _ in BAD_FLAGS])
def test_bad_flag_values(flags: list[str], expect: str, corpus_file: Path, tmp_path: Path, capsys) -> None:
    refused(capsys, ["train", "--data", str(corpus_file), "--out", str(tmp_path / "o"), *TINY, *flags], expect)
    assert not (tmp_path / "o").exists()


BAD_TOML = [
    ("[train]\nlr = nan\n", "[train] lr must be a finite number"),
    ("[train]\nlr = inf\n", "[train] lr must be a finite number"),
    ("[train]\nlr = \"fast\"\n", "[train] lr expects a number, got 'fast'"),
    ("[train]\nlr = [0.1]\n", "[train] lr expects a number"),
    ("[model]\nn_layer = 2.5\n", "[model] n_layer expects an integer, got 2.5"),
    ("[model]\nn_layer = true\n", "[model] n_layer expects an integer, got True"),
    ("[model]\nbias = 1\n", "[model] bias expects true or false"),
    ("[model]\nn_embd = 1_000_000_000_000_000_000_000\n", "beyond the largest integer"),
    ("[model]\nlogit_softcap = -inf\n", "[model] logit_softcap must be a finite number"),
    ("[model]\npos = \"alibi\"\n", "[model] pos must be one of learned, rope"),
    ("[train]\nbeta1 = 2.0\n", "--beta1 must be in [0, 1)"),
    ("[train]\nout = 5\n", "[train] out expects a string"),
    ("[train]\nwarmup = 5\n", "unknown key(s) ['warmup']"),
    ("train = 5\n", "[train] must be a table"),
    ("[optim]\nlr = 1\n", "unknown section(s) ['optim']"),
]


@pytest.mark.parametrize("text,expect", BAD_TOML, ids=[t.replace("\n", " ")[:40] for t, _ in BAD_TOML])
def test_bad_toml_values(text: str, expect: str, corpus_file: Path, tmp_path: Path, capsys) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text(text)
    refused(capsys, ["train", "--data", str(corpus_file), "--out", str(tmp_path / "o"), *TINY, "--config",
                     str(recipe)], expect)
    assert not (tmp_path / "o").exists()


def test_ints_widen_to_floats_in_toml(tmp_path: Path) -> None:
    from nanophi.config import load_toml, resolve

    recipe = tmp_path / "r.toml"
    recipe.write_text("[train]\nlr = 1\ngrad_clip = 0\n")
    cfg = resolve({}, load_toml(recipe))
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float) and cfg.train.grad_clip == 0.0


# --- 3. run files edited into valid JSON of the wrong shape ---------------------------------------------------
EDITS = [
    (checkpoint.CONFIG, [1, 2, 3], "must be a JSON object"),
    (checkpoint.CONFIG, {"model": {"n_layer": 1}}, "lacks model key(s) n_head"),
    (checkpoint.CONFIG, {"model": "gpt"}, "must be a JSON object with a \"model\" object"),
    ("config:n_embd", "16", "[model] n_embd expects an integer"),
    ("config:n_embd", 10**9, "n-embd must be in [1, 65536]"),
    (checkpoint.STATE, [], "must be a JSON object, got list"),
    (checkpoint.STATE, {"best_val": 1.0}, "lacks \"step\""),
    (checkpoint.STATE, {"step": "3"}, "\"step\" is '3', expected int"),
    (checkpoint.STATE, {"step": True}, "\"step\" is True, expected int"),
]


@pytest.mark.parametrize("name,content,expect", EDITS, ids=[f"{n}-{str(c)[:20]}" for n, c, _ in EDITS])
def test_hand_edited_run_files(name: str, content, expect: str, trained, tmp_path: Path, capsys) -> None:
    run = copy_run(trained, tmp_path / "run")
    ckpt_dir = (run / "last").resolve()
    if name.startswith("config:"):
        config = json.loads((ckpt_dir / checkpoint.CONFIG).read_text())
        config["model"][name.split(":")[1]] = content
        name, content = checkpoint.CONFIG, config
    (ckpt_dir / name).write_text(json.dumps(content))
    before = snapshot(run)
    for argv in (["train", "--out", str(run), "--resume", "--max-iters", "6", "--dashboard", "off"],
                 ["eval", str(run)],
                 ["sample", str(run), "--max-new-tokens", "2"],
                 ["export", str(run), "--format", "hf", "--out", str(tmp_path / "hf")]):
        line = refused(capsys, argv, expect)
        assert f"{run}/last/{name}" in line or str(ckpt_dir / name) in line, line  # names the file to fix
    assert snapshot(run) == before and not (tmp_path / "hf").exists()


def test_a_corrupt_run_marker_is_one_line(trained, tmp_path: Path, capsys) -> None:
    run = copy_run(trained, tmp_path / "run")
    (run / checkpoint.RUN_MARKER).write_text('{"format": "nanophi-run", "checkpoints": "all"}')
    refused(capsys, ["train", "--out", str(run), "--resume", "--max-iters", "6", "--dashboard", "off"],
            "run marker")


# --- 4. a Hugging Face folder holding a pickle ---------------------------------------------------------------
class NotATensor:
    """Anything but a tensor: what a malicious or foreign pytorch_model.bin carries."""


@pytest.mark.parametrize("payload", ["object", "truncated"])
def test_a_pickled_pytorch_model_bin_is_refused(payload: str, tmp_path: Path, capsys) -> None:
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1, "n_head": 2, "n_embd": 8,
                                                "n_positions": 16, "vocab_size": 11}))
    data = pickle.dumps({"wte.weight": NotATensor()})
    (hf / "pytorch_model.bin").write_bytes(data if payload == "object" else b"PK\x03\x04" + data[:7])
    before = snapshot(hf)
    refused(capsys, ["sample", str(hf), "--max-new-tokens", "2"], "cannot be loaded as plain tensors")
    refused(capsys, ["export", str(hf), "--format", "gguf", "--out", str(tmp_path / "m.gguf")], "pytorch_model.bin")
    assert snapshot(hf) == before and not (tmp_path / "m.gguf").exists()


def test_a_wrong_shaped_hf_config_is_one_line(tmp_path: Path, capsys) -> None:
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "model.safetensors").write_bytes(b"")
    for content, expect in (([], "must be a JSON object"), ({"model_type": "gpt2"}, "lacks 'n_embd'"),
                            ({"model_type": "gpt2", "n_layer": "2", "n_head": 2, "n_embd": 8, "n_positions": 16,
                              "vocab_size": 11}, "wrong type")):
        (hf / "config.json").write_text(json.dumps(content))
        refused(capsys, ["sample", str(hf), "--max-new-tokens", "2"], expect)


# --- 5. recipes ship inside the package --------------------------------------------------------------------
def test_recipes_by_name(tmp_path: Path, capsys) -> None:
    from nanophi.config import load_toml, recipes, resolve

    assert {"cpu-fast", "nanogpt-cpu"} <= set(recipes())
    fast = resolve({}, load_toml("cpu-fast"))
    assert fast.train.optimizer == "muon" and fast.model.n_layer == 2
    assert resolve({}, load_toml("nanogpt-cpu.toml")).model.n_layer == 4
    line = refused(capsys, ["train", "--out", str(tmp_path / "o"), "--config", "cpu-fastest"], "cpu-fast, nanogpt-cpu")
    assert "neither a file nor a recipe" in line and not (tmp_path / "o").exists()


def test_root_recipes_are_the_packaged_ones() -> None:
    """recipes/ at the repository root is where the README points; it must not drift from the package's."""
    packaged = REPO / "src" / "nanophi" / "recipes"
    root = REPO / "recipes"
    assert sorted(p.name for p in root.glob("*.toml")) == sorted(p.name for p in packaged.glob("*.toml"))
    for p in packaged.glob("*.toml"):
        assert (root / p.name).read_bytes() == p.read_bytes(), p.name
    pyproject = (REPO / "pyproject.toml").read_text()
    assert '"recipes/*.toml"' in pyproject  # shipped as package data


def test_config_help_names_the_recipes(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "recipe shipped with nanophi (cpu-fast, nanogpt-cpu)" in text


# --- the other commands that write: export, prepare (and eval's one number) -----------------------------------
def test_export_force_replaces_only_an_earlier_export(trained, tmp_path: Path, capsys) -> None:
    run = trained[0]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text('{"theme": "dark"}\n')
    (mine / "notes.txt").write_text("mine\n")
    before = snapshot(mine)
    refused(capsys, ["export", str(run), "--format", "hf", "--out", str(mine)], "--force")
    refused(capsys, ["export", str(run), "--format", "hf", "--out", str(mine), "--force"], "did not write")
    assert snapshot(mine) == before
    out = tmp_path / "hf"
    assert main(["export", str(run), "--format", "hf", "--out", str(out)]) == 0
    assert main(["export", str(run), "--format", "hf", "--out", str(out), "--force"]) == 0  # its own: replaced


def test_prepare_and_eval_inputs(trained, tmp_path: Path, capsys) -> None:
    a_file = tmp_path / "f.txt"
    a_file.write_text("keep me\n")
    refused(capsys, ["prepare", "--data", str(trained[1]), "--out", str(a_file)], "is a file")
    refused(capsys, ["prepare", "--data", str(trained[1]), "--tokenizer", "bpe", "--vocab-size", str(10**12)],
            "--vocab-size must be in [2,")
    refused(capsys, ["eval", str(trained[0]), "--batch-size", "0"], "--batch-size must be in [1,")
    assert a_file.read_text() == "keep me\n"


def test_export_and_prepare_on_a_read_only_disk(trained, tmpfs: Path, capsys) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    refused(capsys, ["export", str(trained[0]), "--format", "hf", "--out", str(tmpfs / "hf")], "Read-only file system")
    refused(capsys, ["export", str(trained[0]), "--format", "gguf", "--out", str(tmpfs / "m.gguf")],
            "Read-only file system")
    refused(capsys, ["prepare", "--data", str(trained[1]), "--out", str(tmpfs / "p")], "Read-only file system")
    assert list(tmpfs.iterdir()) == []


@pytest.mark.parametrize("argv", [["sandbox", "run", "x.py", "--timeout", "abc"], ["train", "--bogus"],
                                  ["textbook", "dedup"], ["humaneval", "score"]])
def test_argparse_mistakes_are_one_line(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """argparse's own errors (a non-number, an unknown flag, a missing argument) are one line too, exit 2."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error:" in err[0] and "--help" in err[0], err
