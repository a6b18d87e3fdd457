"""Request bodies for `tnt serve`: the upload limit, reading images from a request, and noticing a client
that has gone.

The limit answers 413 only after it has read (and thrown away) the rest of the body, up to a bound, as
nginx does: a server that answers and closes with unread data in its socket makes the client's kernel
see a reset (``Connection reset by peer``) instead of the answer, whenever the upload outlasts the
keep-alive timer that the early answer starts.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

__all__ = ["BodyLimit", "ClientGone", "ServeError", "form_files", "media_type", "one_image", "unless_gone"]

T = TypeVar("T")
Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class ServeError(Exception):
    """A request refused with ``status`` and a one-sentence ``message`` (the JSON ``error``); ``headers``
    go with the answer (``Retry-After``, ``Connection: close``)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


class ClientGone(Exception):
    """The client closed its connection before its answer was ready; nobody reads the answer."""


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """``{"error": message}`` with ``status``."""
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class BodyLimit:
    """ASGI middleware: refuse request bodies over ``max_bytes`` with 413, after draining them.

    A declared ``Content-Length`` over the limit is read and dropped, then answered; a body without one
    (chunked) is counted as it streams and, once past the limit, read to its end and dropped before the
    app's 413 goes out. Draining stops at ``drain_bytes``: a larger body is answered at once with
    ``Connection: close`` (the client may then see a reset, as from any server).
    """

    def __init__(self, app: Any, max_bytes: int, drain_bytes: int | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.drain_bytes = drain_bytes if drain_bytes is not None else max(4 * max_bytes, 64 * 2**20)

    def message(self) -> str:
        return f"the upload is larger than the server's limit of {self.max_bytes / 2**20:g} MB"

    async def _drain(self, receive: Receive, seen: int) -> bool:
        """Read the body to its end; False if it passed ``drain_bytes`` first or the client left."""
        while seen <= self.drain_bytes:
            message = await receive()
            if message["type"] != "http.request":
                return False
            seen += len(message.get("body", b""))
            if not message.get("more_body", False):
                return seen <= self.drain_bytes
        return False

    def _refusal(self, drained: bool) -> ServeError:
        return ServeError(413, self.message(), None if drained else {"connection": "close"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            drained = int(declared) <= self.drain_bytes and await self._drain(receive, 0)
            refusal = self._refusal(drained)
            await error_response(refusal.status, refusal.message, refusal.headers)(scope, receive, send)
            return
        seen = 0

        async def counted() -> MutableMapping[str, Any]:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                more = message.get("more_body", False)
                raise self._refusal(not more or await self._drain(receive, seen))
            return message

        await self.app(scope, counted, send)


def media_type(request: Request) -> str:
    """The request's content type without parameters, lower case ('' if none)."""
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def form_files(request: Request, max_files: int) -> list[UploadFile]:
    """The ``file`` fields of a multipart form (415 for another content type, 422 for none)."""
    if media_type(request) != "multipart/form-data":
        raise ServeError(415, "send the images as multipart/form-data fields named 'file'")
    try:
        form = await request.form(max_files=max_files, max_fields=max_files + 8)
    except HTTPException as e:  # Starlette's refusal of a malformed or oversized form
        raise ServeError(400, f"unreadable form ({e.detail})") from None
    except (ValueError, KeyError, UnicodeError) as e:  # the multipart parser's own
        raise ServeError(400, f"unreadable form ({type(e).__name__})") from None
    files = [f for f in form.getlist("file") if isinstance(f, UploadFile)]
    if not files:
        raise ServeError(422, "the form has no file field named 'file'")
    return files


async def one_image(request: Request) -> bytes:
    """The bytes of the one image of a /predict or /explain request: raw ``image/*`` or a form field."""
    media = media_type(request)
    if media.startswith("image/"):
        return await request.body()
    if media == "multipart/form-data":
        (upload, *_rest) = await form_files(request, max_files=1)
        return await upload.read()
    shown = media or "none"
    raise ServeError(
        415, f"content type {shown!r} is not accepted: send image/* bytes or a multipart field 'file'"
    )


async def _disconnected(receive: Receive) -> None:
    """Return when the client has closed the connection (the body has been read already)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def unless_gone(request: Request, work: Awaitable[T]) -> T:
    """Await ``work`` while watching the request's connection: if the client disconnects first, ``work``
    is cancelled (an engine request gives its place back at once) and :class:`ClientGone` is raised.

    Call it only once the request's body has been read.
    """
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request.receive))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
        gone.cancel()
    if task.cancelled() or not task.done():
        with contextlib.suppress(asyncio.CancelledError):
            await task
        raise ClientGone("the client closed the connection")
    return task.result()
