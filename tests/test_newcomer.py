"""A newcomer's first hour (issue 17): a light CLI start, help that matches the code, files with the
umask's mode, no warnings from bwskc's own code, progress lines in logs, honest output details, and the
CLI route for vision configs."""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import stat
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from bwskc import cli

ROOT = Path(__file__).resolve().parents[1]
BWSKC_DIRS = tuple(str(ROOT / d) + os.sep for d in ("bwskc", "passes", "kernels", "grammar"))


# ----------------------------------------------------------------------------------- start-up
def test_cli_import_and_parser_import_no_torch():
    """``bwskc --help`` pays for neither torch nor transformers nor triton (benchmarks/startup.py times it)."""
    code = ("import sys, bwskc.cli as c; c.build_parser(); "
            "print(sorted(m for m in ('torch', 'transformers', 'triton') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert done.stdout.strip() == "[]", done.stdout + done.stderr


def test_help_exits_zero_without_torch():
    code = ("import sys, bwskc.cli as c\n"
            "for argv in ([], ['lower'], ['parse'], ['check-evidence'], ['check-gradients'], ['train']):\n"
            "    try:\n        c.build_parser().parse_args(argv + ['--help'])\n"
            "    except SystemExit as e:\n        assert e.code == 0, argv\n"
            "assert 'torch' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)


def test_run_constants_are_the_trainers():
    from bwskc.train import loop, run, tasks
    assert run.MODE_DIRS == loop.MODE_DIRS
    assert run.TASKS == tasks.TASKS


# ----------------------------------------------------------------------------------- help
def _subparsers(parser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _options():
    parser = cli.build_parser()
    for name, sub in _subparsers(parser).items():
        for action in sub._actions:
            if isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
                continue
            yield name, sub, action


def test_top_level_description_mentions_training():
    assert "train" in cli.build_parser().description


@pytest.mark.parametrize("command", ["lower", "parse", "check-evidence", "check-gradients", "train"])
def test_every_option_has_help_and_its_real_default(command):
    """Every argument has help; every option says its default, and a default printed is the real one."""
    checked = 0
    for name, sub, action in _options():
        if name != command:
            continue
        formatter = sub._get_formatter()
        text = formatter._expand_help(action) if action.help else ""
        flag = action.option_strings[-1] if action.option_strings else action.dest
        assert text.strip(), f"{command} {flag}: no help"
        if not action.option_strings:  # a positional argument has no default
            continue
        assert "default" in text, f"{command} {flag}: help does not say its default: {text!r}"
        default = action.default
        if default not in (None, False, [], ""):
            assert re.search(rf"default:? {re.escape(str(default))}\b", text) or \
                f"(default: {default}" in text, f"{command} {flag}: default {default!r} not in {text!r}"
        checked += 1
    assert checked


def test_passes_help_lists_the_registry():
    from bwskc.passes.manager import REGISTRY
    assert cli.pass_names() == list(REGISTRY)
    lower = _subparsers(cli.build_parser())["lower"]
    action = next(a for a in lower._actions if "--passes" in a.option_strings)
    for name in REGISTRY:
        assert name in action.help


def test_train_defaults_are_what_the_run_uses():
    from bwskc.train.loop import RunConfig
    args = cli.build_parser().parse_args(["train"])
    for key in ("epochs", "batch_size", "seq_len", "weight_decay", "grad_clip", "precision", "patience",
                "seed", "eval_every", "save_every", "nproc", "ddp_timeout", "check_gradients"):
        assert getattr(args, key) == getattr(RunConfig, key), key


# ----------------------------------------------------------------------------------- files
@pytest.fixture
def umask022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_output_file_honours_umask(tmp_path, umask022):
    target = tmp_path / "out.bwsk"
    cli.write_output("text\n", str(target))
    assert _mode(target) == 0o644
    os.umask(0o077)
    cli.write_output("again\n", str(target))
    assert _mode(target) == 0o600



def test_lower_outputs_honour_umask(tmp_path, umask022):
    out, weights = tmp_path / "m.bwsk", tmp_path / "w.safetensors"
    assert cli.main(["lower", str(ROOT / "examples/gpt2-tiny/config.json"), "-o", str(out),
                     "--weights-out", str(weights)]) == 0
    assert _mode(out) == 0o644 and _mode(weights) == 0o644


# ----------------------------------------------------------------------------------- a short run
@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """One reversible variant, two steps, a few evaluation rows: in this process, with every warning
    recorded and stdout captured (what a log file would hold), under umask 022."""
    from bwskc.train.run import run_training
    out = tmp_path_factory.mktemp("newcomer") / "run"
    args = cli.build_parser().parse_args(
        ["train", "--mode", "reversible", "--experiment", "scratch", "--max-steps", "2", "--eval-every", "1",
         "--seq-len", "32", "--batch-size", "2", "--eval-rows", "6", "--out", str(out)])
    old = os.umask(0o022)
    stdout = io.StringIO()
    try:
        with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(stdout):
            warnings.simplefilter("always")
            run_training(args)
            import bwskc
            import torch
            model = bwskc.load_trained(out / "scratch-bwsk-reversible")
            model(torch.zeros(1, 8, dtype=torch.long))
    finally:
        os.umask(old)
    return out, list(caught), stdout.getvalue()


def test_no_warning_from_bwskc_code(short_run):
    _, caught, _ = short_run
    ours = [f"{w.filename}:{w.lineno}: {w.category.__name__}: {w.message}" for w in caught
            if w.filename.startswith(BWSKC_DIRS) and issubclass(w.category, (FutureWarning, DeprecationWarning))]
    assert not ours, ours
    leaf = [str(w.message) for w in caught if "LeafSpec" in str(w.message)]
    assert not leaf, leaf  # torch's own, from run_decompositions: silenced where bwskc calls it


def test_written_files_honour_umask(short_run):
    out, _, _ = short_run
    variant = out / "scratch-bwsk-reversible"
    for path in [variant / "model.safetensors", variant / "checkpoint" / "module.safetensors",
                 variant / "checkpoint" / "optimizer.safetensors", out / "README.md", out / "results.json"]:
        assert _mode(path) == 0o644, f"{path}: {oct(_mode(path))}"


def test_progress_lines_in_a_log(short_run):
    _, _, said = short_run
    lines = said.splitlines()
    assert lines[0].startswith("data: ") and "prepared in" in lines[0]
    assert "[1/1] scratch-bwsk-reversible" in lines
    assert any("lowered and compiled (reversible, gradients checked) in" in line for line in lines)
    assert any(re.search(r"step 2/2 train loss .* \[6 rows in [\d.]+ s\]", line) for line in lines)
    assert any("scoring the test split (6 rows)" in line for line in lines)
    assert any(re.search(r": test perplexity [\d.]+ \[6 rows in", line) for line in lines)
    assert len(lines) <= 8, said


def test_run_readme_details(short_run):
    out, _, _ = short_run
    readme = (out / "README.md").read_text()
    assert readme.splitlines()[0] == "# bwskc train results: default (embedded Pythia-style GPT-NeoX)"
    assert "site-packages" not in readme.splitlines()[0] and str(ROOT) not in readme.splitlines()[0]
    assert "whatever else ran on the machine" in readme  # the Time column's caveat
    assert "about 90/5/5" not in readme
    assert re.search(r"train \d+ \([\d.]+%\), valid 6 of \d+ \([\d.]+%\), test 6 of \d+ \([\d.]+%\)", readme), readme
    assert "--eval-rows 6: validation 6 of" in readme and "test 6 of" in readme
    info = json.loads((out / "data" / "data.json").read_text())
    assert info["eval_rows"] == 6 and info["blocks"]["test"] == 6


def test_eval_rows_mismatch_is_refused(short_run):
    out, _, _ = short_run
    args = cli.build_parser().parse_args(["train", "--mode", "conventional", "--experiment", "scratch",
                                          "--max-steps", "2", "--seq-len", "32", "--batch-size", "2",
                                          "--out", str(out)])
    from bwskc.errors import BwskError
    from bwskc.train.run import run_training
    with pytest.raises(BwskError, match="--eval-rows 6, not 0"):
        run_training(args)


def test_stdlib_split_says_its_measured_shares():
    from bwskc.train.data import load_text
    note = load_text("stdlib", max_chars=200_000).note
    shares = [float(x) for x in re.findall(r"([\d.]+)%", note)]
    assert len(shares) == 3 and abs(sum(shares) - 100) < 0.5, note
    assert "about 90/5/5" not in note


# ----------------------------------------------------------------------------------- output details
def test_dot_says_one_leaf():
    import torch

    import bwskc
    from bwskc.emit import to_dot
    program = bwskc.lower(torch.nn.ReLU(), (torch.zeros(2),))
    dot = to_dot(program)
    assert "1 leaf\\n" in dot or '1 leaf"' in dot, dot
    assert "1 leaves" not in dot


def test_comparison_plot_marks_each_mode_and_the_training_lines(tmp_path, monkeypatch):
    from bwskc.train import output
    kept = []
    plt = output._pyplot()
    monkeypatch.setattr(plt, "close", lambda fig: kept.append(fig))
    results = {}
    for d in ("conventional", "bwsk-analyzed", "bwsk-reversible"):
        (tmp_path / f"scratch-{d}").mkdir()
        rows = [{"step": s, "loss": 5.0 - s / 10} for s in range(1, 5)] + [{"step": 4, "val_loss": 4.6}]
        (tmp_path / f"scratch-{d}" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        results[f"scratch-{d}"] = {}
    output.plot_comparison(tmp_path, results)
    ax = kept[0].axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any("training" in label for label in labels), labels
    validation = [line for line in ax.get_lines() if "validation" in (line.get_label() or "")]
    assert len({(line.get_linestyle(), line.get_marker()) for line in validation}) == 3


def test_vision_config_lowers_through_the_cli(tmp_path):
    """A ResNet config.json (no sdpa attention to ask for) lowers through ``bwskc lower``."""
    from transformers import ResNetConfig
    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic",
                          num_labels=3, architectures=["ResNetForImageClassification"])
    config.save_pretrained(tmp_path)
    out = tmp_path / "resnet.bwsk"
    assert cli.main(["lower", str(tmp_path / "config.json"), "--input", "pixel_values=f32[1,3,32,32]",
                     "-o", str(out)]) == 0
    assert out.read_text().strip()


def test_report_lists_no_empty_residual_chain():
    """A residual chain's operations lie in the blocks it composes: no row of 0 operations for it."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    import bwskc
    from bwskc.report import report
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=64)).eval()
    program = bwskc.run_passes(bwskc.lower(model, (torch.zeros(1, 8, dtype=torch.long),)),
                               ["typing", "calm", "fusion"])
    assert any(".residual" in name for name in program.defs), list(program.defs)
    text = report(program)
    assert not re.search(r"\| residual chain \| 0 \|", text), text
