"""Generation threads take turns between forwards (backends/turns.py, batching.py)."""
from __future__ import annotations

import threading
import time

from personamix import Generator
from personamix.backends import batching
from personamix.backends.turns import Turns
from personamix.engine.session import Session

SEQ = [1, 2, 3, 4, 1, 2, 3, 4, 1, 2, 3, 4]


def test_a_turn_is_held_by_one_thread_and_given_back_by_it_only():
    turns, inside, most, lock = Turns(), [0], [0], threading.Lock()

    def work():
        for _ in range(20):
            turns.take(limit=60.0)
            with lock:
                inside[0] += 1
                most[0] = max(most[0], inside[0])
            time.sleep(0.001)
            with lock:
                inside[0] -= 1
            turns.give()

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert most[0] == 1 and turns.holder is None and turns.taken_over == 0
    turns.take(limit=60.0)
    other = threading.Thread(target=turns.give)    # not the holder: a no-op
    other.start()
    other.join()
    assert turns.holder == threading.get_ident()


def test_a_turn_kept_past_its_limit_is_taken_over():
    turns, got = Turns(), threading.Event()
    turns.take(limit=60.0)                          # held by this thread and never given back

    def taker():
        turns.take(limit=0.05)
        got.set()

    start = time.perf_counter()
    t = threading.Thread(target=taker)
    t.start()
    t.join(timeout=60)
    assert got.is_set() and 0.04 <= time.perf_counter() - start < 30
    assert turns.taken_over == 1 and turns.holder == t.ident
    turns.give()                                    # this thread lost it: giving back does nothing
    assert turns.holder == t.ident


def _overlap(backend, n=6, pause=0.005) -> int:
    """The most generation threads ever inside their work between two calls at once (three
    generations of `n` one-token calls, `pause` seconds of work between them)."""
    inside, most, lock = [0], [0], threading.Lock()

    def run():
        session = Session(backend)
        for i in range(n):
            session.logits("ref", SEQ[: 3 + i], 1)
            with lock:
                inside[0] += 1
                most[0] = max(most[0], inside[0])
            time.sleep(pause)                      # a sampler's work
            with lock:
                inside[0] -= 1
        session.close()

    threads = [threading.Thread(target=run, daemon=True) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a generation hung"
    return most[0]


def test_generations_take_turns_between_forwards_on_cpu(tiny_dir, monkeypatch):
    """On CPU the batched backend lets one generation at a time work between forwards (others wait
    for its next call or its end); with take_turns=False they overlap. Outputs are the same."""
    base, adapters = str(tiny_dir[0]), tiny_dir[1]
    on = Generator.from_pretrained(base, adapters=adapters, backend="batched", device="cpu").backend
    off = Generator.from_pretrained(base, adapters=adapters, backend="batched", device="cpu").backend
    off.turns = None
    assert on.turns is not None
    monkeypatch.setattr(batching, "TURN_LIMIT", 1e4)   # no takeover: a strict turn
    assert _overlap(on) == 1 and on.turns.holder is None and on.turns.taken_over == 0
    assert _overlap(off) >= 2


def test_a_generation_that_keeps_its_turn_delays_the_others_boundedly(tiny_dir, monkeypatch):
    """A generation that stops between calls (its consumer stopped reading) keeps its turn; the
    others take it over after TURN_LIMIT forwards' time and finish."""
    base, adapters = str(tiny_dir[0]), tiny_dir[1]
    b = Generator.from_pretrained(base, adapters=adapters, backend="batched", device="cpu").backend
    hold, served = threading.Event(), threading.Event()

    def quiet():
        session = Session(b)
        session.logits("ref", SEQ[:3], 1)
        served.set()
        hold.wait(60)                              # holds its turn meanwhile
        session.close()

    q = threading.Thread(target=quiet, daemon=True)
    q.start()
    assert served.wait(60)
    try:
        assert _overlap(b, n=3, pause=0.0) >= 1
    finally:
        hold.set()
        q.join(timeout=60)
    assert b.turns.taken_over >= 1 and not q.is_alive()
