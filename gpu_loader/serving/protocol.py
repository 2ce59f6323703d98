"""The OpenAI wire format the server speaks: request and response bodies of /v1/completions,
/v1/chat/completions and /v1/models, the admin bodies, and the error shape `{"error": {...}}`.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

#: Request fields the server accepts but cannot honour, with the value that means "not used".
#: Any other value is refused with a 400 naming the field (never silently ignored).
UNSUPPORTED_UNLESS_DEFAULT: dict[str, Any] = {
    "n": 1,
    "best_of": 1,
    "use_beam_search": False,
    "logprobs": None,
    "top_logprobs": None,
    "echo": False,
    "suffix": None,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "logit_bias": None,
    "tools": None,
    "tool_choice": None,
    "functions": None,
    "response_format": None,
    "length_penalty": 1.0,
    "top_k": -1,
    "min_tokens": 0,
    "repetition_penalty": 1.0,
    "num_beams": 1,
}
#: Fields accepted and ignored because they change nothing about the tokens (OpenAI bookkeeping).
IGNORED = ("user", "stream_options", "metadata", "store", "service_tier", "parallel_tool_calls")


class _Request(BaseModel):
    # Unknown fields are kept so that `unsupported()` can name them instead of dropping them.
    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False

    def unsupported(self) -> list[str]:
        """Names of the fields set to something this server does not do."""
        bad = []
        for name, value in {**self.__dict__, **(self.model_extra or {})}.items():
            if name in UNSUPPORTED_UNLESS_DEFAULT:
                if value is not None and value != UNSUPPORTED_UNLESS_DEFAULT[name]:
                    bad.append(name)
            elif name in (self.model_extra or {}) and name not in IGNORED:
                bad.append(name)
        return sorted(bad)

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionRequest(_Request):
    prompt: str | list[int]
    max_tokens: int | None = Field(default=16, ge=1)


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


def _id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None
    logprobs: None = None
    token_ids: list[int] | None = None  # deltastore: the generated token ids


class CompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: _id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ChatChoiceMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatChoiceMessage
    finish_reason: str | None
    logprobs: None = None
    token_ids: list[int] | None = None


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: _id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    finish_reason: str | None = None
    token_ids: list[int] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    """One entry of /v1/models (OpenAI's shape plus deltastore's fields)."""

    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "deltastore"
    kind: Literal["base", "delta"] = "delta"
    resident: bool = False
    pinned: bool = False
    codec: str | None = None
    slot: int | None = None
    base_fingerprint: str | None = None
    source: Literal["base", "resident", "registry"] = "registry"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class AdapterRequest(BaseModel):
    """Admin body, shaped like vLLM's /v1/load_lora_adapter (`lora_name`, `lora_path`)."""

    model_config = ConfigDict(extra="forbid")

    lora_name: str = Field(min_length=1)
    lora_path: str | None = None  # a registry ref or a local .bdelta (default: lora_name)
    pin: bool = False


class ErrorBody(BaseModel):
    message: str
    type: str
    code: str | int | None = None
    param: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
