"""Request bodies of the OpenAI surface and the memory endpoints, as pydantic models.

Field names and types are the OpenAI API's; types are strict (``"5"`` is not a number), unknown fields
are ignored (clients send many we have no use for), and ``memory`` / ``remember`` are ours (the
``openai`` client sends them with ``extra_body=``).
"""

from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field

Stop = Union[str, list[str], None]


class Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class Sampling(Body):
    """What completions and chat completions share."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=0)
    temperature: float | None = Field(None, ge=0, le=2)  # 0: greedy; None: OpenAI's default, 1
    top_p: float | None = Field(None, gt=0, le=1)
    stop: Stop = None
    seed: int | None = None
    stream: bool | None = False
    n: int | None = Field(None, ge=1, le=1)  # one choice per prompt
    memory: str | None = None

    def stops(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or ())
        return tuple(s for s in stops if s)


class CompletionRequest(Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    echo: bool | None = False
    logprobs: int | None = Field(None, ge=0, le=5)


class TextPart(Body):
    type: Literal["text"]
    text: str


class Message(Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart], None] = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0)
    remember: bool | None = False


class NewMemory(Body):
    name: str
    memory_size: int | None = Field(None, ge=1)


class Document(Body):
    text: str
    source: str | None = Field(None, max_length=512)
