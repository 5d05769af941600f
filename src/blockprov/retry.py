"""The one retry helper: exponential backoff with full jitter, bounded by attempts and by time.

Whether an error is worth retrying is the caller's decision (``is_temporary``); by default only
``RepositoryUnavailable`` is.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from blockprov.errors import RepositoryUnavailable

T = TypeVar("T")


def default_is_temporary(exc: BaseException) -> bool:
    return isinstance(exc, RepositoryUnavailable)


@dataclass(frozen=True)
class RetryPolicy:
    timeout: float = 30.0  # give up after this many seconds in total
    first_delay: float = 0.05
    max_delay: float = 2.0
    max_attempts: int = 1_000_000

    def delays(self) -> list[float]:
        """The nominal (un-jittered) delay schedule, for documentation and tests."""
        out: list[float] = []
        d = self.first_delay
        while len(out) < min(self.max_attempts - 1, 64):
            out.append(d)
            d = min(d * 2, self.max_delay)
        return out


def _next_delay(policy: RetryPolicy, attempt: int) -> float:
    cap = min(policy.max_delay, policy.first_delay * (2 ** attempt))
    return random.uniform(cap / 2, cap)


def retry_sync(fn: Callable[[], T], policy: RetryPolicy,
               is_temporary: Callable[[BaseException], bool] = default_is_temporary) -> T:
    deadline = time.monotonic() + policy.timeout
    attempt = 0
    while True:
        try:
            return fn()
        except Exception as e:
            attempt += 1
            if not is_temporary(e) or attempt >= policy.max_attempts:
                raise
            delay = _next_delay(policy, attempt)
            if time.monotonic() + delay > deadline:
                raise
            time.sleep(delay)


async def retry_async(fn: Callable[[], Awaitable[T]], policy: RetryPolicy,
                      is_temporary: Callable[[BaseException], bool] = default_is_temporary) -> T:
    deadline = time.monotonic() + policy.timeout
    attempt = 0
    while True:
        try:
            return await fn()
        except Exception as e:
            attempt += 1
            if not is_temporary(e) or attempt >= policy.max_attempts:
                raise
            delay = _next_delay(policy, attempt)
            if time.monotonic() + delay > deadline:
                raise
            await asyncio.sleep(delay)
