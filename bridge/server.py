"""The OpenAI-compatible HTTP front of ``bridge.serving.Engine`` (Starlette on uvicorn):
``/v1/completions``, ``/v1/chat/completions`` (the checkpoint's chat template), ``/v1/models`` and
``/health``; ``stream: true`` as server-sent events. It only translates: JSON in, a ``Request`` to
the engine, its events out. Bad requests get 4xx with an OpenAI-style error body; a full queue 429.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from bridge.errors import BridgeError, RequestError
from bridge.serving import Busy, Engine, Event, Request


def _error(e: RequestError) -> JSONResponse:
    body = {"error": {"message": e.message, "type": e.kind, "param": e.param, "code": None}}
    return JSONResponse(body, status_code=e.status)


class _Events:
    """The engine thread's events handed to this request's asyncio queue."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.queue = loop, asyncio.Queue()

    def put(self, event: Event) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)


def _number(body: dict, name: str, kind, default, low=None, high=None, above=None):
    value = body.get(name, default)
    if value is None:
        value = default
    ok = isinstance(value, kind) and not isinstance(value, bool) or kind is float and isinstance(value, int) \
        and not isinstance(value, bool)  # fmt: skip
    if not ok or (low is not None and value < low) or (high is not None and value > high) \
            or (above is not None and value <= above):  # fmt: skip
        bounds = " and ".join(x for x in (f">= {low}" if low is not None else "", f"> {above}" if above is not None else "",
                                          f"<= {high}" if high is not None else "") if x)  # fmt: skip
        raise RequestError(400, f"'{name}' must be a{'n integer' if kind is int else ' number'}{' ' + bounds if bounds else ''}, "
                            f"got {value!r}", param=name)  # fmt: skip
    return kind(value)


def build_app(engine: Engine, model_name: str) -> Starlette:
    gen = engine.gen
    created = int(time.time())

    async def parse(http: HttpRequest) -> dict:
        try:
            body = json.loads(await http.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RequestError(400, f"the request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise RequestError(400, "the request body must be a JSON object")
        model = body.get("model")
        if model is not None and model != model_name:
            raise RequestError(404, f"the model '{model}' does not exist; this server serves '{model_name}'",
                           kind="not_found_error", param="model")  # fmt: skip
        if body.get("n", 1) != 1:
            raise RequestError(400, "only n=1 is supported", param="n")
        return body

    def make_request(body: dict, prompt_ids: list, loop) -> Request:
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise RequestError(400, "'stop' must be a string or a list of strings", param="stop")
        top_k = _number(body, "top_k", int, 0, low=-1)
        seed = body.get("seed")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
            raise RequestError(400, f"'seed' must be an integer >= 0, got {seed!r}", param="seed")
        return Request(prompt_ids=prompt_ids,
                       max_tokens=_number({"max_tokens": max_tokens}, "max_tokens", int, 16, low=1),
                       temperature=_number(body, "temperature", float, 1.0, low=0.0),
                       top_p=_number(body, "top_p", float, 1.0, above=0.0, high=1.0),
                       top_k=max(top_k, 0), seed=seed, stop=stop, ignore_eos=bool(body.get("ignore_eos", False)),
                       events=_Events(loop))  # fmt: skip

    def token_ids(prompt: Any) -> list | None:
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return list(prompt)
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], list):
            return token_ids(prompt[0])
        return None

    def encode(text: str, chat_messages=None) -> list:
        try:
            if chat_messages is not None:
                return gen.text.encode_messages(chat_messages)
            return gen.encode(text)
        except BridgeError as e:
            raise RequestError(400, str(e)) from None

    async def run(http: HttpRequest, request: Request, body: dict, chat: bool):
        try:
            engine.submit(request)
        except Busy as e:
            raise RequestError(429, str(e), kind="rate_limit_error") from None
        except BridgeError as e:
            raise RequestError(400, str(e)) from None
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        queue: asyncio.Queue = request.events.queue
        if body.get("stream"):
            return StreamingResponse(stream(request, queue, rid, chat), media_type="text/event-stream")
        text, finish, last = [], None, None
        try:
            while finish is None:
                try:
                    event = await asyncio.wait_for(queue.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    if await http.is_disconnected():
                        request.cancel()
                        return None
                    continue
                text.append(event.text)
                finish, last = event.finish, event
        except asyncio.CancelledError:
            request.cancel()
            raise
        if finish == "error":
            raise RequestError(500, last.error or "generation failed", kind="server_error")
        usage = dict(prompt_tokens=last.prompt_tokens, completion_tokens=last.completion_tokens,
                     total_tokens=last.prompt_tokens + last.completion_tokens)  # fmt: skip
        content = "".join(text)
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish,
                      "logprobs": None}  # fmt: skip
            return JSONResponse({"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model_name,
                                 "choices": [choice], "usage": usage})  # fmt: skip
        choice = {"index": 0, "text": content, "finish_reason": finish, "logprobs": None}
        return JSONResponse({"id": rid, "object": "text_completion", "created": int(time.time()), "model": model_name,
                             "choices": [choice], "usage": usage})  # fmt: skip

    async def stream(request: Request, queue: asyncio.Queue, rid: str, chat: bool):
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(piece: str | None, finish: str | None, first: bool = False) -> str:
            if chat:
                delta = {} if piece is None else {"content": piece}
                if first:
                    delta = {"role": "assistant", "content": ""}
                choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            else:
                choice = {"index": 0, "text": piece or "", "finish_reason": finish, "logprobs": None}
            body = {"id": rid, "object": kind, "created": int(time.time()), "model": model_name, "choices": [choice]}
            return f"data: {json.dumps(body)}\n\n"

        try:
            if chat:
                yield chunk(None, None, first=True)
            while True:
                event = await queue.get()
                if event.text:
                    yield chunk(event.text, None)
                if event.finish == "error":
                    error = {"error": {"message": event.error or "generation failed", "type": "server_error",
                                       "param": None, "code": None}}  # fmt: skip
                    yield f"data: {json.dumps(error)}\n\n"
                    break
                if event.finish is not None:
                    yield chunk(None, event.finish)
                    break
            yield "data: [DONE]\n\n"
        finally:  # the client went away (the generator is closed early): free the slot
            request.cancel()

    async def completions(http: HttpRequest):
        try:
            body = await parse(http)
            prompt = body.get("prompt")
            ids = token_ids(prompt)
            if ids is None:
                if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                    prompt = prompt[0]
                if not isinstance(prompt, str) or not prompt:
                    raise RequestError(400, "'prompt' must be a non-empty string or a list of token ids", param="prompt")
                ids = encode(prompt)
            return await run(http, make_request(body, ids, asyncio.get_running_loop()), body, chat=False)
        except RequestError as e:
            return _error(e)

    async def chat_completions(http: HttpRequest):
        try:
            body = await parse(http)
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages or not all(
                    isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):  # fmt: skip
                raise RequestError(400, "'messages' must be a non-empty list of {role, content} objects", param="messages")
            ids = encode("", chat_messages=[_plain(m) for m in messages])
            return await run(http, make_request(body, ids, asyncio.get_running_loop()), body, chat=True)
        except RequestError as e:
            return _error(e)

    async def models(http: HttpRequest):
        card = {"id": model_name, "object": "model", "created": created, "owned_by": "torchax-bridge",
                "max_model_len": engine.context}  # fmt: skip
        return JSONResponse({"object": "list", "data": [card]})

    async def health(http: HttpRequest):
        if engine.error is not None:
            return JSONResponse({"status": "error", "error": str(engine.error)}, status_code=503)
        return JSONResponse({"status": "ok", "active": len(engine.active), "waiting": engine.waiting.qsize()})

    async def not_found(http: HttpRequest, exc):
        return _error(RequestError(404, f"no route {http.method} {http.url.path}", kind="not_found_error"))

    async def server_error(http: HttpRequest, exc):  # never a traceback to the client, never a dead server
        return _error(RequestError(500, f"{type(exc).__name__}: {exc}", kind="server_error"))

    routes = [Route("/v1/completions", completions, methods=["POST"]),
              Route("/v1/chat/completions", chat_completions, methods=["POST"]),
              Route("/v1/models", models, methods=["GET"]), Route("/health", health, methods=["GET"])]  # fmt: skip
    return Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found, 500: server_error})


def _plain(message: dict) -> dict:
    """A chat message with its content as text (a list of {type: text} parts joined)."""
    content = message.get("content")
    if isinstance(content, list):
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    if not isinstance(content, str):
        raise RequestError(400, "a message's 'content' must be text", param="messages")
    return {"role": message["role"], "content": content}


def serve(engine: Engine, model_name: str, host: str = "127.0.0.1", port: int = 8000, log=print,
          ready=None) -> None:  # fmt: skip
    """Serves until Ctrl-C (or SIGTERM): then the requests in flight finish, the engine stops, and
    this returns. ``ready(port, stop)`` is called once it listens: the port it bound (``port`` 0
    picks one) and a function that shuts it down as Ctrl-C does (for a caller that runs it in a
    thread)."""
    import uvicorn

    app = build_app(engine, model_name)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=60,
                            lifespan="off")  # fmt: skip
    server = uvicorn.Server(config)
    engine.start()

    if ready is not None or log is not None:
        async def announce():
            while not server.started:
                await asyncio.sleep(0.05)
            bound = server.servers[0].sockets[0].getsockname()[1] if server.servers else port
            if log is not None:
                log(f"serving '{model_name}' on http://{host}:{bound}/v1 ({engine.slots} slots, context {engine.context})")
            if ready is not None:
                ready(bound, lambda: setattr(server, "should_exit", True))

        original = server.startup

        async def startup(sockets=None):
            await original(sockets)
            asyncio.get_running_loop().create_task(announce())

        server.startup = startup
    try:
        server.run()
    finally:
        engine.stop(drain=True)
