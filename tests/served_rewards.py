"""Rewards the tests serve with ``python -m g2rpo.rewards.serve`` (by dotted path, so a server process can
build them), and :func:`serving`, which runs that command for a test and stops it after."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from g2rpo.rewards.geneval import GenEval
from g2rpo.rewards.jpeg import JpegCompressibility

ROOT = Path(__file__).resolve().parents[1]
#: how long a server may take to answer /health "ok" (about 4 s on 2 idle cores; the suite loads them)
START_TIMEOUT_S = 120.0
#: the environment variable a keyed test server reads its key from
KEY_ENV = "G2RPO_TEST_REWARD_KEY"


class Scripted:
    """JPEG compressibility, steered by each sample's metadata so one server covers many cases:
    ``{"nan": true}`` scores NaN, ``{"raise": message}`` raises, ``{"sleep": s}`` sleeps ``s`` seconds first.
    Each call appends ``{"prompts", "metadata", "sources"}`` (sources as uint8 pixel lists) to ``log``; after
    ``die_after_calls`` calls the next one kills the whole server (its process group), as a crash would."""

    reads_sources = True

    def __init__(self, log: str | None = None, die_after_calls: int | None = None) -> None:
        self.log = log
        self.die_after_calls = die_after_calls
        self.calls = 0

    def __call__(self, images, prompts, metadata, sources=None):
        if self.die_after_calls is not None and self.calls >= self.die_after_calls:
            os.killpg(os.getpgrp(), signal.SIGKILL)
        self.calls += 1
        if self.log:
            pixels = None if sources is None else (sources * 255).round().to(torch.uint8).tolist()
            line = {"prompts": list(prompts), "metadata": list(metadata), "sources": pixels}
            with open(self.log, "a") as file:
                file.write(json.dumps(line) + "\n")
        time.sleep(max([float(m.get("sleep", 0)) for m in metadata] + [0.0]))
        for entry in metadata:
            if "raise" in entry:
                raise RuntimeError(entry["raise"])
        scores = JpegCompressibility()(images)
        nan = torch.tensor([bool(m.get("nan")) for m in metadata])
        return torch.where(nan, torch.nan, scores)


def calls(log: Path) -> list[dict]:
    """The calls a :class:`Scripted` reward logged, oldest first."""
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


class BrightnessDetector:
    """A stand-in for Mask2Former: one ``cat`` whose confidence is the mean of the red channel, one ``dog``
    whose confidence is the mean of the green channel, each covering the whole image."""

    classes = ["cat", "dog"]

    def __call__(self, image: np.ndarray):
        height, width = image.shape[:2]
        boxes = [
            np.array([[0, 0, width, height, image[..., channel].mean() / 255]], dtype=np.float32)
            for channel in (0, 1)
        ]
        return boxes, None


class FakeGenEval(GenEval):
    """GenEval's rules and named scores over :class:`BrightnessDetector`, every colour red."""

    def __init__(self) -> None:
        super().__init__(
            detector=BrightnessDetector(), colours=lambda crops, name: ["red"] * len(crops), threshold=0.45
        )


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Served:
    process: subprocess.Popen
    port: int
    output: Path
    key: str | None = None
    log: Path | None = None  #: a :class:`Scripted` reward's call log, where it keeps one

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/score"

    def kill(self) -> None:
        """SIGKILL the server's whole process group (its workers and API servers with it)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(30)


def start(
    reward: str, *options: str, output: Path, port: int | None = None, key: str | None = None
) -> Served:
    """Start ``python -m g2rpo.rewards.serve reward *options`` in its own process group, with ``key`` as
    its API key when given; no wait."""
    port = port or free_port()
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "g2rpo.rewards.serve", reward, "--port", str(port), *options]
    if key is not None:
        environment[KEY_ENV] = key
        command += ["--api-key-env", KEY_ENV]
    with open(output, "ab") as log:
        process = subprocess.Popen(
            command, cwd=ROOT, env=environment, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    return Served(process, port, output, key)


def wait_ready(served: Served) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    headers = {} if served.key is None else {"X-API-Key": served.key}
    request = urllib.request.Request(f"http://127.0.0.1:{served.port}/health", headers=headers)
    while time.monotonic() < deadline:
        if served.process.poll() is not None:
            raise RuntimeError(f"the reward server exited: {served.output.read_text()[-3000:]}")
        with contextlib.suppress(OSError), urllib.request.urlopen(request, timeout=2) as response:
            if response.read() == b"ok":
                return
        time.sleep(0.2)
    served.kill()
    raise RuntimeError(
        f"the reward server did not start in {START_TIMEOUT_S} s: {served.output.read_text()[-3000:]}"
    )


@contextlib.contextmanager
def serving(reward: str, *options: str, output: Path, **kwargs) -> Iterator[Served]:
    """A started, ready server for the ``with`` block; killed after it."""
    served = start(reward, *options, output=output, **kwargs)
    try:
        wait_ready(served)
        yield served
    finally:
        served.kill()


class OnDevice:
    """Records the device it was built for and each call's batch size; scores the mean pixel."""

    def __init__(self, device: str = "unset") -> None:
        self.device = device
        self.calls: list[int] = []

    def __call__(self, images, prompts, metadata):
        self.calls.append(len(prompts))
        return images.mean(dim=(1, 2, 3))
