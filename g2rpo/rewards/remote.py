"""Rewards scored in another process: a client (:class:`RemoteReward`) and a small server (:class:`RewardServer`).

Why: a heavy reward (a detector-based GenEval evaluator, a large preference model) may need a software stack
that conflicts with the trainer's, or one GPU copy of it may serve several runs. The trainer then keeps only
this client; the model lives behind ``python -m g2rpo.rewards.remote <dotted.path.Reward> --port 8765``.
VLM judges served by vLLM / SGLang speak the OpenAI chat API instead, which needs a different client.

Wire format (JSON only, never pickle, so neither side can run code the other sends):
    POST /score  {"images": [base64 PNG of uint8 HxWx3, ...], "prompts": [str, ...], "metadata": [dict, ...],
                  "sources": [base64 PNG, ...] (edits only: each image's source, for rewards that read it)}
              -> {"scores": [float or null, ...]}      null = NaN = unscorable (left out of the advantages)
    POST /scores (the same request) -> {"scores": {name: [float or null, ...], ...}}
              a reward's named scores (``scores()``, e.g. GenEval's accuracy and partial), for evaluation
    GET /health -> {"status": "ok"}
Images are quantised with ``round(x * 255)`` (as the JPEG reward does) and PNG is lossless, so a served
reward sees the pixels an in-process one would quantise to. Errors come back as ``{"error": message}``:
400 for a malformed request, 413 for a body over the server's ``--max-request-mb``, 500 when the reward
raised.

Before the run loads its model, :func:`g2rpo.preflight.check` calls :meth:`RemoteReward.check` (GET /health)
on every remote reward of its config: a server that is not up fails the run in seconds, not after the model
load and the first rollout.

Failure policy: connection errors, timeouts and HTTP 5xx are retried ``max_retries`` times with exponential
backoff; then :class:`RewardServerError` stops the run (the training loop does not catch it), and re-running
the same command resumes from the last checkpoint once the server is back. A 4xx is the client's fault and
is not retried. A failed request never becomes a score of 0, which would silently train on a wrong reward.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import http.client
import io
import json
import logging
import math
import threading
from collections.abc import Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import torch
from hydra.utils import get_class
from PIL import Image
from torch import Tensor

from g2rpo.rewards.base import RewardFunction
from g2rpo.rewards.http import RewardServerError, get, post_with_retries

log = logging.getLogger(__name__)

#: the server's default request limit: 32 images of 1024x1024 at PNG's worst case (incompressible pixels: 3 MiB
#: each, 4 MiB in base64) are 128 MiB; twice that leaves room for metadata and larger batches of smaller images
MAX_REQUEST_MB = 256
#: how long a server thread waits on a silent client (each socket operation) before dropping it
REQUEST_TIMEOUT_S = 60.0
#: how long a client's start-up check waits for GET /health
HEALTH_TIMEOUT_S = 5.0


def encode_image(pixels: np.ndarray) -> str:
    """Base64 PNG of one ``uint8 [H, W, 3]`` array; compress_level=1: lossless either way, and fast."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_image(data: str) -> np.ndarray:
    """The ``uint8 [H, W, 3]`` array of a base64 PNG; anything else is a malformed request (ValueError)."""
    if not isinstance(data, str):
        raise ValueError(f"an image must be a base64 string, got {type(data).__name__}")
    try:
        image = Image.open(io.BytesIO(base64.b64decode(data, validate=True)), formats=["PNG"])
        image.load()
    except (ValueError, OSError) as error:
        raise ValueError(f"an image is not a base64 PNG: {error}") from None
    if image.mode != "RGB":
        raise ValueError(f"images must be 8-bit RGB PNGs, got mode {image.mode!r}")
    return np.asarray(image)


class RemoteReward:
    """Scores images through a :class:`RewardServer` (or any server of the same wire format) over HTTP.

    The batch is sent in requests of ``batch_size`` images (bounding request size and server memory);
    the scores come back in order. See the module docstring for the retry and failure policy.
    """

    reads_sources = True  # an edit's source images go over the wire, for a served reward that reads them

    def __init__(
        self,
        url: str,
        batch_size: int = 32,
        timeout_s: float = 120.0,
        max_retries: int = 5,
        backoff_s: float = 1.0,
        max_backoff_s: float = 60.0,
    ) -> None:
        if batch_size < 1 or timeout_s <= 0 or max_retries < 0 or backoff_s < 0:
            raise ValueError(
                f"RemoteReward needs batch_size >= 1, timeout_s > 0, max_retries >= 0 and backoff_s >= 0; got "
                f"batch_size={batch_size}, timeout_s={timeout_s}, max_retries={max_retries}, backoff_s={backoff_s}"
            )
        self.url = url
        self.batch_size = int(batch_size)
        self.timeout_s = float(timeout_s)
        self.max_retries = int(max_retries)
        self.backoff_s = float(backoff_s)
        self.max_backoff_s = float(max_backoff_s)

    def __repr__(self) -> str:
        return f"RemoteReward(url={self.url!r}, batch_size={self.batch_size})"

    @property
    def health_url(self) -> str:
        """``GET /health`` beside the scoring endpoint (``.../score`` -> ``.../health``)."""
        parts = urlsplit(self.url)
        return urlunsplit((parts.scheme, parts.netloc, parts.path.rsplit("/", 1)[0] + "/health", "", ""))

    def check(self, timeout_s: float = HEALTH_TIMEOUT_S) -> None:
        """Raise :class:`RewardServerError` unless the server answers ``GET /health`` with ``{"status": "ok"}``:
        called before the run loads its model, so a server that is not up fails in seconds, naming its URL."""
        url = self.health_url
        where = urlsplit(self.url)
        elsewhere = where.hostname not in ("127.0.0.1", "localhost", "::1")
        command = "python -m g2rpo.rewards.remote <dotted.path.of.a.Reward>" + (
            " --host 0.0.0.0" if elsewhere else ""
        )
        command += f" --port {where.port}" if where.port else ""
        start = (
            f"start it first{f' on {where.hostname}' if elsewhere else ''} with `{command}` (docs/rewards.md, "
            "remote rewards), or correct the reward's url"
        )
        try:
            status, body = get(url, timeout_s=timeout_s)
        except (OSError, http.client.HTTPException) as error:
            raise RewardServerError(
                f"reward server {url} does not answer ({type(error).__name__}: {error}): {start}"
            ) from None
        try:
            ok = status == 200 and json.loads(body) == {"status": "ok"}
        except ValueError:
            ok = False
        if not ok:
            raise RewardServerError(
                f'reward server {url} answered HTTP {status} {body[:200]!r}, not {{"status": "ok"}}: is it '
                f"a g2rpo reward server? {start}"
            )

    def __call__(
        self,
        images: Tensor,
        prompts: Sequence[str],
        metadata: Sequence[dict] = (),
        sources: Tensor | None = None,
    ) -> Tensor:
        scores: list[float | None] = []
        for body, count in self._requests(images, prompts, metadata, sources):
            scores.extend(self._parse(self._post(self.url, body), count))
        return torch.tensor([math.nan if s is None else s for s in scores], dtype=torch.float32)

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

    def _post(self, url: str, body: bytes) -> bytes:
        """One request's answer, retried as the module docstring says."""
        return post_with_retries(
            url,
            body,
            {"Content-Type": "application/json"},
            what="reward server",
            timeout_s=self.timeout_s,
            max_retries=self.max_retries,
            backoff_s=self.backoff_s,
            max_backoff_s=self.max_backoff_s,
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
        url = self.url.rsplit("/", 1)[0] + "/scores"
        named: dict[str, list[float | None]] = {}
        for body, count in self._requests(images, prompts, metadata, sources):
            raw = self._post(url, body)
            try:
                batch = dict(json.loads(raw)["scores"])
            except (ValueError, KeyError, TypeError):
                raise RewardServerError(
                    f"reward server {url} answered without a JSON 'scores' object: {raw[:200]!r}"
                ) from None
            for name, values in batch.items():
                named.setdefault(name, []).extend(self._checked(values, count))
        return {
            name: torch.tensor([math.nan if v is None else v for v in values], dtype=torch.float32)
            for name, values in named.items()
        }


class RewardServer:
    """Serves an in-process reward function over HTTP (stdlib ``ThreadingHTTPServer``).

    Requests are decoded in their own threads, but the reward is called under one lock, one call per
    request: a GPU model is never run concurrently. The socket is bound at construction, so ``port=0``
    picks a free port, read back from :attr:`port`. A body over ``max_request_mb`` MiB gets a 413 that tells
    the client to lower its ``batch_size``; a client silent for ``request_timeout_s`` (on any one read or
    write) is dropped, so a stalled one does not hold a thread for ever.
    """

    def __init__(
        self,
        reward: RewardFunction,
        host: str = "127.0.0.1",
        port: int = 0,
        device: str = "cpu",
        max_request_mb: float = MAX_REQUEST_MB,
        request_timeout_s: float = REQUEST_TIMEOUT_S,
    ) -> None:
        if max_request_mb <= 0 or request_timeout_s <= 0:
            raise ValueError(
                f"RewardServer needs max_request_mb > 0 and request_timeout_s > 0; got {max_request_mb}, "
                f"{request_timeout_s}"
            )
        self.reward = reward
        self.device = torch.device(device)
        self.max_request_mb = max_request_mb
        self.request_timeout_s = float(request_timeout_s)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._httpd = _HTTPServer((host, port), _Handler)
        self._httpd.reward_server = self
        self.host, self.port = self._httpd.server_address[:2]

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/score"

    def start(self) -> RewardServer:
        """Serve in a daemon thread (it dies with the process), and return self."""
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="reward-server",
            daemon=True,
        )
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve in this thread until interrupted (the command line's Ctrl-C)."""
        try:
            self._httpd.serve_forever(poll_interval=0.5)
        finally:
            self.stop()

    def stop(self) -> None:
        """Stop accepting connections and close the socket; a request in flight finishes in its thread."""
        if self._closed:
            return
        self._closed = True
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
        self._httpd.server_close()

    def __enter__(self) -> RewardServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def score(
        self, images: Tensor, prompts: list[str], metadata: list[dict], sources: Tensor | None = None
    ) -> list[float | None]:
        with self._lock, torch.no_grad():
            scores = self.reward(images.to(self.device), prompts, metadata, **self._sources(sources))
        return _as_list(scores, images.shape[0])

    def named_scores(
        self, images: Tensor, prompts: list[str], metadata: list[dict], sources: Tensor | None = None
    ) -> dict[str, list[float | None]]:
        """The reward's named ``scores()`` (the handler answers 400 to a reward without them)."""
        with self._lock, torch.no_grad():
            named = self.reward.scores(images.to(self.device), prompts, metadata, **self._sources(sources))
        return {str(name): _as_list(values, images.shape[0]) for name, values in named.items()}

    def _sources(self, sources: Tensor | None) -> dict[str, Tensor]:
        """The keyword that gives a reward reading edits' sources (``reads_sources``) the request's images."""
        if sources is None or not getattr(self.reward, "reads_sources", False):
            return {}
        return {"sources": sources.to(self.device)}


def pixels_of(images: Tensor) -> np.ndarray:
    """``[B, 3, H, W]`` floats in [0, 1] as ``uint8 [B, H, W, 3]``, quantised as the module docstring says."""
    pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu().numpy()


def _as_list(scores: Tensor | Sequence, count: int) -> list[float | None]:
    """A reward's scores as JSON numbers, NaN as null."""
    if isinstance(scores, Tensor):
        scores = scores.detach().float().flatten().cpu().tolist()
    scores = [None if s is None or math.isnan(float(s)) else float(s) for s in scores]
    if len(scores) != count:
        raise ValueError(f"the reward returned {len(scores)} scores for {count} images")
    return scores


def _tensor(encoded: list[str]) -> Tensor:
    """Base64 PNGs of one size as ``[B, 3, H, W]`` floats in [0, 1]."""
    arrays = [decode_image(data) for data in encoded]
    if len({array.shape for array in arrays}) > 1:
        raise ValueError(f"the images differ in size: {sorted({a.shape for a in arrays})}")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # stop() must not wait for a hung reward call
    reward_server: RewardServer


class _TooLarge(ValueError):
    """A body over the server's limit (answered 413, after it is read and discarded)."""


class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer
    server_version = "g2rpo-reward/1"

    def setup(self) -> None:
        self.timeout = (
            self.server.reward_server.request_timeout_s
        )  # StreamRequestHandler sets it on the socket
        super().setup()

    def do_GET(self) -> None:
        if urlsplit(self.path).path == "/health":
            self._send(200, {"status": "ok"})
        else:
            self._send(404, {"error": f"no such path {self.path!r}; GET /health or POST /score"})

    def do_POST(self) -> None:
        path = urlsplit(self.path).path
        if path not in ("/score", "/scores"):
            self._send(404, {"error": f"no such path {self.path!r}; POST /score or /scores"})
            return
        try:
            images, prompts, metadata, sources = self._read_request()
        except _TooLarge as error:
            self._send(413, {"error": str(error)})
            return
        except ValueError as error:
            self._send(400, {"error": f"malformed request: {error}"})
            return
        except (
            TimeoutError
        ):  # the client went silent mid-body: drop it (the socket timeout freed this thread)
            log.warning("reward server: a client sent no data for %g s; dropped", self.timeout)
            self.close_connection = True
            return
        server = self.server.reward_server
        if path == "/scores" and not callable(getattr(server.reward, "scores", None)):
            self._send(
                400, {"error": f"{type(server.reward).__name__} has no named scores; POST /score instead"}
            )
            return
        if not prompts:
            self._send(200, {"scores": {} if path == "/scores" else []})
            return
        try:
            if path == "/scores":
                scores = server.named_scores(images, prompts, metadata, sources)
            else:
                scores = server.score(images, prompts, metadata, sources)
        except Exception as error:  # the reward's own failure: the client retries a 500
            log.exception("the reward raised on a batch of %d images", len(prompts))
            self._send(500, {"error": f"the reward raised {type(error).__name__}: {error}"})
            return
        self._send(200, {"scores": scores})

    def _read_request(self) -> tuple[Tensor, list[str], list[dict], Tensor | None]:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise ValueError("a Content-Length header is required")
        limit_mb = self.server.reward_server.max_request_mb
        if int(length) > limit_mb * 2**20:
            left = int(length)
            while left > 0:  # read and drop the body: a client still sending would miss the answer otherwise
                chunk = self.rfile.read(min(left, 1 << 20))
                if not chunk:
                    break
                left -= len(chunk)
            raise _TooLarge(
                f"the body has {int(length) / 2**20:.1f} MiB, over this server's limit of {limit_mb:g} MiB: lower "
                "the client's batch_size (images per request), or restart the server with a larger --max-request-mb"
            )
        payload = json.loads(self.rfile.read(int(length)))
        if not isinstance(payload, dict) or not isinstance(payload.get("images"), list):
            raise ValueError('the body must be a JSON object with an "images" list')
        count = len(payload["images"])
        prompts = payload.get("prompts")
        metadata = payload.get("metadata", [{} for _ in range(count)])
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise ValueError('"prompts" must be a list of strings')
        if not isinstance(metadata, list) or not all(isinstance(m, dict) for m in metadata):
            raise ValueError('"metadata" must be a list of objects')
        if len(prompts) != count or len(metadata) != count:
            raise ValueError(
                f"{count} images but {len(prompts)} prompts and {len(metadata)} metadata objects"
            )
        sources = payload.get("sources")
        if sources is not None and (not isinstance(sources, list) or len(sources) != count):
            raise ValueError(f'"sources" must be a list of {count} images, one per image')
        if not count:
            return torch.empty(0, 3, 0, 0), [], [], None
        return _tensor(payload["images"]), prompts, metadata, None if sources is None else _tensor(sources)

    def _send(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
            log.info("reward server: the client left before its HTTP %d answer", status)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m g2rpo.rewards.remote",
        description="Serve a reward function over HTTP for g2rpo.rewards.remote.RemoteReward.",
    )
    parser.add_argument(
        "reward", help="dotted path of a reward class, e.g. g2rpo.rewards.JpegCompressibility"
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="0.0.0.0 serves other machines (no authentication)"
    )
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--kwargs", default="{}", help="JSON constructor arguments, e.g. '{\"quality\": 95}'")
    parser.add_argument("--device", default="cpu", help="where the images are put before the reward's call")
    parser.add_argument(
        "--max-request-mb",
        type=float,
        default=MAX_REQUEST_MB,
        help="largest request body in MiB (default %(default)s: 32 images of 1024x1024 at PNG's worst case, "
        "twice over); a larger one gets HTTP 413, telling the client to lower its batch_size",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    kwargs = json.loads(args.kwargs)
    if not isinstance(kwargs, dict):
        parser.error("--kwargs must be a JSON object")
    reward = get_class(args.reward)(**kwargs)
    server = RewardServer(
        reward, host=args.host, port=args.port, device=args.device, max_request_mb=args.max_request_mb
    )
    print(f"serving {args.reward} on {server.url} (GET /health); Ctrl-C stops", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()


if __name__ == "__main__":
    main()
