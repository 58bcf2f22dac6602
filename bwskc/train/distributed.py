"""``--nproc N``: data-parallel training through torch.distributed, launched as torchrun does.

The launcher starts N copies of ``python -m bwskc.train.worker`` with ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` set; each joins the group (gloo on CPU, nccl on
CUDA), takes its slice of every global batch and wraps the compiled module in
``DistributedDataParallel`` (gradients averaged, so a step equals one process's step on the whole global
batch). A worker started by ``torchrun`` itself finds the same variables and joins the same way.
"""
from __future__ import annotations

import datetime
import os
import socket
import subprocess
import sys
import time

from bwskc.train.loop import World


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(config_path: str, nproc: int) -> int:
    """Run the worker on ``nproc`` processes; the exit status is the first failing rank's (0 if none)."""
    port = free_port()
    procs = []
    for rank in range(nproc):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS=os.environ.get(
                       "OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc))))
        procs.append(subprocess.Popen([sys.executable, "-m", "bwskc.train.worker", config_path], env=env))
    # The first rank to fail ends the group: the others would wait in a collective until its timeout.
    while True:
        codes = [p.poll() for p in procs]
        failed = next((c for c in codes if c), None)
        if failed is not None:
            for p in procs:
                if p.poll() is None:
                    p.terminate()
            for p in procs:
                p.wait()
            return failed if failed > 0 else 1  # killed by a signal: a failure, not bad input
        if all(c == 0 for c in codes):
            return 0
        time.sleep(0.2)


def join(device: str) -> World:
    """Join the group the environment describes (a lone process when WORLD_SIZE is absent or 1)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    import torch.distributed as dist
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=10))
    rank = dist.get_rank()
    if device.startswith("cuda"):
        import torch
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    return World(rank=rank, size=size)


def leave() -> None:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
