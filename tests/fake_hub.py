"""A local HTTP server that answers the few Hugging Face hub endpoints a push uses, and records them.

huggingface_hub talks to it over real HTTP (``HfApi(endpoint=...)`` through ``constants.ENDPOINT``),
so a push is tested offline with nothing mocked inside the library:

* ``POST /api/repos/create`` — the repository (``{"name", "organization", "visibility"}``);
* ``POST /api/validate-yaml`` — the model card's metadata;
* ``POST /api/models/{repo}/preupload/{rev}`` — every file is a small "regular" upload;
* ``POST /api/models/{repo}/commit/{rev}`` — NDJSON: a header, then one line per file (base64).

    with FakeHub() as hub:
        ...push to hub.url...
        hub.created, hub.files          # what arrived
"""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeHub:
    def __init__(self) -> None:
        self.created: list[dict] = []
        self.files: dict[str, bytes] = {}  # path in repo -> content
        self.commits: list[dict] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def _reply(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                length = int(self.headers.get("Content-Length", 0))
                body = self.rfile.read(length)
                path = self.path.split("?", 1)[0]
                if path == "/api/repos/create":
                    payload = json.loads(body)
                    hub.created.append(payload)
                    repo = "/".join(p for p in (payload.get("organization"), payload["name"]) if p)
                    return self._reply(200, {"url": f"{hub.url}/{repo}", "name": repo, "id": repo})
                if path == "/api/validate-yaml":
                    return self._reply(200, {"errors": [], "warnings": []})
                if "/preupload/" in path:
                    files = json.loads(body)["files"]
                    return self._reply(200, {"files": [
                        {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files
                    ]})
                if "/commit/" in path:
                    lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
                    hub.commits.append(lines[0]["value"])
                    for line in lines[1:]:
                        if line["key"] == "file":
                            value = line["value"]
                            hub.files[value["path"]] = base64.b64decode(value["content"])
                    repo = path.split("/api/models/", 1)[1].rsplit("/commit/", 1)[0]
                    return self._reply(200, {"commitUrl": f"{hub.url}/{repo}/commit/abc123", "commitOid": "abc123"})
                return self._reply(404, {"error": f"the fake hub does not know {path}"})

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> "FakeHub":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
