"""OpenAI-style chat on one shared base model with a LoRA adapter per tenant (plain classes).

``ChatEngine`` lives in a chat replica. It holds the base model once and the adapters of the
tenants it has served recently (``ModelCache``: one load per tenant, LRU by count and bytes),
and hands the generation to ``DecodeBatcher`` (batching.py): concurrent requests decode
together, one token per step, each row through its own tenant's adapter, up to ``max_batch``
rows. Token ids come back per request and are turned into text here; when the consumer goes
away (the client disconnected and Serve cancelled the request) or a stop sequence is found,
the row leaves the batch at the next step and the others continue.

Limits (``ChatLimits``): prompt tokens, max_tokens, messages and characters; beyond them the
answer is a 4xx with a sentence, decided before any generation starts.

The request (``ChatRequest``) is OpenAI's, and no field of it is silently ignored: a field is
honoured (declared on the model) or refused with a 400 that names it (``REFUSED_FIELDS``, and
``extra="forbid"`` for anything else). ``stop`` is honoured on the replica by ``StopMatcher``,
which also ends the generation, so the tokens after a stop sequence are never computed.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from core.errors import (
    HTTPError,
    IntegrityError,
    ModelNotFound,
    ServiceUnavailable,
    UnsafeFormatError,
)
from core.model_store import ModelRef, ModelStore
from core.timing import Timings
from patterns.multiplexing.batching import BASE_ADAPTER, BatchFailed, DecodeBatcher, Row
from patterns.multiplexing.cache import ModelCache
from patterns.multiplexing.catalog import ModelIndex
from patterns.multiplexing.ids import ID_SCHEMA
from patterns.multiplexing.openai_errors import OpenAIError, openai_error_body
from patterns.multiplexing.tenants import BASE_TENANT

MAX_MESSAGE_CHARS = 8_000
MAX_CONTENT_PARTS = 64
MAX_STOP_SEQUENCES = 4  # OpenAI's limit


class ChatLimits(BaseModel):
    max_prompt_tokens: int = Field(default=512, ge=16, le=8192)  # after the chat template
    max_tokens: int = Field(default=256, ge=1, le=4096)  # the most a request may ask for
    default_max_tokens: int = Field(default=96, ge=1, le=4096)  # when it asks for nothing
    max_messages: int = Field(default=32, ge=1, le=256)


# ------------------------------------------------------------------------------ the request
@dataclass(frozen=True)
class Refused:
    """An OpenAI request field this server does not honour: why, and the values that ask for
    what it does anyway (accepted, as null is)."""

    reason: str
    neutral: tuple[Any, ...] = ()

    def accepts(self, value: Any) -> bool:
        # by type too: `logprobs: 0` or `n: true` are not what the client means
        return value is None or any(type(value) is type(v) and value == v for v in self.neutral)

    def schema(self) -> dict[str, Any]:
        only = " or ".join(json.dumps(v) for v in (None, *self.neutral))
        return {"enum": [None, *self.neutral], "description": f"Only {only}: {self.reason}."}


_TOOLS = "this server does not call tools or functions"
_PENALTY = "the server applies its own repetition penalty (chat.repetition_penalty)"
# Every field of OpenAI's chat-completions request that ChatRequest does not declare. With
# null or a neutral value it is accepted; with any other value it is a 400 that names it. A
# field in neither ChatRequest nor this table is a 400 too (unknown_parameter).
REFUSED_FIELDS: dict[str, Refused] = {
    "n": Refused("this server generates one choice per request", (1,)),
    "tools": Refused(_TOOLS),
    "tool_choice": Refused(_TOOLS, ("none",)),
    "parallel_tool_calls": Refused(_TOOLS),
    "functions": Refused(_TOOLS),
    "function_call": Refused(_TOOLS, ("none",)),
    "response_format": Refused(
        "answers are plain text; JSON mode and structured outputs are not supported",
        ({"type": "text"},),
    ),
    "logprobs": Refused("log probabilities are not returned", (False,)),
    "top_logprobs": Refused("log probabilities are not returned"),
    "logit_bias": Refused("token biases are not applied"),
    "presence_penalty": Refused(_PENALTY),
    "frequency_penalty": Refused(_PENALTY),
    "user": Refused("this server keeps no per-user record"),
    "safety_identifier": Refused("this server keeps no per-user record"),
    "store": Refused("completions are not stored", (False,)),
    "metadata": Refused("completions are not stored"),
    "modalities": Refused("this model answers in text only", (["text"],)),
    "audio": Refused("this model answers in text only"),
    "prediction": Refused("predicted outputs are not supported"),
    "reasoning_effort": Refused("this model has no separate reasoning budget"),
    "verbosity": Refused("answers have one verbosity, the model's own"),
    "service_tier": Refused("there is one service tier"),
    "web_search_options": Refused("this server does not search the web"),
    "prompt_cache_key": Refused("prompts are not cached"),
}
# The same for the fields of a message (roles tool and function are refused as values).
REFUSED_MESSAGE_FIELDS: dict[str, Refused] = {
    "name": Refused("participant names are not passed to the model"),
    "tool_calls": Refused(_TOOLS),
    "tool_call_id": Refused(_TOOLS),
    "function_call": Refused(_TOOLS),
    "refusal": Refused("refusals are not part of the prompt"),
    "audio": Refused("this model reads text only"),
}


def _refuse(kind: str, message: str, param: str) -> PydanticCustomError:
    # openai_errors.validation_error reads the field from ctx and the code from the type
    return PydanticCustomError(kind, message, {"param": param})


def _drop_refused(data: Any, table: dict[str, Refused]) -> Any:
    """``data`` without the refused fields sent with null or a neutral value; a refused field
    sent with any other value raises, naming it."""
    if not isinstance(data, dict):
        return data
    out = {}
    for key, value in data.items():
        rule = table.get(key)
        if rule is None:
            out[key] = value  # declared, or unknown (extra="forbid" names it)
        elif not rule.accepts(value):
            kind = "unsupported_value" if rule.neutral else "unsupported_parameter"
            message = f"{key} is not supported: {rule.reason}."
            if rule.neutral:
                message += f" Send {json.dumps(rule.neutral[0])} or leave it out."
            raise _refuse(kind, message, key)
    return out


def _document_refused(table: dict[str, Refused]) -> Callable[[dict[str, Any]], None]:
    def add(schema: dict[str, Any]) -> None:
        props = schema.setdefault("properties", {})
        for key, rule in table.items():
            props.setdefault(key, rule.schema())

    return add


class TextPart(BaseModel):
    """A content part; only text ones (image_url, input_audio and file parts are refused)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    # pattern \S: some text that is not only spaces, in the schema as in the code (a 400)
    text: str = Field(min_length=1, max_length=MAX_MESSAGE_CHARS, pattern=r"\S")


class ChatMessage(BaseModel):
    model_config = ConfigDict(
        extra="forbid", json_schema_extra=_document_refused(REFUSED_MESSAGE_FIELDS)
    )

    # "developer" is OpenAI's newer name for "system"; the chat template gets "system".
    role: Literal["system", "developer", "user", "assistant"]
    content: (
        Annotated[str, Field(min_length=1, max_length=MAX_MESSAGE_CHARS, pattern=r"\S")]
        | Annotated[list[TextPart], Field(min_length=1, max_length=MAX_CONTENT_PARTS)]
    )

    @model_validator(mode="before")
    @classmethod
    def _honoured_or_refused(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        if data.get("role") in ("tool", "function"):  # before the tool fields they come with
            raise _refuse("unsupported_value", f"role {data['role']!r}: {_TOOLS}.", "role")
        data = _drop_refused(data, REFUSED_MESSAGE_FIELDS)
        content = data.get("content")
        if isinstance(content, list):
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind is not None and kind != "text":
                    raise _refuse(
                        "unsupported_value",
                        f"Content parts of type {str(kind)[:40]!r} are not supported: this "
                        "model reads text only; send the message as text parts or a string.",
                        f"content[{j}].type",
                    )
        return data

    @model_validator(mode="after")
    def _some_text(self) -> ChatMessage:
        text = self.text()
        if not text.strip():
            raise ValueError("a message's content is empty")
        if len(text) > MAX_MESSAGE_CHARS:
            raise ValueError(f"a message's content is over {MAX_MESSAGE_CHARS} characters")
        return self

    def text(self) -> str:
        """The content as one string: text parts joined by newlines."""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)

    def for_template(self) -> dict[str, str]:
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": self.text()}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool | None = None


StopSequence = Annotated[str, Field(min_length=1, max_length=256)]


class ChatRequest(BaseModel):
    """OpenAI's chat-completions request: the fields this server honours are declared; the
    ones it does not honour are refused (REFUSED_FIELDS), and so is any other field."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_document_refused(REFUSED_FIELDS))

    # the tenant id (or the base model's name); checked by check_model_id, for its sentence
    model: str = Field(min_length=1, json_schema_extra=ID_SCHEMA)
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    # Greedy when absent or 0, unlike OpenAI's default of 1: answers are reproducible.
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1)
    stop: (
        StopSequence
        | Annotated[list[StopSequence], Field(min_length=1, max_length=MAX_STOP_SEQUENCES)]
        | None
    ) = Field(
        default=None,
        description="Generation ends before the first of these; the text does not include it.",
    )

    @model_validator(mode="before")
    @classmethod
    def _honoured_or_refused(cls, data: Any) -> Any:
        return _drop_refused(data, REFUSED_FIELDS)

    def stop_sequences(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def wanted_tokens(self, limits: ChatLimits) -> int:
        wanted = self.max_completion_tokens or self.max_tokens or limits.default_max_tokens
        if wanted > limits.max_tokens:
            field = "max_completion_tokens" if self.max_completion_tokens else "max_tokens"
            raise OpenAIError(
                400,
                f"{field} is {wanted}; this service generates at most {limits.max_tokens} "
                "tokens per answer.",
                param=field,
                code="invalid_value",
            )
        return wanted


class StopMatcher:
    """Cuts streamed text at the first stop sequence, which is not passed on.

    ``feed`` returns the text that can be sent now: a tail that could be the start of a stop
    sequence is held back until the next piece says whether it is one.
    """

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.held = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        if self.stopped:
            return ""
        text = self.held + piece
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped, self.held = True, ""
            return text[: min(hits)]
        keep = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(text)), keep, -1):
                if text.endswith(stop[:k]):
                    keep = k
                    break
        self.held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]

    def flush(self) -> str:
        """What was held back, once the text has ended without a stop sequence."""
        out, self.held = self.held, ""
        return out


# ------------------------------------------------------------------------------ OpenAI shapes
def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def chunk(cid: str, created: int, model: str, delta: dict[str, Any], finish: str | None) -> dict:
    return {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


def sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def error_item(exc: HTTPError) -> dict[str, Any]:
    """A refusal as a value that crosses the handle (the field at fault and code included)."""
    return {
        "type": "error",
        "status": exc.status_code,
        "message": exc.message,
        "param": getattr(exc, "param", None),
        "code": getattr(exc, "code", None),
    }


def refusal(item: dict[str, Any]) -> OpenAIError:
    """A replica's error item as the error the ingress answers."""
    return OpenAIError(
        item["status"], item["message"], param=item.get("param"), code=item.get("code")
    )


def error_body(item: dict[str, Any]) -> dict[str, Any]:
    err = refusal(item)
    return openai_error_body(err.status_code, err.message, err.param, err.code)


async def sse_stream(
    gen: Any, first: dict[str, Any], cid: str, created: int, tenant: str, include_usage: bool
) -> AsyncIterator[bytes]:
    """A replica's items as server-sent events in OpenAI's chunk shape, then ``[DONE]``."""
    try:
        yield sse(chunk(cid, created, tenant, {"role": "assistant", "content": ""}, None))
        async for item in gen:
            if item["type"] == "delta":
                yield sse(chunk(cid, created, tenant, {"content": item["content"]}, None))
            elif item["type"] == "end":
                last = chunk(cid, created, tenant, {}, item["finish_reason"])
                last["timings_ms"] = item["timings_ms"]
                yield sse(last)
                if include_usage:
                    tail = chunk(cid, created, tenant, {}, None)
                    tail["choices"] = []
                    tail["usage"] = usage(first["prompt_tokens"], item["completion_tokens"])
                    yield sse(tail)
            elif item["type"] == "error":  # OpenAI's shape; the SDK raises it as an APIError
                yield sse(error_body(item))
        yield sse("[DONE]")
    finally:
        gen.cancel()  # the client went away: Serve cancels us, we cancel the generation


async def collect_completion(
    gen: Any, first: dict[str, Any], cid: str, created: int, tenant: str
) -> dict[str, Any]:
    """A replica's items as one ``chat.completion``; raises the refusal it ended with."""
    text: list[str] = []
    end: dict[str, Any] = {}
    async for item in gen:
        if item["type"] == "delta":
            text.append(item["content"])
        elif item["type"] == "end":
            end = item
        elif item["type"] == "error":
            raise refusal(item)
    return {
        "id": cid,
        "object": "chat.completion",
        "created": created,
        "model": tenant,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "".join(text)},
                "finish_reason": end.get("finish_reason", "stop"),
            }
        ],
        "usage": usage(first["prompt_tokens"], end.get("completion_tokens", 0)),
        "adapter": first["adapter"],
        "performance": {
            "time_to_first_token_ms": end.get("time_to_first_token_ms"),
            "tokens_per_s": end.get("tokens_per_s"),
        },
        "timings_ms": end.get("timings_ms", {}),
    }


# ------------------------------------------------------------------------------ the engine
@dataclass
class LoadedAdapter:
    tenant: str
    ref: ModelRef
    config: dict[str, Any]
    state: dict[str, Any] | None  # dropped once installed into the model
    nbytes: int


class ChatEngine:
    """One base model, many tenants' adapters, concurrent requests decoded together."""

    def __init__(
        self,
        store: ModelStore,
        index: ModelIndex,
        limits: ChatLimits,
        *,
        device: str = "cpu",
        torch_threads: int | None = None,
        max_adapters: int = 8,
        max_adapter_bytes: int = 64 * 1024 * 1024,
        repetition_penalty: float = 1.2,
        max_batch: int = 8,
    ) -> None:
        from patterns.multiplexing.llm import load_base

        self.store = store
        self.index = index
        self.limits = limits
        self.device = device
        self.repetition_penalty = repetition_penalty
        t0 = time.perf_counter()
        self.model, self.tokenizer = load_base(device, torch_threads)
        self.base_load_s = round(time.perf_counter() - t0, 2)
        self.adapters: ModelCache[LoadedAdapter] = ModelCache(
            self._load_adapter,
            lambda a: a.nbytes,
            max_models=max_adapters,
            max_bytes=max_adapter_bytes,
            on_evict=lambda tenant, _a: self._to_remove.add(tenant),
        )
        self._installed: set[str] = set()
        self._to_remove: set[str] = set()
        config = self.model.generation_config.eos_token_id
        eos = set(config if isinstance(config, list) else [config]) - {None}
        self.batcher = DecodeBatcher(
            self.model,
            eos_ids=eos | {self.tokenizer.eos_token_id},
            pad_id=self.tokenizer.pad_token_id,
            max_batch=max_batch,
            repetition_penalty=repetition_penalty,
            device=device,
            release=self._remove_evicted,
        )
        self.store_reads = 0
        self.counts = {"generations": 0, "cancelled": 0, "tokens": 0, "errors": 0}
        self.last: dict[str, Any] = {}

    # ---------------------------------------------------------------- adapters
    async def _load_adapter(self, tenant: str) -> LoadedAdapter:
        entry = self.index.lookup(tenant)
        self.store_reads += 1
        try:
            files, ref = await asyncio.to_thread(
                self.store.read_verified, entry.name, entry.version
            )
        except (IntegrityError, UnsafeFormatError, ModelNotFound) as exc:
            raise ServiceUnavailable(
                f"The adapter of tenant {tenant!r} cannot be loaded ({exc}); other tenants "
                "are unaffected."
            ) from exc
        if ref.sha256 != entry.manifest_sha256:
            raise ServiceUnavailable(
                f"The adapter of tenant {tenant!r} is not the one the index names; refusing it."
            )
        from safetensors.torch import load

        state = load(files["adapter_model.safetensors"])
        nbytes = sum(t.numel() * t.element_size() for t in state.values())
        config = json.loads(files["adapter_config.json"])
        return LoadedAdapter(tenant, ref, config, state, nbytes)

    def _install(self, adapter: LoadedAdapter) -> None:
        """Put a loaded adapter into the base model (on the batcher's thread, between steps)."""
        from peft import LoraConfig

        if adapter.tenant in self._installed:
            return
        from transformers.utils import logging as hf_logging

        config = LoraConfig(**adapter.config)
        verbosity = hf_logging.get_verbosity()
        # transformers reports the adapter's keys as "missing" when it gets a state dict
        # rather than a checkpoint folder; they are loaded (the tests compare the answers).
        hf_logging.set_verbosity_error()
        try:
            with warnings.catch_warnings():
                # peft warns that a second adapter makes "multiple adapters": the point here
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                self.model.load_adapter(
                    adapter_name=adapter.tenant,
                    peft_config=config,
                    adapter_state_dict=adapter.state,
                )
        finally:
            hf_logging.set_verbosity(verbosity)
        self._installed.add(adapter.tenant)
        adapter.state = None  # the model holds the weights now; the cache keeps accounting

    def _remove_evicted(self, in_use: set[str]) -> None:
        """Evicted adapters out of the model, except those a running row still uses."""
        for tenant in list(self._to_remove - in_use):
            self._to_remove.discard(tenant)
            if tenant in self._installed and tenant not in self.adapters:
                self.model.delete_adapter(tenant)
                self._installed.discard(tenant)

    async def adapter_for(self, tenant: str) -> tuple[LoadedAdapter | None, str]:
        if tenant == BASE_TENANT:
            return None, "base"
        self.index.lookup(tenant)  # 404 before any read
        return await self.adapters.get(tenant)

    # ---------------------------------------------------------------- requests
    def prompt_ids(self, request: ChatRequest) -> list[int]:
        from patterns.multiplexing.llm import chat_ids

        if len(request.messages) > self.limits.max_messages:
            raise OpenAIError(
                400,
                f"The conversation has {len(request.messages)} messages; at most "
                f"{self.limits.max_messages} are accepted.",
                param="messages",
            )
        if request.messages[-1].role != "user":
            raise OpenAIError(400, "The last message must be from the user.", param="messages")
        messages = [m.for_template() for m in request.messages]
        ids = chat_ids(self.tokenizer, messages)
        if len(ids) > self.limits.max_prompt_tokens:
            raise OpenAIError(
                400,
                f"The prompt is {len(ids)} tokens after the chat template; this service "
                f"accepts at most {self.limits.max_prompt_tokens}. Shorten the conversation.",
                param="messages",
                code="context_length_exceeded",
            )
        return ids

    async def stream(
        self,
        tenant: str,
        payload: dict[str, Any],
        claim: Callable[[str], Awaitable[Any]] | None = None,
    ) -> AsyncIterator[dict[str, Any]]:
        """Items: ``start`` (or ``error``), then ``delta`` per text piece, then ``end``."""
        timings = Timings()
        try:
            request = ChatRequest(**payload)
            max_new = request.wanted_tokens(self.limits)
            ids = self.prompt_ids(request)
            with timings.stage("adapter"):
                adapter, outcome = await self.adapter_for(tenant)
            if claim is not None and tenant != BASE_TENANT:
                await claim(tenant)
        except HTTPError as exc:
            yield error_item(exc)
            return
        except ValueError as exc:  # a handle caller's invalid request (the ingress checks first)
            yield error_item(OpenAIError(400, str(exc)))
            return
        yield {
            "type": "start",
            "prompt_tokens": len(ids),
            "adapter": adapter.ref.public() if adapter else None,
            "adapter_cache": outcome,
        }
        if request.temperature:  # absent or 0: greedy
            sampling = {"temperature": request.temperature, "top_p": request.top_p or 1.0}
        else:
            sampling = {}
        row = Row(
            ids,
            BASE_ADAPTER if adapter is None else tenant,
            max_new,
            seed=request.seed,
            install=None if adapter is None else lambda: self._install(adapter),
            **sampling,
        )
        async for item in self._generate(row, request, timings):
            yield item

    async def _generate(
        self, row: Row, request: ChatRequest, timings: Timings
    ) -> AsyncIterator[dict[str, Any]]:
        t0 = time.perf_counter()
        first_token_ms: float | None = None
        finish, failed = "stop", False
        stops = StopMatcher(request.stop_sequences())
        tokens: list[int] = []
        text = sent = ""
        try:
            async with aclosing(self.batcher.generate(row)) as ids:
                async for token in ids:
                    if row.admitted and not tokens:
                        timings.add("queue", (row.admitted - t0) * 1000)
                    tokens.append(token)
                    # The whole answer decoded again, sent up to its last space or newline (as
                    # transformers' TextIteratorStreamer does): a piece is a word or more, and
                    # never half of a character's bytes.
                    text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                    cut = len(text) if text.endswith("\n") else text.rfind(" ") + 1
                    if cut <= len(sent) or not text.startswith(sent):
                        continue
                    piece = stops.feed(text[len(sent) : cut])
                    sent = text[:cut]
                    if piece:
                        if first_token_ms is None:
                            first_token_ms = (time.perf_counter() - t0) * 1000
                        yield {"type": "delta", "content": piece}
                    if stops.stopped:
                        break  # the row leaves the batch at the next step
            rest = "" if stops.stopped else stops.feed(text[len(sent) :]) + stops.flush()
            if rest:
                yield {"type": "delta", "content": rest}
        except BatchFailed:
            failed = True
        except BaseException:
            finish = "cancelled"
            raise
        finally:
            elapsed = time.perf_counter() - t0
            self.counts["generations"] += 1
            self.counts["tokens"] += len(tokens)
            if finish == "cancelled":
                self.counts["cancelled"] += 1
            if failed:
                self.counts["errors"] += 1
            self.last = {"completion_tokens": len(tokens), "finish": finish, "seconds": elapsed}
        if failed:
            yield {"type": "error", "status": 503, "message": "Generation failed; retry."}
            return
        if len(tokens) >= row.max_new and not stops.stopped:
            finish = "length"
        timings.add("generate", elapsed * 1000)
        yield {
            "type": "end",
            "completion_tokens": len(tokens),
            "finish_reason": finish,
            "time_to_first_token_ms": round(first_token_ms or 0.0, 1),
            "tokens_per_s": round(len(tokens) / elapsed, 2) if elapsed > 0 else None,
            "timings_ms": timings.as_dict(),
        }

    def stats(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "base_model_load_s": self.base_load_s,
            "adapters": self.adapters.snapshot(),
            "installed": sorted(self._installed),
            "store_reads": self.store_reads,
            **self.counts,
            "batch": self.batcher.stats(),
            "last": self.last,
        }
