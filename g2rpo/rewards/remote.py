"""The client of a served reward (:mod:`g2rpo.rewards.serve`, LitServe): :class:`RemoteReward`.

Why: a heavy reward (a detector-based GenEval evaluator, a large preference model) may need a software stack
that conflicts with the trainer's, or one GPU copy of it may serve several runs. The trainer then keeps only
this client; the model lives behind ``python -m g2rpo.rewards.serve <dotted.path.Reward> --port 8765``.
The wire format is JSON (:mod:`g2rpo.rewards.wire`). VLM judges served by vLLM / SGLang speak the OpenAI chat
API instead, which :class:`~g2rpo.rewards.chat.ChatClient` speaks.

A rollout is sent in requests of ``batch_size`` images, ``max_concurrency`` of them in flight at once, each to
the next of ``url``'s URLs (one per replica, round-robin; rank ``r`` of a distributed run starts at the
``r``-th, so ranks spread over the replicas from their first request), with ``X-API-Key`` from the variable
``api_key_env`` names. The server batches requests from every client, so concurrent requests also fill its
batches.

Before the run loads its model, :func:`g2rpo.preflight.check` calls :meth:`RemoteReward.check` (``GET
/health`` on every URL): a server that is down, still starting, or refusing the key fails the run in seconds,
naming the URL, not after the model load and the first rollout.

Failure policy: connection errors, timeouts and HTTP 5xx are retried ``max_retries`` times with exponential
backoff, each retry on the next URL; then :class:`RewardServerError` stops the run (the training loop does
not catch it), and re-running the same command resumes from the last checkpoint once the server is back. A
4xx (a malformed request, a wrong key, a body over the server's limit) is the client's fault and is not
retried. A failed request never becomes a score of 0, which would silently train on a wrong reward.
"""

from __future__ import annotations

import http.client
import itertools
import json
import math
import os
import threading
from collections.abc import Iterator, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import torch
from torch import Tensor

from g2rpo.rewards.http import RewardServerError, all_or_nothing, get, post_with_retries
from g2rpo.rewards.wire import encode_image, pixels_of

#: how long a client's start-up check waits for GET /health
HEALTH_TIMEOUT_S = 5.0
#: what a served reward's health check answers: LitServe's "ok", or the earlier stdlib server's JSON
HEALTHY = (b"ok", b'{"status": "ok"}')


class RemoteReward:
    """Scores images through a reward server over HTTP (see the module docstring).

    ``url`` is one scoring URL (``http://host:port/score``) or a list of them, one per replica. ``timeout_s``
    bounds each wait for the answer and the whole answer; ``connect_timeout_s`` the connection alone.
    """

    reads_sources = True  # an edit's source images go over the wire, for a served reward that reads them

    def __init__(
        self,
        url: str | Sequence[str],
        batch_size: int = 32,
        max_concurrency: int = 4,
        timeout_s: float = 120.0,
        connect_timeout_s: float = 10.0,
        max_retries: int = 5,
        backoff_s: float = 1.0,
        max_backoff_s: float = 60.0,
        api_key_env: str | None = None,
    ) -> None:
        urls = [url] if isinstance(url, str) else [str(u) for u in url]
        if (
            not urls
            or batch_size < 1
            or max_concurrency < 1
            or timeout_s <= 0
            or connect_timeout_s <= 0
            or max_retries < 0
            or backoff_s < 0
        ):
            raise ValueError(
                "RemoteReward needs at least one url, batch_size >= 1, max_concurrency >= 1, timeout_s > 0, "
                f"connect_timeout_s > 0, max_retries >= 0 and backoff_s >= 0; got url={url!r}, "
                f"batch_size={batch_size}, max_concurrency={max_concurrency}, timeout_s={timeout_s}, "
                f"connect_timeout_s={connect_timeout_s}, max_retries={max_retries}, backoff_s={backoff_s}"
            )
        self.urls = urls
        self.batch_size = int(batch_size)
        self.max_concurrency = int(max_concurrency)
        self.timeout_s = float(timeout_s)
        self.connect_timeout_s = float(connect_timeout_s)
        self.max_retries = int(max_retries)
        self.backoff_s = float(backoff_s)
        self.max_backoff_s = float(max_backoff_s)
        self.api_key_env = api_key_env
        self._headers = {"Content-Type": "application/json"}
        if api_key_env:
            key = os.environ.get(api_key_env)
            if not key:
                raise ValueError(
                    f"RemoteReward: api_key_env={api_key_env!r}, but ${api_key_env} is not set (or empty): export "
                    f"the key the server was started with (--api-key-env), e.g. `export {api_key_env}=...`"
                )
            self._headers["X-API-Key"] = key
        self._turn = itertools.count(int(os.environ.get("RANK", 0)))  # ranks start on different replicas
        self._turn_lock = threading.Lock()

    @property
    def url(self) -> str:
        """The first scoring URL (the only one, without replicas)."""
        return self.urls[0]

    def __repr__(self) -> str:  # never shows the key
        return f"RemoteReward(url={self.urls if len(self.urls) > 1 else self.url!r}, batch_size={self.batch_size})"

    @staticmethod
    def _beside(url: str, endpoint: str) -> str:
        """The URL of ``endpoint`` beside a scoring URL (``.../score`` -> ``.../health``)."""
        parts = urlsplit(url)
        return urlunsplit((parts.scheme, parts.netloc, parts.path.rsplit("/", 1)[0] + "/" + endpoint, "", ""))

    @property
    def health_url(self) -> str:
        """``GET /health`` beside the (first) scoring endpoint."""
        return self._beside(self.url, "health")

    def check(self, timeout_s: float = HEALTH_TIMEOUT_S) -> None:
        """Raise :class:`RewardServerError` unless every URL's server answers ``GET /health`` as ready:
        called before the run loads its model, so a server that is down, starting or refusing the key fails
        in seconds, naming its URL."""
        for scoring in self.urls:
            self._check(scoring, timeout_s)

    def _check(self, scoring: str, timeout_s: float) -> None:
        url = self._beside(scoring, "health")
        where = urlsplit(scoring)
        elsewhere = where.hostname not in ("127.0.0.1", "localhost", "::1")
        command = "python -m g2rpo.rewards.serve <dotted.path.of.a.Reward>" + (
            " --host 0.0.0.0" if elsewhere else ""
        )
        command += f" --port {where.port}" if where.port else ""
        start = (
            f"start it first{f' on {where.hostname}' if elsewhere else ''} with `{command}` (docs/rewards.md, "
            "remote rewards), or correct the reward's url; a server just started answers once its workers have "
            f"built the reward (seconds to minutes): wait until `curl {self._beside(scoring, 'health')}` says ok"
        )
        try:
            status, body = get(url, timeout_s=timeout_s, headers=self._headers)
        except (OSError, http.client.HTTPException) as error:
            raise RewardServerError(
                f"reward server {url} does not answer ({type(error).__name__}: {error}): {start}"
            ) from None
        if status == 401:
            given = f"${self.api_key_env}" if self.api_key_env else "no key (api_key_env is not set)"
            raise RewardServerError(
                f"reward server {url} refused the key (HTTP 401): the client sent {given}; set the reward's "
                "api_key_env to a variable holding the key the server was started with"
            )
        if status == 503:
            raise RewardServerError(
                f"reward server {url} is up but not ready (HTTP 503: its workers are still loading the reward, "
                "or one failed): wait for it, or read its log"
            )
        if status != 200 or body.strip() not in HEALTHY:
            raise RewardServerError(
                f"reward server {url} answered HTTP {status} {body[:200]!r}, not a g2rpo reward server's "
                f"health: is it a g2rpo reward server? {start}"
            )

    def __call__(
        self,
        images: Tensor,
        prompts: Sequence[str],
        metadata: Sequence[dict] = (),
        sources: Tensor | None = None,
    ) -> Tensor:
        scores: list[float | None] = []
        for raw, count in self._send("score", images, prompts, metadata, sources):
            scores.extend(self._parse(raw, count))
        return torch.tensor([math.nan if s is None else s for s in scores], dtype=torch.float32)

    def _send(
        self,
        endpoint: str,
        images: Tensor,
        prompts: Sequence[str],
        metadata: Sequence[dict],
        sources: Tensor | None,
    ) -> list[tuple[bytes, int]]:
        """Each request's answer and image count, in order: ``max_concurrency`` requests in flight; the first
        that fails for good stops the others' retries and raises."""
        bodies = list(self._requests(images, prompts, metadata, sources))
        answers = all_or_nothing(
            lambda body, stop: self._post(endpoint, body, stop),
            [body for body, _ in bodies],
            self.max_concurrency,
            "reward",
        )
        return [(answer, count) for answer, (_, count) in zip(answers, bodies)]

    def _requests(
        self, images: Tensor, prompts: Sequence[str], metadata: Sequence[dict], sources: Tensor | None = None
    ) -> Iterator[tuple[bytes, int]]:
        """The JSON bodies of ``batch_size`` images each (with their edits' sources), and their image counts."""
        count = images.shape[0]
        metadata = list(metadata) if len(metadata) else [{} for _ in range(count)]
        if len(prompts) != count or len(metadata) != count:
            raise ValueError(f"{count} images but {len(prompts)} prompts and {len(metadata)} metadata dicts")
        if sources is not None and sources.shape[0] != count:
            raise ValueError(f"{count} images but {sources.shape[0]} source images")
        pixels = pixels_of(images)
        source_pixels = None if sources is None else pixels_of(sources)
        for start in range(0, count, self.batch_size):
            stop = min(start + self.batch_size, count)
            payload = {
                "images": [encode_image(array) for array in pixels[start:stop]],
                "prompts": [str(p) for p in prompts[start:stop]],
                "metadata": [dict(m) for m in metadata[start:stop]],
            }
            if source_pixels is not None:
                payload["sources"] = [encode_image(array) for array in source_pixels[start:stop]]
            try:
                body = json.dumps(payload).encode()
            except TypeError as error:
                raise ValueError(
                    f"RemoteReward: the prompt metadata must be JSON-serialisable: {error}"
                ) from None
            yield body, stop - start

    def _post(self, endpoint: str, body: bytes, stop: threading.Event | None = None) -> bytes:
        """One request's answer, from the next replica in turn, retried as the module docstring says."""
        with self._turn_lock:
            first = next(self._turn) % len(self.urls)
        urls = [self._beside(url, endpoint) for url in self.urls[first:] + self.urls[:first]]
        return post_with_retries(
            urls,
            body,
            self._headers,
            what="reward server",
            timeout_s=self.timeout_s,
            connect_timeout_s=self.connect_timeout_s,
            max_retries=self.max_retries,
            backoff_s=self.backoff_s,
            max_backoff_s=self.max_backoff_s,
            stop=stop,
            hint="; a 401 means a missing or wrong key (api_key_env)",
        )

    def _parse(self, raw: bytes, expected: int) -> list[float | None]:
        try:
            scores = json.loads(raw)["scores"]
        except (ValueError, KeyError, TypeError):
            raise RewardServerError(
                f"reward server {self.url} answered without a JSON 'scores' list: {raw[:200]!r}"
            ) from None
        return self._checked(scores, expected)

    def _checked(self, scores: Any, expected: int) -> list[float | None]:
        if not isinstance(scores, list) or len(scores) != expected:
            got = len(scores) if isinstance(scores, list) else type(scores).__name__
            raise RewardServerError(f"reward server {self.url} returned {got} scores for {expected} images")
        if not all(s is None or (isinstance(s, (int, float)) and not isinstance(s, bool)) for s in scores):
            raise RewardServerError(f"reward server {self.url} returned non-numeric scores: {scores[:8]}")
        return [None if s is None else float(s) for s in scores]


class RemoteNamedReward(RemoteReward):
    """A served reward with several named scores (GenEval's strict ``accuracy`` and ``partial`` credit), which
    evaluation tables show as columns: :meth:`scores` posts to the server's ``/scores``; calling it scores
    as :class:`RemoteReward` does."""

    def scores(
        self,
        images: Tensor,
        prompts: Sequence[str],
        metadata: Sequence[dict] = (),
        sources: Tensor | None = None,
    ) -> dict[str, Tensor]:
        named: dict[str, list[float | None]] = {}
        for raw, count in self._send("scores", images, prompts, metadata, sources):
            try:
                batch = dict(json.loads(raw)["scores"])
            except (ValueError, KeyError, TypeError):
                raise RewardServerError(
                    f"reward server {self._beside(self.url, 'scores')} answered without a JSON 'scores' object: "
                    f"{raw[:200]!r}"
                ) from None
            for name, values in batch.items():
                named.setdefault(name, []).extend(self._checked(values, count))
        return {
            name: torch.tensor([math.nan if v is None else v for v in values], dtype=torch.float32)
            for name, values in named.items()
        }


def main() -> None:
    """The server moved to LitServe; say where rather than fail with a bare "no module"."""
    raise SystemExit(
        "the reward server is now `python -m g2rpo.rewards.serve <dotted.path.Reward> --port 8765` (LitServe); "
        "see docs/rewards.md, remote rewards"
    )


if __name__ == "__main__":
    main()
