"""An OpenAI-compatible ``{base_url}/chat/completions`` client (vLLM, SGLang, a hosted API), shared by the
VLM judge reward and Pair-GRPO's LLM completion of pairs.

Plain HTTP through :func:`g2rpo.rewards.http.post_with_retries` rather than the ``openai`` package: one JSON
POST needs no new dependency. Constructing a client contacts nothing; :meth:`ChatClient.check` (which
:func:`g2rpo.preflight.check` calls on a reward's clients before the model loads) and the first request do.
The API key is ``api_key``, else the environment variable ``api_key_env``, else ``"EMPTY"`` (what vLLM /
SGLang accept when started without ``--api-key``).
"""

from __future__ import annotations

import http.client
import json
import os
import threading
from typing import Any

from g2rpo.rewards.http import RewardServerError, all_or_nothing, get, post_with_retries

RETRIED_STATUS = 429  # a busy server's "too many requests": retried like a 5xx


class ChatClient:
    """Sends user messages ``max_concurrency`` at a time, each retried as ``RemoteReward``'s requests; the first
    request that fails for good stops the others and raises."""

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        temperature: float = 0.0,
        max_tokens: int = 512,
        max_concurrency: int = 16,
        timeout_s: float = 120.0,
        max_retries: int = 5,
        backoff_s: float = 1.0,
        max_backoff_s: float = 60.0,
        what: str = "chat server",
    ) -> None:
        if max_concurrency < 1 or timeout_s <= 0 or max_retries < 0 or backoff_s < 0:
            raise ValueError(
                f"{what}: needs max_concurrency >= 1, timeout_s > 0, max_retries >= 0 and backoff_s >= 0; got "
                f"max_concurrency={max_concurrency}, timeout_s={timeout_s}, max_retries={max_retries}, "
                f"backoff_s={backoff_s}"
            )
        self.base_url = base_url.rstrip("/")
        self.url = self.base_url + "/chat/completions"
        self.model = model
        self._api_key = api_key if api_key is not None else os.environ.get(api_key_env, "EMPTY")
        self._key_source = "api_key" if api_key is not None else f"the environment variable {api_key_env}"
        self.temperature = float(temperature)
        self.max_tokens = int(max_tokens)
        self.max_concurrency = int(max_concurrency)
        self.timeout_s = float(timeout_s)
        self.max_retries = int(max_retries)
        self.backoff_s = float(backoff_s)
        self.max_backoff_s = float(max_backoff_s)
        self.what = what

    def __repr__(self) -> str:  # never shows the API key
        return f"ChatClient(url={self.url!r}, model={self.model!r}, max_concurrency={self.max_concurrency})"

    def check(self, timeout_s: float = 5.0) -> None:
        """Raise :class:`RewardServerError` unless ``GET {base_url}/models`` (served by vLLM, SGLang and hosted
        APIs alike) answers with a model list holding ``model``: a server that is down, refuses the key, or
        serves another model fails before the run loads its own, not at its first scored batch."""
        url = self.base_url + "/models"
        start = (
            "start the server first (the vllm / sglang commands are in conf/reward/unified_reward.yaml), or "
            "correct base_url (the OpenAI API lives under /v1)"
        )
        try:
            status, body = get(url, timeout_s=timeout_s, headers={"Authorization": f"Bearer {self._api_key}"})
        except (OSError, http.client.HTTPException) as error:
            raise RewardServerError(
                f"{self.what} {url} does not answer ({type(error).__name__}: {error}): {start}"
            ) from None
        if status in (401, 403):
            raise RewardServerError(
                f"{self.what} {url} refused the API key (HTTP {status}); the key comes from {self._key_source}"
            )
        try:
            served = [entry["id"] for entry in json.loads(body)["data"]] if status == 200 else None
        except (ValueError, KeyError, TypeError):
            served = None
        if served is None:
            raise RewardServerError(
                f"{self.what} {url} answered HTTP {status} {body[:200]!r}, not an OpenAI model list: {start}"
            )
        if self.model not in served:
            raise RewardServerError(
                f"{self.what} {url} does not serve model={self.model!r}; it serves {served}: set the client's "
                f"model to one of them, or start the server with --served-model-name {self.model}"
            )

    def complete_all(self, contents: list[Any]) -> list[str | None]:
        """The assistant's text for each user message ``content`` (a string, or OpenAI's list of parts), in
        order; ``None`` where an answer has no text."""
        return all_or_nothing(self.complete, contents, self.max_concurrency, "chat")

    def complete(self, content: Any, stop: threading.Event | None = None) -> str | None:
        """One user message's answer; a body that is not a chat completion means a wrong server."""
        body = json.dumps(
            {
                "model": self.model,
                "messages": [{"role": "user", "content": content}],
                "temperature": self.temperature,
                "max_tokens": self.max_tokens,
            }
        ).encode()
        raw = post_with_retries(
            self.url,
            body,
            {"Content-Type": "application/json", "Authorization": f"Bearer {self._api_key}"},
            what=self.what,
            timeout_s=self.timeout_s,
            max_retries=self.max_retries,
            backoff_s=self.backoff_s,
            max_backoff_s=self.max_backoff_s,
            retried_statuses=frozenset({RETRIED_STATUS}),
            stop=stop or threading.Event(),
            hint=f"; check model={self.model!r} and the API key",
        )
        try:
            message = json.loads(raw)["choices"][0]["message"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise RewardServerError(
                f"{self.what} {self.url} answered without an OpenAI chat completion: {raw[:200]!r}"
            ) from None
        text = message.get("content") if isinstance(message, dict) else None
        return text if isinstance(text, str) else None
