"""Bounded retries with exponential backoff for the transient failures of networked storage.

Only failures that a later attempt can cure are retried: refused or dropped connections, timeouts,
throttling and 5xx answers. A missing object, a refused credential or a bad request fails at once.
Every retry is logged with the URL, the attempt and the wait, so a slow or flaky store shows up in
the training log instead of as an unexplained stall. The clients underneath (botocore, s3fs) are
configured not to retry on their own, so this is the one place where retries happen.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

log = logging.getLogger("scd_train.storage")

T = TypeVar("T")

# S3 error codes (and HTTP statuses) that mean "try again later"
TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
                   "InternalError", "ServiceUnavailable", "503", "500", "502", "504"}


@dataclass(frozen=True)
class RetryPolicy:
    """``attempts`` tries in all; waits of first_delay_s, doubling, capped at max_delay_s."""

    attempts: int = 5
    first_delay_s: float = 0.5
    max_delay_s: float = 8.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"retry attempts={self.attempts} must be at least 1")
        if self.first_delay_s < 0 or self.max_delay_s < 0:
            raise ValueError("retry delays must be non-negative")

    def delay(self, failed_attempt: int) -> float:
        """Seconds to wait after the ``failed_attempt``-th failure (1-based)."""
        return min(self.max_delay_s, self.first_delay_s * 2 ** (failed_attempt - 1))

    def call(self, fn: Callable[[], T], what: str, on_retry: Callable[[], None] | None = None) -> T:
        """``fn()``, retried on transient failures; the last failure is re-raised as it came."""
        for attempt in range(1, self.attempts + 1):
            try:
                return fn()
            except Exception as exc:
                if attempt == self.attempts or not is_transient(exc):
                    if attempt > 1:
                        exc.storage_attempts = attempt  # type: ignore[attr-defined]  # for the final message
                    raise
                wait = self.delay(attempt)
                log.warning("storage: %s failed (%s); attempt %d of %d, retrying in %.2fs", what, brief(exc),
                            attempt, self.attempts, wait)
                if on_retry is not None:
                    on_retry()
                time.sleep(wait)
        raise AssertionError("unreachable")


def _causes(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def error_code(exc: BaseException) -> str | None:
    """The S3 error code (or HTTP status) carried by a botocore ClientError anywhere in the chain."""
    for e in _causes(exc):
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            code = response.get("Error", {}).get("Code")
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            return str(code or status) if (code or status) else None
    return None


def is_transient(exc: BaseException) -> bool:
    """Whether a later attempt may succeed."""
    code = error_code(exc)
    if code is not None:
        return code in TRANSIENT_CODES or (code.isdigit() and int(code) >= 500)
    for e in _causes(exc):
        if isinstance(e, (ConnectionError, TimeoutError, socket.timeout, asyncio.TimeoutError)):
            return True
        name = type(e).__name__
        # botocore / aiohttp / fsspec network failures, matched by name so neither must be imported here
        if name in {"EndpointConnectionError", "ConnectionClosedError", "ConnectTimeoutError", "ReadTimeoutError",
                    "ProxyConnectionError", "HTTPClientError", "ClientConnectionError", "ClientConnectorError",
                    "ServerDisconnectedError", "ClientPayloadError", "ClientOSError", "FSTimeoutError",
                    "IncompleteRead", "ResponseStreamingError"}:
            return True
        if isinstance(e, OSError) and e.errno in (errno.EREMOTEIO, errno.ECONNRESET, errno.ECONNREFUSED,
                                                  errno.ETIMEDOUT, errno.EHOSTUNREACH, errno.ENETUNREACH):
            return True
    return False


def brief(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
