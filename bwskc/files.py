"""Writing files the way the user expects: whole or not at all, with the mode ``open()`` would give.

Shared by the command line (``bwskc lower -o``, ``--weights-out``) and the trainer (checkpoints, the
published model, results): a kill or an error leaves the old file or the new one, never half of one,
and files written through a temporary (``mkstemp``, safetensors) get the umask's mode, not 0600.
Imports neither torch nor anything else heavy, so the CLI can import it at start-up.
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from bwskc.errors import BwskError

__all__ = ["umask_mode", "honour_umask", "write_output", "write_text_atomic"]


def umask_mode(mode: int = 0o666) -> int:
    """``mode`` less the process's umask: what ``open(path, "w")`` gives a new file (0644 under 022)."""
    try:  # Linux: read it, rather than set and restore it (which another thread could see)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return mode & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    current = os.umask(0o022)
    os.umask(current)
    return mode & ~current


def honour_umask(*paths: Path) -> None:
    """Give files the mode ``open()`` would (0644 under umask 022): safetensors writes through a
    temporary file and leaves 0600, and the published model and checkpoints are the user's to share."""
    mode = umask_mode()
    for path in paths:
        os.chmod(path, mode)


def write_output(text: str, output: str | None) -> None:
    """Print, or replace OUTPUT atomically (a failure leaves an existing file untouched)."""
    if output is None:
        sys.stdout.write(text)
        return
    target = Path(output)
    if target.is_dir():
        raise BwskError(f"{output}: is a directory")
    directory = target.parent if str(target.parent) else Path(".")
    if not directory.is_dir():
        raise BwskError(f"{output}: directory {directory} does not exist")
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{target.name}.", suffix=".tmp")
    except OSError as exc:
        raise BwskError(f"{output}: cannot write ({exc.strerror})") from None
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, umask_mode())  # mkstemp makes 0600; the file is the user's, as open() would make it
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    """Replace ``path`` whole: a kill leaves the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
