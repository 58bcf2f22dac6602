"""Checking a sharded run against the eager model: N processes spawned here (gloo, this machine), each
compiling the model with ``shard={axis: N}`` and running forward and backward on the same whole
inputs; the outputs, every parameter's gradient, the updated buffers and (for a training capture) the
evaluation output are compared with the eager model's, and the collectives each call ran with the
schedule's prediction. ``bwskc check-shard`` and the tests use it.

A case is a dict (picklable, so spawned processes rebuild everything themselves):
``model`` (a zoo name, ``bwskc.testing``), ``axis``, ``train`` (capture and run in training mode),
``shape`` (the input's shape: ``[batch, seq]`` token ids or ``[batch, C, H, W]`` pixels), ``seed``; or
``build``, ``"module:function"`` called with the case and returning ``(model, inputs)`` (tests' own
models; a case comes from code, never from a file); ``reference``: ``"compiled"`` compares with the
single-process conventional module (``bwskc.compile``, both reseeded alike) instead of the eager model,
which is how a training run with dropout is checked: its masks are counter-based, drawn at the same
global coordinates on every shard.
"""
from __future__ import annotations

import json
import os
import socket
import tempfile

import torch


GRAD_FLOOR = 1e-3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _inputs(model, shape, seed):
    g = torch.Generator().manual_seed(seed)
    if len(shape) == 2:  # token ids
        vocab = model.config.vocab_size
        return (torch.randint(0, vocab, tuple(shape), generator=g),)
    return (torch.randn(tuple(shape), generator=g),)


def _first(x):
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (tuple, list)):
        return x[0]
    return x.logits  # a transformers ModelOutput


def _rel(a: torch.Tensor, b: torch.Tensor, floor: float = 0.0) -> float:
    """max |a - b| over max |b|; the scale is at least ``floor`` (a gradient that is zero in exact
    arithmetic, as a key projection's bias is under softmax, is rounding noise on both sides)."""
    scale = max(b.abs().max().item(), floor)
    return (a - b).abs().max().item() / (scale if scale > 0 else 1.0)


def run_case(case: dict) -> dict:
    """One case on this process (the group is initialised): the errors and the communication."""
    import importlib

    import bwskc
    from bwskc.testing import build_zoo_model
    torch.manual_seed(0)
    if "build" in case:  # "module:function", called with the case: (model, inputs)
        mod, _, fn = case["build"].partition(":")
        model, inputs = getattr(importlib.import_module(mod), fn)(case)
        model.train(case.get("train", False))
    else:
        model = build_zoo_model(case["model"]).train(case.get("train", False))
        inputs = _inputs(model, case["shape"], case.get("seed", 0))
    sharded = bwskc.compile(model, inputs, shard={case["axis"]: case["nproc"]})
    sharded.train(case.get("train", False))
    if case.get("reference") == "compiled":
        # the single-process conventional module: the same counter-based random numbers (dropout in
        # training), which the eager model's generator does not draw
        model = bwskc.compile(model, inputs).train(case.get("train", False))
        model.reseed(case.get("seed", 0) + 7)
        sharded.reseed(case.get("seed", 0) + 7)
    out = _first(sharded(*inputs))
    log = list(sharded.comm.log)
    predicted = list(sharded.schedule.comm)
    ref = _first(model(*inputs))
    weight = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1))
    (out * weight).sum().backward()
    (ref * weight).sum().backward()
    eager = dict(model.named_parameters(remove_duplicate=False))
    own = dict(sharded.named_parameters(remove_duplicate=False))
    for n, p in own.items():  # a tied weight the reference holds under its other name only
        if n not in eager:
            eager[n] = next((eager[m] for m, q in own.items() if q is p and m in eager), None)
    pairs = [(n, p.grad, eager[n].grad) for n, p in sharded.named_parameters()
             if eager[n] is not None and eager[n].grad is not None and p.grad is not None]
    # gradients are compared at a scale of at least 1e-3 of the largest one (GRAD_FLOOR)
    floor = GRAD_FLOOR * max((g.abs().max().item() for _, _, g in pairs), default=0.0)
    grads = {n: _rel(a, b, floor) for n, a, b in pairs}
    missing = sorted(n for n, p in sharded.named_parameters() if eager[n] is None or (p.grad is None) !=
                     (eager[n].grad is None))
    bufs = dict(model.named_buffers())
    buffers = {n: _rel(b.double(), bufs[n].double()) for n, b in sharded.named_buffers() if n in bufs}
    result = {"forward": _rel(out, ref), "gradient": max(grads.values(), default=0.0), "worst": max(grads, key=grads.get, default=None),
              "gradients_checked": len(grads), "missing_gradients": missing,
              "buffers": max(buffers.values(), default=0.0), "log": log, "predicted": predicted,
              "steps": {str(s): [st.collective for st in v] for s, v in sharded.schedule.steps.items()
                        if any(st.collective for st in v)}}
    if case.get("train", False):
        sharded.eval()
        model.eval()
        with torch.no_grad():
            ref_eval = _first(model(*inputs))
            result["eval"] = _rel(_first(sharded(*inputs)), ref_eval)
        # how far training's output is from evaluation's: dropout was on (not a vacuous comparison)
        result["train_vs_eval"] = _rel(ref.detach(), ref_eval)
    return result


def _worker(rank: int, nproc: int, port: int, cases: list, out_path: str) -> None:
    import torch.distributed as dist
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=nproc)
    try:
        results = []
        for case in cases:
            try:
                results.append(run_case({**case, "nproc": nproc}))
            except Exception as exc:  # noqa: BLE001 - reported per case, the others still run
                results.append({"error": f"{type(exc).__name__}: {exc}"})
        if rank == 0:
            with open(out_path, "w") as f:
                json.dump(results, f)
    finally:
        dist.destroy_process_group()


def check_sharded(cases: list[dict], nproc: int = 2) -> list[dict]:
    """Run every case on ``nproc`` spawned processes; rank 0's results, one dict per case."""
    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "results.json")
        mp.start_processes(_worker, args=(nproc, _free_port(), cases, path), nprocs=nproc,
                           start_method="spawn")
        with open(path) as f:
            return json.load(f)
