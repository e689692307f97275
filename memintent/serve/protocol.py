"""The OpenAI API's request and response bodies, as the server reads and writes them (pydantic).

Requests: ``/v1/completions`` (``CompletionRequest``) and ``/v1/chat/completions`` (``ChatCompletionRequest``).
Fields the OpenAI API defines and this server does not use (``user``, ...) are accepted and ignored, as other
servers do; those that would change the answer and are not implemented (``logit_bias``, ``echo``, ``suffix``,
``best_of`` above ``n``, ``tools``, a JSON ``response_format``) are refused with a 400 naming the field. Extensions
(vLLM's names): ``top_k``, ``min_p``, ``stop_token_ids``, ``ignore_eos``, and ``return_token_ids`` (each choice also
carries its generated ``token_ids``; always so for a model without a tokenizer, whose text is empty).
"""

from __future__ import annotations

import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt

from memintent.engine.sampling import MAX_LOGPROBS


class _In(BaseModel):
    # Fields other clients send and this server does not use are ignored, not refused.
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_In):
    include_usage: bool = False


class _Sampling(_In):
    """What completions and chat completions share."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0)      # None: 1, OpenAI's default
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    seed: int | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # extensions
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    stop_token_ids: list[StrictInt] | None = None
    ignore_eos: bool = False
    return_token_ids: bool = False


class CompletionRequest(_Sampling):
    prompt: str | list[StrictInt] | list[str] | list[list[StrictInt]]
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class ContentPart(_In):
    type: str
    text: str | None = None


class ChatMessage(_In):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list | None = None
    response_format: dict | None = None


# ---------------------------------------------------------------------------------------------------------------
# Responses


class _Out(BaseModel):
    def json_text(self) -> str:
        return self.model_dump_json(exclude_none=True)


class Usage(_Out):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(_Out):
    tokens: list[str] = []
    token_logprobs: list[float] = []
    top_logprobs: list[dict[str, float]] = []
    text_offset: list[int] = []


class CompletionChoice(_Out):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    token_ids: list[int] | None = None


class CompletionResponse(_Out):
    id: str
    object: str = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(_Out):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChatLogprobs(_Out):
    content: list[ChatTokenLogprob] = []


class AssistantMessage(_Out):
    role: str = "assistant"
    content: str


class ChatChoice(_Out):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    token_ids: list[int] | None = None


class ChatResponse(_Out):
    id: str
    object: str = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None


class ChatDelta(_Out):
    role: str | None = None
    content: str | None = None


class ChatStreamChoice(_Out):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    token_ids: list[int] | None = None


class ChatChunk(_Out):
    id: str
    object: str = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatStreamChoice]
    usage: Usage | None = None


class ModelCard(_Out):
    id: str
    object: str = "model"
    created: int
    owned_by: str = "memintent"
    max_model_len: int


class ModelList(_Out):
    object: str = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
