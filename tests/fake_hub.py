"""A Hugging Face Hub on 127.0.0.1 for tests: the few endpoints that `huggingface_hub`, `datasets` and
`transformers` call to resolve a repository's commit, list its files and download them. Processes started
with `hub.environment()` talk to it through the libraries' real code (HF_ENDPOINT), with their caches in
the test's folder. Repositories hold commits of files; `main` can be moved to model a push."""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse


class FakeHub:
    def __init__(self, home: Path):
        self.home = home  # HF_HOME of the processes that use this Hub
        self.repos: dict[tuple[str, str], dict] = {}  # (kind "model"|"dataset", repo id) -> {"main", "commits"}
        self.requests: list[str] = []  # "METHOD path", in the order received
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_port}"

    def environment(self, **extra: str) -> dict[str, str]:
        return {"HF_ENDPOINT": self.endpoint, "HF_HOME": str(self.home), "HF_HUB_DISABLE_TELEMETRY": "1", **extra}

    def push(self, kind: str, repo_id: str, files: dict[str, bytes]) -> str:
        """Add a commit holding `files` and point `main` at it; returns its 40-hex id."""
        repo = self.repos.setdefault((kind, repo_id), {"main": None, "commits": {}})
        commit = hashlib.sha1(f"{repo_id}:{len(repo['commits'])}".encode()).hexdigest()
        repo["commits"][commit] = dict(files)
        repo["main"] = commit
        return commit

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        def _reply(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _commit(self, kind: str, repo_id: str, revision: str) -> tuple[str, dict] | None:
            repo = hub.repos.get((kind, repo_id))
            if repo is None:
                return None
            commit = repo["main"] if revision == "main" else revision
            return (commit, repo["commits"][commit]) if commit in repo["commits"] else None

        def _api(self, kind: str, parts: list[str]) -> None:
            # /api/{kind}s/{org}/{name}[/revision/{rev} | /tree/{rev}[/{folder}] | /paths-info/{rev}]
            repo_id, rest = "/".join(parts[:2]), parts[2:]
            found = self._commit(kind, repo_id, rest[1] if len(rest) > 1 else "main")
            if found is None:
                return self._reply(404, headers={"X-Error-Code": "RepoNotFound"})
            commit, files = found
            if not rest or rest[0] == "revision":
                info = {"id": repo_id, "sha": commit, "siblings": [{"rfilename": name} for name in files]}
                return self._reply(200, json.dumps(info).encode(), {"Content-Type": "application/json"})
            if rest[0] == "tree":
                folder = "/".join(rest[2:])
                prefix = f"{folder}/" if folder else ""
                entries, folders = [], set()
                for name, content in files.items():
                    if not name.startswith(prefix):
                        continue
                    below = name[len(prefix) :]
                    if "/" in below:
                        folders.add(prefix + below.split("/")[0])
                    else:
                        entries.append({"type": "file", "path": name, "size": len(content), "oid": _oid(content)})
                entries += [{"type": "directory", "path": path, "oid": "0" * 40} for path in sorted(folders)]
                return self._reply(200, json.dumps(entries).encode(), {"Content-Type": "application/json"})
            return self._reply(200, b"[]", {"Content-Type": "application/json"})  # paths-info: nothing extra

        def _resolve(self, kind: str, repo_id: str, revision: str, name: str) -> None:
            found = self._commit(kind, repo_id, revision)
            if found is None:
                return self._reply(404, headers={"X-Error-Code": "RepoNotFound"})
            if name not in found[1]:  # the commit tells the client's cache which commit lacks the file
                return self._reply(404, headers={"X-Error-Code": "EntryNotFound", "X-Repo-Commit": found[0]})
            content = found[1][name]
            headers = {"X-Repo-Commit": found[0], "ETag": f'"{_oid(content)}"', "Accept-Ranges": "bytes"}
            requested = self.headers.get("Range", "")
            if not requested.startswith("bytes="):
                return self._reply(200, content, {"Content-Type": "application/octet-stream", **headers})
            first, _, last = requested[len("bytes=") :].partition("-")  # streaming readers ask for parts
            start, stop = int(first), min(int(last) + 1 if last else len(content), len(content))
            headers["Content-Range"] = f"bytes {start}-{stop - 1}/{len(content)}"
            return self._reply(206, content[start:stop], {"Content-Type": "application/octet-stream", **headers})

        def _route(self) -> None:
            hub.requests.append(f"{self.command} {self.path}")
            parts = unquote(urlparse(self.path).path).strip("/").split("/")
            if parts[:2] == ["api", "models"]:
                return self._api("model", parts[2:])
            if parts[:2] == ["api", "datasets"]:
                return self._api("dataset", parts[2:])
            kind, parts = ("dataset", parts[1:]) if parts[0] == "datasets" else ("model", parts)
            if len(parts) > 4 and parts[2] == "resolve":
                return self._resolve(kind, "/".join(parts[:2]), parts[3], "/".join(parts[4:]))
            return self._reply(200 if self.path == "/" else 404)

        do_GET = do_HEAD = do_POST = _route

        def log_message(self, *args) -> None:  # quiet
            pass

    return Handler


def _oid(content: bytes) -> str:
    return hashlib.sha1(content).hexdigest()
