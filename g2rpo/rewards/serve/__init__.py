"""A g2rpo reward served by LitServe: ``python -m g2rpo.rewards.serve <dotted.path.Reward> [options]``.

Why a server: a heavy reward (GenEval's detector, a large preference model) may need a software stack that
conflicts with the trainer's, and one GPU copy of it can score for every rank of every run. Why LitServe
(Lightning's serving engine, FastAPI + uvicorn underneath) rather than a server of our own:

- **Dynamic batching across clients**: requests that reach the queue within ``batch_timeout`` of each other,
  from any rank of any run, up to ``max_batch_size`` requests, are scored in one reward call (requests are
  grouped by endpoint and image size, so each call sees images of one size).
- **Replicas**: ``devices`` x ``workers_per_device`` workers, each with its own copy of the reward on its own
  device, take requests from one queue. Replicas on other machines are listed as several client URLs.
- **A key**: with ``--api-key-env NAME`` every endpoint, ``/health`` included, wants ``X-API-Key`` equal to
  ``$NAME`` (401 otherwise), so only the runs given the key are scored.

The wire format is :mod:`g2rpo.rewards.wire`'s JSON, unchanged from the earlier stdlib server, so existing
clients keep working. What we add on top of LitServe, and why: ``/scores`` (named scores) shares the
``/score`` workers (a second LitAPI would load a second copy of the model), errors are answered per request
as ``{"error": ...}`` (LitServe fails a whole batch when one input is malformed, and a client must not get
another's 400), and :class:`BodyLimits` bounds a request's body and each wait for it, which uvicorn does not.

Dependencies in a reward's own environment: Python >= 3.10, torch, numpy, Pillow and ``litserve`` (which
brings FastAPI, uvicorn and pyzmq); then ``pip install --no-deps -e <this repo>`` and the reward's own
packages. Nothing else of g2rpo's (Hydra, Lightning, diffusers) is imported here.
"""

import asyncio
import hmac
import importlib
import inspect
import logging
from dataclasses import dataclass, field
from typing import Any

import litserve as ls
import torch
from fastapi import Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from litserve.server import RegularRequestHandler
from pydantic import BaseModel, model_validator
from starlette.exceptions import HTTPException
from torch import Tensor

from g2rpo.rewards.wire import images_of, scores_of

log = logging.getLogger(__name__)

#: the default body limit: 32 images of 1024x1024 at PNG's worst case (incompressible pixels: 3 MiB each,
#: 4 MiB in base64) are 128 MiB; twice that leaves room for metadata and larger batches of smaller images
MAX_REQUEST_MB = 256.0
#: how long the server waits on a silent client mid-body before answering 408 and dropping it
READ_TIMEOUT_S = 60.0
#: a request still queued after this long is answered 504 unscored: its client (timeout_s=120) has given up
QUEUE_TIMEOUT_S = 120.0


class ScoreRequest(BaseModel):
    """The body of ``POST /score`` and ``/scores``; FastAPI checks it before it is queued (400 otherwise)."""

    images: list[str]
    prompts: list[str]
    metadata: list[dict] | None = None
    sources: list[str] | None = None

    @model_validator(mode="after")
    def _one_of_each_per_image(self) -> "ScoreRequest":
        count = len(self.images)
        metadata = count if self.metadata is None else len(self.metadata)
        if len(self.prompts) != count or metadata != count:
            raise ValueError(
                f"{count} images but {len(self.prompts)} prompts and {metadata} metadata objects"
            )
        if self.sources is not None and len(self.sources) != count:
            raise ValueError(f'"sources" must be a list of {count} images, one per image')
        return self


class NamedScoreRequest(ScoreRequest):
    """A ``POST /scores`` request on its way to the shared workers: answered with the named scores."""


@dataclass
class Outcome:
    """One request's answer: an HTTP status and its JSON body."""

    status: int
    body: dict[str, Any]


@dataclass
class Job:
    """One decoded request in a worker; ``answer`` is set for one answered unscored (malformed, or empty)."""

    named: bool
    images: Tensor | None = None
    prompts: list[str] = field(default_factory=list)
    metadata: list[dict] = field(default_factory=list)
    sources: Tensor | None = None
    answer: Outcome | None = None

    @property
    def key(self) -> tuple:
        """Requests scored in one reward call share this: the endpoint, and the image (and source) sizes."""
        sources = None if self.sources is None else tuple(self.sources.shape[1:])
        return self.named, tuple(self.images.shape[1:]), sources


def reward_class(path: str) -> type:
    """The class at a dotted path (``package.module.Class``), with a message naming what is missing."""
    module_name, _, name = path.rpartition(".")
    if not module_name:
        raise ValueError(
            f"{path!r} is not a dotted path: give package.module.Class, e.g. g2rpo.rewards.JpegCompressibility"
        )
    module = importlib.import_module(module_name)
    try:
        return getattr(module, name)
    except AttributeError:
        raise ValueError(f"module {module_name} has no {name!r}: check the reward's dotted path") from None


class RewardAPI(ls.LitAPI):
    """LitServe's view of a g2rpo :class:`~g2rpo.rewards.base.RewardFunction` (see the module docstring)."""

    def __init__(
        self,
        reward: str,
        reward_kwargs: dict[str, Any] | None = None,
        api_key: str | None = None,
        max_batch_size: int = 8,
        batch_timeout: float = 0.01,
    ) -> None:
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout, api_path="/score")
        self.reward_path = reward
        self.reward_kwargs = dict(reward_kwargs or {})
        self.api_key = api_key or None

    def setup(self, device: str) -> None:
        """Build the reward in this worker, on its device (a ``device`` argument the reward takes and the
        kwargs do not set is this worker's; a reward that is a module is moved there)."""
        cls = reward_class(self.reward_path)
        kwargs = dict(self.reward_kwargs)
        if "device" not in kwargs and "device" in _parameters(cls):
            kwargs["device"] = str(device)
        reward = cls(**kwargs)
        if isinstance(reward, torch.nn.Module):
            reward = reward.to(device).eval()
        self.reward = reward
        self.torch_device = torch.device(device)
        log.info("worker on %s serves %s", device, self.reward_path)

    def authorize(self, request: Request) -> None:
        """LitServe's per-endpoint auth hook (a FastAPI dependency): ``X-API-Key`` must equal the key."""
        if self.api_key is None:
            return
        given = request.headers.get("x-api-key", "")
        if not hmac.compare_digest(given.encode(), self.api_key.encode()):
            raise HTTPException(
                401,
                "missing or wrong X-API-Key: give the client the server's key through its api_key_env "
                "(the name of an environment variable holding it)",
            )

    def decode_request(self, request: ScoreRequest) -> Job:
        """PNG decoding happens here, in the worker; a bad image is this request's 400, not its batch's."""
        named = isinstance(request, NamedScoreRequest)
        count = len(request.images)
        metadata = request.metadata if request.metadata is not None else [{} for _ in range(count)]
        if not count:
            return Job(named, answer=Outcome(200, {"scores": {} if named else [], "batch": _batch_of([])}))
        try:
            images = images_of(request.images)
            sources = None if request.sources is None else images_of(request.sources)
        except ValueError as error:
            return Job(named, answer=Outcome(400, {"error": f"malformed request: {error}"}))
        return Job(named, images, list(request.prompts), list(metadata), sources)

    def predict(self, jobs: list[Job] | Job) -> list[Outcome] | Outcome:
        """Score the batch's requests, one reward call per :attr:`Job.key`; a call that raises is a 500 for
        its requests only (the client retries them)."""
        if isinstance(jobs, Job):  # max_batch_size=1: LitServe's unbatched loop
            return self.predict([jobs])[0]
        outcomes: list[Outcome | None] = [job.answer for job in jobs]
        groups: dict[tuple, list[int]] = {}
        for index, job in enumerate(jobs):
            if job.answer is None:
                groups.setdefault(job.key, []).append(index)
        for members in groups.values():
            group = [jobs[index] for index in members]
            for index, outcome in zip(members, self._score(group)):
                outcomes[index] = outcome
        return outcomes

    def encode_response(self, output: Outcome) -> Response:
        return JSONResponse(output.body, status_code=output.status)

    def _score(self, jobs: list[Job]) -> list[Outcome]:
        """One reward call for requests of one key, split back into their answers."""
        named = jobs[0].named
        batch = _batch_of(jobs)
        if named and not callable(getattr(self.reward, "scores", None)):
            message = f"{type(self.reward).__name__} has no named scores; POST /score instead"
            return [Outcome(400, {"error": message}) for _ in jobs]
        images = torch.cat([job.images for job in jobs]).to(self.torch_device)
        prompts = [prompt for job in jobs for prompt in job.prompts]
        metadata = [entry for job in jobs for entry in job.metadata]
        kwargs = {}
        if jobs[0].sources is not None and getattr(self.reward, "reads_sources", False):
            kwargs["sources"] = torch.cat([job.sources for job in jobs]).to(self.torch_device)
        try:
            with torch.no_grad():
                if named:
                    values = self.reward.scores(images, prompts, metadata, **kwargs)
                    columns = {str(name): scores_of(v, len(prompts)) for name, v in values.items()}
                else:
                    column = scores_of(self.reward(images, prompts, metadata, **kwargs), len(prompts))
        except Exception as error:  # the reward's own failure: a 500, which the client retries
            log.exception("the reward raised on %d requests of %d images", len(jobs), len(prompts))
            return [
                Outcome(500, {"error": f"the reward raised {type(error).__name__}: {error}"}) for _ in jobs
            ]
        outcomes, start = [], 0
        for job in jobs:
            stop = start + len(job.prompts)
            if named:
                scores: Any = {name: values[start:stop] for name, values in columns.items()}
            else:
                scores = column[start:stop]
            outcomes.append(Outcome(200, {"scores": scores, "batch": batch}))
            start = stop
        return outcomes


def _batch_of(jobs: list[Job]) -> dict[str, int]:
    return {"requests": len(jobs), "images": sum(len(job.prompts) for job in jobs)}


def _parameters(cls: type) -> set[str]:
    try:
        return set(inspect.signature(cls).parameters)
    except (TypeError, ValueError):
        return set()


class BodyLimits:
    """ASGI middleware bounding a request body's size and each wait for its next piece, which uvicorn does not.

    A body declared over ``max_bytes`` is read and dropped before the 413 (a client still sending would miss
    the answer otherwise); one that grows past it undeclared fails as it does. A client silent for
    ``read_timeout_s`` mid-body gets a 408: on asyncio a stalled client holds no thread, but it would hold
    its connection and buffers for ever.
    """

    def __init__(self, app: Any, max_bytes: int, read_timeout_s: float) -> None:
        self.app = app
        self.max_bytes = int(max_bytes)
        self.read_timeout_s = float(read_timeout_s)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", ())).get(b"content-length", b"")
        received = 0

        async def timed() -> dict:
            try:
                return await asyncio.wait_for(receive(), self.read_timeout_s)
            except asyncio.TimeoutError:
                raise HTTPException(408, f"the client sent no data for {self.read_timeout_s:g} s") from None

        async def limited() -> dict:
            nonlocal received
            message = await timed()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise HTTPException(413, self._too_large(received))
            return message

        if declared.isdigit() and int(declared) > self.max_bytes:
            try:
                while (await timed()).get("more_body", False):
                    pass
            except HTTPException:
                return
            await JSONResponse({"error": self._too_large(int(declared))}, status_code=413)(
                scope, receive, send
            )
            return
        await self.app(scope, limited, send)

    def _too_large(self, size: int) -> str:
        return (
            f"the body has {size / 2**20:.1f} MiB, over this server's limit of {self.max_bytes / 2**20:g} MiB: lower "
            "the client's batch_size (images per request), or restart the server with a larger --max-request-mb"
        )


def build_server(
    reward: str,
    reward_kwargs: dict[str, Any] | None = None,
    *,
    api_key: str | None = None,
    accelerator: str = "auto",
    devices: int | str = "auto",
    workers_per_device: int = 1,
    max_batch_size: int = 8,
    batch_timeout: float = 0.01,
    max_request_mb: float = MAX_REQUEST_MB,
    read_timeout_s: float = READ_TIMEOUT_S,
    queue_timeout_s: float = QUEUE_TIMEOUT_S,
) -> ls.LitServer:
    """The LitServer for ``reward`` (a dotted class path, built with ``reward_kwargs`` in each worker);
    ``server.run(host=..., port=...)`` serves it. The class is imported here first, so a wrong path fails
    before any worker starts."""
    if max_request_mb <= 0 or read_timeout_s <= 0 or queue_timeout_s <= batch_timeout:
        raise ValueError(
            f"the reward server needs max_request_mb > 0, read_timeout_s > 0 and queue_timeout_s > batch_timeout; "
            f"got {max_request_mb}, {read_timeout_s}, {queue_timeout_s} and {batch_timeout}"
        )
    reward_class(reward)
    api = RewardAPI(
        reward, reward_kwargs, api_key, max_batch_size=max_batch_size, batch_timeout=batch_timeout
    )
    limits = {"max_bytes": int(max_request_mb * 2**20), "read_timeout_s": read_timeout_s}
    server = ls.LitServer(
        api,
        accelerator=accelerator,
        devices=devices,
        workers_per_device=workers_per_device,
        timeout=queue_timeout_s,
        middlewares=[(BodyLimits, limits)],
        disable_openapi_url=True,
    )
    handler = RegularRequestHandler(api, server)

    async def named_scores(request: ScoreRequest) -> Response:
        named = NamedScoreRequest.model_construct(**dict(request))
        return await handler.handle_request(named, ScoreRequest)

    server.app.add_api_route("/scores", named_scores, methods=["POST"], dependencies=[Depends(api.authorize)])
    server.app.add_exception_handler(HTTPException, _error_answer)
    server.app.add_exception_handler(RequestValidationError, _malformed_answer)
    return server


async def _error_answer(request: Request, error: HTTPException) -> JSONResponse:
    return JSONResponse({"error": str(error.detail)}, status_code=error.status_code, headers=error.headers)


async def _malformed_answer(request: Request, error: RequestValidationError) -> JSONResponse:
    problems = "; ".join(
        f"{'.'.join(str(part) for part in problem.get('loc', ()))}: {problem.get('msg', '')}"
        for problem in error.errors()
    )
    return JSONResponse({"error": f"malformed request: {problems}"}, status_code=400)
