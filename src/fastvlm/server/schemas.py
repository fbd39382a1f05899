"""The request body of ``POST /v1/chat/completions``, as the OpenAI API defines it.

Only the shape is checked here: types, strictly (``"4"``, ``true`` or ``3.0`` is not a
token count, ``"yes"`` is not a boolean), and ranges that do not depend on the model,
tight enough that no value can turn the logits into NaN or overflow a seed. Whether
the model can honour a request (context length, image limits) is decided later.
Fields the API has but this server ignores because they change nothing in the answer
(``user``, ``metadata``, ``store``, ...) are accepted and dropped so that stock
clients work; fields that would change the answer but are not honoured (``tools``,
``audio``, vLLM's ``guided_grammar``, ...) are declared here so that ``translate`` can
refuse them by name: nothing that changes the answer is dropped silently.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

MAX_STOP_SEQUENCES = 4  # the OpenAI limit
MAX_STOP_CHARS = 1024
MAX_SEED = 2**63 - 1  # OpenAI's seed is an int64
# Counted before pydantic validates the items: 200,000 messages would take seconds.
MAX_MESSAGES = 1024  # and as many content parts in all
MAX_CHOICES = 8  # n: each choice takes a batch row
MAX_TOP_LOGPROBS = 20  # the OpenAI limit
MAX_LOGIT_BIAS = 1024  # entries; each costs a scatter per step
MAX_GUIDED_CHOICES = 1024
BIAS = Annotated[float, Field(ge=-100.0, le=100.0, allow_inf_nan=False)]  # the OpenAI range


class _Lenient(BaseModel):
    """Unknown keys are dropped; known ones must have exactly the declared JSON type."""

    model_config = ConfigDict(extra="ignore", strict=True)


class ImageURL(_Lenient):
    url: str
    detail: str | None = None  # accepted; every image is encoded at the model's size


class TextPart(_Lenient):
    type: Literal["text"]
    text: str


class ImagePart(_Lenient):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class Message(_Lenient):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None


class StreamOptions(_Lenient):
    include_usage: bool = False


class JSONSchemaFormat(_Lenient):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    # "schema" would shadow a BaseModel attribute; clients send and see "schema".
    json_schema: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None  # the schema is enforced either way


class TextFormat(_Lenient):
    type: Literal["text"]


class JSONObjectFormat(_Lenient):
    type: Literal["json_object"]


class JSONSchemaResponseFormat(_Lenient):
    type: Literal["json_schema"]
    json_schema: JSONSchemaFormat


ResponseFormat = Annotated[
    TextFormat | JSONObjectFormat | JSONSchemaResponseFormat, Field(discriminator="type")
]


class ChatCompletionRequest(_Lenient):
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = None  # the range depends on the context: see translate
    max_completion_tokens: int | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0, allow_inf_nan=False)
    seed: int | None = Field(default=None, ge=-MAX_SEED - 1, le=MAX_SEED)
    stop: str | list[str] | None = None
    n: int | None = Field(default=None, ge=1, le=MAX_CHOICES)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0, allow_inf_nan=False)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0, allow_inf_nan=False)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    # Token ids as strings (JSON keys are strings), as OpenAI's clients send them.
    logit_bias: dict[str, BIAS] | None = Field(default=None, max_length=MAX_LOGIT_BIAS)
    response_format: ResponseFormat | None = None
    # Refused in translate unless set to their no-op value.
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    audio: Any = None
    modalities: list[str] | None = None
    prediction: Any = None
    web_search_options: Any = None
    # Extensions that vLLM and llama.cpp also accept.
    guided_json: dict[str, Any] | str | None = None  # a JSON schema, or its JSON text
    guided_regex: str | None = Field(default=None, min_length=1)
    guided_choice: list[str] | None = Field(default=None, min_length=1, max_length=MAX_GUIDED_CHOICES)
    guided_decoding_backend: str | None = None  # accepted; there is one backend
    guided_grammar: Any = None  # refused: no context-free grammars
    guided_whitespace_pattern: Any = None  # refused: JSON is always compact
    structured_outputs: Any = None  # newer vLLM's form of the guided_* fields; refused
    top_k: int | None = Field(default=None, ge=0, le=1_000_000)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0, allow_inf_nan=False)
    # transformers' CTRL penalty divides (or multiplies) logits by this: far from 1 it
    # overflows them. vLLM allows (0, 2]; 0.1..10 covers every sensible use.
    repetition_penalty: float | None = Field(default=None, ge=0.1, le=10.0, allow_inf_nan=False)
    ignore_eos: bool = False

    @field_validator("messages", mode="before")
    @classmethod
    def _bounded(cls, messages: Any) -> Any:
        if isinstance(messages, list):
            parts = sum(
                len(m["content"])
                for m in messages
                if isinstance(m, dict) and isinstance(m.get("content"), list)
            )
            for count, what in ((len(messages), "messages"), (parts, "content parts")):
                if count > MAX_MESSAGES:
                    raise PydanticCustomError(
                        "too_long", f"{count} {what}; at most {MAX_MESSAGES} are accepted in one request"
                    )
        return messages

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def requested_max_tokens(self) -> tuple[int | None, str]:
        """The new-token budget the client asked for, and the field it came from."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"
