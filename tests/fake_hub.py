"""A stand-in for the Hugging Face hub on 127.0.0.1, enough for huggingface_hub's snapshot_download, list_repo_files
and ranged GETs: it serves model folders written by the tests, one folder a revision, and counts every byte of a
file it sends, so that a test can say exactly what was fetched."""

from __future__ import annotations

import hashlib
import json
import re
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def commit_of(repo_id: str, revision: str) -> str:
    return hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()


class FakeHub:
    def __init__(self, repositories: dict[str, dict[str, Path]]):
        """`repositories`: repo id -> {branch name: model folder}."""
        self.folders: dict[tuple[str, str], Path] = {}  # (repo id, branch or commit) -> folder
        self.commits: dict[tuple[str, str], str] = {}
        for repo_id, revisions in repositories.items():
            for revision, folder in revisions.items():
                commit = commit_of(repo_id, revision)
                for name in (revision, commit):
                    self.folders[repo_id, name] = folder
                    self.commits[repo_id, name] = commit
        self.served: dict[tuple[str, str], int] = {}  # (repo id, file name) -> bytes of it sent
        self.ranges: list[tuple[str, str, str | None]] = []  # (repo id, file name, Range header) of each GET of a file
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def file_bytes(self, suffix: str) -> int:
        return sum(count for (_, name), count in self.served.items() if name.endswith(suffix))

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *arguments) -> None:
                pass

            def do_HEAD(self) -> None:
                self.answer(body=False)

            def do_GET(self) -> None:
                self.answer(body=True)

            def reply(self, status: int, data: bytes = b"", headers: dict | None = None, body: bool = True) -> None:
                self.send_response(status)
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if body:
                    self.wfile.write(data)

            def missing(self, code: str) -> None:
                self.reply(404, headers={"X-Error-Code": code})

            def answer(self, body: bool) -> None:
                path = self.path.split("?")[0]
                api = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(revision|tree)/([^/]+)", path)
                if api:
                    repo_id, kind, revision = api.groups()
                    folder = hub.folders.get((repo_id, revision))
                    if folder is None:
                        known = any(key[0] == repo_id for key in hub.folders)
                        return self.missing("RevisionNotFound" if known else "RepoNotFound")
                    files = sorted(path for path in folder.iterdir() if path.is_file())
                    if kind == "tree":
                        listing = [
                            {"type": "file", "path": p.name, "size": p.stat().st_size, "oid": "0" * 40} for p in files
                        ]
                    else:
                        commit = hub.commits[repo_id, revision]
                        listing = {"id": repo_id, "sha": commit, "siblings": [{"rfilename": p.name} for p in files]}
                    return self.reply(200, json.dumps(listing).encode(), {"Content-Type": "application/json"}, body)
                resolve = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
                folder = hub.folders.get(resolve.groups()[:2]) if resolve else None
                if folder is None:
                    return self.missing("RepoNotFound")
                repo_id, revision, name = resolve.groups()
                file = folder / name
                if not file.is_file():
                    return self.missing("EntryNotFound")
                data = file.read_bytes()
                headers = {
                    "X-Repo-Commit": hub.commits[repo_id, revision],
                    "ETag": f'"{hashlib.sha1(data).hexdigest()}"',
                }
                status, wanted = 200, self.headers.get("Range")
                if wanted:
                    start, end = re.fullmatch(r"bytes=(\d+)-(\d*)", wanted).groups()
                    start, end = int(start), min(int(end) if end else len(data) - 1, len(data) - 1)
                    headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
                    status, data = 206, data[start : end + 1]
                if body:
                    with hub.lock:
                        hub.served[repo_id, name] = hub.served.get((repo_id, name), 0) + len(data)
                        hub.ranges.append((repo_id, name, wanted))
                self.reply(status, data, headers, body)

        return Handler

    @contextmanager
    def running(self):
        thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self.server.shutdown()
            self.server.server_close()


def use_fake_hub(monkeypatch, hub: FakeHub, cache: Path) -> None:
    """Point huggingface_hub (already imported, so its constants already read) at `hub`, with an empty cache."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for variable in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):  # no token of the machine's is sent to the stand-in
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(cache / "no-token"))
