"""One variant's run in its own process: ``python -m bwskc.train.worker CONFIG.json``.

Each variant of ``bwskc train --mode all`` runs in a fresh process, so that its peak resident memory is
its own (a process's peak never goes down) and one variant's allocations cannot flatter or burden the
next. With ``--nproc N`` the launcher starts N of these, one per rank. Started by the launcher, a worker
touches a heartbeat and leaves its one-line error in a file for the launcher to report
(``bwskc.train.distributed``).
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

RESULTS = "training_results.json"


def run_variant(cfg, world=None, log=None) -> dict:
    """Train one variant; the main rank writes ``training_results.json`` and returns the results."""
    from bwskc.files import write_text_atomic
    from bwskc.train.loop import Trainer, World
    world = world or World()
    log = log or (lambda message: print(message, flush=True))  # a log file sees progress as it happens
    trainer = Trainer(cfg, world, log=log if world.main else (lambda *a: None))
    results = trainer.run()
    if world.main:
        write_text_atomic(Path(cfg.out) / RESULTS, json.dumps(results, indent=1) + "\n")
    return results


def write_config(cfg, path: Path) -> None:
    path.write_text(json.dumps(asdict(cfg), indent=1) + "\n")


def read_config(path: str):
    from bwskc.errors import BwskError
    from bwskc.train.loop import RunConfig
    try:
        return RunConfig(**json.loads(Path(path).read_text()))
    except (OSError, ValueError, TypeError) as exc:
        raise BwskError(f"{path}: not a run configuration ({type(exc).__name__})") from None


def _train(config_path: str) -> None:
    import torch.distributed as dist

    from bwskc.errors import BwskError
    from bwskc.train import distributed
    from bwskc.train.run import write_error
    cfg = read_config(config_path)
    try:
        world = distributed.join(cfg.device, cfg.ddp_timeout)
        try:
            run_variant(cfg, world)
        finally:
            distributed.leave()
    except dist.DistError as exc:  # seen from here, another rank's failure (or a timeout waiting on it)
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        error = BwskError(f"{distributed.PEER_FAILED} ({type(exc).__name__}: {text[:200]}; "
                          f"--ddp-timeout {cfg.ddp_timeout:g} s)")
        error.exit_code = 1
        raise error from None
    except OSError as exc:
        raise BwskError(write_error(exc, Path(cfg.out))) from None


def main(argv=None) -> int:
    from bwskc.command import guarded
    from bwskc.train import distributed
    args = sys.argv[1:] if argv is None else argv
    where = distributed.supervised()
    if where is None or os.environ.get("BWSKC_DEBUG"):
        return guarded(lambda: _train(args[0]))
    distributed.start_heartbeat(where)
    rank = int(os.environ.get("RANK", "0"))
    stderr = sys.stderr

    def body():
        with contextlib.redirect_stderr(stderr):  # progress and warnings as usual; the error line below
            _train(args[0])
    with open(distributed.error_path(where, rank), "w") as errors, contextlib.redirect_stderr(errors):
        return guarded(body)  # the launcher reports it, naming the rank, and stops the others


if __name__ == "__main__":
    sys.exit(main())
