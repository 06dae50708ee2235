"""A minimal OpenAI-compatible server that answers instantly, for gateway-overhead benchmarks.

Raw asyncio streams (uvloop when installed) and a hand-written HTTP/1.1 keep-alive parser, so it
costs as little CPU as possible. ``POST /v1/chat/completions`` streams the same reply every time
(a role chunk, 8 content deltas, a final chunk with ``finish_reason`` and ``usage``, then
``data: [DONE]``), each SSE event written as soon as the previous one is; without ``"stream": true``
it answers the same reply as one JSON body. ``GET /v1/models`` lists the model last asked for.

    python tests/bench/instant_upstream.py --port 8100
"""

from __future__ import annotations

import argparse
import asyncio
import json

WORDS = ["The", " quick", " brown", " fox", " jumps", " over", " the", " dog."]
USAGE = {"prompt_tokens": 12, "completion_tokens": len(WORDS), "total_tokens": 12 + len(WORDS)}
_cache: dict[tuple[str, bool], list[bytes]] = {}
_last_model = "instant"


def _head(status: str, content_type: str, length: int | None) -> bytes:
    framing = f"content-length: {length}" if length is not None else "transfer-encoding: chunked"
    return (f"HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\n{framing}\r\n"
            "connection: keep-alive\r\n\r\n").encode()


def _json_response(body: dict, status: str = "200 OK") -> list[bytes]:
    data = json.dumps(body, separators=(",", ":")).encode()
    return [_head(status, "application/json", len(data)) + data]


def _chat(model: str, stream: bool) -> list[bytes]:
    """The writes of one chat completion reply: one per SSE event (chunked framing), or one body."""
    if (model, stream) in _cache:
        return _cache[model, stream]
    base = {"id": "chatcmpl-instant", "created": 1700000000, "model": model}
    if not stream:
        message = {"role": "assistant", "content": "".join(WORDS)}
        out = _json_response({**base, "object": "chat.completion", "usage": USAGE,
                              "choices": [{"index": 0, "message": message, "finish_reason": "stop"}]})
    else:
        def event(delta: dict, finish: str | None = None, **extra) -> bytes:
            chunk = {**base, "object": "chat.completion.chunk", **extra,
                     "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            data = b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"
            return b"%x\r\n%s\r\n" % (len(data), data)

        events = [event({"role": "assistant", "content": ""})] + [event({"content": w}) for w in WORDS]
        events.append(event({}, "stop", usage=USAGE))
        events.append(b"e\r\ndata: [DONE]\n\n\r\n0\r\n\r\n")
        out = [_head("200 OK", "text/event-stream", None) + events[0], *events[1:]]
    _cache[model, stream] = out
    return out


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
    if "content-length" in headers:
        return await reader.readexactly(int(headers["content-length"]))
    if headers.get("transfer-encoding", "").lower() != "chunked":
        return b""
    body = b""
    while size := int((await reader.readline()).split(b";")[0], 16):
        body += (await reader.readexactly(size + 2))[:-2]
    while await reader.readline() not in (b"\r\n", b""):  # trailers
        pass
    return body


def _answer(method: str, path: str, body: bytes) -> list[bytes]:
    global _last_model
    path = path.split("?")[0]
    if method == "POST" and path.endswith("/chat/completions"):
        request = json.loads(body or b"{}")
        _last_model = request.get("model") or _last_model
        return _chat(_last_model, bool(request.get("stream")))
    if method == "GET" and path.endswith("/models"):
        return _json_response({"object": "list", "data": [{"id": _last_model, "object": "model",
                                                            "created": 0, "owned_by": "instant"}]})
    if method == "GET" and path in ("/health", "/"):
        return _json_response({"status": "ok"})
    return _json_response({"error": {"message": f"no route {method} {path}", "type": "not_found"}},
                          "404 Not Found")


async def _serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while head := await reader.readuntil(b"\r\n\r\n"):
            lines = head.decode("latin-1").split("\r\n")
            method, path, _ = lines[0].split(" ", 2)
            headers = {}
            for line in lines[1:]:
                if line:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
            for part in _answer(method, path, await _read_body(reader, headers)):
                writer.write(part)
            if headers.get("connection", "").lower() == "close":
                break
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def serve(host: str, port: int, ready=None) -> None:
    server = await asyncio.start_server(_serve, host, port, backlog=1024)
    if ready is not None:
        ready.set()
    async with server:
        await server.serve_forever()


def run(host: str = "127.0.0.1", port: int = 8100, ready=None) -> None:
    """Serve forever (the entry point of the server's own process); ``ready`` (an Event) is set once bound."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(host, port, ready))
    else:
        uvloop.run(serve(host, port, ready))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    args = parser.parse_args()
    run(args.host, args.port)
