"""POST with retries, shared by the reward clients that speak HTTP: :class:`~g2rpo.rewards.remote.RemoteReward`
(our wire format) and :class:`~g2rpo.rewards.chat.ChatClient` (the OpenAI chat API), and the one GET their
start-up checks send. Stdlib ``urllib``: one JSON POST needs no new dependency.

Timeouts: ``timeout_s`` is urllib's socket timeout, which bounds each wait on the socket (to connect, for the
answer to begin, for each next piece of it) but not the whole answer: a server trickling bytes could hold a
request for ever. So the body is read in pieces against a deadline of ``timeout_s`` from the request's
start, and a request still receiving past it fails as a timeout. A request thus ends within about
``2 * timeout_s``: the deadline, plus at most one socket wait. (A server that trickles its status line and
headers is bounded per wait only; ours, vLLM's and SGLang's send them at once.) ``connect_timeout_s``, where
given, bounds the connection alone, so a host that is down fails in seconds while a slow reward still has
``timeout_s`` to answer.

``url`` may be several URLs (replicas of one server): attempt ``k`` goes to the ``k``-th, cyclically, so a
retry tries the next replica, and one replica down does not fail a request while another is up.
"""

from __future__ import annotations

import concurrent.futures
import functools
import http.client
import json
import logging
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from typing import TypeVar

log = logging.getLogger(__name__)

#: bytes per read of an answer, between checks of its deadline
CHUNK_BYTES = 1 << 16


class _ReadTimeout:
    """A connection that waits ``read_timeout_s`` on its socket once connected: urllib's ``timeout`` then
    bounds the connection alone (urllib otherwise uses one timeout for both)."""

    def __init__(self, *args, read_timeout_s: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.read_timeout_s = read_timeout_s

    def connect(self) -> None:
        super().connect()  # type: ignore[misc]
        self.sock.settimeout(self.read_timeout_s)  # type: ignore[attr-defined]


class _HTTPConnection(_ReadTimeout, http.client.HTTPConnection):
    pass


class _HTTPSConnection(_ReadTimeout, http.client.HTTPSConnection):
    pass


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, read_timeout_s: float) -> None:
        super().__init__()
        self.connection = functools.partial(_HTTPConnection, read_timeout_s=read_timeout_s)

    def http_open(self, request: urllib.request.Request):
        return self.do_open(self.connection, request)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, read_timeout_s: float) -> None:
        super().__init__()
        self.connection = functools.partial(_HTTPSConnection, read_timeout_s=read_timeout_s)

    def https_open(self, request: urllib.request.Request):
        return self.do_open(self.connection, request, context=self._context)


@functools.lru_cache(maxsize=32)
def opener(read_timeout_s: float) -> urllib.request.OpenerDirector:
    """An opener whose connections wait ``read_timeout_s`` on the socket once connected. No proxy: a reward
    server is an internal service, and a site-wide http_proxy from the environment must not intercept it."""
    return urllib.request.build_opener(
        urllib.request.ProxyHandler({}), _HTTPHandler(read_timeout_s), _HTTPSHandler(read_timeout_s)
    )


Item = TypeVar("Item")
Answer = TypeVar("Answer")


def all_or_nothing(
    send: Callable[[Item, threading.Event], Answer], items: Sequence[Item], max_concurrency: int, name: str
) -> list[Answer]:
    """``send(item, stop)`` for every item, ``max_concurrency`` at a time, answers in order. The first that
    fails for good sets ``stop`` (its siblings give up their retries, see :func:`post_with_retries`) and is
    raised: a batch is scored whole or not at all."""
    if not items:
        return []
    stop = threading.Event()
    executor = concurrent.futures.ThreadPoolExecutor(
        max_workers=min(max_concurrency, len(items)), thread_name_prefix=name
    )
    try:
        futures = [executor.submit(send, item, stop) for item in items]
        done, _ = concurrent.futures.wait(futures, return_when=concurrent.futures.FIRST_EXCEPTION)
        failed = [f for f in futures if f in done and f.exception() is not None]
        if failed:
            raise failed[0].exception()
        return [f.result() for f in futures]
    finally:
        stop.set()
        executor.shutdown(wait=True, cancel_futures=True)


class RewardServerError(RuntimeError):
    """The reward server could not score a batch; the run stops rather than train on missing rewards."""


def post_with_retries(
    url: str | Sequence[str],
    body: bytes,
    headers: dict[str, str],
    *,
    what: str,
    timeout_s: float,
    max_retries: int,
    backoff_s: float,
    max_backoff_s: float,
    retried_statuses: frozenset[int] = frozenset(),
    stop: threading.Event | None = None,
    hint: str = "",
    connect_timeout_s: float | None = None,
) -> bytes:
    """POST ``body`` and return the answer, retrying what a restarted or less busy server could answer
    (connection errors, timeouts, 5xx and ``retried_statuses``) with exponential backoff, then raising
    :class:`RewardServerError`; another 4xx raises at once. ``stop`` (set by a failed sibling request)
    ends the retries early. ``what`` and ``hint`` name the server and what to check in the messages."""
    urls = [url] if isinstance(url, str) else list(url)
    attempts = max_retries + 1
    started = time.monotonic()
    last_error = ""
    for attempt in range(attempts):
        url = urls[attempt % len(urls)]
        if stop is not None and stop.is_set():
            raise RewardServerError(f"{what} {url}: another request of the batch failed")
        request = urllib.request.Request(url, data=body, headers=headers, method="POST")
        try:
            connect_s = timeout_s if connect_timeout_s is None else connect_timeout_s
            with opener(timeout_s).open(request, timeout=connect_s) as response:
                return read_before(response, time.monotonic() + timeout_s, timeout_s)
        except urllib.error.HTTPError as error:
            message = error_message(error)
            if error.code < 500 and error.code not in retried_statuses:
                raise RewardServerError(
                    f"{what} {url} rejected the request with HTTP {error.code} (not retried: resending the "
                    f"same request would fail again{hint}): {message}"
                ) from None
            last_error = f"HTTP {error.code}: {message}"
        except (OSError, http.client.HTTPException) as error:  # refused, reset, timed out, cut short
            last_error = f"{type(error).__name__}: {error}"
        if attempt + 1 < attempts:
            delay = min(backoff_s * 2**attempt, max_backoff_s)
            log.warning(
                "%s %s: attempt %d of %d failed (%s); retrying in %.3g s",
                what,
                url,
                attempt + 1,
                attempts,
                last_error,
                delay,
            )
            if stop is None:
                time.sleep(delay)
            else:
                stop.wait(delay)
    tried = urls[: min(attempts, len(urls))]
    where = tried[0] if len(tried) == 1 else f"({', '.join(tried)})"
    raise RewardServerError(
        f"{what} {where} failed {attempts} attempts in {time.monotonic() - started:.1f} s "
        f"(timeout_s={timeout_s:g}, max_retries={max_retries}); last error: {last_error}. "
        "No score was made up: the run stops here. Once the server is back, re-run the same command to "
        "resume from the last checkpoint."
    )


def read_before(response: http.client.HTTPResponse, deadline: float, timeout_s: float) -> bytes:
    """The body of ``response``, read in pieces: past ``deadline`` (``time.monotonic()``) with more to come, it
    raises ``TimeoutError``, which the caller retries as any timeout (the module docstring says why)."""
    chunks = []
    while chunk := response.read1(CHUNK_BYTES):
        chunks.append(chunk)
        if time.monotonic() > deadline and response.length != 0:  # 0: the whole body is in
            raise TimeoutError(f"timed out: the answer was still arriving after timeout_s={timeout_s:g} s")
    return b"".join(chunks)


def get(url: str, *, timeout_s: float, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """One GET and no retry, for a client's start-up check: the HTTP status and body, an HTTP error's
    included; a server that cannot be reached raises ``OSError`` (or ``http.client.HTTPException``)."""
    request = urllib.request.Request(url, headers=headers or {}, method="GET")
    try:
        with opener(timeout_s).open(request, timeout=timeout_s) as response:
            return response.status, read_before(response, time.monotonic() + timeout_s, timeout_s)
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.read(CHUNK_BYTES)


def error_message(error: urllib.error.HTTPError) -> str:
    """The server's ``{"error": ...}`` message, or the raw body of a server that is not ours."""
    try:
        raw = error.read()
    except (OSError, http.client.HTTPException):
        return error.reason or ""
    finally:
        error.close()
    try:
        return str(json.loads(raw)["error"])
    except (ValueError, KeyError, TypeError):
        return raw[:500].decode(errors="replace") or str(error.reason)
