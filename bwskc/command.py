"""Running a command the way ``bwskc`` reports it: exit status 0 on success, 2 on bad input (one line on
stderr, no traceback), 1 on an internal error (``BWSKC_DEBUG=1`` shows the traceback), 130 on Ctrl-C.

Shared by the command line (``bwskc.cli.main``) and the trainer's worker processes
(``python -m bwskc.train.worker``), which report the same way. Importing it does not import torch.
"""
from __future__ import annotations

import logging
import os
import sys
import warnings

from bwskc.errors import BwskError, IRSyntaxError

__all__ = ["guarded", "quiet", "quiet_torch"]


def quiet(torch_logs: bool = True) -> None:
    """Silence warnings and the libraries' own logging (a command's output is its own lines)."""
    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if torch_logs:
        quiet_torch()


def quiet_torch() -> None:
    """Silence torch's logs (imports torch): torch logs tracebacks of its own before our one-line error."""
    import torch._logging
    torch._logging.set_logs(all=logging.CRITICAL)


def guarded(body, torch_logs: bool = True) -> int:
    """Run ``body`` as a command: 0 on success, one line on stderr and 2 on bad input (1 where the
    error says so, such as a diverged training run), 1 on an internal error; no traceback.
    ``torch_logs=False``: the body quiets torch's logs itself, once it knows it needs torch."""
    quiet(torch_logs)
    try:
        body()
        return 0
    except IRSyntaxError as exc:
        print(f"bwskc: {exc}\n{exc.caret_display()}", file=sys.stderr)
        return 2
    except BwskError as exc:
        if str(exc):  # empty: a child process said it already
            print(f"bwskc: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", 2)
    except KeyboardInterrupt:
        print("bwskc: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception as exc:  # an internal error: say so plainly
        if os.environ.get("BWSKC_DEBUG"):
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"bwskc: internal error: {type(exc).__name__}: {first} (BWSKC_DEBUG=1 shows the "
              "traceback)", file=sys.stderr)
        return 1
