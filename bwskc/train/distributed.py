"""``--nproc N``: data-parallel training through torch.distributed, launched as torchrun does; and the
supervision of every worker process ``bwskc train`` starts.

The launcher starts N copies of ``python -m bwskc.train.worker`` with ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` set; each joins the group (gloo on CPU, nccl on
CUDA), takes its slice of every global batch and wraps the compiled module in
``DistributedDataParallel`` (gradients averaged, so a step equals one process's step on the whole global
batch). A worker started by ``torchrun`` itself finds the same variables and joins the same way.

Failing fast and loud: a rank that dies is named with its exit status or signal and the others are
stopped at once (they would wait for it in a collective); a rank that stops running (SIGSTOP, frozen) is
found by its heartbeat, a file its own thread touches every half second, going stale; a collective waits
at most ``--ddp-timeout`` seconds. SIGINT and SIGTERM sent to the launcher are passed on to the workers,
and a worker whose launcher is gone (even killed with SIGKILL) exits within a second. A worker's own
one-line error goes to a file the launcher reads, so the command prints one line, naming the rank.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from bwskc.errors import BwskError

SUPERVISOR_DIR = "BWSKC_SUPERVISOR_DIR"  # where a worker touches its heartbeat and leaves its error line
SUPERVISOR_PID = "BWSKC_SUPERVISOR_PID"  # the launcher: a worker whose parent is no longer it exits
HEARTBEAT_S = 0.5
POLL_S = 0.1
SETTLE_S = 0.5       # after a first failure, the time others that fail with it get to show up
STOP_GRACE_S = 5.0   # a signalled worker's time to exit before SIGKILL
LAUNCHER_GAP_S = 2.0  # a longer pause between two polls: the launcher itself was stopped (Ctrl-Z)
PEER_FAILED = "a collective failed"  # a worker's error that is another rank's failure seen from here


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stale_after(timeout_s: float) -> float:
    """Seconds without a heartbeat after which a running rank counts as stopped."""
    return min(timeout_s / 4, 30.0)


# ------------------------------------------------------------------------------------ the launcher
@dataclass
class _Worker:
    rank: int
    proc: subprocess.Popen
    started: float            # time.time() at start
    heartbeat: Path
    error: Path
    ended: float | None = None  # time.monotonic() when first seen ended

    @property
    def code(self) -> int | None:
        return self.proc.returncode


@dataclass
class _Failure:
    worker: _Worker
    message: str
    exit_code: int


class Terminated(BwskError):
    """The launcher got SIGTERM (or SIGHUP): the workers were given the same signal and stopped."""

    def __init__(self, signum: int, name: str):
        super().__init__(f"{name}: stopped by {signal.Signals(signum).name}; its worker processes were "
                         f"stopped too")
        self.exit_code = 128 + signum


def launch(config_path: str, nproc: int, name: str, timeout_s: float) -> None:
    """Run the worker on ``nproc`` processes (one, without torch.distributed, when ``nproc`` is 1) and
    watch them; a failure is one ``BwskError`` naming the rank, once every worker has ended."""
    with tempfile.TemporaryDirectory(prefix="bwskc-workers-") as tmp:
        workers = []
        try:
            with _signals_raise(name):
                port = free_port()
                workers = [_start(config_path, rank, nproc, port, Path(tmp)) for rank in range(nproc)]
                failure = _watch(workers, nproc, timeout_s)
        except KeyboardInterrupt:  # passed on as it came: each worker stops as if interrupted itself
            _stop(workers, signal.SIGINT)
            raise
        except BaseException:  # SIGTERM or SIGHUP (Terminated), or the launcher's own failure
            _stop(workers, signal.SIGTERM)
            raise
        if failure is not None:
            _stop(workers, signal.SIGTERM)
            raise _error(failure, nproc, name)


def _start(config_path: str, rank: int, nproc: int, port: int, tmp: Path) -> _Worker:
    env = dict(os.environ, **{SUPERVISOR_DIR: str(tmp), SUPERVISOR_PID: str(os.getpid())})
    if nproc > 1:
        env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS=os.environ.get(
                       "OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc))))
    proc = subprocess.Popen([sys.executable, "-m", "bwskc.train.worker", config_path], env=env)
    return _Worker(rank, proc, time.time(), heartbeat_path(tmp, rank), error_path(tmp, rank))


def heartbeat_path(directory: Path, rank: int) -> Path:
    return directory / f"rank{rank}.alive"


def error_path(directory: Path, rank: int) -> Path:
    return directory / f"rank{rank}.err"


@contextlib.contextmanager
def _signals_raise(name: str):
    """SIGTERM and SIGHUP raise ``Terminated`` here (SIGINT raises KeyboardInterrupt already), so that
    the workers are stopped rather than orphaned. Only the main thread can set handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated(signum, name)
    saved = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in saved.items():
            signal.signal(s, h)


def _watch(workers: list[_Worker], nproc: int, timeout_s: float) -> _Failure | None:
    """Poll until every worker ended well (None) or one failed: died, or (with peers waiting on it)
    stopped beating."""
    last_poll = time.monotonic()
    baseline = time.time()  # heartbeats count from here (moved on when the launcher itself was stopped)
    while True:
        now = time.monotonic()
        if now - last_poll > LAUNCHER_GAP_S:
            baseline = time.time()
        last_poll = now
        _reap(workers)
        if any(w.code not in (None, 0) for w in workers):
            time.sleep(SETTLE_S)
            _reap(workers)
            return _culprit([w for w in workers if w.code not in (None, 0)], nproc)
        if all(w.code == 0 for w in workers):
            return None
        if nproc > 1:  # a lone worker may be paused and continued: nobody waits on it
            silent = _silent(workers, baseline, timeout_s)
            if silent is not None:
                return silent
        time.sleep(POLL_S)


def _reap(workers: list[_Worker]) -> None:
    for w in workers:
        if w.proc.poll() is not None and w.ended is None:
            w.ended = time.monotonic()


def _silent(workers: list[_Worker], baseline: float, timeout_s: float) -> _Failure | None:
    """A running worker whose heartbeat is stale (or, before its first one, a worker that has not
    started within the whole timeout: importing torch takes seconds, not minutes)."""
    now = time.time()
    for w in workers:
        if w.code is not None:
            continue
        try:
            age, limit = now - max(w.heartbeat.stat().st_mtime, baseline), stale_after(timeout_s)
        except FileNotFoundError:
            age, limit = now - max(w.started, baseline), timeout_s
        if age > limit:
            return _Failure(w, f"{_label(w, 2)} (pid {w.proc.pid}) stopped responding: no heartbeat for "
                            f"{age:.0f} s{_proc_state(w.proc.pid)} (--ddp-timeout {timeout_s:g})", 1)
    return None


def _proc_state(pid: int) -> str:
    """What Linux says the process is doing, when it explains the silence."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""
    return {"T": "; it is stopped (SIGSTOP or SIGTSTP)", "t": "; it is stopped by a debugger",
            "D": "; it is waiting on I/O", "Z": "; it has exited"}.get(state, "")


def _label(w: _Worker, nproc: int) -> str:
    return f"rank {w.rank}" if nproc > 1 else "its worker process"


def _culprit(failed: list[_Worker], nproc: int) -> _Failure:
    """The failure that caused the others: a death by signal (no rank dies of another's), then a
    failure of the rank's own (bad input, divergence), then a collective that failed; the earliest."""
    def order(w: _Worker):
        text = _error_text(w)
        kind = 0 if w.code < 0 else (2 if PEER_FAILED in text else 1)
        return kind, w.ended
    w = min(failed, key=order)
    if w.code < 0:
        return _Failure(w, f"{_label(w, nproc)} (pid {w.proc.pid}) was killed by "
                        f"{_signal_name(-w.code)}", 1)
    text = _error_text(w)
    if nproc == 1 and text:
        return _Failure(w, text, w.code)  # the worker's own line, as if it had run here
    said = f": {text}" if text else " and printed nothing"
    return _Failure(w, f"{_label(w, nproc)} (pid {w.proc.pid}) failed with exit status {w.code}{said}", w.code)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _error_text(w: _Worker) -> str:
    try:
        text = w.error.read_text(errors="replace").strip()
    except OSError:
        return ""
    return text[len("bwskc: "):] if text.startswith("bwskc: ") else text


def _error(failure: _Failure, nproc: int, name: str) -> BwskError:
    message = failure.message
    if nproc > 1:
        message = f"{name}: {message}; the other ranks were stopped"
    elif failure.worker.code is None or failure.worker.code < 0:
        message = f"{name}: {message}"
    exc = BwskError(message)
    exc.exit_code = failure.exit_code
    return exc


def _stop(workers: list[_Worker], sig: int) -> None:
    """Give every running worker ``sig`` (and SIGCONT, so a stopped one acts on it), then SIGKILL what
    is still there after the grace period."""
    running = [w for w in workers if w.proc.poll() is None]
    for w in running:
        with contextlib.suppress(ProcessLookupError):
            w.proc.send_signal(sig)
            w.proc.send_signal(signal.SIGCONT)
    deadline = time.monotonic() + STOP_GRACE_S
    for w in running:
        try:
            w.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            w.proc.kill()
            w.proc.wait()


# ------------------------------------------------------------------------------------ the worker side
def supervised() -> Path | None:
    """The launcher's directory when this process is a worker it started, else None."""
    where = os.environ.get(SUPERVISOR_DIR)
    return Path(where) if where else None


def start_heartbeat(directory: Path) -> None:
    """Touch this rank's heartbeat every HEARTBEAT_S in a daemon thread (a stopped or frozen process
    stops touching it); exit at once when the launcher is gone, rather than train for nobody."""
    rank = int(os.environ.get("RANK", "0"))
    launcher = int(os.environ.get(SUPERVISOR_PID, "0"))
    path = heartbeat_path(directory, rank)

    def beat():
        while True:
            if launcher and os.getppid() != launcher:
                os._exit(1)
            with contextlib.suppress(OSError):
                path.touch()
            time.sleep(HEARTBEAT_S)
    threading.Thread(target=beat, name="bwskc-heartbeat", daemon=True).start()


def join(device: str, timeout_s: float = 300.0):
    """Join the group the environment describes (a lone process when WORLD_SIZE is absent or 1)."""
    from bwskc.train.loop import World
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    import torch.distributed as dist
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    rank = dist.get_rank()
    if device.startswith("cuda"):
        import torch
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    return World(rank=rank, size=size)


def leave() -> None:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------ --shard (FSDP2)
def shard(module, device, size: int, reshard_after_forward: bool | None = None):
    """``module`` fully sharded over the group's ``size`` ranks, in place (FSDP2 ``fully_shard`` on a
    1-D mesh; gloo on CPU, nccl on CUDA): each rank keeps its dim-0 slice of every parameter, of its
    gradient and of the optimizer's state, as DTensors; the parameters are all-gathered before forward
    and the gradients reduce-scattered (averaged) after backward, so a step is DDP's step.

    The whole compiled module is one FSDP unit. Its parameters are read through ``get_attr`` nodes of
    one fx graph, so no submodule's ``forward`` runs and a per-layer unit would never be unsharded; as
    the root unit, it is not resharded between forward and backward (FSDP2's default for the root).
    The coupling chains' ``save_for_backward`` holds the unsharded parameters, the same tensors FSDP
    frees and refills in place (version counters preserved), so their backward reads valid weights even
    with ``reshard_after_forward=True`` (``tests/test_fsdp.py`` checks both). The module must be built
    identically on every rank (same seed): FSDP2 shards each rank's copy and broadcasts nothing."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh(device.type, (size,), mesh_dim_names=("shard",))
    fully_shard(module, mesh=mesh, reshard_after_forward=reshard_after_forward)
    _keep_fx_call(module)
    return module


def _keep_fx_call(module) -> None:
    """fully_shard swaps the module's class for a subclass (``FSDP<cls>``); a GraphModule that then
    recompiles (``train()``/``eval()`` switch the compiled module's graph) would give that subclass its
    own ``_wrapped_call``, which calls ``super(FSDP<cls>).__call__``: the base's ``call_wrapped``, which
    looks up ``_wrapped_call`` on the instance again, for ever (a RecursionError, or a segfault under
    gloo). Giving the subclass the base's wrapper keeps one ``nn.Module.__call__`` at the end."""
    cls = type(module)
    if "_wrapped_call" in vars(cls):
        return
    base = next((c for c in cls.__mro__[1:] if "_wrapped_call" in vars(c)), None)
    if base is not None:
        cls._wrapped_call = vars(base)["_wrapped_call"]


def _is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor
    return isinstance(t, DTensor)


def local(t):
    """A DTensor's local shard (a plain tensor is its own)."""
    return t.to_local() if _is_dtensor(t) else t


def full(t):
    """A DTensor gathered whole on every rank (a collective: every rank must call it, in the same
    order); a plain tensor as it is."""
    return t.full_tensor() if _is_dtensor(t) else t


def gathered_module_state(module, keep: bool) -> dict | None:
    """The module's state dict with every sharded tensor gathered whole, one at a time, as CPU
    tensors on the rank that ``keep``s it (the main rank; the others take part and get None)."""
    state = {}
    for k, v in module.state_dict().items():
        v = full(v)
        if keep:
            state[k] = v.detach().to("cpu", copy=True).contiguous()
    return state if keep else None


def gathered_optimizer_state(opt, keep: bool) -> dict | None:
    """``opt.state_dict()`` with its sharded states gathered whole (as ``gathered_module_state``): the
    same layout, parameter indices and all, as a single process's optimizer writes."""
    sd = opt.state_dict()
    out = {}
    for index in sorted(sd["state"]):
        entry = {}
        for name, value in sd["state"][index].items():
            value = full(value) if hasattr(value, "shape") else value
            if keep and hasattr(value, "shape"):
                value = value.detach().to("cpu", copy=True)
            entry[name] = value
        out[index] = entry
    return {"state": out, "param_groups": sd["param_groups"]} if keep else None


def state_bytes(module, opt) -> dict:
    """This rank's bytes of parameters, gradients and optimizer states (local shards' ``numel *
    element_size``; the whole tensors in a run that does not shard)."""
    def size(t):
        t = local(t)
        return t.numel() * t.element_size()
    params = list(module.parameters())
    return {"parameters": sum(size(p) for p in params),
            "gradients": sum(size(p.grad) for p in params if p.grad is not None),
            "optimizer": sum(size(v) for s in opt.state.values() for v in s.values() if hasattr(v, "numel"))}
