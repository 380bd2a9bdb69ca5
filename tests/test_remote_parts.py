"""The pieces of the remote backend that need no engine: choosing how to score, and bad URLs."""

import pytest

from personamix import PersonamixError
from personamix.backends.remote import ScoringWays
from personamix.backends.vllm_engine import VllmEngine


def test_scoring_ways_try_both_then_use_the_faster_and_retry_the_other():
    ways = ScoringWays()
    cost = {"prompt": 1.0, "next": 0.2}
    first = ways.pick(100)
    ways.record(100, first, cost[first])
    second = ways.pick(100)
    ways.record(100, second, cost[second])
    assert {first, second} == {"prompt", "next"}                  # each is timed first
    picks = [ways.pick(100) for _ in range(ScoringWays.RETRY * 2)]
    assert picks.count("next") > picks.count("prompt") >= 1      # mostly the faster, the other now and then
    assert ways.pick(3000) == "prompt"                            # another context length is learnt on its own
    for _ in range(10):
        ways.record(100, "next", 3.0)                             # the faster one slows down: the choice follows
    assert [ways.pick(100) for _ in range(3)].count("prompt") >= 2


@pytest.mark.parametrize("url,msg", [("127.0.0.1:8000", "http://"), ("ftp://x", "http://")])
def test_bad_engine_urls_are_named(url, msg):
    with pytest.raises(PersonamixError, match=msg):
        VllmEngine(url)
