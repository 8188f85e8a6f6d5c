"""Served rewards: the LitServe server (``python -m g2rpo.rewards.serve``) and its client over loopback: exact
scores, NaN passthrough, batching across clients, per-request errors, a key, body and read limits, retries
over replicas, and a training run that stops when its server is killed and resumes once it is back."""

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

import psutil
import pytest
import torch
from conftest import FAST_RUN
from hydra.utils import instantiate

from g2rpo.data import source_images
from g2rpo.loggers import read_metrics
from g2rpo.preflight import PreflightError
from g2rpo.rewards import JpegCompressibility, RewardEnsemble, http, remote
from g2rpo.rewards.http import RewardServerError
from g2rpo.rewards.remote import RemoteReward
from g2rpo.rewards.wire import encode_image, pixels_of
from g2rpo.run import train
from g2rpo.shapes.editing import as_objects, edit_dataset
from g2rpo.shapes.world import render
from tests.served_rewards import KEY_ENV, calls, free_port, serving, start, wait_ready

SCRIPTED = "tests.served_rewards.Scripted"


def _batch(count: int = 10, size: int = 16, **extra):
    images = torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(count))
    prompts = [f"prompt {i}" for i in range(count)]
    metadata = [{"tag": "single_object", "index": i, **extra} for i in range(count)]
    return images, prompts, metadata


def _body(images, prompts, metadata) -> bytes:
    return json.dumps(
        {"images": [encode_image(a) for a in pixels_of(images)], "prompts": prompts, "metadata": metadata}
    ).encode()


def _post(url: str, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(
        url, data=body, headers={"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        with error:
            return error.code, json.loads(error.read())


@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
    """One server for the module: :class:`Scripted`, batches of up to 8 requests gathered for 50 ms."""
    folder = tmp_path_factory.mktemp("scripted")
    log = folder / "calls.jsonl"
    options = ("--kwargs", json.dumps({"log": str(log)}), "--max-batch-size", "8", "--batch-timeout", "0.05")
    with serving(SCRIPTED, *options, output=folder / "server.log") as served:
        served.log = log
        yield served


def _new_calls(served, before: int) -> list[dict]:
    return calls(served.log)[before:]


def _wait_for_calls(served, count: int, timeout_s: float = 30) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    while len(calls(served.log)) < count and time.monotonic() < deadline:
        time.sleep(0.02)
    return calls(served.log)


def test_loopback_scores_equal_the_in_process_reward_in_requests_of_batch_size(scripted):
    images, prompts, metadata = _batch(10)
    before = len(calls(scripted.log))
    one_at_a_time = RemoteReward(scripted.url, batch_size=4, max_concurrency=1, timeout_s=30, max_retries=0)
    assert torch.equal(one_at_a_time(images, prompts, metadata), JpegCompressibility()(images))
    logged = _new_calls(scripted, before)
    assert [len(call["prompts"]) for call in logged] == [4, 4, 2]  # ceil(10 / 4) requests, in order
    assert [p for call in logged for p in call["prompts"]] == prompts
    assert [m for call in logged for m in call["metadata"]] == metadata
    concurrent = RemoteReward(scripted.url, batch_size=2, max_concurrency=3, timeout_s=30, max_retries=0)
    assert torch.equal(concurrent(images, prompts, metadata), JpegCompressibility()(images))  # order kept


def test_unscorable_samples_come_back_as_nan(scripted):
    images, prompts, metadata = _batch(4)
    metadata[1]["nan"] = metadata[2]["nan"] = True
    scores = RemoteReward(scripted.url, max_retries=0)(images, prompts, metadata)
    expected = JpegCompressibility()(images)
    assert scores[0] == expected[0] and scores[3] == expected[3]
    assert math.isnan(scores[1]) and math.isnan(scores[2])


def test_requests_of_two_concurrent_clients_are_scored_in_one_reward_call(scripted):
    """While the worker is busy, two clients' requests queue; the next batch takes both (LitServe's dynamic
    batching), so the reward is called once for both and each client gets its own scores back."""
    before = len(calls(scripted.log))
    blocker = threading.Thread(target=lambda: _post(scripted.url, _body(*_batch(1, sleep=1.0))))
    blocker.start()
    _wait_for_calls(scripted, before + 1)  # the blocker is being scored: the worker sleeps for 1 s
    batches = {"a": _batch(4), "b": _batch(5)}
    answers: dict[str, tuple[int, dict]] = {}
    clients = [
        threading.Thread(
            target=lambda name=name, batch=batch: answers.__setitem__(
                name, _post(scripted.url, _body(*batch))
            )
        )
        for name, batch in batches.items()
    ]
    for client in clients:
        client.start()
    for thread in [*clients, blocker]:
        thread.join()
    for name, (images, _, _) in batches.items():
        status, body = answers[name]
        assert status == 200 and body["batch"] == {"requests": 2, "images": 9}
        assert body["scores"] == pytest.approx(JpegCompressibility()(images).tolist())
    together = _new_calls(scripted, before)[1:]
    assert len(together) == 1 and sorted(together[0]["prompts"]) == sorted(
        [*batches["a"][1], *batches["b"][1]]
    )


def test_a_malformed_request_fails_alone_not_the_batch_it_lands_in(scripted):
    """LitServe fails a whole batch when one input fails to decode; ours answers that request 400 alone."""
    blocker = threading.Thread(target=lambda: _post(scripted.url, _body(*_batch(1, sleep=0.5))))
    blocker.start()
    time.sleep(0.1)
    bad = json.dumps({"images": ["AAAA"], "prompts": ["a cat"]}).encode()
    images, prompts, metadata = _batch(3)
    answers = {}
    threads = [
        threading.Thread(target=lambda: answers.__setitem__("bad", _post(scripted.url, bad))),
        threading.Thread(
            target=lambda: answers.__setitem__("good", _post(scripted.url, _body(images, prompts, metadata)))
        ),
    ]
    for thread in threads:
        thread.start()
    for thread in [*threads, blocker]:
        thread.join()
    assert answers["bad"][0] == 400 and "not a base64 PNG" in answers["bad"][1]["error"]
    assert answers["good"][0] == 200
    assert answers["good"][1]["scores"] == pytest.approx(JpegCompressibility()(images).tolist())


def test_a_reward_slower_than_the_timeout_fails_after_max_retries_plus_one_attempts(scripted, caplog):
    images, prompts, metadata = _batch(2, sleep=0.6, slow=True)
    client_kwargs = {"timeout_s": 0.2, "max_retries": 2, "backoff_s": 0.01}
    with (
        caplog.at_level(logging.WARNING, logger=http.__name__),
        pytest.raises(RewardServerError, match="failed 3 attempts") as raised,
    ):
        RemoteReward(scripted.url, **client_kwargs)(images, prompts, metadata)
    assert len([r for r in caplog.records if "retrying" in r.getMessage()]) == 2
    assert scripted.url in str(raised.value) and "timed out" in str(raised.value)
    deadline = time.monotonic() + 30  # the server scores the abandoned attempts all the same: 3 x 2 images
    while len(_logged(scripted, "slow")) < 6 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(_logged(scripted, "slow")) == 6


def _logged(served, marker: str) -> list[dict]:
    """The metadata of every image the served reward was called on that carries ``marker``."""
    return [m for call in calls(served.log) for m in call["metadata"] if marker in m]


def test_malformed_requests_get_a_json_400_and_the_client_does_not_retry_it(scripted, monkeypatch, caplog):
    status, body = _post(scripted.url, b"not json")
    assert status == 400 and "malformed request" in body["error"]
    status, body = _post(scripted.url, json.dumps({"images": ["AAAA"], "prompts": ["a cat"]}).encode())
    assert status == 400 and "not a base64 PNG" in body["error"]
    status, body = _post(scripted.url, json.dumps({"images": [], "prompts": ["a cat"]}).encode())
    assert status == 400 and "0 images but 1 prompts" in body["error"]

    monkeypatch.setattr(remote, "encode_image", lambda pixels: "not base64!")
    client = RemoteReward(scripted.url, max_retries=3, backoff_s=30)  # a retry would take 30 s
    started = time.monotonic()
    with (
        caplog.at_level(logging.WARNING, logger=http.__name__),
        pytest.raises(RewardServerError, match="HTTP 400 .*not a base64 PNG"),
    ):
        client(*_batch(2, malformed=True))
    assert time.monotonic() - started < 5
    assert not [r for r in caplog.records if "retrying" in r.getMessage()]
    assert not _logged(scripted, "malformed")  # none reached the reward
    assert "a cat" not in [p for call in calls(scripted.log) for p in call["prompts"]]


def test_the_server_binds_loopback_by_default_and_answers_health_checks(scripted):
    server = psutil.Process(scripted.process.pid)
    listening = {
        connection.laddr
        for process in [server, *server.children(recursive=True)]
        for connection in process.net_connections(kind="tcp")
        if connection.status == psutil.CONN_LISTEN
    }
    assert {(address.ip, address.port) for address in listening} == {("127.0.0.1", scripted.port)}
    with urllib.request.urlopen(f"http://127.0.0.1:{scripted.port}/health", timeout=5) as response:
        assert response.read() == b"ok"


def test_a_crashing_reward_is_a_retried_500_with_its_message(scripted):
    images, prompts, metadata = _batch(2, **{"raise": "the reward model crashed"})
    status, body = _post(scripted.url, _body(images, prompts, metadata))
    assert status == 500 and "the reward model crashed" in body["error"]
    with pytest.raises(RewardServerError, match="failed 2 attempts.*HTTP 500: .*the reward model crashed"):
        RemoteReward(scripted.url, max_retries=1, backoff_s=0.01)(images, prompts, metadata)


def test_a_reward_without_named_scores_says_so(scripted):
    """Moved from test_evaluation: ``/scores`` of a reward with no ``scores()`` is a 400 naming ``/score``."""
    with pytest.raises(RewardServerError, match="no named scores"):
        remote.RemoteNamedReward(scripted.url, max_retries=0).scores(*_batch(2))


def test_a_served_reward_gets_the_sources_over_the_wire(scripted):
    """Moved from test_editing: the ensemble gives an edit's source images to the client, which sends them
    with the edits; the served reward receives them losslessly (PNG of the rounded pixels)."""
    dataset = edit_dataset("train", per_type=1, seed=8)
    metadata = dataset.metadata[:3]
    images = torch.stack([render(as_objects(m["target"])) for m in metadata])
    before = len(calls(scripted.log))
    served = RemoteReward(scripted.url, batch_size=2, max_concurrency=1)
    RewardEnsemble({"served": served})(images, dataset.prompts[:3], metadata)
    received = torch.tensor([pixels for call in _new_calls(scripted, before) for pixels in call["sources"]])
    expected = (source_images(metadata, 32) * 255).round()
    torch.testing.assert_close(received.float(), expected)


def test_several_urls_are_used_in_turn_and_a_retry_goes_to_the_next(scripted, monkeypatch):
    dead = f"http://127.0.0.1:{free_port()}/score"
    images, prompts, metadata = _batch(6)
    expected = JpegCompressibility()(images)
    # each request starts at the next URL: the dead one fails a request that may not retry...
    one_try = RemoteReward([scripted.url, dead], batch_size=2, max_concurrency=1, max_retries=0)
    with pytest.raises(RewardServerError, match=rf"{dead} failed 1 attempts.*Connection refused"):
        one_try(images, prompts, metadata)
    # rank r of a distributed run starts at the r-th URL
    with monkeypatch.context() as patched:
        patched.setenv("RANK", "1")
        second_first = RemoteReward([scripted.url, dead], batch_size=2, max_concurrency=1, max_retries=0)
        with pytest.raises(RewardServerError, match=rf"{dead} failed 1 attempts"):
            second_first(images[:2], prompts[:2], metadata[:2])
    # ...and its retry goes to the live one
    retried = RemoteReward(
        [dead, scripted.url], batch_size=2, max_concurrency=2, max_retries=1, backoff_s=0.01
    )
    assert torch.equal(retried(images, prompts, metadata), expected)
    with pytest.raises(RewardServerError, match=f"reward server {dead.replace('score', 'health')} does not"):
        retried.check()


def test_the_remote_reward_config_composes_and_instantiates(compose_config):
    cfg = compose_config("reward=remote")
    ensemble = instantiate(cfg.reward)
    assert isinstance(ensemble, RewardEnsemble) and list(ensemble.rewards) == ["remote"]
    client = ensemble.rewards["remote"]
    assert isinstance(client, RemoteReward)
    assert client.urls == ["http://127.0.0.1:8765/score"]
    assert (client.batch_size, client.max_concurrency, client.timeout_s, client.connect_timeout_s) == (
        32,
        4,
        120,
        10,
    )
    assert (client.max_retries, client.backoff_s, client.api_key_env) == (5, 1.0, None)
    replicas = compose_config(
        "reward=remote", "reward.rewards.remote.url=[http://a:1/score,http://b:2/score]"
    )
    assert instantiate(replicas.reward).rewards["remote"].urls == ["http://a:1/score", "http://b:2/score"]


def test_the_start_up_check_asks_health_and_names_the_url_and_the_command_when_down(scripted):
    RemoteReward(scripted.url).check()
    prefixed = RemoteReward(f"http://127.0.0.1:{scripted.port}/rewards/jpeg/score")
    assert prefixed.health_url == f"http://127.0.0.1:{scripted.port}/rewards/jpeg/health"
    with pytest.raises(RewardServerError, match=r"answered HTTP 404 .* is it a g2rpo reward server\?"):
        prefixed.check()  # our server has no such path: not the server the url meant
    port = free_port()
    with pytest.raises(RewardServerError) as raised:
        RemoteReward(f"http://127.0.0.1:{port}/score").check()
    message = str(raised.value)
    assert f"reward server http://127.0.0.1:{port}/health does not answer" in message
    assert f"`python -m g2rpo.rewards.serve <dotted.path.of.a.Reward> --port {port}`" in message


def test_a_run_whose_reward_server_is_down_stops_before_anything_loads(compose_config):
    url = f"http://127.0.0.1:{free_port()}/score"  # nothing answers there
    remote_reward = "reward.rewards.remote"
    cfg = compose_config(
        *FAST_RUN, "reward=remote", f"{remote_reward}.url='{url}'", f"{remote_reward}.max_retries=0"
    )
    with pytest.raises(
        PreflightError, match=r"reward.rewards.remote: reward server .*/health does not answer"
    ):
        train(cfg)
    assert not Path(cfg.run_dir).exists()  # train() stopped at its preflight


@pytest.fixture(scope="module")
def strict(tmp_path_factory):
    """A server with a key, a 16 KiB body limit and a 0.3 s read timeout."""
    folder = tmp_path_factory.mktemp("strict")
    options = ("--max-request-mb", str(16 / 1024), "--read-timeout", "0.3")
    with serving(
        "g2rpo.rewards.JpegCompressibility", *options, output=folder / "server.log", key="s3cret"
    ) as served:
        yield served


def test_a_wrong_key_is_refused_with_401_and_not_retried(strict, monkeypatch, caplog):
    images, prompts, metadata = _batch(2)
    monkeypatch.setenv("WRONG_KEY", "guess")
    monkeypatch.setenv("RIGHT_KEY", "s3cret")
    wrong = RemoteReward(strict.url, max_retries=3, backoff_s=30, api_key_env="WRONG_KEY")  # a retry: 30 s
    started = time.monotonic()
    with (
        caplog.at_level(logging.WARNING, logger=http.__name__),
        pytest.raises(RewardServerError, match="HTTP 401 .*wrong X-API-Key"),
    ):
        wrong(images, prompts, metadata)
    assert time.monotonic() - started < 5
    assert not [r for r in caplog.records if "retrying" in r.getMessage()]
    with pytest.raises(RewardServerError, match=r"refused the key \(HTTP 401\): the client sent \$WRONG_KEY"):
        wrong.check()
    with pytest.raises(RewardServerError, match=r"refused the key .*sent no key"):
        RemoteReward(strict.url).check()
    assert _post(strict.url, _body(images, prompts, metadata))[0] == 401  # no key at all
    right = RemoteReward(strict.url, api_key_env="RIGHT_KEY")
    right.check()
    assert torch.equal(right(images, prompts, metadata), JpegCompressibility()(images))
    assert "s3cret" not in repr(right)
    monkeypatch.delenv("RIGHT_KEY")
    with pytest.raises(ValueError, match=r"\$RIGHT_KEY is not set"):
        RemoteReward(strict.url, api_key_env="RIGHT_KEY")


def test_a_body_over_the_server_limit_gets_a_413_saying_what_to_change(strict, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "s3cret")
    images, prompts, metadata = _batch(8, size=32)  # ~4 KiB of base64 PNG an image
    client = RemoteReward(strict.url, batch_size=8, max_retries=3, backoff_s=30, api_key_env=KEY_ENV)
    started = time.monotonic()
    with pytest.raises(RewardServerError) as raised:
        client(images, prompts, metadata)
    assert time.monotonic() - started < 5  # not retried
    message = str(raised.value)
    assert "HTTP 413" in message and "over this server's limit of 0.015625 MiB" in message
    assert "lower the client's batch_size" in message and "larger --max-request-mb" in message
    # a body far over the limit and the socket buffers is read and dropped, so the client gets the answer
    status, body = _post(strict.url, b" " * (8 << 20), {"X-API-Key": "s3cret"})
    assert status == 413 and "the body has 8.0 MiB" in body["error"]
    small = RemoteReward(strict.url, batch_size=2, api_key_env=KEY_ENV)
    assert torch.equal(small(images, prompts, metadata), JpegCompressibility()(images))


def test_a_client_silent_mid_body_gets_a_408_and_the_server_keeps_serving(strict, monkeypatch):
    with socket.create_connection(("127.0.0.1", strict.port), timeout=10) as stalled:
        stalled.sendall(
            b"POST /score HTTP/1.1\r\nHost: x\r\nX-API-Key: s3cret\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000\r\n\r\n{"
        )  # then nothing
        started = time.monotonic()
        answer = b""
        while b"sent no data" not in answer and (piece := stalled.recv(4096)):  # headers and body may split
            answer += piece
        assert answer.startswith(b"HTTP/1.1 408") and b"sent no data for 0.3 s" in answer
        assert time.monotonic() - started < 5
    monkeypatch.setenv(KEY_ENV, "s3cret")
    RemoteReward(strict.url, api_key_env=KEY_ENV).check()  # and still serves


def test_the_read_timeout_is_not_the_connect_timeout():
    """A short connect_timeout_s bounds the connection only: a reward slower than it still answers."""
    listener = socket.create_server(("127.0.0.1", 0))

    def slow() -> None:
        connection, _ = listener.accept()
        with connection:
            connection.recv(1 << 16)
            time.sleep(0.5)
            body = b'{"scores": [0.5]}'
            connection.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))

    thread = threading.Thread(target=slow, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/score"
        client = RemoteReward(url, connect_timeout_s=0.1, timeout_s=5, max_retries=0)
        assert client(*_batch(1)).tolist() == [0.5]
    finally:
        thread.join()
        listener.close()


def test_a_run_stops_cleanly_when_its_reward_server_is_killed_and_resumes_once_it_is_back(
    compose_config, tmp_path, caplog
):
    """The server scores iteration 0, then dies (SIGKILL of its process group) on iteration 1's request: the
    client retries, the run stops with the checkpoint of iteration 0, and re-running it once a new server is up
    resumes there. A server that comes back during a client's backoff is picked up."""
    port = free_port()
    options = ("--kwargs", json.dumps({"die_after_calls": 1}))
    server = start(SCRIPTED, *options, port=port, output=tmp_path / "server.log")
    wait_ready(server)
    cfg = compose_config(
        *FAST_RUN,
        "reward=remote",
        f"reward.rewards.remote.url='{server.url}'",
        "reward.rewards.remote.max_retries=2",
        "reward.rewards.remote.backoff_s=0.05",
        "reward.rewards.remote.timeout_s=30",
        "callbacks.images=null",  # no image grids or export: this test is about the reward server
        "callbacks.export=null",
    )
    run = Path(cfg.run_dir)
    try:
        with (
            caplog.at_level(logging.WARNING, logger=http.__name__),
            pytest.raises(RewardServerError, match="failed 3 attempts.*re-run the same command"),
        ):
            train(cfg)
    finally:
        server.kill()
    assert server.process.returncode is not None
    assert len([r for r in caplog.records if "retrying" in r.getMessage()]) == 2
    assert torch.load(run / "checkpoints/last.ckpt", weights_only=False)["epoch"] == 0
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [0]

    back = start(SCRIPTED, port=port, output=tmp_path / "server.log")  # not ready for seconds yet
    try:
        images, prompts, metadata = _batch(2)
        patient = RemoteReward(back.url, max_retries=20, backoff_s=0.1, max_backoff_s=2)  # ~35 s of patience
        assert torch.equal(patient(images, prompts, metadata), JpegCompressibility()(images))
        train(cfg)
    finally:
        back.kill()
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [0, 1]
    assert torch.load(run / "checkpoints/last.ckpt", weights_only=False)["epoch"] == 1


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


def test_a_wrong_dotted_path_or_an_unset_key_variable_stops_the_server_before_it_starts(monkeypatch, capsys):
    from g2rpo.rewards.serve import build_server
    from g2rpo.rewards.serve.__main__ import main

    with pytest.raises(
        ValueError, match="module g2rpo.rewards has no 'Nope': check the reward's dotted path"
    ):
        build_server("g2rpo.rewards.Nope")
    monkeypatch.delenv("UNSET_REWARD_KEY", raising=False)
    with pytest.raises(SystemExit) as exited:
        main(["g2rpo.rewards.JpegCompressibility", "--api-key-env", "UNSET_REWARD_KEY"])
    assert exited.value.code == 2 and "$UNSET_REWARD_KEY is not set" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        main(["JpegCompressibility"])
    assert exited.value.code == 2 and "is not a dotted path" in capsys.readouterr().err


def test_a_run_whose_key_variable_is_unset_stops_before_anything_loads(compose_config, monkeypatch):
    monkeypatch.delenv("UNSET_REWARD_KEY", raising=False)
    cfg = compose_config(*FAST_RUN, "reward=remote", "reward.rewards.remote.api_key_env=UNSET_REWARD_KEY")
    with pytest.raises(PreflightError, match=r"reward.rewards.remote: .*\$UNSET_REWARD_KEY is not set"):
        train(cfg)
    assert not Path(cfg.run_dir).exists()


def test_the_api_scores_a_batch_in_one_call_per_image_size_and_answers_bad_requests_alone():
    """LitServe's worker side, in process: a batch of requests is one reward call per image size (and endpoint),
    each request gets its own scores back in order, and a malformed or empty request is answered alone."""
    from g2rpo.rewards.serve import NamedScoreRequest, RewardAPI, ScoreRequest

    api = RewardAPI("tests.served_rewards.OnDevice", max_batch_size=8)
    api.setup("cpu")
    assert api.reward.device == "cpu"  # the worker's device, as the reward takes one

    def request(count: int, size: int, cls=ScoreRequest):
        images = torch.rand(count, 3, size, size)
        encoded = [encode_image(a) for a in pixels_of(images)]
        return cls(images=encoded, prompts=["p"] * count), (pixels_of(images) / 255).mean(axis=(1, 2, 3))

    (small, small_means), (large, large_means), (other, other_means) = (
        request(2, 8),
        request(3, 16),
        request(1, 8),
    )
    bad = ScoreRequest(images=["AAAA"], prompts=["p"])
    empty = ScoreRequest(images=[], prompts=[])
    named, _ = request(1, 8, NamedScoreRequest)
    outcomes = api.predict([api.decode_request(r) for r in (small, bad, large, other, empty, named)])
    assert sorted(api.reward.calls) == [3, 3]  # 2 + 1 images of 8 px together, the 3 of 16 px apart
    assert [o.status for o in outcomes] == [200, 400, 200, 200, 200, 400]
    for outcome, means in (
        (outcomes[0], small_means),
        (outcomes[2], large_means),
        (outcomes[3], other_means),
    ):
        assert outcome.body["scores"] == pytest.approx(means.tolist(), abs=1e-6)
    assert outcomes[0].body["batch"] == outcomes[3].body["batch"] == {"requests": 2, "images": 3}
    assert "not a base64 PNG" in outcomes[1].body["error"] and outcomes[4].body["scores"] == []
    assert "no named scores" in outcomes[5].body["error"]
    answer = api.encode_response(outcomes[1])
    assert answer.status_code == 400 and json.loads(answer.body)["error"].startswith("malformed request")
