"""VLM judge reward against a fake OpenAI-compatible server on loopback: request shape, ordered scores under
bounded concurrency, NaN for answers without a valid score, retries, failures, and a config that builds
without contacting any server."""

from __future__ import annotations

import base64
import io
import json
import logging
import math
import re
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import torch
from hydra.utils import instantiate
from PIL import Image

from g2rpo import preflight
from g2rpo.rewards import RewardEnsemble
from g2rpo.rewards.chat import ChatClient
from g2rpo.rewards.http import RewardServerError
from g2rpo.rewards.judge import DEFAULT_PROMPT_TEMPLATE, VLMJudge

KEY = "test-key"
MODEL = "judge-model"


class FakeJudgeServer(ThreadingHTTPServer):
    """Answers chat completions like vLLM / SGLang, after checking the request the way a real one would.

    The score is derived from the caption "prompt <i>" (``i % 5 + 1``) so the test can check the order;
    the captions "garbled" and "boastful" get an answer without a score and one with a score of 9.
    """

    daemon_threads = True
    block_on_close = False

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.lock = threading.Lock()
        self.attempts = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.statuses: list[int] = []  # answered, one per request, before any success
        self.always_status: int | None = None
        self.delay_s = 0.0
        self.release = threading.Event()  # ends the delays at teardown
        self.payloads: list[dict[str, Any]] = []
        self.image_sizes: list[tuple[int, int]] = []

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class _Handler(BaseHTTPRequestHandler):
    server: FakeJudgeServer

    def do_GET(self) -> None:
        """vLLM's and SGLang's model list, behind the same key."""
        if self.headers.get("Authorization") != f"Bearer {KEY}":
            self._send(401, {"error": {"message": "invalid API key"}})
        elif self.path != "/v1/models":
            self._send(404, {"error": {"message": f"no route {self.path}"}})
        else:
            self._send(200, {"object": "list", "data": [{"id": MODEL, "object": "model"}]})

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        server = self.server
        with server.lock:
            server.attempts += 1
            server.in_flight += 1
            server.max_in_flight = max(server.max_in_flight, server.in_flight)
            status = server.statuses.pop(0) if server.statuses else server.always_status
        try:
            server.release.wait(server.delay_s)
            if status is not None:
                reply = status, {"error": {"message": f"scripted HTTP {status}"}}
            elif self.headers.get("Authorization") != f"Bearer {KEY}":
                reply = 401, {"error": {"message": "invalid API key"}}
            elif self.path != "/v1/chat/completions":
                reply = 404, {"error": {"message": f"no route {self.path}"}}
            else:
                reply = self._answer(json.loads(body))
        finally:
            # Leave the in-flight count before answering: once the client has its reply it may send the
            # next request, which must not be counted beside this finished one.
            with server.lock:
                server.in_flight -= 1
        self._send(*reply)

    def _answer(self, payload: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        try:
            caption, size = self._check(payload)
        except (AssertionError, KeyError, ValueError, OSError) as error:
            return 400, {"error": {"message": f"bad request: {error!r}"}}
        with self.server.lock:
            self.server.payloads.append(payload)
            self.server.image_sizes.append(size)
        if caption == "garbled":
            content = "The image is lovely, but I would rather not give a number."
        elif caption == "boastful":
            content = "Astonishing. Final Score: 9"
        else:
            index = int(re.fullmatch(r"prompt (\d+)", caption).group(1))
            content = f"The caption says {caption!r}; the image shows it well.\nFinal Score: {index % 5 + 1}"
        return 200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}

    @staticmethod
    def _check(payload: dict[str, Any]) -> tuple[str, tuple[int, int]]:
        assert payload["model"] == MODEL, payload["model"]
        (message,) = payload["messages"]
        assert message["role"] == "user"
        image_part, text_part = message["content"]
        assert image_part["type"] == "image_url" and text_part["type"] == "text"
        prefix = "data:image/png;base64,"
        url = image_part["image_url"]["url"]
        assert url.startswith(prefix), url[:40]
        image = Image.open(io.BytesIO(base64.b64decode(url[len(prefix) :], validate=True)), formats=["PNG"])
        image.load()
        assert image.mode == "RGB", image.mode
        caption = re.search(r"Text caption: \[(.*)\]", text_part["text"]).group(1)
        assert caption in text_part["text"]
        return caption, image.size

    def _send(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client timed out
            pass

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def server() -> Iterator[FakeJudgeServer]:
    httpd = FakeJudgeServer()
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield httpd
    httpd.release.set()
    httpd.shutdown()
    thread.join()
    httpd.server_close()


def _judge(
    server: FakeJudgeServer, prompt_template: str = DEFAULT_PROMPT_TEMPLATE, **kwargs: Any
) -> VLMJudge:
    options = {"api_key": KEY, "timeout_s": 5.0, "max_retries": 2, "backoff_s": 0.01, **kwargs}
    return VLMJudge(
        ChatClient(base_url=server.base_url, model=MODEL, **options), prompt_template=prompt_template
    )


def _images(count: int, size: int = 8) -> torch.Tensor:
    return torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(0))


def test_scores_come_back_in_order_with_bounded_concurrency(server):
    server.delay_s = 0.05  # long enough for requests to overlap
    prompts = [f"prompt {i}" for i in range(11)]
    judge = _judge(server, max_concurrency=3)
    scores = judge(_images(11), prompts, [{} for _ in prompts])
    assert scores.dtype == torch.float32
    assert scores.tolist() == pytest.approx([(i % 5 + 1) / 5 for i in range(11)])
    assert server.attempts == 11
    assert 2 <= server.max_in_flight <= 3
    assert server.image_sizes == [(512, 512)] * 11
    assert {(p["temperature"], p["max_tokens"]) for p in server.payloads} == {(0.0, 512)}


def test_answers_without_a_valid_score_are_nan_and_logged(server, caplog):
    caplog.set_level(logging.WARNING, logger="g2rpo.rewards.judge")
    scores = _judge(server)(_images(3), ["prompt 3", "garbled", "boastful"], [{}] * 3)
    assert scores[0].item() == pytest.approx(0.8)
    assert math.isnan(scores[1].item()) and math.isnan(scores[2].item())
    assert "rather not give a number" in caplog.text
    assert "outside [0, 5]" in caplog.text and "Astonishing" in caplog.text


def test_an_ensemble_keeps_the_nan_of_an_unscorable_image(server):
    output = RewardEnsemble({"judge": _judge(server)})(_images(2), ["prompt 0", "garbled"], [{}] * 2)
    assert output.scores["judge"][0].item() == pytest.approx(0.2)
    assert math.isnan(output.scores["judge"][1].item())


@pytest.mark.parametrize("status", [503, 429])
def test_a_busy_server_is_retried(server, status):
    server.statuses = [status]
    scores = _judge(server)(_images(1), ["prompt 4"], [{}])
    assert scores.tolist() == [1.0]
    assert server.attempts == 2


def test_persistent_server_errors_raise_after_all_attempts(server):
    server.always_status = 500
    with pytest.raises(RewardServerError, match=r"failed 3 attempts.*HTTP 500.*resume"):
        _judge(server, max_retries=2)(_images(1), ["prompt 1"], [{}])
    assert server.attempts == 3


def test_a_rejected_key_raises_at_once(server):
    with pytest.raises(RewardServerError, match="HTTP 401.*invalid API key"):
        _judge(server, api_key="wrong")(_images(1), ["prompt 1"], [{}])
    assert server.attempts == 1


def test_the_key_comes_from_the_environment(server, monkeypatch):
    monkeypatch.setenv("JUDGE_TEST_KEY", KEY)
    judge = _judge(server, api_key=None, api_key_env="JUDGE_TEST_KEY")
    assert judge(_images(1), ["prompt 0"], [{}]).tolist() == [pytest.approx(0.2)]
    assert KEY not in repr(judge)


def test_a_server_slower_than_the_timeout_is_retried_then_raises(server):
    server.delay_s = 3.0
    started = time.monotonic()
    with pytest.raises(RewardServerError, match=r"failed 2 attempts.*timed out"):
        _judge(server, timeout_s=0.2, max_retries=1)(_images(1), ["prompt 1"], [{}])
    assert server.attempts == 2
    assert time.monotonic() - started < 2.0


def test_a_template_without_the_prompt_is_refused(server):
    with pytest.raises(ValueError, match=r"\{prompt\}"):
        _judge(server, prompt_template="Rate this image from 1 to 5.")


def test_the_config_builds_without_contacting_a_server(compose_config, monkeypatch):
    def no_network(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the reward contacted a server while being built")

    monkeypatch.setattr(urllib.request.OpenerDirector, "open", no_network)
    reward = instantiate(compose_config("reward=unified_reward").reward)
    judge = reward.rewards["unified_reward"]
    assert isinstance(judge, VLMJudge)
    assert judge.url == "http://127.0.0.1:17140/v1/chat/completions"
    assert judge.model == "UnifiedReward-7b-v1.5"
    assert (judge.max_score, judge.image_size) == (5.0, 512)


def test_the_start_up_check_asks_for_the_model_list(server):
    client = ChatClient(base_url=server.base_url, model=MODEL, api_key=KEY, what="VLM judge")
    client.check()  # serves MODEL under this key
    assert server.attempts == 0  # no chat completion was asked for
    with pytest.raises(RewardServerError, match=r"does not serve model='other'; it serves \['judge-model'\]"):
        ChatClient(base_url=server.base_url, model="other", api_key=KEY).check()
    with pytest.raises(
        RewardServerError, match=r"refused the API key \(HTTP 401\); the key comes from api_key"
    ):
        ChatClient(base_url=server.base_url, model=MODEL, api_key="wrong").check()
    with pytest.raises(
        RewardServerError, match=r"/models answered HTTP 404 .* correct base_url \(the OpenAI API"
    ):
        ChatClient(base_url=server.base_url.removesuffix("/v1"), model=MODEL, api_key=KEY).check()
    port = server.server_address[1]
    server.shutdown()
    server.server_close()
    with pytest.raises(
        RewardServerError, match=rf"VLM judge http://127.0.0.1:{port}/v1/models does not answer"
    ):
        client.check()


def test_preflight_checks_the_judge_before_the_model_loads(server, compose_config, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    chat = "reward.rewards.unified_reward.chat"
    preflight.check(
        compose_config("reward=unified_reward", f"{chat}.base_url={server.base_url}", f"{chat}.model={MODEL}")
    )
    cfg = compose_config(
        "reward=unified_reward", f"{chat}.base_url={server.base_url}"
    )  # UnifiedReward-7b-v1.5
    with pytest.raises(preflight.PreflightError) as error:
        preflight.check(cfg)
    assert str(error.value).startswith("a reward server does not answer (nothing is loaded until it does):\n")
    assert f"{chat}: VLM judge {server.base_url}/models does not serve model='UnifiedReward-7b-v1.5'" in str(
        error.value
    )
