"""A loopback stand-in for the Hugging Face Hub: the endpoints huggingface_hub's snapshot_download
and hf_hub_download call (file_download.py, hf_api.py, utils/_http.py), over repositories held
in memory, answering with the headers and error codes the real Hub sends."""
from __future__ import annotations

import dataclasses
import hashlib
import http.server
import json
import re
import threading
import time
from urllib.parse import unquote, urlsplit


@dataclasses.dataclass
class Repo:
    files: dict[str, bytes]
    gated: bool = False        # files only to a request with a token (an Authorization header)

    @property
    def sha(self) -> str:
        """The commit: a hash of the file contents."""
        return hashlib.sha1(json.dumps(sorted((p, oid(d)) for p, d in self.files.items())).encode()).hexdigest()


def oid(data: bytes) -> str:
    """git's blob id of the data: the ETag the Hub sends for a file not in LFS."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


API = re.compile(r"/api/(models|datasets)/([^/]+/[^/]+)/(revision|tree)/([^/]+)")
RESOLVE = re.compile(r"/(datasets/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)")


class Hub:
    """`with Hub({("model", "org/name"): Repo(...)}) as hub:` serves at hub.url; hub.requests lists
    (method, path) of every request; `delay` seconds pass before each file's bytes."""

    def __init__(self, repos: dict[tuple[str, str], Repo], delay: float = 0.0):
        self.repos, self.delay, self.requests = repos, delay, []

    def __enter__(self) -> "Hub":
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                hub.answer(self, body=True)

            def do_HEAD(self):
                hub.answer(self, body=False)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def answer(self, h: http.server.BaseHTTPRequestHandler, body: bool) -> None:
        path = urlsplit(h.path).path
        self.requests.append((h.command, path))
        if m := API.fullmatch(path):
            kind, repo_id, what, rev = m[1][:-1], m[2], m[3], unquote(m[4])
        elif m := RESOLVE.fullmatch(path):
            kind, repo_id, what, rev = ("dataset" if m[1] else "model"), m[2], "file", unquote(m[3])
        else:
            return _send(h, 404, b"", {})
        repo = self.repos.get((kind, repo_id))
        if repo is None:
            return _send(h, 401, b"", {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"})
        if rev not in ("main", repo.sha):
            return _send(h, 404, b"", {"X-Error-Code": "RevisionNotFound", "X-Error-Message": "Invalid rev id"})
        if what == "revision":
            return _json(h, {"id": repo_id, "sha": repo.sha, "private": False, "gated": "manual" if repo.gated else False,
                             "siblings": [{"rfilename": p} for p in repo.files]})
        if what == "tree":
            return _json(h, [{"type": "file", "path": p, "size": len(d), "oid": oid(d)} for p, d in repo.files.items()])
        name = unquote(m[4])
        if repo.gated and "authorization" not in {k.lower() for k in h.headers}:
            return _send(h, 401, b"", {"X-Error-Code": "GatedRepo", "X-Error-Message": "Access is restricted"})
        if name not in repo.files:
            return _send(h, 404, b"", {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": repo.sha})
        data = repo.files[name]
        if body and self.delay:
            time.sleep(self.delay)
        _send(h, 200, data if body else b"", {"ETag": f'"{oid(data)}"', "X-Repo-Commit": repo.sha,
                                              "Content-Type": "application/octet-stream"}, len(data))


def _json(h, obj) -> None:
    _send(h, 200, json.dumps(obj).encode(), {"Content-Type": "application/json"})


def _send(h, status: int, data: bytes, headers: dict[str, str], length: int | None = None) -> None:
    h.send_response(status)
    for k, v in headers.items():
        h.send_header(k, v)
    h.send_header("Content-Length", str(len(data) if length is None else length))
    h.end_headers()
    if data:
        h.wfile.write(data)
