"""``bwskc train`` failure paths (issue 13, item 9): a foreign ``--out``, non-finite options, an
unwritable ``--out``, a kill while the data is written, a moved run, damaged checkpoints, and DDP
workers that die, stop, or lose their launcher. Each failure is one line and exit 2 (bad input) or 1
(a failed run), with nothing touched; the DDP ones within a bounded time."""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from bwskc.cli import main
from bwskc.train import checkpoint as ckpt
from test_train import _args, _bad, _corpus, _metrics, _model, _tree_digest

CONV = ["--mode", "conventional", "--experiment", "scratch"]
VARIANT = "scratch-conventional"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    return _model(root / "model"), _corpus(root / "corpus")


@pytest.fixture(scope="module")
def finished(tmp_path_factory, inputs):
    """One finished two-step run with a checkpoint at step 2 (evaluated at every step)."""
    model, data = inputs
    out = tmp_path_factory.mktemp("finished") / "out"
    assert main(_args(model, data, out, *CONV, "--max-steps", "2", "--eval-every", "1")) == 0
    return out


def _unfinished_copy(finished: Path, where: Path) -> Path:
    """The finished run copied elsewhere (moved), its variant made resumable again."""
    shutil.copytree(finished, where)
    (where / VARIANT / "training_results.json").unlink()
    return where


def _resume_argv(inputs, out: Path, *extra) -> list[str]:
    model, data = inputs
    return _args(model, data, out, *CONV, "--max-steps", "2", "--eval-every", "1", "--resume", *extra)


# ------------------------------------------------------------------------------------ --out
def test_foreign_nonempty_out_is_refused_and_untouched(tmp_path, capsys, inputs):
    model, data = inputs
    mine = tmp_path / "project"
    mine.mkdir()
    (mine / "README.md").write_text("my notes\n")
    (mine / "results.json").write_text("{}\n")
    for extra in ((), ("--resume",)):
        err = _bad(_args(model, data, mine, *CONV, "--max-steps", "1", *extra), capsys, untouched=mine)
        assert str(mine) in err and "not empty" in err
    assert sorted(p.name for p in mine.iterdir()) == ["README.md", "results.json"]


def test_out_rule_accepts_new_empty_and_run_directories(tmp_path):
    from argparse import Namespace

    from bwskc.train.run import RUN_MARKER, _check_out
    args = Namespace(resume=False)
    variants = [("scratch", "conventional")]
    _check_out(args, tmp_path / "new", variants)
    (tmp_path / "empty").mkdir()
    _check_out(args, tmp_path / "empty", variants)
    run = tmp_path / "run"
    (run / "scratch-bwsk-reversible").mkdir(parents=True)
    (run / RUN_MARKER).write_text("{}\n")
    _check_out(args, run, variants)  # a run directory gains a variant it lacks


# ------------------------------------------------------------------------------------ options
@pytest.mark.parametrize("flag,value", [
    ("--lr", "inf"), ("--lr", "nan"), ("--lr", "-1e-3"), ("--lr", "0"), ("--lr", "1e999"),
    ("--weight-decay", "inf"), ("--weight-decay", "nan"), ("--weight-decay", "-0.1"),
    ("--grad-clip", "inf"), ("--grad-clip", "nan"), ("--epochs", "0"), ("--max-steps", "0"),
    ("--batch-size", "0"), ("--seq-len", "1"), ("--eval-every", "-1"), ("--save-every", "-2"),
    ("--warmup", "-1"), ("--patience", "0"), ("--nproc", "0"), ("--ddp-timeout", "inf"),
    ("--ddp-timeout", "1")])
def test_numeric_options_out_of_range_are_one_line(tmp_path, capsys, inputs, flag, value):
    model, data = inputs
    err = _bad(_args(model, data, tmp_path / "o", flag, value), capsys)
    assert flag in err
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------ writing
@pytest.mark.skipif(not Path("/sys").is_dir(), reason="needs Linux's /sys, a filesystem no one may create in")
def test_unwritable_out_is_probed_by_writing(capsys, inputs):
    """/sys refuses new files even to root, for whom os.access says it is writable."""
    model, data = inputs
    err = _bad(_args(model, data, "/sys/bwskc-test/out"), capsys)
    assert "/sys/bwskc-test/out" in err and "cannot write" in err


def test_write_failure_mid_run_is_one_line_naming_the_path(tmp_path, capsys, inputs, monkeypatch):
    model, data = inputs
    out = tmp_path / "out"

    def disk_full(where, *a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(where / ckpt.DATA / ckpt.BLOCKS))
    monkeypatch.setattr(ckpt, "save_data", disk_full)
    err = _bad(_args(model, data, out, *CONV, "--max-steps", "1"), capsys)
    assert str(out / "data" / "blocks.safetensors") in err and "No space left" in err


# ------------------------------------------------------------------------------------ data
def test_kill_while_data_is_written_leaves_a_resumable_run(tmp_path, inputs):
    model, data = inputs
    out = tmp_path / "out"
    argv = _args(model, data, out, *CONV, "--max-steps", "1")
    env = dict(os.environ, **{ckpt.FAULT_KILL_IN_DATA: "1"})
    killed = subprocess.run([sys.executable, "-m", "bwskc.cli", *argv], env=env, capture_output=True, text=True,
                            timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (out / "data").exists()  # written whole or not at all
    assert main(argv + ["--resume"]) == 0
    assert ckpt.data_problem(out / "data") is None and not (out / "data.tmp").exists()
    assert json.loads((out / VARIANT / "training_results.json").read_text())["steps"] == 1


def test_moved_run_resumes_and_incomplete_data_is_prepared_again(tmp_path, capsys, inputs, finished):
    """The run directory moved elsewhere, its data/ left incomplete (no data.json, as a kill left it
    before data was written atomically): --resume rebuilds the data and continues the checkpoint."""
    moved = _unfinished_copy(finished, tmp_path / "elsewhere" / "moved")
    (moved / "data" / ckpt.DATA_JSON).unlink()
    capsys.readouterr()
    assert main(_resume_argv(inputs, moved)) == 0
    said = capsys.readouterr().out
    assert "preparing it again" in said and f"{VARIANT}: resumed at step 2" in said
    assert ckpt.data_problem(moved / "data") is None
    assert _metrics(moved / VARIANT / "metrics.jsonl") == _metrics(finished / VARIANT / "metrics.jsonl")


# ------------------------------------------------------------------------------------ checkpoints
@pytest.mark.parametrize("name", ["module.safetensors", "optimizer.safetensors"])
def test_flipped_byte_in_checkpoint_is_refused(tmp_path, capsys, inputs, finished, name):
    out = _unfinished_copy(finished, tmp_path / "out")
    blob = out / VARIANT / ckpt.CHECKPOINT / name
    data = bytearray(blob.read_bytes())
    data[-3] ^= 0x10  # inside the last tensor's values: the file still parses
    blob.write_bytes(bytes(data))
    err = _bad(_resume_argv(inputs, out), capsys, untouched=out)
    assert str(blob) in err and "corrupt checkpoint" in err and "sha256" in err


def _rewrite_state(variant: Path, edit) -> None:
    """Edit state.json and record its new checksum: a well-formed file whose fields are wrong."""
    where = variant / ckpt.CHECKPOINT
    saved = json.loads((where / "state.json").read_text())
    edit(saved)
    (where / "state.json").write_text(json.dumps(saved))
    sums = json.loads((where / ckpt.CHECKSUMS).read_text())
    sums["sha256"]["state.json"] = ckpt.file_sha256(where / "state.json")
    (where / ckpt.CHECKSUMS).write_text(json.dumps(sums))


@pytest.mark.parametrize("field,edit", [
    ("state.step", lambda s: s["state"].update(step=1.5)),
    ("state.step", lambda s: s["state"].update(step="2")),
    ("state.step", lambda s: s["state"].update(step=-1)),
    ("state.best_val", lambda s: s["state"].update(best_val="low")),
    ("state.losses", lambda s: s["state"].update(losses=[None])),
    ("state.last_train", lambda s: s["state"].update(last_train="x")),
    ("state.json.state", lambda s: s.update(state=[])),
    ("state.json.hyperparameters", lambda s: s.pop("hyperparameters")),
])
def test_malformed_state_json_is_one_line(tmp_path, capsys, inputs, finished, field, edit):
    out = _unfinished_copy(finished, tmp_path / "out")
    _rewrite_state(out / VARIANT, edit)
    err = _bad(_resume_argv(inputs, out), capsys, untouched=out)
    assert "state.json" in err and "corrupt checkpoint" in err and field.split(".")[-1] in err


def test_metrics_cut_by_a_kill_are_truncated_and_damage_is_named(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    ckpt.truncate_metrics(path, 2)
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'
    path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(ckpt.BwskError, match=r"metrics.jsonl:2: "):
        ckpt.truncate_metrics(path, 2)


# ------------------------------------------------------------------------------------ DDP
def _workers(config: Path) -> dict[int, int]:
    """rank -> pid of the live worker processes running ``config`` (zombies have no command line)."""
    found = {}
    for d in Path("/proc").iterdir():
        try:
            argv = (d / "cmdline").read_bytes().split(b"\0")
            env = dict(x.split(b"=", 1) for x in (d / "environ").read_bytes().split(b"\0") if b"=" in x)
        except (OSError, ValueError):
            continue
        if b"bwskc.train.worker" in argv and str(config).encode() in argv:
            found[int(env.get(b"RANK", b"0"))] = int(d.name)
    return found


def _beating(config: Path, n: int, limit_s: float = 120) -> dict[int, int]:
    """Wait until ``n`` workers of ``config`` run and each has touched its heartbeat."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        found = _workers(config)
        if len(found) == n and all(_heartbeat(pid, rank).exists() for rank, pid in found.items()):
            return found
        time.sleep(0.1)
    raise AssertionError(f"{n} workers of {config} did not start within {limit_s} s")


def _heartbeat(pid: int, rank: int) -> Path:
    from bwskc.train.distributed import SUPERVISOR_DIR, heartbeat_path
    env = dict(x.split("=", 1) for x in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in x)
    return heartbeat_path(Path(env[SUPERVISOR_DIR]), rank)


def _gone(config: Path, limit_s: float) -> bool:
    deadline = time.monotonic() + limit_s
    while _workers(config) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not _workers(config)


def _kill_leftovers(config: Path) -> None:
    for pid in _workers(config).values():  # only the workers this test started
        os.kill(pid, signal.SIGKILL)


def _ddp_with_fault(tmp_path, inputs, capsys, fault, *extra):
    """Run a two-rank training in this process; once both ranks beat, ``fault(workers)``. Returns the
    exit status, the one stderr line, and the seconds from the fault to the command's end."""
    model, data = inputs
    out = tmp_path / "out"
    config = out / VARIANT / "run_config.json"
    faulted = {}

    def inject():
        try:
            workers = _beating(config, 2)
        except AssertionError:
            return
        faulted["at"] = time.monotonic()
        fault(workers)
    thread = threading.Thread(target=inject, daemon=True)
    thread.start()
    try:
        code = main(_args(model, data, out, *CONV, "--max-steps", "200", "--nproc", "2", *extra))
        ended = time.monotonic()
    finally:
        thread.join(5)
        _kill_leftovers(config)
    err = capsys.readouterr().err.strip()
    assert "at" in faulted, err
    assert _gone(config, 1), "workers left running"
    return code, err, ended - faulted["at"]


def test_ddp_dead_rank_is_named_and_the_others_stopped(tmp_path, inputs, capsys):
    code, err, took = _ddp_with_fault(tmp_path, inputs, capsys, lambda w: os.kill(w[1], signal.SIGKILL))
    assert code == 1 and len(err.splitlines()) == 1, err
    assert "rank 1" in err and "SIGKILL" in err and "other ranks were stopped" in err
    assert took < 20


def test_ddp_stopped_rank_is_found_by_its_heartbeat(tmp_path, inputs, capsys):
    """A SIGSTOPped rank: found within a quarter of --ddp-timeout (plus the stop), not the collective
    timeout; named, and killed with the rest."""
    code, err, took = _ddp_with_fault(tmp_path, inputs, capsys, lambda w: os.kill(w[1], signal.SIGSTOP),
                                      "--ddp-timeout", "20")
    assert code == 1 and len(err.splitlines()) == 1, err
    assert "rank 1" in err and "stopped responding" in err and "it is stopped" in err
    assert took < 15  # 5 s of silence, then at most the stop's grace; the collective would take 20


def _launcher(config: Path) -> subprocess.Popen:
    code = ("import sys; from bwskc.cli import guarded; from bwskc.train.distributed import launch; "
            "sys.exit(guarded(lambda: launch(sys.argv[1], 2, 'v', 20.0)))")
    return subprocess.Popen([sys.executable, "-c", code, str(config)], stderr=subprocess.PIPE, text=True)


def _config(tmp_path, finished, name: str) -> Path:
    from bwskc.train.loop import RunConfig
    from bwskc.train.worker import write_config
    model = json.loads((finished / VARIANT / "bwskc.json").read_text())["model"]
    out = tmp_path / name
    out.mkdir()
    cfg = RunConfig(model=model, mode="conventional", experiment="scratch", out=str(out),
                    data=str(finished / "data"), max_steps=200, batch_size=4, seq_len=32, nproc=2,
                    ddp_timeout=20.0)
    write_config(cfg, out / "run_config.json")
    return out / "run_config.json"


def test_killing_the_launcher_stops_the_workers(tmp_path, finished):
    """SIGTERM: passed on to the workers, one line, exit 143. SIGKILL (no handler runs): the workers
    see their launcher gone and exit within a second or two."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        config = _config(tmp_path, finished, sig.name)
        launcher = _launcher(config)
        try:
            _beating(config, 2)
            launcher.send_signal(sig)
            err = launcher.communicate(timeout=30)[1].strip()
            assert _gone(config, 10), f"workers still training after the launcher got {sig.name}"
        finally:
            launcher.kill()
            _kill_leftovers(config)
        if sig == signal.SIGTERM:
            assert launcher.returncode == 128 + signal.SIGTERM and len(err.splitlines()) == 1, err
            assert "SIGTERM" in err
        else:
            assert launcher.returncode == -signal.SIGKILL
