"""Child processes that die with the launcher, and whose stderr is kept for error reports."""

from __future__ import annotations

import collections
import ctypes
import functools
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence

_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent_pid: int) -> None:
    # Linux: a kill -9 of the launcher must not leave an orphaned executor or router. Runs in
    # the child between fork and exec. The signal comes when the thread that forked the child
    # exits: the supervisor starts every child from its main thread.
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        return
    # A parent that died before prctl ran sends nothing: the child was reparented already.
    if os.getppid() != parent_pid:
        os._exit(1)


class Child:
    """A supervised process; its stderr is echoed to ours and the tail kept."""

    def __init__(self, name: str, argv: Sequence[str], env: dict[str, str] | None = None):
        self.name = name
        self.tail: collections.deque[str] = collections.deque(maxlen=40)
        self.proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=None,
            stderr=subprocess.PIPE,
            env=env,
            preexec_fn=functools.partial(_die_with_parent, os.getpid()),
            # Its own process group, so that `kill` reaches what it started too (mpirun's ranks).
            process_group=0,
        )
        self._pump = threading.Thread(target=self._echo, name=f"{name}-stderr", daemon=True)
        self._pump.start()

    def _echo(self) -> None:
        assert self.proc.stderr is not None
        for raw in iter(self.proc.stderr.readline, b""):
            line = raw.decode("utf-8", "replace")
            self.tail.append(line.rstrip("\n"))
            sys.stderr.write(line)
            sys.stderr.flush()

    def poll(self) -> int | None:
        return self.proc.poll()

    def error_tail(self, lines: int = 15) -> str:
        self._pump.join(timeout=2)
        return "\n".join(list(self.tail)[-lines:])

    def terminate(self, timeout: float) -> int | None:
        """SIGTERM, then SIGKILL to its process group after `timeout` seconds."""
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
            except ProcessLookupError:
                pass
        return self.proc.returncode

    def kill(self) -> int | None:
        """SIGKILL to its whole process group, at once: for a child that is stuck, not one
        that is draining."""
        try:
            # The group outlives its leader while any member lives; the id is not reused then.
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # the group is gone already
        self.proc.wait()
        return self.proc.returncode

    @property
    def pid(self) -> int:
        return self.proc.pid


def python_module_argv(module: str, args: Sequence[str]) -> list[str]:
    return [sys.executable, "-u", "-m", module, *args]


def env_without(names: Sequence[str]) -> dict[str, str]:
    env = dict(os.environ)
    for n in names:
        env.pop(n, None)
    return env
