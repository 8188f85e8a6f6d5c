"""Remote rewards: exact scores over loopback, NaN passthrough, retries, a clear failure, and a training run
that stops on a dead reward server and resumes once it is back."""

from __future__ import annotations

import json
import logging
import math
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from conftest import FAST_RUN
from hydra.utils import instantiate

from g2rpo.loggers import read_metrics
from g2rpo.preflight import PreflightError
from g2rpo.rewards import JpegCompressibility, RewardEnsemble, http, remote
from g2rpo.rewards.http import RewardServerError
from g2rpo.rewards.remote import RemoteReward, RewardServer
from g2rpo.run import train


def _batch(count: int = 10, size: int = 16):
    images = torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(0))
    prompts = [f"prompt {i}" for i in range(count)]
    metadata = [{"tag": "single_object", "index": i} for i in range(count)]
    return images, prompts, metadata


class Recording:
    """Wraps a reward, recording each call's prompts and metadata (one call per HTTP request)."""

    def __init__(self, reward) -> None:
        self.reward = reward
        self.calls: list[tuple[list[str], list[dict]]] = []

    def __call__(self, images, prompts, metadata):
        self.calls.append((list(prompts), list(metadata)))
        return self.reward(images, prompts, metadata)


class FailsAfter:
    """A served reward that scores ``calls`` batches, then raises (a crashed model behind a live server)."""

    def __init__(self, calls: int) -> None:
        self.left = calls

    def __call__(self, images, prompts, metadata):
        if self.left == 0:
            raise RuntimeError("the reward model crashed")
        self.left -= 1
        return JpegCompressibility()(images)


def test_loopback_scores_equal_the_in_process_reward_in_requests_of_batch_size():
    images, prompts, metadata = _batch(10)
    served = Recording(JpegCompressibility())
    with RewardServer(served) as server:
        scores = RemoteReward(server.url, batch_size=4, timeout_s=10, max_retries=0)(
            images, prompts, metadata
        )
    assert torch.equal(scores, JpegCompressibility()(images))
    assert [len(p) for p, _ in served.calls] == [4, 4, 2]  # ceil(10 / 4) requests
    assert [p for call, _ in served.calls for p in call] == prompts
    assert [m for _, call in served.calls for m in call] == metadata


@pytest.mark.parametrize(
    "returned", [[1.5, None, float("nan"), -2.0], torch.tensor([1.5, float("nan"), float("nan"), -2.0])]
)
def test_unscorable_samples_come_back_as_nan(returned):
    images, prompts, metadata = _batch(4)
    with RewardServer(lambda *args: returned) as server:
        scores = RemoteReward(server.url, max_retries=0)(images, prompts, metadata)
    assert scores[0] == 1.5 and scores[3] == -2.0
    assert math.isnan(scores[1]) and math.isnan(scores[2])


def test_a_reward_slower_than_the_timeout_fails_after_max_retries_plus_one_attempts(caplog):
    release, calls = threading.Event(), []

    def hangs(images, prompts, metadata):
        calls.append(len(prompts))
        release.wait(10)
        return torch.zeros(len(prompts))

    images, prompts, metadata = _batch(2)
    client_kwargs = {"timeout_s": 0.2, "max_retries": 2, "backoff_s": 0.01}
    with RewardServer(hangs) as server, caplog.at_level(logging.WARNING, logger=http.__name__):
        with pytest.raises(RewardServerError, match="failed 3 attempts") as raised:
            RemoteReward(server.url, **client_kwargs)(images, prompts, metadata)
        release.set()  # the server serialises reward calls: let the queued attempts through, then count them
        deadline = time.monotonic() + 5
        while len(calls) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
    assert calls == [2, 2, 2]
    assert len([r for r in caplog.records if "retrying" in r.getMessage()]) == 2
    assert server.url in str(raised.value) and "timed out" in str(raised.value)


def test_a_stopped_server_fails_clearly_and_a_restarted_one_is_picked_up():
    images, prompts, metadata = _batch(3)
    expected = JpegCompressibility()(images)
    server = RewardServer(JpegCompressibility()).start()
    client = RemoteReward(server.url, timeout_s=5, max_retries=2, backoff_s=0.01)
    assert torch.equal(client(images, prompts, metadata), expected)
    server.stop()

    with pytest.raises(RewardServerError) as raised:
        client(images, prompts, metadata)
    message = str(raised.value)
    assert server.url in message and "failed 3 attempts" in message
    assert "re-run the same command" in message and "Connection refused" in message

    # Back on the same port during the backoff (0.05 + 0.1 + 0.2 + ... s): the call succeeds.
    restarted: list[RewardServer] = []
    timer = threading.Timer(
        0.1, lambda: restarted.append(RewardServer(JpegCompressibility(), port=server.port).start())
    )
    timer.start()
    try:
        patient = RemoteReward(server.url, timeout_s=5, max_retries=6, backoff_s=0.05)
        assert torch.equal(patient(images, prompts, metadata), expected)
    finally:
        timer.join()
        for started in restarted:
            started.stop()
    assert len(restarted) == 1


def _post(url: str, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        with error:
            return error.code, json.loads(error.read())


def test_malformed_requests_get_a_json_400_and_the_client_does_not_retry_it(monkeypatch, caplog):
    served = Recording(JpegCompressibility())
    with RewardServer(served) as server:
        status, body = _post(server.url, b"not json")
        assert status == 400 and "malformed request" in body["error"]
        status, body = _post(server.url, json.dumps({"images": ["AAAA"], "prompts": ["a cat"]}).encode())
        assert status == 400 and "not a base64 PNG" in body["error"]
        status, body = _post(server.url, json.dumps({"images": [], "prompts": ["a cat"]}).encode())
        assert status == 400 and "0 images but 1 prompts" in body["error"]

        monkeypatch.setattr(remote, "encode_image", lambda pixels: "not base64!")
        client = RemoteReward(server.url, max_retries=3, backoff_s=30)  # a retry would take 30 s
        started = time.monotonic()
        with (
            caplog.at_level(logging.WARNING, logger=http.__name__),
            pytest.raises(RewardServerError, match="HTTP 400 .*not a base64 PNG"),
        ):
            client(*_batch(2))
        assert time.monotonic() - started < 5
        assert not [r for r in caplog.records if "retrying" in r.getMessage()]
    assert served.calls == []


def test_the_server_binds_loopback_by_default_and_answers_health_checks():
    with RewardServer(JpegCompressibility()) as server:
        assert server.host == "127.0.0.1" and server.port > 0
        assert server.url == f"http://127.0.0.1:{server.port}/score"
        health = f"http://127.0.0.1:{server.port}/health"
        with urllib.request.urlopen(health, timeout=5) as response:
            assert json.loads(response.read()) == {"status": "ok"}


def test_a_crashing_reward_is_a_retried_500_with_its_message():
    images, prompts, metadata = _batch(2)
    served = FailsAfter(0)
    with RewardServer(served) as server:
        status, body = _post(
            server.url,
            json.dumps(
                {
                    "images": [
                        remote.encode_image(a)
                        for a in (images * 255).round().byte().permute(0, 2, 3, 1).numpy()
                    ],
                    "prompts": prompts,
                    "metadata": metadata,
                }
            ).encode(),
        )
        assert status == 500 and "the reward model crashed" in body["error"]
        with pytest.raises(
            RewardServerError, match="failed 2 attempts.*HTTP 500: .*the reward model crashed"
        ):
            RemoteReward(server.url, max_retries=1, backoff_s=0.01)(images, prompts, metadata)


def test_the_remote_reward_config_composes_and_instantiates(compose_config):
    cfg = compose_config("reward=remote")
    ensemble = instantiate(cfg.reward)
    assert isinstance(ensemble, RewardEnsemble) and list(ensemble.rewards) == ["remote"]
    client = ensemble.rewards["remote"]
    assert isinstance(client, RemoteReward)
    assert client.url == "http://127.0.0.1:8765/score"
    assert (client.batch_size, client.timeout_s, client.max_retries, client.backoff_s) == (32, 120, 5, 1.0)


def test_a_run_stops_cleanly_when_the_reward_server_dies_and_resumes_once_it_is_back(compose_config):
    server = RewardServer(FailsAfter(1)).start()  # scores iteration 0, then every request gets a 500
    cfg = compose_config(
        *FAST_RUN,
        "reward=remote",
        f"reward.rewards.remote.url='{server.url}'",
        "reward.rewards.remote.max_retries=1",
        "reward.rewards.remote.backoff_s=0.01",
        "reward.rewards.remote.timeout_s=30",
        "callbacks.images=null",  # no image grids or export: this test is about the reward server
        "callbacks.export=null",
    )
    run = Path(cfg.run_dir)
    try:
        with pytest.raises(RewardServerError, match="re-run the same command"):
            train(cfg)
    finally:
        server.stop()
    assert torch.load(run / "checkpoints/last.ckpt", weights_only=False)["epoch"] == 0
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [0]

    with RewardServer(JpegCompressibility(), port=server.port):
        train(cfg)
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [0, 1]
    assert torch.load(run / "checkpoints/last.ckpt", weights_only=False)["epoch"] == 1


def test_the_start_up_check_asks_health_and_names_the_url_and_the_command_when_down():
    with RewardServer(JpegCompressibility()) as server:
        RemoteReward(server.url).check()
        prefixed = RemoteReward(f"http://127.0.0.1:{server.port}/rewards/jpeg/score")
        assert prefixed.health_url == f"http://127.0.0.1:{server.port}/rewards/jpeg/health"
        with pytest.raises(RewardServerError, match=r"answered HTTP 404 .* is it a g2rpo reward server\?"):
            prefixed.check()  # our server has no such path: not the server the url meant
    with pytest.raises(RewardServerError) as raised:
        RemoteReward(server.url).check()
    message = str(raised.value)
    assert f"reward server http://127.0.0.1:{server.port}/health does not answer" in message
    assert f"`python -m g2rpo.rewards.remote <dotted.path.of.a.Reward> --port {server.port}`" in message


def test_a_run_whose_reward_server_is_down_stops_before_anything_loads(compose_config):
    server = RewardServer(JpegCompressibility())  # bound, never started: a free port nothing answers on
    server.stop()
    remote = "reward.rewards.remote"
    cfg = compose_config(
        *FAST_RUN, "reward=remote", f"{remote}.url='{server.url}'", f"{remote}.max_retries=0"
    )
    with pytest.raises(
        PreflightError, match=rf"reward.rewards.remote: reward server .*:{server.port}/health does"
    ):
        train(cfg)
    assert not Path(cfg.run_dir).exists()  # train() stopped at its preflight


def test_a_body_over_the_server_limit_gets_a_413_saying_what_to_change():
    images, prompts, metadata = _batch(8, size=32)  # ~4 KiB of base64 PNG an image
    served = Recording(JpegCompressibility())
    with RewardServer(served, max_request_mb=16 / 1024) as server:  # 16 KiB
        client = RemoteReward(
            server.url, batch_size=8, max_retries=3, backoff_s=30
        )  # a retry would take 30 s
        started = time.monotonic()
        with pytest.raises(RewardServerError) as raised:
            client(images, prompts, metadata)
        assert time.monotonic() - started < 5
        message = str(raised.value)
        assert "HTTP 413" in message and "over this server's limit of 0.015625 MiB" in message
        assert "lower the client's batch_size" in message and "larger --max-request-mb" in message
        # a body far over the limit and the socket buffers is read and dropped, so the client gets the answer
        status, body = _post(server.url, b" " * (8 << 20))
        assert status == 413 and "the body has 8.0 MiB" in body["error"]
        assert torch.equal(
            RemoteReward(server.url, batch_size=2)(images, prompts, metadata), JpegCompressibility()(images)
        )
    assert [len(p) for p, _ in served.calls] == [2, 2, 2, 2]


def test_a_silent_client_is_dropped_after_the_request_timeout():
    with RewardServer(JpegCompressibility(), request_timeout_s=0.2) as server:
        with socket.create_connection((server.host, server.port), timeout=5) as stalled:
            stalled.sendall(
                b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{"
            )  # then nothing
            started = time.monotonic()
            assert stalled.recv(1024) == b""  # the server closed the connection
            assert time.monotonic() - started < 2
        RemoteReward(server.url).check()  # and still serves


def test_an_answer_trickled_past_timeout_s_fails_as_a_timeout():
    """urllib's timeout bounds each wait on the socket, not the answer: a byte every 20 ms never trips it."""
    listener = socket.create_server(("127.0.0.1", 0))
    done = threading.Event()

    def trickle() -> None:
        connection, _ = listener.accept()
        with connection:
            connection.recv(1 << 16)
            connection.sendall(
                b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\nContent-Length: 200\r\n\r\n"
            )
            for _ in range(200):
                if done.wait(0.02):
                    return
                try:
                    connection.sendall(b" ")
                except OSError:  # the client gave up
                    return

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/score"
    started = time.monotonic()
    try:
        with pytest.raises(
            RewardServerError, match=r"failed 1 attempts.*timed out: the answer was still arriving"
        ):
            RemoteReward(url, timeout_s=0.3, max_retries=0)(*_batch(1))
        assert time.monotonic() - started < 1.5  # 4 s of trickle before
    finally:
        done.set()
        thread.join()
        listener.close()
