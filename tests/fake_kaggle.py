"""A small fake Kaggle API server for the client tests (127.0.0.1 only; stops by itself).

The real ``kaggle`` client, run with ``KAGGLE_API_ENVIRONMENT=LOCALHOST``, sends every call to
``http://localhost/api/v1/<service>/<Method>``; with ``HTTP_PROXY=http://127.0.0.1:PORT`` those
requests (absolute URLs in the request line) arrive here. The server answers the calls that
dataset create/version/status, kernel push/status/output and competition submit make, records every
call, and can be told to fail one method with an error in a 200 answer (what the client prints
while exiting 0).
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit


class FakeKaggle:
    """State of the fake server: existing datasets, queued statuses, injected errors, the call log."""

    def __init__(self, lifetime_s: float = 120.0):
        self.datasets: set[str] = set()  # "owner/slug" that exist
        self.dataset_status: list[str] = []  # statuses GetDatasetStatus answers in turn (then "ready")
        self.kernel_status: list[str] = []  # statuses GetKernelSessionStatus answers in turn (then COMPLETE)
        self.errors: dict[str, str] = {}  # method -> error text answered with HTTP 200
        self.calls: list[tuple[str, dict]] = []
        self.uploads: dict[str, int] = {}  # token -> bytes received
        state = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def _body(self) -> bytes:
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def _send(self, code: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_PUT(self):  # noqa: N802 - the blob upload
                token = urlsplit(self.path).path.rsplit("/", 1)[-1]
                state.uploads[token] = len(self._body())
                state.calls.append(("PUT", {"token": token}))
                self._send(200, {})

            def do_POST(self):  # noqa: N802
                method = urlsplit(self.path).path.rsplit("/", 1)[-1]
                raw = self._body()
                try:
                    body = json.loads(raw or b"{}")
                except ValueError:
                    body = {"raw": len(raw)}
                state.calls.append((method, body))
                code, payload = state.answer(method, body)
                self._send(code, payload)

            do_GET = do_POST  # noqa: N815

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True
        )
        self.timer = threading.Timer(lifetime_s, self.stop)  # stops by itself if a test forgets
        self.timer.daemon = True

    def __enter__(self) -> FakeKaggle:
        self.thread.start()
        self.timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self.timer.cancel()
        self.server.shutdown()
        self.server.server_close()

    def methods(self) -> list[str]:
        return [m for m, _ in self.calls]

    def answer(self, method: str, body: dict) -> tuple[int, dict]:
        """(HTTP status, JSON) for one API call."""
        ref = f"{body.get('ownerSlug')}/{body.get('datasetSlug')}"
        if method in self.errors:
            return 200, {"status": "Error", "error": self.errors[method], "ref": "", "url": ""}
        if method == "GetDatasetStatus":
            if ref not in self.datasets:
                return 404, {"code": 404, "message": f"Dataset {ref} not found"}
            return 200, {"status": (self.dataset_status.pop(0) if self.dataset_status else "READY").upper()}
        if method == "StartBlobUpload":
            token = f"tok{len(self.uploads) + len(self.calls)}"
            return 200, {"token": token, "createUrl": f"http://localhost/upload/{token}"}
        if method == "CreateDataset":
            slug = body.get("slug") or body.get("datasetSlug")
            self.datasets.add(f"{body.get('ownerSlug')}/{slug}")
            return 200, {
                "status": "Ok",
                "url": f"https://www.kaggle.com/{body.get('ownerSlug')}/{slug}",
                "ref": "",
                "error": "",
            }
        if method == "CreateDatasetVersion":
            return 200, {"status": "Ok", "url": f"https://www.kaggle.com/{ref}", "ref": ref, "error": ""}
        if method == "SaveKernel":
            return 200, {
                "ref": "/code/x",
                "url": "https://www.kaggle.com/code/x",
                "versionNumber": 3,
                "error": "",
            }
        if method == "GetKernelSessionStatus":
            return 200, {"status": self.kernel_status.pop(0) if self.kernel_status else "COMPLETE"}
        if method == "StartSubmissionUpload":
            return 200, {"token": "sub1", "createUrl": "http://localhost/upload/sub1"}
        if method == "CreateSubmission":
            return 200, {"message": f"Successfully submitted to {body.get('competitionName')}", "ref": 7}
        if method == "ListKernelSessionOutput":
            return 200, {"files": [], "log": ""}
        return 200, {}
