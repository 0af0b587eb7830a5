"""The points between the steps of long model work, where its caller may step in.

Decoding is many small model calls (one per generated token); a caller that shares one thread
between several models should not have to wait for a whole translation before it can run a
one-sentence embedding, nor finish a translation whose client has gone. Every loop of long work
calls :func:`checkpoint` once per step. Without a hook installed it does nothing. A caller installs
one with :func:`between_steps` around a call, on the thread that makes the call: the hook may run
other, short work on the same thread, and raises :class:`~quantization.errors.Abandoned` to stop
the call (nothing of the stopped work is returned).
"""

from __future__ import annotations

import contextlib
import threading
from typing import Callable, Iterator

_local = threading.local()


@contextlib.contextmanager
def between_steps(hook: Callable[[], None]) -> Iterator[None]:
    """Call ``hook`` at every :func:`checkpoint` this thread reaches inside the block (innermost hook wins)."""
    previous = getattr(_local, "hook", None)
    _local.hook = hook
    try:
        yield
    finally:
        _local.hook = previous


def checkpoint() -> None:
    """Between two steps of long work: run the caller's hook, if one is installed on this thread."""
    hook = getattr(_local, "hook", None)
    if hook is not None:
        hook()
