"""What one connection may cost the server: body size, read time, and memory kept afterwards.

    connection ─> TimedH11Protocol    the request (headers and body) must arrive within
                                      request_read_timeout_s of its first byte (or of the connect)
               ─> BodyLimitMiddleware a body over max_request_body_bytes is a 413: at once when
                                      Content-Length says so, else as soon as the bytes read pass it
               ─> the app             large text is tokenized on a worker thread; afterwards
                                      release_freed_memory() hands glibc's freed heap back

uvicorn itself only times out idle keep-alive connections: a client that connects and sends half a
request keeps its connection (and a task) forever. The timed protocol closes it; the app sees an
ordinary disconnect.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from .protocol import APIError

log = logging.getLogger("vattention.server")

LARGE_BODY_BYTES = 1 << 20  # after a request this large, freed heap memory is handed back


class BodyTooLargeError(APIError):
    def __init__(self, limit: int):
        super().__init__(413, f"The request body is larger than this server accepts "
                              f"({limit} bytes; --max-request-body-bytes).",
                         code="request_too_large")


class BodyLimitMiddleware:
    """ASGI middleware: refuse bodies over `max_bytes` with the OpenAI error envelope (413)."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await _send_error(send, BodyTooLargeError(self.max_bytes))
            return await _drain(receive, int(length))
        received = 0
        body_done = False

        async def counted_receive():
            nonlocal received, body_done
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if received > self.max_bytes:
                    raise BodyTooLargeError(self.max_bytes)  # answered by the app's APIError handler
            return message

        try:
            await self.app(scope, counted_receive, send)
        finally:
            if received > self.max_bytes and not body_done:
                await _drain(receive, DRAIN_LIMIT_BYTES)
            if received > LARGE_BODY_BYTES:
                await asyncio.to_thread(release_freed_memory)


DRAIN_LIMIT_BYTES = 256 << 20  # refused bytes read and dropped at most, so the answer is not lost


async def _drain(receive, most_bytes: int) -> None:
    """Read and drop the rest of a refused body (up to most_bytes). Closing a connection whose
    peer is still sending makes the kernel answer with a reset, which can destroy the 413 before
    the client reads it; reading the rest first (a "lingering close") lets the answer arrive."""
    seen = 0
    while seen <= min(most_bytes, DRAIN_LIMIT_BYTES):
        message = await receive()
        if message["type"] != "http.request":
            return
        seen += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


async def _send_error(send, error: APIError) -> None:
    from .protocol import ErrorResponse
    body = ErrorResponse(error=error.info).model_dump_json().encode()
    await send({"type": "http.response.start", "status": error.status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()), (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class TimedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, plus a deadline for reading each request: from the connect (or
    the first byte of a later request on the connection) to the end of its body. A connection
    still sending its request at the deadline is closed."""

    read_timeout_s: float = 30.0  # set by make_protocol

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._read_deadline = None
        self._arm_read_deadline()

    def data_received(self, data: bytes) -> None:
        if self._read_deadline is None:  # the first byte of a new request on a kept-alive connection
            self._arm_read_deadline()
        super().data_received(data)
        if self.conn.their_state is not h11.SEND_BODY and self.conn.their_state is not h11.IDLE:
            self._disarm()  # the whole request is in

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._disarm()  # idle between requests is uvicorn's keep-alive timeout's business

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm_read_deadline(self) -> None:
        self._read_deadline = self.loop.call_later(self.read_timeout_s, self._read_timed_out)

    def _disarm(self) -> None:
        if self._read_deadline is not None:
            self._read_deadline.cancel()
            self._read_deadline = None

    def _read_timed_out(self) -> None:
        self._read_deadline = None
        if self.transport.is_closing() or self.conn.their_state not in (h11.IDLE, h11.SEND_BODY):
            return
        client = "%s:%d" % self.client if self.client else "a client"
        log.info("closing the connection of %s: its request did not arrive within %.0f s",
                 client, self.read_timeout_s)
        self.transport.close()


def make_protocol(read_timeout_s: float) -> type[TimedH11Protocol]:
    """The protocol class uvicorn instantiates per connection, with this server's deadline."""
    return type("TimedH11Protocol", (TimedH11Protocol,), {"read_timeout_s": read_timeout_s})


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
_malloc_trim = getattr(_libc, "malloc_trim", None)  # glibc only


def release_freed_memory() -> None:
    """Give the heap that large requests freed back to the OS. Tokenizing a prompt allocates many
    small blocks per token; glibc keeps them after they are freed (measured: RSS 69 -> 349 MB
    after one 2 MB prompt, back to 59 MB after malloc_trim), so without this the server's RSS
    only ever grows to its largest request's."""
    if _malloc_trim is not None:
        _malloc_trim(0)
