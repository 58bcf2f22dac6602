"""``bwskc train --nproc 2 --shard`` (FSDP2, gloo on CPU) against one process on the same global batch,
in conventional and reversible mode, dropout on: the same losses, gradient norms and weights, the same
files in the same layout, each rank holding half the parameters, gradients and optimizer states; a
sharded run resumed after a kill continues as if it never stopped; and the coupling chains' backward
reads valid weights even when FSDP frees them between forward and backward.

The two-process runs start their own processes (the CLI's launcher, or this file run as a worker, as
torchrun would start it)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bwskc.cli import main

from test_train import _args, _corpus, _metrics  # tests/: pytest's rootdir, or this script's own directory

# a tiny GPT-2, dropout on (the masks are counter-based: each rank draws its rows' slice)
GPT2 = {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 64, "vocab_size": 300,
        "resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.0, "bos_token_id": 0, "eos_token_id": 0,
        "use_cache": False}
STEPS = 4
FLAGS = ["--experiment", "scratch", "--max-steps", str(STEPS), "--eval-every", "2", "--save-every", "2"]
DIRS = {"conventional": "scratch-conventional", "reversible": "scratch-bwsk-reversible"}
REL = 1e-5


def _gpt2(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(GPT2))
    return directory / "config.json"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    return root, _gpt2(root / "model"), _corpus(root / "corpus")


@pytest.fixture(scope="module")
def runs(setup):
    """Per mode: the run directory of one process and of two sharded processes (made on first use)."""
    root, model, data = setup
    made = {}

    def get(mode: str) -> tuple[Path, Path]:
        if mode not in made:
            one, two = root / f"one-{mode}", root / f"two-{mode}"
            assert main(_args(model, data, one, "--mode", mode, *FLAGS)) == 0
            assert main(_args(model, data, two, "--mode", mode, *FLAGS, "--nproc", "2", "--shard")) == 0
            made[mode] = one / DIRS[mode], two / DIRS[mode]
        return made[mode]
    return get


def test_shard_needs_two_processes(setup, tmp_path, capsys):
    _, model, data = setup
    code = main(_args(model, data, tmp_path / "out", "--shard"))
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "--shard needs --nproc 2" in err, err
    assert not (tmp_path / "out").exists()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


# conventional: slow (35 s on 2 cores), the reversible run shards the same FSDP unit and is the harder case
@pytest.mark.parametrize("mode", [pytest.param("conventional", marks=pytest.mark.slow), "reversible"])
def test_sharded_run_matches_one_process(runs, mode):
    """Losses, gradient norms and validation losses within 1e-5 relative; every file a single process
    writes, with its keys, shapes and dtypes; weights and optimizer states within 1e-5 relative (per
    tensor, in norm). One exception: the key projection's bias. Softmax is shift invariant, so its exact
    gradient is zero and what autograd computes is rounding noise, different for every split of the
    batch (DDP's too); AdamW divides that noise by its own root mean square and so takes full-size
    steps of either sign: those entries are held to the bound of such steps, lr per step."""
    from safetensors.torch import load_file
    one, two = runs(mode)
    a, b = _metrics(one / "metrics.jsonl"), _metrics(two / "metrics.jsonl")
    assert [sorted(r) for r in a] == [sorted(r) for r in b]
    for x, y in zip(a, b):
        for key in ("loss", "grad_norm", "val_loss", "train_loss"):
            if key in x:
                assert y[key] == pytest.approx(x[key], rel=REL, abs=1e-7), (key, x, y)
    # the same files (a launched run also keeps the run_config.json its workers read)
    assert sorted(p.name for p in one.iterdir()) == sorted(p.name for p in two.iterdir() if p.name != "run_config.json")
    width = GPT2["n_embd"]
    lr = json.loads((one / "training_results.json").read_text())["hyperparameters"]["lr"]
    for name in ("model.safetensors", "checkpoint/module.safetensors", "checkpoint/optimizer.safetensors"):
        x, y = load_file(str(one / name)), load_file(str(two / name))
        assert x.keys() == y.keys(), name
        for k in x:
            assert (x[k].dtype, x[k].shape) == (y[k].dtype, y[k].shape), (name, k)
            if not x[k].is_floating_point() or x[k].dim() == 0:
                assert torch.equal(x[k], y[k]), (name, k)  # integer buffers, Adam's step counts
                continue
            if tuple(x[k].shape) == (3 * width,):  # c_attn's bias [query | key | value], its moments
                key = torch.zeros(3 * width, dtype=torch.bool)
                key[width:2 * width] = True
                if "optimizer" not in name:  # the key's slice: the noise above, at most lr a step
                    assert float((x[k][key] - y[k][key]).abs().max()) <= lr * STEPS, (name, k)
                x[k], y[k] = x[k][~key], y[k][~key]
            assert _rel(y[k], x[k]) <= REL, (name, k, _rel(y[k], x[k]))
    s1, s2 = (json.loads((d / "checkpoint" / "state.json").read_text()) for d in (one, two))
    assert s1["param_groups"] == s2["param_groups"] and s1["state"]["step"] == s2["state"]["step"] == STEPS
    r1, r2 = (json.loads((d / "training_results.json").read_text()) for d in (one, two))
    assert r2["data_parallel"] == "fsdp2" and r1["test_loss"] == pytest.approx(r2["test_loss"], rel=REL)


def test_each_rank_holds_half_the_state(runs):
    """Parameters, gradients and AdamW's two moments, as each rank's local shards hold them
    (``numel * element_size``): 1/2 of the single process's, within the rounding of a dim-0 split of
    odd length (torch.chunk: rank 0 takes the larger half); Adam's step counts (one scalar per
    tensor) are not sharded and count whole on each rank."""
    from safetensors.torch import load_file
    one, two = runs("reversible")
    whole = json.loads((one / "training_results.json").read_text())["state_bytes_per_rank"]
    ranks = json.loads((two / "training_results.json").read_text())["state_bytes_per_rank"]
    assert len(whole) == 1 and len(ranks) == 2
    whole = whole[0]
    shapes = [t.shape for t in load_file(str(one / "checkpoint" / "module.safetensors")).values()]
    params = len(load_file(str(one / "checkpoint" / "optimizer.safetensors"))) // 3  # step, exp_avg, exp_avg_sq
    steps = 4 * params  # float32 scalars
    slack = sum(4 * (t.numel() // t[0]) for t in shapes if len(t) and t[0] % 2)  # one float32 row of each
    for rank in ranks:
        for part in ("parameters", "gradients"):
            assert abs(rank[part] - whole[part] / 2) <= slack, (part, rank, whole)
        assert abs((rank["optimizer"] - steps) - (whole["optimizer"] - steps) / 2) <= 2 * slack, (rank, whole)
    assert sum(r["parameters"] for r in ranks) == whole["parameters"]
    assert sum(r["gradients"] for r in ranks) == whole["gradients"]
    assert sum(r["optimizer"] - steps for r in ranks) == whole["optimizer"] - steps
    per_rank = sum(ranks[0].values()) / sum(whole.values())
    assert per_rank <= 0.5 + (2 * slack + steps) / sum(whole.values()) + 1e-9, per_rank


@pytest.mark.slow  # reason: three 2-process trainer runs, about 2 minutes on 2 cores; the DDP resume test stays in the default run
def test_sharded_resume_after_kill(setup, runs, tmp_path):
    """A sharded run killed after step 3 (its checkpoint is step 2's) resumes into the sharded module
    and optimizer and continues step for step as the run that never stopped."""
    root, model, data = setup
    _, whole = runs("reversible")
    out = tmp_path / "cut"
    argv = _args(model, data, out, "--mode", "reversible", *FLAGS, "--nproc", "2", "--shard")
    env = dict(os.environ, BWSKC_FAULT_KILL_AT_STEP="3")
    killed = subprocess.run([sys.executable, "-m", "bwskc.cli", *argv], env=env, capture_output=True, text=True)
    assert killed.returncode == 1 and "SIGKILL" in killed.stderr, killed.stderr[-2000:]
    assert main(argv + ["--resume"]) == 0
    a, b = _metrics(out / DIRS["reversible"] / "metrics.jsonl"), _metrics(whole / "metrics.jsonl")
    assert [sorted(r) for r in a] == [sorted(r) for r in b]
    for x, y in zip(a, b):
        for key in x:
            if isinstance(x[key], float):
                assert y[key] == pytest.approx(x[key], rel=1e-6, abs=1e-9), (key, x, y)
            else:
                assert x[key] == y[key], (key, x, y)


# ----------------------------------------------------------------------- the coupling under resharding
def _compiled(rows: int):
    """The tiny GPT-2 compiled reversibly, from the same seed on every process, and its batch."""
    import bwskc
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**{k: v for k, v in GPT2.items() if k != "model_type"}))
    ids = torch.randint(0, GPT2["vocab_size"], (4, 16), generator=torch.Generator().manual_seed(1))
    return bwskc.compile(model, (ids[:rows],), mode="reversible", seed=0), ids


def _loss(module, ids, step: int, shard: int = 0):
    import torch.nn.functional as F
    module.reseed(0, step, shard=shard)
    out = module(ids)
    logits = out[0] if isinstance(out, (tuple, list)) else out
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def _worker(out: Path) -> None:
    """One rank: the module sharded with ``reshard_after_forward=True`` (the unsharded weights are
    freed after forward and gathered again in backward), two steps' gradients gathered whole."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor
    from bwskc.train.distributed import full, shard
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    module, ids = _compiled(2)
    assert len(module.chains) > 0
    shard(module, torch.device("cpu"), 2, reshard_after_forward=True)
    grads, freed = [], []
    for step in range(2):
        loss = _loss(module, ids[2 * rank:2 * rank + 2], step, shard=rank) / 2  # the mean of the two halves
        # resharded after forward: the unsharded weights the chains saved for backward are freed now
        freed.append(all(isinstance(p, DTensor) for p in module.parameters()))
        loss.backward()
        grads.append({n: full(p.grad) * 2 for n, p in module.named_parameters()})  # summed over ranks / 2
        module.zero_grad(set_to_none=True)
    if rank == 0:
        torch.save({"grads": grads, "freed": freed}, out)
    dist.destroy_process_group()


def test_coupling_backward_after_reshard(tmp_path):
    """FSDP2 with ``reshard_after_forward=True`` frees the unsharded weights between forward and
    backward and refills the same tensors in backward: the reversible chains' saved weights are
    those tensors, so the sharded gradients equal one process's on the whole batch (dropout on)."""
    from bwskc.train.distributed import free_port
    out = tmp_path / "grads.pt"
    env = dict(os.environ, WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, __file__, str(out)], env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    got = torch.load(out)
    assert all(got["freed"])
    module, ids = _compiled(4)
    for step in range(2):
        # the two ranks' losses are means over their halves: the whole batch's mean is their mean
        _loss(module, ids, step).backward()
        for name, p in module.named_parameters():
            want, have = p.grad, got["grads"][step][name]
            if name.endswith("attn.c_attn.bias"):  # the key bias: zero exactly, noise as computed
                w = GPT2["n_embd"]
                want, have = torch.cat([want[:w], want[2 * w:]]), torch.cat([have[:w], have[2 * w:]])
            assert _rel(have, want) <= REL, (step, name, _rel(have, want))
        module.zero_grad(set_to_none=True)


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
