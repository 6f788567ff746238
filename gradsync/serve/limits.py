"""What one HTTP client may make the front process hold: a request's head bounded in size
and in time, its body counted as it streams and refused (413) once over the limit.

uvicorn leaves these open with httptools (issue 22): its C parser buffers header lines
without end, a client sending one byte a second holds its connection forever, and a chunked
body (no Content-Length) would be read whole before a route could refuse it. Its own limits
are used where it has them: ``limit_concurrency`` (503 past that many connections) and
``timeout_keep_alive`` (an idle kept-alive connection closes); what it lacks is here.

    bounded_protocol(t)  uvicorn's httptools protocol, plus: a request line and headers over
                         MAX_HEAD_BYTES -> 431, not complete within t seconds -> 408 (a
                         fresh connection that sends nothing is closed after t seconds too)
    BodyLimit            ASGI middleware: every route's body read as it streams; over the
                         limit -> 413; silent for t seconds -> 408; shutting down -> 503
Each refusal is ``{"error": "..."}`` and closes the connection.
"""

from __future__ import annotations

import asyncio
import json
from http import HTTPStatus

# Request line and headers together. A Triton or httpx client sends a few hundred bytes;
# 64 KiB leaves room for long tokens in proxies' headers (nginx's default is 32 KiB).
MAX_HEAD_BYTES = 64 * 1024
# At shutdown, a body still arriving gets this long to finish before a 503: a request in
# flight is answered, a stalled upload does not hold the shutdown.
STOP_GRACE_S = 1.0


def _raw_answer(status: int, message: str) -> bytes:
    """A whole HTTP/1.1 answer ``{"error": message}`` that closes the connection."""
    body = json.dumps({"error": message}).encode()
    return (f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"
            f"content-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n").encode() + body


def bounded_protocol(head_timeout_s: float) -> type:
    """uvicorn's httptools protocol with the head of every request bounded: over
    ``MAX_HEAD_BYTES`` it is answered 431, not complete ``head_timeout_s`` after its first
    byte (or after the connection opened) 408; both close the connection."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class BoundedHttpToolsProtocol(HttpToolsProtocol):
        # The parser's callbacks (on_message_begin, on_headers_complete, ...) mark where a
        # head starts and ends; bytes are counted as they arrive, before httptools buffers
        # them, so a header line without end is refused after one read past the limit.
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._head_bytes = 0
            self._in_head = True
            self._head_timer = None
            self._arm_head_timer()

        def _arm_head_timer(self) -> None:
            if self._head_timer is None:
                self._head_timer = self.loop.call_later(head_timeout_s, self._head_timed_out)

        def _disarm_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _refuse(self, status: int, message: str) -> None:
            self.logger.warning("%s: %s", self.client, message)
            self._disarm_head_timer()
            if not self.transport.is_closing():
                self.transport.write(_raw_answer(status, message))
                self.transport.close()

        def _head_timed_out(self) -> None:
            self._head_timer = None
            if self._head_bytes == 0:  # a connection that never sent anything: just close
                if not self.transport.is_closing():
                    self.transport.close()
                return
            self._refuse(408, f"request line and headers not received within "
                              f"{head_timeout_s:g} s")

        def data_received(self, data: bytes) -> None:
            if self._in_head:
                self._head_bytes += len(data)
            super().data_received(data)
            if self._in_head and self._head_bytes > MAX_HEAD_BYTES:
                self._refuse(431, f"request line and headers over {MAX_HEAD_BYTES} bytes")

        def on_message_begin(self) -> None:
            self._in_head = True
            self._arm_head_timer()
            super().on_message_begin()

        def on_headers_complete(self) -> None:
            self._in_head = False
            self._disarm_head_timer()
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            # The next request's head starts here; its bytes come in the next reads.
            self._in_head, self._head_bytes = True, 0
            super().on_message_complete()

        def connection_lost(self, exc) -> None:
            self._disarm_head_timer()
            super().connection_lost(exc)

    return BoundedHttpToolsProtocol


class BodyLimit:
    """ASGI middleware: reads each request's body as it streams, at most ``max_bytes`` of
    it, then hands it to ``app`` whole.

    Args:
        app: the ASGI application.
        max_bytes: the largest body; a larger one is refused (413) as soon as its bytes
            pass the limit, Content-Length or chunked, on every route.
        idle_timeout_s: the longest a client may be silent while sending a body (408).
    """

    def __init__(self, app, max_bytes: int, idle_timeout_s: float):
        self.app = app
        self.max_bytes = max_bytes
        self.idle_timeout_s = idle_timeout_s
        self.stopping = False
        self._stop_at = 0.0
        self._reading: set[asyncio.Timeout] = set()

    def stop(self) -> None:
        """The server is shutting down: bodies still arriving get ``STOP_GRACE_S`` more to
        finish (a request in flight is answered), then 503, so a stalled upload does not hold
        the shutdown (call from the event loop)."""
        self.stopping = True
        self._stop_at = asyncio.get_running_loop().time() + STOP_GRACE_S
        for deadline in list(self._reading):
            if deadline.when() is None or deadline.when() > self._stop_at:
                deadline.reschedule(self._stop_at)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:  # refused unread
            await _refuse(send, 413, f"request body of {int(declared)} bytes is over the "
                                     f"limit of {self.max_bytes} (--max-request-rows)")
            return
        chunks, total = [], 0
        while True:
            try:
                message = await self._receive(receive)
            except TimeoutError:
                if self.stopping:
                    await _refuse(send, 503, "the server is shutting down")
                else:
                    await _refuse(send, 408, f"request body stalled for "
                                             f"{self.idle_timeout_s:g} s")
                return
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > self.max_bytes:
                await _refuse(send, 413, f"request body over the limit of {self.max_bytes} "
                                         "bytes (--max-request-rows)")
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # (a disconnect, if the route listens for one)
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _receive(self, receive):
        # asyncio.timeout, not wait_for: no task per read on Python 3.11.
        when = asyncio.get_running_loop().time() + self.idle_timeout_s
        if self.stopping:
            when = min(when, self._stop_at)
        async with asyncio.timeout_at(when) as deadline:
            self._reading.add(deadline)
            try:
                return await receive()
            finally:
                self._reading.discard(deadline)


async def _refuse(send, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body, "more_body": False})
