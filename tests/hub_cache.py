"""A Hugging Face hub for tests, without the network: a snapshot laid out in the hub cache's own
layout, and a small HTTP server on 127.0.0.1 that speaks the part of the hub's API that
huggingface_hub's `snapshot_download` uses (revision info, tree listing, resolve HEAD/GET,
and the hub's error codes for gated repositories and missing revisions).

The cache layout (huggingface_hub's documented one; dataset repositories under datasets--ORG--NAME):
    <cache>/models--ORG--NAME/blobs/<sha256>              file contents
    <cache>/models--ORG--NAME/snapshots/<commit>/<path>   symlinks to ../../blobs/<sha256>
    <cache>/models--ORG--NAME/refs/main                   the commit main points at

The server answers for models (/api/models/ORG/NAME/…, /ORG/NAME/resolve/…) and for dataset
repositories (/api/datasets/ORG/NAME/…, /datasets/ORG/NAME/resolve/…).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


def folder_files(root: Path) -> dict[str, bytes]:
    """Every file under `root`, keyed by its POSIX path relative to it."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def commit_of(files: dict[str, bytes]) -> str:
    return hashlib.sha1(json.dumps(sorted((k, hashlib.sha256(v).hexdigest()) for k, v in files.items())).encode()).hexdigest()


def lay_out_snapshot(cache: Path, repo: str, files: dict[str, bytes], revision: str = "main",
                     repo_type: str = "model") -> Path:
    """Write `files` as a cached snapshot of `repo` (refs/<revision> → its commit); returns the snapshot folder."""
    storage = cache / (f"{repo_type}s--" + repo.replace("/", "--"))
    commit = commit_of(files)
    snapshot = storage / "snapshots" / commit
    for path, data in files.items():
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / path
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (storage / "refs").mkdir(parents=True, exist_ok=True)
    (storage / "refs" / revision).write_text(commit)
    return snapshot


@dataclass
class HubRepo:
    files: dict[str, bytes]
    gated: bool = False
    """Gated: every request without the token gets 403 with X-Error-Code GatedRepo."""
    branches: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.commit = commit_of(self.files)
        self.branches.setdefault("main", self.commit)


class HubServer:
    """`with HubServer({"org/name": HubRepo(files)}) as hub:` — hub.endpoint for HF_ENDPOINT, hub.requests
    the (method, path, had a token) of every request it answered. `datasets` are the dataset repositories."""

    def __init__(self, repos: dict[str, HubRepo], token: str | None = None,
                 datasets: dict[str, HubRepo] | None = None) -> None:
        self.repos, self.token, self.datasets = repos, token, datasets or {}
        self.requests: list[tuple[str, str, bool]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def do_HEAD(self) -> None:
                server._answer(self, body=False)

            def do_GET(self) -> None:
                server._answer(self, body=True)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> HubServer:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _answer(self, handler: BaseHTTPRequestHandler, body: bool) -> None:
        path = unquote(urlsplit(handler.path).path)
        authorised = handler.headers.get("Authorization") == f"Bearer {self.token}" if self.token else False
        self.requests.append((handler.command, path, "Authorization" in handler.headers))
        parts = path.strip("/").split("/")
        api = parts[0] == "api" and parts[1:2] in (["models"], ["datasets"])
        dataset = (parts[1:2] if api else parts[:1]) == ["datasets"]
        if api or dataset:  # /api/TYPE/ORG/NAME/… → TYPE/ORG/NAME/…; /datasets/ORG/NAME/resolve/… → ORG/NAME/resolve/…
            parts = parts[1:]
        repo_name = "/".join(parts[1:3] if api else parts[0:2])
        repo = (self.datasets if dataset else self.repos).get(repo_name)
        if repo is None:
            return self._error(handler, 404, "RepoNotFound")
        if repo.gated and not authorised:
            return self._error(handler, 403, "GatedRepo")
        if api:  # /api/{models|datasets}/ORG/NAME[/{revision|tree}/REV] (no revision: the default branch)
            kind, revision = (parts[3], parts[4]) if len(parts) > 4 else ("revision", "main")
            commit = repo.branches.get(revision, revision if revision == repo.commit else None)
            if commit is None:
                return self._error(handler, 404, "RevisionNotFound")
            if kind == "revision":
                payload = {"id": repo_name, "sha": commit,
                           "siblings": [{"rfilename": name} for name in sorted(repo.files)]}
            else:
                payload = [{"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                           for name, data in sorted(repo.files.items())]
            return self._send(handler, 200, json.dumps(payload).encode(), {"Content-Type": "application/json"}, body)
        # [/datasets]/ORG/NAME/resolve/REV/PATH
        revision, name = parts[3], "/".join(parts[4:])
        commit = repo.branches.get(revision, revision if revision == repo.commit else None)
        if commit is None:
            return self._error(handler, 404, "RevisionNotFound")
        if name not in repo.files:
            return self._error(handler, 404, "EntryNotFound")
        data = repo.files[name]
        headers = {"X-Repo-Commit": commit, "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                   "Content-Type": "application/octet-stream"}
        self._send(handler, 200, data, headers, body)

    @staticmethod
    def _send(handler, status: int, data: bytes, headers: dict[str, str], body: bool) -> None:
        handler.send_response(status)
        for key, value in {**headers, "Content-Length": str(len(data))}.items():
            handler.send_header(key, value)
        handler.end_headers()
        if body:
            handler.wfile.write(data)

    def _error(self, handler, status: int, code: str) -> None:
        self._send(handler, status, json.dumps({"error": code}).encode(),
                   {"X-Error-Code": code, "Content-Type": "application/json"}, handler.command == "GET")

    def downloaded(self) -> set[str]:
        """Files fetched with GET from resolve/ URLs (their paths in the repository)."""
        return {p.split("/resolve/", 1)[1].split("/", 1)[1] for m, p, _ in self.requests if m == "GET" and "/resolve/" in p}
