"""An HTTP server on 127.0.0.1 for download tests: files, errors, truncated bodies and dropped connections.

Each route maps a path to a :class:`Reply`. The server also answers the way the Hugging Face hub answers
``huggingface_hub`` (``/{repo}/resolve/{revision}/{file}`` with ``X-Repo-Commit`` and ``ETag`` headers), so
``HF_ENDPOINT`` can point at it. Every request is recorded (method, path), so a test can check that a
cached file was not fetched again.
"""

from __future__ import annotations

import hashlib
import http.server
import threading
from dataclasses import dataclass, field


@dataclass
class Reply:
    """What the server sends for a path.

    ``send`` cuts the body after that many bytes and closes the connection (the headers still announce
    the whole length: a connection dropped mid-file); ``drop`` closes the connection before any reply.
    """

    body: bytes = b""
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    send: int | None = None
    drop: bool = False


def hub_reply(body: bytes, *, commit: str = "a" * 40, send: int | None = None) -> Reply:
    """A file as the hub serves it: its commit in ``X-Repo-Commit``, its SHA-256 as the ETag."""
    etag = hashlib.sha256(body).hexdigest()
    return Reply(body, headers={"X-Repo-Commit": commit, "ETag": f'"{etag}"'}, send=send)


class FileServer:
    """``with FileServer() as server: server.routes["/x"] = Reply(b"...")``; ``server.url("/x")``."""

    def __init__(self) -> None:
        self.routes: dict[str, Reply] = {}
        self.requests: list[tuple[str, str]] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _reply(self, with_body: bool) -> None:
                path = self.path.split("?", 1)[0]
                server.requests.append((self.command, path))
                reply = server.routes.get(path, Reply(b"Not Found", status=404))
                if reply.drop:
                    self.close_connection = True
                    return
                self.send_response(reply.status)
                headers = {"Content-Type": "application/octet-stream", **reply.headers}
                headers["Content-Length"] = str(len(reply.body))
                for k, v in headers.items():
                    self.send_header(k, v)
                if reply.send is not None:
                    self.send_header("Connection", "close")
                self.end_headers()
                if with_body:
                    self.wfile.write(reply.body if reply.send is None else reply.body[: reply.send])
                    self.wfile.flush()
                if reply.send is not None:
                    self.close_connection = True

            def do_GET(self) -> None:  # noqa: N802 - http.server's hook
                self._reply(with_body=True)

            def do_HEAD(self) -> None:  # noqa: N802
                self._reply(with_body=False)

        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def base(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def url(self, path: str) -> str:
        return self.base + path

    def gets(self, path: str) -> int:
        """How many GET requests reached ``path``."""
        return sum(1 for method, p in self.requests if method == "GET" and p == path)

    def __enter__(self) -> FileServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
