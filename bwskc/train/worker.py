"""One variant's run in its own process: ``python -m bwskc.train.worker CONFIG.json``.

Each variant of ``bwskc train --mode all`` runs in a fresh process, so that its peak resident memory is
its own (a process's peak never goes down) and one variant's allocations cannot flatter or burden the
next. With ``--nproc N`` the launcher starts N of these, one per rank.
"""
from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

from bwskc.train.loop import RunConfig, Trainer, World

RESULTS = "training_results.json"


def run_variant(cfg: RunConfig, world: World = World(), log=None) -> dict:
    """Train one variant; the main rank writes ``training_results.json`` and returns the results."""
    log = log or (lambda message: print(message, flush=True))  # a log file sees progress as it happens
    trainer = Trainer(cfg, world, log=log if world.main else (lambda *a: None))
    results = trainer.run()
    if world.main:
        (Path(cfg.out) / RESULTS).write_text(json.dumps(results, indent=1) + "\n")
    return results


def write_config(cfg: RunConfig, path: Path) -> None:
    path.write_text(json.dumps(asdict(cfg), indent=1) + "\n")


def read_config(path: str) -> RunConfig:
    return RunConfig(**json.loads(Path(path).read_text()))


def main(argv=None) -> int:
    from bwskc.cli import guarded
    from bwskc.train import distributed
    args = sys.argv[1:] if argv is None else argv

    def body():
        cfg = read_config(args[0])
        world = distributed.join(cfg.device)
        try:
            run_variant(cfg, world)
        finally:
            distributed.leave()
    return guarded(body)  # a failing rank prints its line; the launcher then stops the others quietly


if __name__ == "__main__":
    sys.exit(main())
