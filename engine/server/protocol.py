"""The OpenAI wire format: request bodies checked into `GenerateArgs`, and the JSON answers.

Parsing is strict about what it uses and blind to the rest: a field a benchmark client sends that
this server does not implement (`stream_options.continuous_usage_stats`, `top_p`, `user`, ...) is
ignored, never rejected, as vLLM does. Every way a used field can be wrong is an `ApiError`, which
the app turns into HTTP 400 with OpenAI's `{"error": {"message", "type", "code"}}` body.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from typing import Any, Callable

from engine.config import ConfigError
from engine.sampling_params import SamplingParams
from engine.server.tokenizer import TextCodec

DEFAULT_MAX_TOKENS = 16  # OpenAI's legacy completions default; chat shares it (see docs/server.md)
DEFAULT_TEMPERATURE = 1.0  # OpenAI's and vLLM's default: a request that says nothing samples


class ApiError(Exception):
    """A request the server will not run: HTTP status, OpenAI error type and code, message."""

    def __init__(self, message: str, status: int = 400, type_: str = "BadRequestError",
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.type, self.code = status, type_, code or str(status)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": str(self), "type": self.type, "param": None,
                          "code": self.code}}


@dataclass
class GenerateArgs:
    """One request, checked: what the engine needs, and how the answer is shaped."""

    chat: bool
    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingParams
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with token counts
    return_token_ids: bool  # vLLM's extension: choices[0].token_ids holds the output ids


def _get(body: dict, name: str, kind: type | tuple[type, ...], default: Any) -> Any:
    value = body.get(name)
    if value is None:
        return default
    # bool is an int in Python; JSON's true is not a number of tokens.
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _tuple(kind)):
        raise ApiError(f"'{name}' must be of type {_names(kind)}, got {json.dumps(value)[:60]}")
    return value


def _tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _names(kind: type | tuple[type, ...]) -> str:
    return " or ".join(k.__name__ for k in _tuple(kind))


def _is_ids(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool)
                                           for t in value)


def _encode(codec: TextCodec, text: str) -> list[int]:
    try:
        return codec.encode(text)
    except Exception:  # a lone surrogate ("\ud800") is valid JSON but not encodable text
        raise ApiError("the prompt text is not valid Unicode") from None


def _completion_prompt(body: dict, codec: TextCodec) -> list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one prompt
    if isinstance(prompt, str):
        return _encode(codec, prompt)
    if _is_ids(prompt):
        return list(prompt)
    raise ApiError("'prompt' must be a string, a list of token ids, or a list holding one of "
                   "those (batches of several prompts are not supported)")


def _message_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise ApiError("message 'content' must be a string or a list of text parts")


def _chat_prompt(body: dict, codec: TextCodec) -> list[int]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError("'messages' must be a non-empty list")
    clean = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ApiError("each message must be an object with a string 'role'")
        clean.append({"role": m["role"], "content": _message_text(m.get("content", ""))})
    return _encode(codec, codec.render_chat(clean))


def _body(raw: bytes, model_names: set[str]) -> dict:
    """The JSON object of a request body, whose `model`, if given, must be this server's."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as err:
        raise ApiError(f"the body is not valid JSON ({err})") from None
    if not isinstance(body, dict):
        raise ApiError("the body must be a JSON object")
    model = _get(body, "model", str, None)
    if model is not None and model not in model_names:
        raise ApiError(f"the model {json.dumps(model)[:80]} does not exist; this server has "
                       f"{', '.join(sorted(model_names))}", type_="NotFoundError",
                       code="model_not_found")
    return body


def parse(raw: bytes, chat: bool, codec: TextCodec, model_names: set[str],
          why_never: Callable[[list[int], int], str | None]) -> GenerateArgs:
    """Check a request body; `why_never` is the engine's own test of whether a request can run."""
    body = _body(raw, model_names)
    if _get(body, "n", int, 1) != 1:
        raise ApiError("only n=1 is supported")
    max_tokens = _get(body, "max_completion_tokens", int, None)
    if max_tokens is None:
        max_tokens = _get(body, "max_tokens", int, DEFAULT_MAX_TOKENS)
    temperature = _get(body, "temperature", (int, float), DEFAULT_TEMPERATURE)
    seed = _get(body, "seed", int, None)
    ignore_eos = _get(body, "ignore_eos", bool, False)
    stream = _get(body, "stream", bool, False)
    options = _get(body, "stream_options", dict, {})
    include_usage = _get(options, "include_usage", bool, False)
    return_ids = _get(body, "return_token_ids", bool, False)
    if not math.isfinite(temperature):
        raise ApiError("'temperature' must be a finite number")
    prompt_ids = _chat_prompt(body, codec) if chat else _completion_prompt(body, codec)
    why = why_never(prompt_ids, max_tokens)
    if why is not None:
        raise ApiError(f"this request can never run here: {why}")
    stop = () if ignore_eos or codec.eos_token_id is None else (codec.eos_token_id,)
    try:
        sampling = SamplingParams(temperature=float(temperature), seed=seed,
                                  stop_token_ids=stop)
    except ConfigError as err:
        raise ApiError(str(err)) from None
    return GenerateArgs(chat, prompt_ids, max_tokens, sampling, stream, include_usage, return_ids)


def parse_tokenize(raw: bytes, codec: TextCodec, model_names: set[str]) -> list[int]:
    """The token ids of a POST /tokenize body, vLLM's shape: `prompt` text, or chat `messages`
    through the chat template."""
    body = _body(raw, model_names)
    if "messages" in body:
        return _chat_prompt(body, codec)
    return _encode(codec, _get(body, "prompt", str, ""))


# -- answers ---------------------------------------------------------------------------------
def usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def chunk(args: GenerateArgs, rid: str, model: str, text: str | None, reason: str | None,
          token_ids: list[int] | None = None, role: bool = False) -> dict[str, Any]:
    """One streamed event; `text=None` with `role` opens a chat stream."""
    if args.chat:
        delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
        if text is not None:
            delta["content"] = text
        choice: dict[str, Any] = {"index": 0, "delta": delta}
    else:
        choice = {"index": 0, "text": text or ""}
    choice |= {"logprobs": None, "finish_reason": reason}
    if args.return_token_ids and token_ids is not None:
        choice["token_ids"] = token_ids
    return {"id": rid, "object": "chat.completion.chunk" if args.chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": [choice]}


def usage_chunk(args: GenerateArgs, rid: str, model: str, completion: int) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion.chunk" if args.chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": [],
            "usage": usage(len(args.prompt_ids), completion)}


def whole(args: GenerateArgs, rid: str, model: str, text: str, reason: str,
          token_ids: list[int]) -> dict[str, Any]:
    """The non-streaming answer."""
    if args.chat:
        choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text}}
    else:
        choice = {"index": 0, "text": text}
    choice |= {"logprobs": None, "finish_reason": reason}
    if args.return_token_ids:
        choice["token_ids"] = token_ids
    return {"id": rid, "object": "chat.completion" if args.chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": [choice],
            "usage": usage(len(args.prompt_ids), len(token_ids))}
