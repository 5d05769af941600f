"""The one retry helper: what is worth another attempt, how long to wait, and what to say meanwhile.

What to retry is decided by the error's class, never by the loop: a class of errors.py whose
``transient`` attribute is true (``RepositoryUnavailable``, ``CatalogUnavailable``, ``FetchFailed``,
``NoSpace``) may succeed if asked again later; anything else is raised at once, ``UntrustedServer``
included (a certificate does not become trusted by asking again) and every exception that is
not a ``BlockprovError`` (a bug is not retried).

How long: exponential backoff with jitter (each delay uniform in [cap/2, cap], the cap doubling
from ``first_delay`` to ``max_delay``; ``jitter=False``: the cap itself), bounded by ``timeout``
seconds in all (``None``: for ever) and by ``max_attempts``. A delay that would end past the
deadline is not slept: the last error is raised instead.

What to say: every failed attempt is logged, as S3QL's ``@retry`` does: at debug level for the
first ``QUIET`` attempts (a blip nobody needs to hear of), at info for the next ones, and as a
warning from ``LOUD`` attempts on (something is really wrong), each line with the attempt's
number, the time spent so far and the next delay. ``on_retry`` lets a loop say more (a PC's
console, an agent's ``last_error``).

One definition, two drivers: the rules above are ``Attempts.failed`` (called with each failure, it
returns the delay before the next attempt or raises the error); ``retry_sync``, ``retry_async``
and the ``retrying`` decorator (a plain or an ``async`` function) only call and sleep.

Which loops retry for ever, and why (``timeout=None``):

- a PC waiting for its repository at boot (netboot/inagent.py ``resolve``): it has nothing better
  to do and says so on its console; a disk that can boot offline gives up after
  ``blockprov.offline_after`` seconds instead;
- an agent's request poller (agent/report.py): an agent outlives any outage of its repository,
  and the operator's console must see it again when the repository is back;
- hydration (agent/hydrate.py): background work that pauses while the repository is away or the
  disk is full, and goes on when they are back.

Everything else retries for a bounded time (a fetch: the agent's fetch timeout; an S3 request;
a pool's refill) and then fails with the last error.

Something many callers need of one peer that is down (a site cache's upstream: what it says of a
token, its body limits, a kept answer's freshness) is not retried by each of them: ``Backoff``
lets one attempt through per interval, the interval doubling to the policy's ``max_delay``, while
the others make do with what is known (service/sitecache.py).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar, cast

T = TypeVar("T")
P = ParamSpec("P")

log = logging.getLogger("blockprov.retry")

QUIET = 2  # failed attempts logged at debug level
LOUD = 5  # from this failed attempt on, a warning


def is_transient(exc: BaseException) -> bool:
    """Worth another attempt later: the error's class says so (errors.py, ``transient``)."""
    return getattr(exc, "transient", False) is True


@dataclass(frozen=True)
class RetryPolicy:
    timeout: float | None = 30.0  # give up after this many seconds in all (None: never)
    first_delay: float = 0.05
    max_delay: float = 2.0
    max_attempts: int | None = None  # None: as many as the timeout allows
    jitter: bool = True  # False: exactly the cap (a schedule a person reads on a console)

    def delays(self) -> list[float]:
        """The nominal (un-jittered) delay schedule, for documentation and tests."""
        out: list[float] = []
        d = self.first_delay
        limit = 64 if self.max_attempts is None else min(self.max_attempts - 1, 64)
        while len(out) < limit:
            out.append(d)
            d = min(d * 2, self.max_delay)
        return out


OnRetry = Callable[[BaseException, int, float], None]  # (error, failed attempts so far, next delay)


class Attempts:
    """The retry rules of one call: ``failed(error)`` is the delay before the next attempt, or raises."""

    def __init__(self, policy: RetryPolicy, what: str, *, on_retry: OnRetry | None = None,
                 logger: logging.Logger = log) -> None:
        self.policy = policy
        self.what = what
        self.on_retry = on_retry
        self.log = logger
        self.started = time.monotonic()
        self.count = 0  # failed attempts so far

    def failed(self, exc: BaseException) -> float:
        """Called in an ``except`` block: re-raises ``exc`` unless another attempt is due."""
        self.count += 1
        p = self.policy
        if not is_transient(exc) or (p.max_attempts is not None and self.count >= p.max_attempts):
            raise exc
        cap = min(p.max_delay, p.first_delay * 2 ** (self.count - 1))
        delay = random.uniform(cap / 2, cap) if p.jitter else cap
        spent = time.monotonic() - self.started
        if p.timeout is not None and spent + delay > p.timeout:
            raise exc
        level = logging.DEBUG if self.count <= QUIET else logging.INFO if self.count < LOUD else logging.WARNING
        self.log.log(level, "%s failed (attempt %d, %.1f s so far): %s; retrying in %.2f s",
                     self.what, self.count, spent, exc, delay)
        if self.on_retry is not None:
            self.on_retry(exc, self.count, delay)
        return delay


class Backoff:
    """One attempt per interval at a peer that failed, for all of its callers together.

    While nothing failed (or since the last success) every caller may ask: ``due()`` is true.
    After a failure (``failed``), ``due()`` is true for one caller once the interval has passed,
    and that caller takes the turn (the others at the same moment wait for the next interval), so
    a peer that is down costs one attempt per interval however many callers there are. The
    interval starts at the policy's ``first_delay`` and doubles to its ``max_delay``; ``ok()``
    (any success with that peer) ends it."""

    def __init__(self, policy: RetryPolicy, clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy
        self.clock = clock
        self.delay = 0.0  # the current interval; 0: the peer is not known to be down
        self.next_at = 0.0
        self.failures = 0

    @property
    def down(self) -> bool:
        return self.delay > 0

    def due(self) -> bool:
        """May this caller ask now (and if so, the turn is taken)?"""
        if not self.down:
            return True
        now = self.clock()
        if now < self.next_at:
            return False
        self.next_at = now + self.delay  # the callers meanwhile wait for this attempt's interval
        return True

    def failed(self) -> float:
        """An attempt failed: the interval before the next one (doubled, at most ``max_delay``)."""
        self.failures += 1
        p = self.policy
        self.delay = min(p.max_delay, self.delay * 2) if self.delay else p.first_delay
        self.next_at = self.clock() + self.delay
        return self.delay

    def ok(self) -> None:
        self.delay, self.next_at, self.failures = 0.0, 0.0, 0

    def wait(self) -> float:
        """Seconds until the next attempt may be made (0 when one is due)."""
        return max(0.0, self.next_at - self.clock()) if self.down else 0.0


def retry_sync(fn: Callable[[], T], policy: RetryPolicy, what: str = "a request", *,
               on_retry: OnRetry | None = None) -> T:
    attempts = Attempts(policy, what, on_retry=on_retry)
    while True:
        try:
            return fn()
        except Exception as e:
            delay = attempts.failed(e)
        time.sleep(delay)


async def retry_async(fn: Callable[[], Awaitable[T]], policy: RetryPolicy, what: str = "a request", *,
                      on_retry: OnRetry | None = None) -> T:
    attempts = Attempts(policy, what, on_retry=on_retry)
    while True:
        try:
            return await fn()
        except Exception as e:
            delay = attempts.failed(e)
        await asyncio.sleep(delay)


def retrying(policy: RetryPolicy, what: str | None = None) -> Callable[[Callable[P, T]], Callable[P, T]]:
    """The same as a decorator, for a plain or an ``async`` function (called again with the same
    arguments; ``what`` defaults to the function's name)."""

    def wrap(fn: Callable[P, T]) -> Callable[P, T]:
        name = what or fn.__qualname__
        if inspect.iscoroutinefunction(fn):
            async def run_async(*args: P.args, **kw: P.kwargs) -> Any:
                return await retry_async(lambda: cast(Awaitable[Any], fn(*args, **kw)), policy, name)
            return cast(Callable[P, T], functools.wraps(fn)(run_async))

        def run(*args: P.args, **kw: P.kwargs) -> T:
            return retry_sync(lambda: fn(*args, **kw), policy, name)
        return functools.wraps(fn)(run)

    return wrap
