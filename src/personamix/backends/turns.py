"""Generation threads take turns for their own work between forwards.

When a shared forward ends (batching.py), every generation it served wakes at once and runs its
sampler: target math, drafting, streaming; a few hundred small tensor ops, each of which releases
Python's GIL while it runs. With 16 such threads on 2 cores every release hands the GIL to
another thread, so they run interleaved op by op: on the machine of docs/batching.md 16 such
threads made ~600 voluntary and ~130 involuntary context switches per forward, and the forward's
own thread, preempted 6-9 times in each, ran 14-35% slower than the same mix replayed alone.
Taking turns (one generation's work, then the next) does the same work with ~80 switches per
forward, and the forwards run at the replay's speed.

A turn is held from the moment a thread's forward returns until it queues its next call or ends
its generation. It is bounded: a thread that keeps it longer than `limit` (a consumer that
stopped reading, a thread that died) loses it to the next one, so a turn can delay the others
by at most that much and never blocks them.
"""
from __future__ import annotations

import threading
import time


class Turns:
    """One turn, passed between threads; `taken_over` counts turns taken from a holder that kept
    it past the limit."""

    def __init__(self):
        self._cond = threading.Condition()
        self._holder: int | None = None      # thread id of the holder
        self._since = 0.0                    # when it took the turn (perf_counter)
        self.taken_over = 0

    def take(self, limit: float) -> None:
        """Wait until no other thread holds the turn, or its holder has held it for `limit`
        seconds; then hold it."""
        me = threading.get_ident()
        with self._cond:
            while self._holder not in (None, me):
                left = self._since + limit - time.perf_counter()
                if left <= 0:
                    self.taken_over += 1
                    break
                self._cond.wait(left)
            self._holder, self._since = me, time.perf_counter()

    def give(self) -> None:
        """Give the turn back, if the calling thread holds it (a no-op otherwise)."""
        with self._cond:
            if self._holder == threading.get_ident():
                self._holder = None
                self._cond.notify()

    @property
    def holder(self) -> int | None:
        return self._holder
