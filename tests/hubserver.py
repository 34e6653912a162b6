"""A stand-in Hugging Face Hub on a local port: one repo (``owner/remote``) served from a folder."""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlparse

HUB_COMMIT = "fedcba9876543210fedcba9876543210fedcba98"


class FakeHub(ThreadingHTTPServer):
    """Serves one repo (``owner/remote``) from a folder, as the Hub's API and resolve URLs do."""

    def __init__(self, folder: Path, stall: str | None = None) -> None:
        """``stall``: a file name whose download starts and then never finishes (a very slow link)."""
        super().__init__(("127.0.0.1", 0), _HubHandler)
        self.folder = folder
        self.stall = stall
        self.stopped = threading.Event()
        self.requests: list[str] = []
        self.daemon_threads = True

    def shutdown(self) -> None:
        self.stopped.set()
        super().shutdown()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _HubHandler(BaseHTTPRequestHandler):
    server: FakeHub

    def log_message(self, *_args: object) -> None:
        pass

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def do_GET(self) -> None:
        self._answer(body=True)

    def _answer(self, body: bool) -> None:
        self.server.requests.append(f"{self.command} {self.path}")
        path = urlparse(self.path).path
        files = sorted(p for p in self.server.folder.rglob("*") if p.is_file())
        if path.startswith("/api/models/owner/remote/tree/"):
            listing = [
                {"type": "file", "path": str(p.relative_to(self.server.folder)), "size": p.stat().st_size, "oid": "0"}
                for p in files
            ]
            return self._send(json.dumps(listing).encode(), {"Content-Type": "application/json"}, body)
        prefix = "/owner/remote/resolve/main/"
        if path.startswith(prefix) and (self.server.folder / path[len(prefix) :]).is_file():
            data = (self.server.folder / path[len(prefix) :]).read_bytes()
            etag = hashlib.sha1(data).hexdigest()
            return self._send(data, {"X-Repo-Commit": HUB_COMMIT, "ETag": f'"{etag}"'}, body)
        self._send(b"{}", {}, body, status=200 if path == "/" else 404)

    def _send(self, data: bytes, headers: dict[str, str], body: bool, status: int = 200) -> None:
        self.send_response(status)
        for key, value in {**headers, "Content-Length": str(len(data))}.items():
            self.send_header(key, value)
        self.end_headers()
        if body and self.server.stall and self.path.endswith("/" + self.server.stall):
            self.wfile.write(data[:1024])
            self.wfile.flush()
            self.server.stopped.wait()  # the rest never comes (until the server stops)
            return
        if body:
            self.wfile.write(data)
