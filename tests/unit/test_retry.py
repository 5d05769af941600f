"""retry.py: what is retried is the error class's call, the delays back off, the log grows louder."""

from __future__ import annotations

import asyncio
import logging

import pytest

from blockprov.errors import (
    CatalogUnavailable,
    FetchFailed,
    NotFound,
    RepositoryUnavailable,
    StaleConnection,
    UntrustedServer,
)
from blockprov.retry import LOUD, QUIET, Backoff, RetryPolicy, is_transient, retry_async, retry_sync, retrying

FAST = RetryPolicy(timeout=5.0, first_delay=0.001, max_delay=0.002)


class Flaky:
    """Fails ``times`` times with ``error``, then answers 42."""

    def __init__(self, times: int, error: BaseException) -> None:
        self.left, self.error, self.calls = times, error, 0

    def __call__(self) -> int:
        self.calls += 1
        if self.left:
            self.left -= 1
            raise self.error
        return 42

    async def coro(self) -> int:
        return self()


def down() -> RepositoryUnavailable:
    return RepositoryUnavailable(url="http://r", why="connection refused")


def test_the_error_class_says_what_is_transient() -> None:
    assert is_transient(down()) and is_transient(CatalogUnavailable(url="pg", why="x"))
    assert is_transient(StaleConnection(url="http://r", why="reset")) and is_transient(FetchFailed(msg="x"))
    assert not is_transient(UntrustedServer(url="https://r", why="self-signed"))  # exit code 7 too
    assert not is_transient(NotFound(msg="no such image")) and not is_transient(OSError("boom"))


def test_transient_errors_are_retried_until_the_call_succeeds() -> None:
    f = Flaky(3, down())
    assert retry_sync(f, FAST) == 42 and f.calls == 4
    g = Flaky(3, down())
    assert asyncio.run(retry_async(g.coro, FAST)) == 42 and g.calls == 4


@pytest.mark.parametrize("error", [UntrustedServer(url="https://r", why="self-signed"), NotFound(msg="x"),
                                   KeyError("a bug")])
def test_anything_else_is_raised_at_once(error: BaseException) -> None:
    f = Flaky(1, error)
    with pytest.raises(type(error)):
        retry_sync(f, FAST)
    assert f.calls == 1
    g = Flaky(1, error)
    with pytest.raises(type(error)):
        asyncio.run(retry_async(g.coro, FAST))
    assert g.calls == 1


def test_attempts_and_time_are_bounded() -> None:
    f = Flaky(10, down())
    with pytest.raises(RepositoryUnavailable):
        retry_sync(f, RetryPolicy(timeout=5.0, first_delay=0.001, max_delay=0.001, max_attempts=3))
    assert f.calls == 3
    g = Flaky(1000, down())
    with pytest.raises(RepositoryUnavailable):
        retry_sync(g, RetryPolicy(timeout=0.05, first_delay=0.01, max_delay=0.02))
    assert 2 <= g.calls < 1000  # gave up at the deadline, never slept past it


def test_the_delays_back_off_and_on_retry_sees_each_one() -> None:
    seen: list[tuple[int, float]] = []
    f = Flaky(5, down())
    policy = RetryPolicy(timeout=None, first_delay=0.001, max_delay=0.004, jitter=False)
    retry_sync(f, policy, on_retry=lambda e, n, d: seen.append((n, d)))
    assert seen == [(1, 0.001), (2, 0.002), (3, 0.004), (4, 0.004), (5, 0.004)]
    jittered: list[float] = []
    retry_sync(Flaky(4, down()), RetryPolicy(first_delay=0.002, max_delay=0.008),
               on_retry=lambda e, n, d: jittered.append(d))
    assert [c / 2 <= d <= c for d, c in zip(jittered, (0.002, 0.004, 0.008, 0.008), strict=True)] == [True] * 4


def test_the_log_grows_louder_as_attempts_grow(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="blockprov.retry")
    retry_sync(Flaky(LOUD + 1, down()), FAST, "fetching from r")
    levels = [r.levelno for r in caplog.records if r.name == "blockprov.retry"]
    assert levels == [logging.DEBUG] * QUIET + [logging.INFO] * (LOUD - 1 - QUIET) + [logging.WARNING] * 2
    assert all("fetching from r failed (attempt" in r.getMessage() for r in caplog.records)


def test_one_decorator_for_plain_and_async_functions() -> None:
    f, g = Flaky(2, down()), Flaky(2, down())

    @retrying(FAST)
    def plain(x: int) -> int:
        return f() + x

    @retrying(FAST)
    async def coro(x: int) -> int:
        return g() + x

    assert plain(1) == 43 and f.calls == 3
    assert asyncio.run(coro(2)) == 44 and g.calls == 3
    assert plain.__name__ == "plain" and coro.__name__ == "coro"


def test_backoff_lets_one_attempt_through_per_interval() -> None:
    """``Backoff``: while nothing failed everyone may ask; after a failure one caller per interval,
    the interval doubling to the cap; a success ends it."""
    now = [100.0]
    b = Backoff(RetryPolicy(first_delay=2.0, max_delay=8.0, jitter=False), clock=lambda: now[0])
    assert all(b.due() for _ in range(5)) and not b.down
    assert b.failed() == 2.0 and b.down
    assert not any(b.due() for _ in range(5)) and b.wait() == 2.0
    now[0] += 2.0
    assert [b.due() for _ in range(3)] == [True, False, False]  # the first caller takes the turn
    assert [b.failed(), b.failed(), b.failed()] == [4.0, 8.0, 8.0]  # doubled, capped
    now[0] += 7.9
    assert not b.due()
    now[0] += 0.1
    assert b.due()
    b.ok()
    assert not b.down and all(b.due() for _ in range(3)) and b.wait() == 0.0
