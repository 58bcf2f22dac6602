"""Run deeply recursive work (term construction, printing, equality) on a thread with a large stack.

Combinator terms nest as deep as the longest chain of shared values in a definition (Mamba's unrolled
scan nests hundreds of levels), which overflows CPython's default recursion limit and C stack.
"""
from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
_STACK_BYTES = 512 * 1024 * 1024
_RECURSION_LIMIT = 200_000
_local = threading.local()


def run_deep(fn: Callable[..., T], *args, **kwargs) -> T:
    """Call fn on a big-stack thread (or directly when already on one), re-raising its exception."""
    if getattr(_local, "deep", False):
        return fn(*args, **kwargs)
    box: dict = {}

    def target():
        _local.deep = True
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # re-raised on the caller's thread
            box["error"] = exc

    old_size = threading.stack_size(_STACK_BYTES)
    old_limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(old_limit, _RECURSION_LIMIT))
    try:
        thread = threading.Thread(target=target, name="bwskc-deep")
        thread.start()
        thread.join()
    finally:
        threading.stack_size(old_size)
    if "error" in box:
        raise box["error"]
    return box["value"]
