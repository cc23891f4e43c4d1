"""The model, through litellm: imported lazily, with an explicit timeout and a narrow retry rule.

litellm costs 6-8 s and ~120 MiB to import, and by default fetches its cost map over the network
while importing; `import_litellm` sets LITELLM_LOCAL_MODEL_COST_MAP first and is only called by the
runner's own process. Requests always carry `timeout=` (litellm's default is 6000 s). A request is
retried, with capped exponential backoff, only when the provider answered 429 or 5xx; litellm's
and the OpenAI SDK's own retries are switched off so that this rule is the only one.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import uuid
import warnings
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)


class NoModelConfigured(Exception):
    """No model name: the runner cannot start (exit code 2)."""


class LlmError(Exception):
    """A model call failed for good. `retryable`: a later attempt of the task may succeed (429/5xx
    after retries, timeouts, connection errors); false for auth, bad request, unknown model."""

    def __init__(self, message: str, *, retryable: bool, status: int | None = None) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.status = status


def import_litellm() -> Any:
    """Import litellm without network access at import time, quietly."""
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    with warnings.catch_warnings():  # its import-time deprecation noise is not ours to show
        warnings.simplefilter("ignore")
        import litellm
    litellm.suppress_debug_info = True
    litellm.disable_hf_tokenizer_download = True  # else token counting may call huggingface.co
    litellm.telemetry = False
    # litellm logs INFO lines to *stdout* through its own handler; stdout is for results (`run --output
    # json`). Route its loggers to ours (stderr) and keep only warnings.
    own_handler = getattr(getattr(litellm, "_logging", None), "handler", None)
    for name in ("LiteLLM", "LiteLLM Router", "LiteLLM Proxy"):
        lg = logging.getLogger(name)
        if own_handler is not None:
            lg.removeHandler(own_handler)
        lg.setLevel(logging.WARNING)
    # Pydantic warns once per TypedDict with ReadOnly items while litellm builds response types.
    warnings.filterwarnings("ignore", message=r".*is using the `ReadOnly` qualifier", category=UserWarning)
    return litellm


@dataclass(frozen=True)
class LlmSettings:
    model: str | None
    api_base: str | None = None
    api_key: str | None = None  # None: litellm reads the provider's variable (OPENAI_API_KEY, ...)
    timeout_seconds: float = 120.0
    retries: int = 3
    retry_base_seconds: float = 1.0
    retry_max_seconds: float = 30.0
    input_cost_per_token: float | None = None  # prices for models litellm does not know
    output_cost_per_token: float | None = None
    temperature: float | None = None


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # raw JSON text as the model sent it


@dataclass
class LlmReply:
    content: str | None
    tool_calls: list[ToolCall]
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float | None = None  # None: unknown (a model without prices)
    finish_reason: str | None = None
    attempts: int = 1
    raw_message: dict[str, Any] = field(default_factory=dict)

    def assistant_message(self) -> dict[str, Any]:
        """The message to append to the conversation, built explicitly (no provider extras)."""
        msg: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.tool_calls:
            msg["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                for c in self.tool_calls
            ]
        return msg


def _retryable_status(exc: BaseException, litellm: Any) -> int | None:
    """The HTTP status if the provider answered 429 or 5xx; None otherwise. litellm labels
    connection failures and timeouts with 500/408, but no provider answered those."""
    if isinstance(exc, litellm.APIConnectionError | litellm.Timeout):
        return None
    status = getattr(exc, "status_code", None)
    if isinstance(status, int) and (status == 429 or 500 <= status <= 599):
        return status
    return None


class LlmClient:
    """One model. `complete` is a coroutine; call `aclose` at the end of the event loop."""

    def __init__(self, settings: LlmSettings) -> None:
        if not settings.model:
            raise NoModelConfigured(
                "no model configured: pass --model, set llm.model in the configuration, or set "
                "TASKORCH_LLM_MODEL (e.g. openai/gpt-4o-mini; API keys come from the provider's variable)"
            )
        self.settings = settings
        self.litellm = import_litellm()
        import openai  # installed with litellm

        self._api_error = openai.OpenAIError
        if settings.input_cost_per_token is not None or settings.output_cost_per_token is not None:
            self.litellm.register_model({settings.model: {
                "input_cost_per_token": settings.input_cost_per_token or 0.0,
                "output_cost_per_token": settings.output_cost_per_token or 0.0,
                "cache_read_input_token_cost": 0.0, "cache_creation_input_token_cost": 0.0,
                "litellm_provider": settings.model.split("/", 1)[0] if "/" in settings.model else "openai",
                "mode": "chat",
            }})  # fmt: skip

    async def complete(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None, tool_choice: Any = None
    ) -> LlmReply:
        s = self.settings
        kwargs: dict[str, Any] = {"model": s.model, "messages": messages, "timeout": s.timeout_seconds,
                                  "num_retries": 0, "max_retries": 0}  # fmt: skip
        if s.api_base:
            kwargs["api_base"] = s.api_base
        if s.api_key:
            kwargs["api_key"] = s.api_key
        if s.temperature is not None:
            kwargs["temperature"] = s.temperature
        if tools:
            kwargs["tools"] = tools
            if tool_choice is not None:
                kwargs["tool_choice"] = tool_choice
        attempt = 0
        while True:
            attempt += 1
            try:
                resp = await self.litellm.acompletion(**kwargs)
                break
            except self._api_error as e:  # litellm's API errors all derive from openai.OpenAIError
                status = _retryable_status(e, self.litellm)
                if status is not None and attempt <= s.retries:
                    delay = min(s.retry_max_seconds, s.retry_base_seconds * 2 ** (attempt - 1))
                    delay *= random.uniform(0.8, 1.2)
                    log.warning("model answered %s; retrying in %.1f s (%d/%d)", status, delay, attempt, s.retries)
                    await asyncio.sleep(delay)
                    continue
                raise self._error(e, attempt) from None
        return self._reply(resp, attempt)

    def _error(self, e: Exception, attempts: int) -> LlmError:
        lt = self.litellm
        status = getattr(e, "status_code", None)
        text = " ".join(str(e).split())[:500]
        permanent = (lt.AuthenticationError, lt.PermissionDeniedError, lt.NotFoundError, lt.BadRequestError,
                     lt.UnprocessableEntityError)  # fmt: skip
        retryable = not isinstance(e, permanent)
        kind = type(e).__name__
        suffix = f" after {attempts} attempts" if attempts > 1 else ""
        return LlmError(f"model call failed{suffix}: {kind}: {text}", retryable=retryable, status=status)

    def _reply(self, resp: Any, attempts: int) -> LlmReply:
        choice = resp.choices[0]
        msg = choice.message
        calls = [
            ToolCall(id=tc.id or f"call_{uuid.uuid4().hex[:12]}", name=tc.function.name or "",
                     arguments=tc.function.arguments or "{}")
            for tc in (msg.tool_calls or [])
        ]  # fmt: skip
        usage = getattr(resp, "usage", None)
        try:
            cost = float(self.litellm.completion_cost(completion_response=resp))
        except Exception:  # unknown models raise assorted errors; the cost is then unknown
            cost = None
        return LlmReply(
            content=msg.content if isinstance(msg.content, str) else None,
            tool_calls=calls,
            prompt_tokens=int(getattr(usage, "prompt_tokens", 0) or 0),
            completion_tokens=int(getattr(usage, "completion_tokens", 0) or 0),
            cost=cost,
            finish_reason=choice.finish_reason,
            attempts=attempts,
        )

    async def warm_up(self) -> None:
        """One offline mock completion: litellm's first call imports and builds types for a second
        or more, blocking the event loop (and lease renewals). Better before claiming a task."""
        try:
            await self.litellm.acompletion(model=self.settings.model, messages=[{"role": "user", "content": "hi"}],
                                           mock_response="ok")  # fmt: skip
        except self._api_error as e:  # only a warm-up: the real calls report real problems
            log.debug("warm-up failed: %s", e)

    async def aclose(self) -> None:
        """Close litellm's cached HTTP clients (they belong to this event loop) and forget them."""
        await self.litellm.close_litellm_async_clients()
        self.litellm.in_memory_llm_clients_cache.flush_cache()


def parse_arguments(raw: str) -> dict[str, Any]:
    """A tool call's arguments as a dict; ValueError with a message the model can act on."""
    try:
        value = json.loads(raw or "{}")
    except json.JSONDecodeError as e:
        raise ValueError(f"the arguments are not valid JSON ({e.msg} at character {e.pos})") from None
    if not isinstance(value, dict):
        raise ValueError("the arguments must be a JSON object")
    return value
