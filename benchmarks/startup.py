"""Start-up time of the ``bwskc`` command: ``bwskc --help`` and each subcommand's ``--help``.

    python benchmarks/startup.py [--repeat 5]

Each command runs in a fresh process (``python -m bwskc.cli ...``, what the ``bwskc`` script runs) and
is timed wall-clock and in CPU time (the child's user + system seconds), best and median of
``--repeat`` runs; the CPU time is the figure to trust on a loaded machine. It also reports which of
torch, transformers and triton the parser imports (none is the aim: each command imports what it needs
when it runs). A benchmark, not a test: the suite checks the imports (tests/test_newcomer.py), not
the seconds.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ([], ["lower"], ["parse"], ["check-evidence"], ["check-gradients"], ["train"])


def _time(argv: list[str]) -> tuple[float, float]:
    before = os.times()
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "bwskc.cli", *argv, "--help"], cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    after = os.times()
    if done.returncode != 0:
        raise SystemExit(f"bwskc {' '.join(argv)} --help failed: {done.stderr.strip()}")
    cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    return wall, cpu


def _heavy_imports() -> list[str]:
    code = ("import sys, bwskc.cli as c; c.build_parser(); "
            "print(','.join(m for m in ('torch', 'transformers', 'triton') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return [m for m in out.stdout.strip().split(",") if m]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=5, help="runs per command (default: %(default)s)")
    args = p.parse_args()
    print(f"{'command':<32} {'wall best':>10} {'wall median':>12} {'cpu best':>9} {'cpu median':>11}")
    worst = 0.0
    for argv in COMMANDS:
        runs = [_time(argv) for _ in range(args.repeat)]
        walls, cpus = [r[0] for r in runs], [r[1] for r in runs]
        worst = max(worst, min(walls))
        name = " ".join(["bwskc", *argv, "--help"])
        print(f"{name:<32} {min(walls):>9.3f}s {statistics.median(walls):>11.3f}s {min(cpus):>8.3f}s "
              f"{statistics.median(cpus):>10.3f}s")
    heavy = _heavy_imports()
    print(f"heavy modules imported by the parser: {', '.join(heavy) or 'none'}")
    print(f"slowest best wall time: {worst:.3f} s ({'under' if worst < 1 else 'OVER'} the 1 s aim)")
    return 0 if worst < 1 and not heavy else 1


if __name__ == "__main__":
    sys.exit(main())
