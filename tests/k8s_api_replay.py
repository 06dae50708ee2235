"""Replays a recorded Kubernetes API conversation on loopback, for the ``k8s`` sandbox's tests.

A conversation (tests/integration/k8s_pod_sandbox_conversation.json) is the list of requests a
client made, in order, each with what the API server answered: REST calls (pods: create, read,
delete) with their JSON, and ``pods/exec`` websockets with the stdin the client sent and the
frames the server sent back (channel 1 stdout, 2 stderr, 3 the final metav1.Status). The server
here answers each request with the next recorded answer if the request is the recorded one, and
otherwise with a 400 Status, noting the difference in ``mismatches``: a test passes only if the
client made exactly the recorded requests, all of them.

Values only known at run time are placeholders in the recording: ``{pod}``, ``{sandbox_id}`` (the
sandbox's random id; learnt from the first pod created) and ``{namespace}``; ``{any}`` as one value
of a query matches whatever the client sent there. A tar archive on
stdin or stdout is recorded by its members ({name: text}), since an archive's bytes carry times.

It is a replay, not a Kubernetes: nothing runs, and a request off the record gets no answer.
"""

from __future__ import annotations

import asyncio
import io
import json
import tarfile
import threading
from pathlib import Path
from typing import Any

from aiohttp import WSMsgType, web

from arborl.rollout.sandboxes.k8s_pod import LAUNCHER

CONVERSATION = Path(__file__).parent / "integration" / "k8s_pod_sandbox_conversation.json"
V5 = "v5.channel.k8s.io"
ANY = "{any}"  # a recorded query value that stands for whatever the client sent (a time left, say)


def tar_of(members: dict[str, Any]) -> bytes:
    """An archive as PACK_SCRIPT writes it (a folder's contents under "./"), from
    {name: text | {"dir": true} | {"link": target}}."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            if isinstance(content, dict):  # {"dir": true} or {"link": target}
                if content.get("dir"):
                    info.type, info.mode = tarfile.DIRTYPE, 0o755
                else:
                    info.type, info.linkname = tarfile.SYMTYPE, content["link"]
                tar.addfile(info)
                continue
            data = content.encode()
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def members_of(archive: bytes) -> dict[str, str]:
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r") as tar:
        return {m.name: (tar.extractfile(m).read().decode() if m.isfile() else "") for m in tar.getmembers()
                if m.name not in (".", "./")}


class ApiReplay:
    """The conversation served on 127.0.0.1 from a thread of its own (``url``)."""

    def __init__(self, exchanges: list[dict[str, Any]], *, namespace: str = "arborl-test"):
        self.exchanges = exchanges
        self.position = 0
        self.values = {"namespace": namespace}
        self.mismatches: list[str] = []
        self.requests: list[dict[str, Any]] = []  # what the client sent, for tests that look at it
        self.pod_bodies: list[dict[str, Any]] = []
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        self._started.wait(10)

    @classmethod
    def named(cls, name: str, **kwargs: Any) -> ApiReplay:
        return cls(json.loads(CONVERSATION.read_text())["conversations"][name], **kwargs)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def finished(self) -> bool:
        return self.position == len(self.exchanges)

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    # -- serving ---------------------------------------------------------------------------------

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        runner = web.AppRunner(app)
        self._loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]  # noqa: SLF001 - the port the OS chose
        self._started.set()
        self._loop.run_forever()
        self._loop.run_until_complete(runner.cleanup())

    def _fill(self, value: Any) -> Any:
        if isinstance(value, str):
            for key, known in self.values.items():
                value = value.replace("{" + key + "}", known)
            return value
        if isinstance(value, list):
            return [self._fill(v) for v in value]
        if isinstance(value, dict):
            return {k: self._fill(v) for k, v in value.items()}
        return value

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        seen = {"method": request.method, "path": request.path,
                "query": {k: request.query.getall(k) for k in request.query}}
        self.requests.append(seen)
        if self.position >= len(self.exchanges):
            return self._refuse(f"request {len(self.requests)} {request.method} {request.path}: past the recording")
        exchange = self.exchanges[self.position]
        if request.method == "POST" and request.path.endswith("/pods") and body:
            pod = json.loads(body)
            self.pod_bodies.append(pod)
            self.values.setdefault("pod", pod["metadata"]["name"])
            self.values.setdefault("sandbox_id", pod["metadata"]["labels"]["arborl.io/sandbox"])
        expected = self._fill(exchange["request"])
        problem = self._differs(expected, seen)
        if problem:
            return self._refuse(f"request {len(self.requests)}: {problem}")
        self.position += 1
        if "frames" in exchange:
            return await self._exec(request, exchange)
        answer = exchange["response"]
        return web.json_response(self._fill(answer.get("json", {})), status=answer["status"])

    def _differs(self, expected: dict[str, Any], seen: dict[str, Any]) -> str | None:
        for key in ("method", "path"):
            if expected[key] != seen[key]:
                return f"{key} {seen[key]!r}, recorded {expected[key]!r}"
        for name, values in expected.get("query", {}).items():
            got = seen["query"].get(name) or []
            if len(got) != len(values) or any(v not in (g, ANY) for g, v in zip(got, values, strict=True)):
                return f"query {name}={got!r}, recorded {values!r}"
        return None

    def _refuse(self, problem: str) -> web.Response:
        self.mismatches.append(problem)
        return web.json_response({"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": problem,
                                  "reason": "BadRequest", "code": 400}, status=400)

    async def _exec(self, request: web.Request, exchange: dict[str, Any]) -> web.StreamResponse:
        ws = web.WebSocketResponse(protocols=(V5, "v4.channel.k8s.io"))
        await ws.prepare(request)
        expected = self._fill(exchange.get("stdin"))
        if expected is not None:
            received = await self._read_stdin(ws, expected)
            if received is not None:
                self._check_stdin(expected, received)
        for frame in self._fill(exchange["frames"]):
            if frame.get("delay_s"):
                await asyncio.sleep(frame["delay_s"])
            if "channel" not in frame:
                continue
            if "tar" in frame:
                data = tar_of(frame["tar"])
            elif "status" in frame:
                data = json.dumps(frame["status"]).encode()
            else:
                data = frame["data"].encode()
            await ws.send_bytes(bytes([frame["channel"]]) + data)
        await ws.close()
        return ws

    async def _read_stdin(self, ws: web.WebSocketResponse, expected: dict[str, Any]) -> bytes | None:
        """The client's stdin up to the end of what the command reads (the preamble says how much)."""
        data = b""
        while True:
            need = _stdin_length(data)
            if need is not None and len(data) >= need:
                return data
            message = await ws.receive(timeout=30)
            if message.type != WSMsgType.BINARY:
                self.mismatches.append(f"stdin ended early ({message.type}) after {len(data)} bytes")
                return None
            if message.data[:1] == b"\x00":
                data += message.data[1:]

    def _check_stdin(self, expected: dict[str, Any], received: bytes) -> None:
        length = int(received[:8])
        line, rest = received[8:8 + length].decode(), received[8 + length:]
        if line != expected["preamble"]:
            self.mismatches.append(f"stdin preamble {line!r}, recorded {expected['preamble']!r}")
        if "tar" in expected and members_of(rest) != expected["tar"]:
            self.mismatches.append(f"stdin archive {members_of(rest)!r}, recorded {expected['tar']!r}")
        if "data" in expected and rest.decode() != expected["data"]:
            self.mismatches.append(f"stdin {rest!r}, recorded {expected['data']!r}")


def _stdin_length(data: bytes) -> int | None:
    """How many bytes of stdin the exec's command line reads: the preamble, then its ``head -c N``."""
    if len(data) < 8:
        return None
    length = int(data[:8])
    if len(data) < 8 + length:
        return None
    line = data[8:8 + length].decode()
    marker = "head -c "
    extra = int(line.split(marker, 1)[1].split()[0]) if marker in line else 0
    return 8 + length + extra


__all__ = ["LAUNCHER", "ApiReplay", "members_of", "tar_of"]
