"""Child processes that end when the process that started them dies.

A process killed with SIGKILL (kill -9, the OOM killer, a scheduler's timeout) runs no cleanup,
so the pool workers it forked and the commands it started live on, re-parented to init, holding
memory and cores. `die_with_parent` asks the kernel to SIGKILL the calling process the moment
its parent dies (Linux's PR_SET_PDEATHSIG); call it first thing in a pool worker (an
initializer) or, through `parent_death_kill()`, as a subprocess's `preexec_fn` (it holds
across exec).

Trade-offs: Linux only (elsewhere it does nothing, and children outlive a killed parent as
before). The signal comes when the *thread* that forked the child ends, not only the process:
fork from the main thread, or from a thread that lives as long as the child should. A program
run through it that is set-user-ID, or that resets its own parent-death signal, drops it.
A `preexec_fn` runs between fork and exec, which Python warns may deadlock when another
thread of the parent held a lock at the fork; the one here only calls prctl (looked up when
this module is imported, not in the child) and getppid.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable

_PR_SET_PDEATHSIG = 1
_prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None


def die_with_parent(parent: int) -> None:
    """Have the kernel SIGKILL this process when its parent dies; `parent` is the pid of the
    parent that started it (`os.getpid()` read there). If that parent is already gone (it died
    before the call: this process was re-parented), exit at once. A no-op off Linux.
    Raises OSError when prctl refuses."""
    if _prctl is None:
        return
    if _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_PDEATHSIG): {os.strerror(err)}")
    if os.getppid() != parent:
        os._exit(1)


def parent_death_kill() -> Callable[[], None]:
    """A `preexec_fn` for subprocess.Popen/run, made in the parent: the started command is
    SIGKILLed when this process (the thread that starts it) dies."""
    parent = os.getpid()
    return lambda: die_with_parent(parent)
