"""The OpenAI wire format of `slimllm serve`: request bodies checked into generation requests,
generated tokens turned into response choices, chunks and errors.

Requests follow the OpenAI API (`/v1/completions`, `/v1/chat/completions`). Every field is
checked by type (a bool is not a number, a string is not an integer) and range: the sampling
and stopping values by the reference's own `SamplingConfig` and `Stopping`, whose `OptionError`
messages name the field. Fields slimllm cannot honour (`best_of`, `suffix`, `echo`,
`logit_bias`, `tools`, `functions`, a `response_format` other than text, presence or frequency
penalties) are refused with 400 rather than silently ignored; other unknown keys are ignored,
as OpenAI does. Defaults are OpenAI's: temperature 1, top_p 1, completions' max_tokens 16;
chat's max_tokens is the rest of the context, at most CHAT_MAX_TOKENS. `n` choices are `n`
requests, choice i seeded with `seed + i`; without a seed, one is drawn at random.

Stop strings have OpenAI's semantics: the text ends before the stop string (the generator
itself stops on the token that completes it, HF style). `TextStream` releases text as tokens
arrive, holding back an incomplete UTF-8 character and any tail that could begin a stop string,
so a streamed reply never shows text that the stop would have cut.
"""

from __future__ import annotations

import secrets
import time
import uuid
from dataclasses import dataclass, field

from slimllm.reference.errors import OptionError, SlimllmError, shown
from slimllm.reference.generate import SEED_RANGE, Stopping
from slimllm.reference.sampling import SamplingConfig, is_integer

CHAT_MAX_TOKENS = 1024  # chat's default max_tokens: the rest of the context, at most this
COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_N = 16  # choices per request
MAX_LOGPROBS = 20  # alternatives per token
UNSUPPORTED = ("best_of", "suffix", "echo", "logit_bias", "tools", "functions", "tool_choice")
UNSUPPORTED += ("function_call", "presence_penalty", "frequency_penalty", "response_format")
ROLES = ("system", "developer", "user", "assistant", "tool")


class ApiError(Exception):
    """An error answered as OpenAI's JSON: {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, param=None, code=None, headers=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}
        self.type = "invalid_request_error" if status < 500 else "server_error"

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param, code)


# ---------------------------------------------------------------- request fields


def integer(body: dict, name: str, default, low: int, high: int | None = None):
    """body[name] as an int in [low, high] (absent or null: `default`)."""
    value = body.get(name)
    if value is None:
        return default
    if not is_integer(value) or value < low or (high is not None and value > high):
        span = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise bad(f"{name} must be an integer {span}, got {shown(value)}", name)
    return int(value)


def real(body: dict, name: str, default: float) -> float:
    """body[name] as a number (int or float, never bool or str); ranges: SamplingConfig's."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise bad(f"{name} must be a number, got {shown(value)}", name)
    return value


def boolean(body: dict, name: str, default: bool = False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad(f"{name} must be a boolean, got {shown(value)}", name)
    return value


def refuse_unsupported(body: dict) -> None:
    """400 for a field slimllm cannot honour set to anything but its neutral value."""
    for name in UNSUPPORTED:
        value = body.get(name)
        neutral = value in (None, False, 0, "", [], {}, "none", "auto")
        if name == "best_of":
            neutral = value in (None, 1) or value == body.get("n", 1)
        if name == "response_format":
            neutral = value is None or (isinstance(value, dict) and value.get("type") == "text")
        if not neutral:
            raise bad(f"{name} is not supported by this server (got {shown(value)})", name)


def option_error(err: OptionError, chat: bool = False) -> ApiError:
    """An OptionError of the reference's checks as a 400 naming its field (its first word;
    the prompt of a chat request is its messages)."""
    message = str(err).replace("max_new_tokens", "max_tokens")
    first = message.split(" ", 1)[0]
    param = first if first.isidentifier() else None
    if param == "prompt" and chat:
        param = "messages"
    if "context" in message or "cache" in message:
        return bad(message, param or ("messages" if chat else "prompt"), "context_length_exceeded")
    return bad(message, param)


# ---------------------------------------------------------------- the parsed request


@dataclass
class Choice:
    """One generation of a request: its prompt ids and seed; `index` is the choice's index."""

    index: int
    prompt: list[int]
    seed: int


@dataclass
class Job:
    """A checked request: its choices, how each is sampled and stopped, what to report."""

    chat: bool
    choices: list[Choice]
    sampling: SamplingConfig
    stop: tuple[str, ...]
    max_tokens: int | None  # None: the default of the endpoint for each prompt
    logprobs: int | None  # None: off; k: the chosen token's logprob and k alternatives
    stream: bool
    include_usage: bool
    prompt_tokens: int
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))

    def stopping(self, choice: Choice, cache_len: int, eos_ids, decode) -> Stopping:
        """The `Stopping` of one choice (the default max_tokens fills the context)."""
        n = self.max_tokens
        if n is None:
            room = max(1, cache_len - len(choice.prompt))
            n = min(room, CHAT_MAX_TOKENS) if self.chat else COMPLETION_MAX_TOKENS
        try:
            return Stopping(n, tuple(eos_ids), (), self.stop, decode)
        except OptionError as err:
            raise option_error(err) from None


def sampling_of(body: dict) -> SamplingConfig:
    top_k = integer(body, "top_k", 0, -1)  # -1: off, as vLLM spells it
    try:
        return SamplingConfig(
            temperature=real(body, "temperature", 1.0),
            top_k=max(top_k, 0),
            top_p=real(body, "top_p", 1.0),
            min_p=real(body, "min_p", 0.0),
            repetition_penalty=real(body, "repetition_penalty", 1.0),
        )
    except OptionError as err:
        raise option_error(err) from None


def stop_of(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise bad(f"stop must be a non-empty string or a list of them, got {shown(stop)}", "stop")
    if len(stops) > MAX_N:
        raise bad(f"stop takes at most {MAX_N} strings, got {len(stops)}", "stop")
    return tuple(stops)


def seeds_of(body: dict, n: int) -> int:
    low, high = SEED_RANGE
    seed = body.get("seed")
    if seed is None:
        return secrets.randbits(62)
    if not is_integer(seed) or not low <= seed <= high - n:
        raise bad(f"seed must be an integer in [-2**63, 2**64 - n), got {shown(seed)}", "seed")
    return int(seed)


def prompts_of(prompt, encode) -> list[list[int]]:
    """/v1/completions' prompt: a string, a list of strings, token ids or lists of them."""
    what = "prompt must be a string, a list of strings, token ids or a list of token-id lists"
    if isinstance(prompt, str):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise bad(f"{what}, got {shown(prompt)}", "prompt")
    if all(is_integer(t) for t in prompt):
        prompt = [prompt]
    rows = []
    for row in prompt:
        if isinstance(row, str):
            rows.append(encode(row))
        elif isinstance(row, list) and row and all(is_integer(t) and t >= 0 for t in row):
            rows.append([int(t) for t in row])
        else:
            raise bad(f"{what}, got {shown(row)}", "prompt")
        if not rows[-1]:
            raise bad("prompt is empty: give at least one token", "prompt")
    return rows


def messages_of(body: dict) -> list[dict]:
    """The chat messages, each {"role", "content": text} (text parts of a list joined)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages must be a non-empty list of messages", "messages")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise bad(f"messages[{i}] needs a role, one of {ROLES}", f"messages[{i}].role")
        content = message.get("content")
        if isinstance(content, list):
            parts = [p for p in content if isinstance(p, dict)]
            if len(parts) != len(content) or any(p.get("type") != "text" for p in parts):
                raise bad("only text content parts are supported", f"messages[{i}].content")
            if not all(isinstance(p.get("text"), str) for p in parts):
                raise bad("a text part needs a string 'text'", f"messages[{i}].content")
            content = "".join(p["text"] for p in parts)
        if content is None and message["role"] == "assistant":
            content = ""
        if not isinstance(content, str):
            raise bad(f"messages[{i}].content must be a string", f"messages[{i}].content")
        out.append({**message, "content": content})
    return out


def parse(body, chat: bool, encode, render, model_name: str) -> Job:
    """A request body -> `Job`. `encode(text)` tokenizes a completion prompt; `render(messages)`
    -> ids of a chat prompt (raises ApiError when the model has no template)."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    model = body.get("model")
    if model is not None and model != model_name:
        raise ApiError(
            400,
            f"model {shown(model)} is not served here; this server runs {model_name!r}",
            "model",
            "model_not_found",
        )
    refuse_unsupported(body)
    n = integer(body, "n", 1, 1, MAX_N)
    stream = boolean(body, "stream")
    options = body.get("stream_options")
    if options is not None and (not stream or not isinstance(options, dict)):
        raise bad("stream_options needs stream: true and must be an object", "stream_options")
    include_usage = boolean(options or {}, "include_usage")
    if chat:
        logprobs = integer(body, "top_logprobs", 0, 0, MAX_LOGPROBS)
        if not boolean(body, "logprobs"):
            if body.get("top_logprobs") is not None:
                raise bad("top_logprobs needs logprobs: true", "top_logprobs")
            logprobs = None
        max_tokens = integer(body, "max_completion_tokens", None, 1)
        if max_tokens is None:
            max_tokens = integer(body, "max_tokens", None, 1)
        prompts = [render(messages_of(body))]
    else:
        if isinstance(body.get("logprobs"), bool):
            raise bad("logprobs must be an integer (alternatives per token), not a boolean")
        logprobs = integer(body, "logprobs", None, 0, MAX_LOGPROBS)
        max_tokens = integer(body, "max_tokens", COMPLETION_MAX_TOKENS, 1)
        if "prompt" not in body:
            raise bad("prompt is required", "prompt")
        try:
            prompts = prompts_of(body["prompt"], encode)
        except SlimllmError as err:  # text the tokenizer refuses, or no tokenizer
            raise bad(str(err), "prompt") from None
    sampling = sampling_of(body)
    stop = stop_of(body)
    seed = seeds_of(body, n)
    choices = [
        Choice(p * n + j, prompt, seed + j) for p, prompt in enumerate(prompts) for j in range(n)
    ]
    return Job(
        chat=chat,
        choices=choices,
        sampling=sampling,
        stop=stop,
        max_tokens=max_tokens,
        logprobs=logprobs,
        stream=stream,
        include_usage=include_usage,
        prompt_tokens=sum(len(p) for p in prompts),
    )


# ---------------------------------------------------------------- the reply


FINISH = {"length": "length", "eos": "stop", "stop": "stop", "cancelled": "length"}


@dataclass
class Token:
    """One generated token as reported: its id, logprob, alternatives and text offsets."""

    id: int
    logprob: float | None
    top: list | None
    start: int  # characters of the choice's text before this token
    end: int  # ... and up to its end


class TextStream:
    """A choice's text as its tokens arrive: `push(token)` -> (text safe to show now, tokens
    whose text is all shown); `finish()` -> the rest, cut before the first stop string."""

    def __init__(self, decode, stop: tuple[str, ...]):
        self.decode, self.stop = decode, stop
        self.ids: list[int] = []
        self.full = ""  # decode(ids)
        self.sent = ""  # the text released so far
        self.pending: list[Token] = []  # tokens not yet released
        self.tokens: list[Token] = []  # every released token

    def push(self, token: int, logprob=None, top=None) -> tuple[str, list[Token]]:
        start = len(self.full)
        self.ids.append(token)
        self.full = self.decode(self.ids)
        self.pending.append(Token(token, logprob, top, start, len(self.full)))
        if self.cut() is not None:  # a stop string is complete: the rest comes with finish()
            return "", []
        safe = self.full.rstrip("\ufffd")  # an incomplete UTF-8 character waits for its bytes
        safe = safe[: len(safe) - self.held(safe)]
        return self.release(safe, lambda t: t.end <= len(safe))

    def finish(self) -> tuple[str, list[Token]]:
        end = self.cut()
        text = self.full if end is None else self.full[:end]
        return self.release(text, lambda t: t.start < len(text) or t.start == t.end == len(text))

    @property
    def text(self) -> str:
        return self.sent

    def cut(self) -> int | None:
        """Where the first stop string begins in the text, None if none is in it."""
        found = [i for i in (self.full.find(s) for s in self.stop) if i >= 0]
        return min(found) if found else None

    def held(self, text: str) -> int:
        """Characters at the end of `text` that could begin a stop string."""
        longest = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), longest, -1):
                if text.endswith(s[:k]):
                    longest = k
                    break
        return longest

    def release(self, text: str, ready) -> tuple[str, list[Token]]:
        if not text.startswith(self.sent):  # a decoder that rewrote earlier text: wait
            return "", []
        new, self.sent = text[len(self.sent) :], text
        out = [t for t in self.pending if ready(t)]
        self.pending = [t for t in self.pending if not ready(t)]
        for t in out:
            t.start, t.end = min(t.start, len(text)), min(t.end, len(text))
        self.tokens += out
        return new, out


def completion_logprobs(tokens: list[Token], piece) -> dict:
    """/v1/completions' logprobs object for `tokens` (`piece(id)`: a token's text)."""
    return {
        "tokens": [piece(t.id) for t in tokens],
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [{piece(i): lp for i, lp in t.top or ()} for t in tokens],
        "text_offset": [t.start for t in tokens],
    }


def chat_logprobs(tokens: list[Token], piece) -> dict:
    """Chat's logprobs object: content, one entry per token with its alternatives."""

    def entry(token_id, logprob):
        text = piece(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    content = [
        entry(t.id, t.logprob) | {"top_logprobs": [entry(i, lp) for i, lp in t.top or ()]}
        for t in tokens
    ]
    return {"content": content}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def envelope(job: Job, model: str, chunk: bool) -> dict:
    kind = ("chat.completion" if job.chat else "text_completion") + (".chunk" if chunk else "")
    if kind == "text_completion.chunk":
        kind = "text_completion"  # OpenAI names completion chunks like whole completions
    prefix = "chatcmpl-" if job.chat else "cmpl-"
    return {"id": prefix + job.id, "object": kind, "created": job.created, "model": model}


def choice_body(job: Job, index: int, text: str, tokens, finish, piece, chunk: bool) -> dict:
    """One entry of `choices`, whole or as a streamed delta."""
    logprobs = None
    if job.logprobs is not None and (tokens or not chunk):
        logprobs = (chat_logprobs if job.chat else completion_logprobs)(tokens, piece)
    if not job.chat:
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
    if chunk:
        delta = {"content": text} if text or not finish else {}
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
    message = {"role": "assistant", "content": text}
    return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish}


def sse(data) -> bytes:
    """One server-sent event carrying `data` (a JSON string or [DONE])."""
    return f"data: {data}\n\n".encode()
