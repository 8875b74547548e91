"""Graceful stops: SIGTERM (a scheduler's preemption notice) and SIGINT (Ctrl-C) end a run at a safe point.

Inside `fit`, a signal during a training step only sets a flag: the step finishes, the loop saves a checkpoint of
it and raises `Preempted`, so a rerun of the same command loses nothing. Outside a step (building the data,
compiling, evaluating) nothing is half-done that a checkpoint could keep, so the signal raises `Preempted` at
once; an interrupted evaluation is redone on resume because it is recorded only once complete. A second signal
always stops at once.

With several processes the signal may reach them at different steps; they agree on the stopping step through
JAX's preemption sync point (`multihost_utils.reached_preemption_sync_point`), which listens for SIGTERM itself.
"""

from __future__ import annotations

import contextlib
import signal
import threading

import jax


class Preempted(BaseException):
    """The run was stopped by a signal; `status` is the conventional exit status 128 + signal number.

    A BaseException, as KeyboardInterrupt: it is raised wherever the signal lands (outside a step), and a library's
    `except Exception` there (an import's fallback, a retry loop) would otherwise swallow the stop and go on."""

    def __init__(self, signum: int, message: str = "", mid_step: bool = False):
        self.signum = signum
        self.status = 128 + signum
        self.mid_step = mid_step  # raised inside a training step (a second signal): its state is incomplete
        super().__init__(message or f"stopped by {signal.Signals(signum).name}")


class StopSignals:
    """Context manager that turns SIGTERM / SIGINT into `Preempted` (immediately) or a request (`deferred()`).
    Nested use (the command, then `fit` inside it) shares the outer handlers."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)
    _active: StopSignals | None = None

    def __init__(self):
        self.requested: int | None = None
        self._defer = False
        self._previous = {}
        self._outer = None

    def __enter__(self) -> StopSignals:
        if StopSignals._active is not None:
            self._outer = StopSignals._active
            return self._outer
        StopSignals._active = self
        for s in self.SIGNALS:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if self._outer is not None:
            return
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        StopSignals._active = None
        if exc_type is None and self.requested is not None:
            raise Preempted(self.requested)  # a stop whose exception was swallowed (see _handle) ends here

    def _handle(self, signum, frame) -> None:
        first = self.requested is None
        # Recorded before raising: Python drops an exception raised where it runs code on its own behalf (a gc
        # callback such as JAX's, a __del__, a weakref callback: "Exception ignored in ..."). The stop then still
        # happens at the next guarded step (`deferred` raises on entry, `should_stop` after a step) or on exit.
        if first:
            self.requested = signum
        if self._defer and first:
            return  # the loop saves after this step and raises
        raise Preempted(signum, mid_step=self._defer)

    @contextlib.contextmanager
    def deferred(self):
        """While inside, a first signal only sets `requested` (a donated train state must not be abandoned
        mid-step); one that arrived before entering raises at once."""
        if self.requested is not None:
            raise Preempted(self.requested)
        self._defer = True
        try:
            yield
        finally:
            self._defer = False


def should_stop(signals: StopSignals | None, step: int) -> int | None:
    """The signal to stop on after `step` (None = go on); every process gets the same answer."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return signal.SIGTERM if multihost_utils.reached_preemption_sync_point(step) else None
    return signals.requested if signals is not None else None


def stop_signals() -> contextlib.AbstractContextManager:
    """StopSignals on a single process (only the main thread may install handlers); with several processes
    JAX's preemption service owns SIGTERM, so nothing is installed."""
    if jax.process_count() > 1 or threading.current_thread() is not threading.main_thread():
        return contextlib.nullcontext(None)
    return StopSignals()
