"""Load test of the reward server over loopback: concurrent clients, each sending requests back to back.

    python -m experiments.reward_load [--clients 4] [--requests 200] [--images 8] [--size 64]
                                      [--servers litserve stdlib] [--reward jpeg|fixed_cost]
                                      [--max-batch-size 8] [--batch-timeout 0.01] [--workers-per-device 1]

Each server is started as its users start it, with the CPU reward ``g2rpo.rewards.JpegCompressibility`` (or
with ``--reward fixed_cost``, the same plus 20 ms per reward call, a stand-in for a GPU model's forward), and
loaded by ``--clients`` processes, each sending ``--requests`` requests of ``--images`` random RGB images of
``--size`` px through the client's own POST (``g2rpo.rewards.http.post_with_retries``: 3 retries, 0.1 s
backoff, 120 s timeout); the body is encoded once per client, so the figures are the server's, not PNG
encoding's. Printed per server: requests lost (failed after the retries, or answered with the wrong number
of scores), p50 / p99 latency, requests/s over the whole load, and the mean number of requests the server
scored together per reward call (LitServe answers it in each response's "batch"; the stdlib server calls the
reward once per request under a lock, so 1 by design).

``stdlib`` is the earlier hand-written server (``ThreadingHTTPServer``), read from git at ``--stdlib-commit``
into a temporary file and run from there: it is not part of the package any more. The figures land in
``outputs/bench/reward_load.json``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

from g2rpo.rewards import JpegCompressibility
from g2rpo.rewards.http import RewardServerError, post_with_retries
from g2rpo.rewards.wire import encode_image, pixels_of

ROOT = Path(__file__).resolve().parents[1]
REWARDS = {"jpeg": "g2rpo.rewards.JpegCompressibility", "fixed_cost": "experiments.reward_load.FixedCostJpeg"}
#: the last commit with the stdlib server (g2rpo/rewards/remote.py's RewardServer)
STDLIB_COMMIT = "876a754"


class FixedCostJpeg(JpegCompressibility):
    """JPEG compressibility plus 20 ms per call whatever the batch: a stand-in for a GPU model below saturation,
    whose forward costs about the same for 8 images or 64 (the case server-side batching is for)."""

    call_cost_s = 0.02

    def __call__(self, images, prompts=(), metadata=()):
        time.sleep(self.call_cost_s)
        return super().__call__(images, prompts, metadata)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start(server: str, port: int, args: argparse.Namespace, folder: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if server == "litserve":
        command = [
            "-m", "g2rpo.rewards.serve", REWARDS[args.reward], "--port", str(port),
            "--max-batch-size", str(args.max_batch_size), "--batch-timeout", str(args.batch_timeout),
            "--workers-per-device", str(args.workers_per_device),
        ]  # fmt: skip
    else:
        source = subprocess.run(
            ["git", "show", f"{args.stdlib_commit}:g2rpo/rewards/remote.py"],
            cwd=ROOT, check=True, capture_output=True, text=True,
        ).stdout  # fmt: skip
        script = folder / "stdlib_server.py"
        script.write_text(source)
        command = [str(script), REWARDS[args.reward], "--port", str(port)]
    log = open(folder / f"{server}.log", "wb")  # noqa: SIM115 (the server's lifetime)
    return subprocess.Popen(
        [sys.executable, *command],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def wait_ready(process: subprocess.Popen, port: int, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the server did not answer /health in {timeout_s} s")


def client(url: str, requests: int, images: int, size: int, seed: int, barrier, results) -> None:
    """One client process: ``requests`` POSTs back to back; per request its latency, and whether it was lost."""
    batch = torch.rand(images, 3, size, size, generator=torch.Generator().manual_seed(seed))
    body = json.dumps(
        {
            "images": [encode_image(array) for array in pixels_of(batch)],
            "prompts": [f"client {seed} image {i}" for i in range(images)],
            "metadata": [{} for _ in range(images)],
        }
    ).encode()
    barrier.wait()
    records = []
    for _ in range(requests):
        started = time.perf_counter()
        try:
            raw = post_with_retries(
                url, body, {"Content-Type": "application/json"}, what="reward server",
                timeout_s=120, max_retries=3, backoff_s=0.1, max_backoff_s=2,
            )  # fmt: skip
            answer = json.loads(raw)
            lost = len(answer.get("scores", [])) != images
            together = answer.get("batch", {}).get("requests")
        except (RewardServerError, ValueError):
            lost, together = True, None
        records.append((time.perf_counter() - started, lost, together))
    results.put(records)


def load(url: str, args: argparse.Namespace) -> dict:
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(args.clients + 1)
    results = context.Queue()
    processes = [
        context.Process(
            target=client, args=(url, args.requests, args.images, args.size, seed, barrier, results)
        )
        for seed in range(args.clients)
    ]
    for process in processes:
        process.start()
    barrier.wait()
    started = time.perf_counter()
    records = [record for _ in processes for record in results.get()]
    elapsed = time.perf_counter() - started
    for process in processes:
        process.join()
    latencies = sorted(latency for latency, _, _ in records)
    together = [count for _, lost, count in records if not lost and count is not None]
    return {
        "requests": len(records),
        "lost": sum(lost for _, lost, _ in records),
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, round(0.99 * len(latencies)))],
        "requests_per_s": len(records) / elapsed,
        "images_per_s": len(records) * args.images / elapsed,
        "mean_requests_per_reward_call": statistics.mean(together) if together else 1.0,
        "wall_s": elapsed,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.reward_load", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=200, help="per client")
    parser.add_argument("--images", type=int, default=8, help="per request")
    parser.add_argument("--size", type=int, default=64, help="image side in px")
    parser.add_argument(
        "--servers", nargs="+", default=["litserve", "stdlib"], choices=["litserve", "stdlib"]
    )
    parser.add_argument(
        "--reward",
        default="jpeg",
        choices=sorted(REWARDS),
        help="jpeg: JpegCompressibility; "
        "fixed_cost: the same plus 20 ms per call (a GPU model's forward, below saturation)",
    )
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--batch-timeout", type=float, default=0.01)
    parser.add_argument("--workers-per-device", type=int, default=1, help="LitServe's replicas of the reward")
    parser.add_argument("--stdlib-commit", default=STDLIB_COMMIT)
    parser.add_argument("--output", type=Path, default=ROOT / "outputs" / "bench" / "reward_load.json")
    args = parser.parse_args(argv)
    figures = {"settings": {k: v for k, v in vars(args).items() if k != "output"}, "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory() as folder:
        for server in args.servers:
            port = free_port()
            process = start(server, port, args, Path(folder))
            try:
                wait_ready(process, port)
                figures[server] = load(f"http://127.0.0.1:{port}/score", args)
            finally:
                os.killpg(process.pid, 9)
                process.wait()
    print(
        f"{args.clients} clients x {args.requests} requests of {args.images} images ({args.size} px), "
        f"reward {REWARDS[args.reward]}, {os.cpu_count()} CPUs"
    )
    print(f"{'server':10} {'lost':>5} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>7} {'img/s':>7} {'req/call':>8}")
    for server in args.servers:
        row = figures[server]
        print(
            f"{server:10} {row['lost']:5d} {row['p50_ms']:8.1f} {row['p99_ms']:8.1f} {row['requests_per_s']:7.1f} "
            f"{row['images_per_s']:7.0f} {row['mean_requests_per_reward_call']:8.2f}"
        )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"written {args.output}")


if __name__ == "__main__":
    main()
