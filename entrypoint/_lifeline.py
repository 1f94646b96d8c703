"""The child's lifeline: the user's command and everything it started die with the supervisor.

Two guards, because a SIGKILLed supervisor runs no code of its own:

- the child: ``PR_SET_PDEATHSIG`` (Linux, via ``prctl``), armed between fork and exec, so the kernel SIGKILLs it
  when the supervisor's thread that started it ends. If the supervisor died before the arming, the child sees
  another parent and kills itself at once. Elsewhere (macOS) this guard is absent.
- its process group (grandchildren: ``torchrun``'s workers, a shell's jobs): a tiny watchdog process, in its own
  session so terminal signals pass it by, blocks on a pipe whose only writer is the supervisor. When the supervisor
  dies, the kernel closes the pipe, the read sees end-of-file, and the watchdog SIGKILLs the group. At a normal end
  the supervisor writes one byte first (:meth:`Lifeline.release`), and the watchdog leaves the group alone.

Descendants that left the group (``setsid``) escape both, as they escape the forwarded signals.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
from collections.abc import Callable

__all__ = ["Lifeline", "parent_death_signal"]

PR_SET_PDEATHSIG = 1
WATCHDOG = (
    "import os, signal, sys\n"
    "if os.read(0, 1) == b'':\n"  # end-of-file: the supervisor is gone without a word
    "    try:\n"
    "        os.killpg(int(sys.argv[1]), signal.SIGKILL)\n"
    "    except OSError:\n"
    "        pass\n"
)


def parent_death_signal() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the kernel SIGKILL the child when this process dies; None off Linux.

    ``prctl`` is looked up here, in the parent, so the forked child only makes the call.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong)
    parent = os.getpid()

    def arm() -> None:
        prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != parent:  # the supervisor died before the signal was armed
            os.kill(os.getpid(), signal.SIGKILL)

    return arm


class Lifeline:
    """The watchdog of process group ``pgid``: SIGKILLs it if this process dies before :meth:`release`."""

    def __init__(self, pgid: int) -> None:
        read_end, self._write_end = os.pipe()  # not inheritable: the child and others never hold the writer
        try:
            self._proc: subprocess.Popen[bytes] | None = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", WATCHDOG, str(pgid)],
                stdin=read_end,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        except OSError:
            self._proc = None  # the parent-death signal still guards the child itself
        finally:
            os.close(read_end)

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def release(self) -> None:
        """The supervisor is ending normally: tell the watchdog to leave the group alone, and collect it."""
        with contextlib.suppress(OSError):
            os.write(self._write_end, b"x")
        with contextlib.suppress(OSError):
            os.close(self._write_end)
        if self._proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired, ChildProcessError):
                self._proc.wait(timeout=5)
