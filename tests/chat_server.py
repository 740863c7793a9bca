"""A local OpenAI-compatible /v1/chat/completions endpoint for judge tests: 127.0.0.1, a port of its own."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class ChatServer:
    """Subclasses answer each POST in `respond(body, request)` -> (status, payload, headers); `reply(text)` builds
    the usual 200 answer. Use as a context manager: `with MyServer() as server: ... server.url`."""

    def __init__(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep the test output clean
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                status, payload, headers = server.respond(body, self)
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for key, value in headers.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    def respond(self, body: dict, request: BaseHTTPRequestHandler) -> tuple[int, dict, dict]:
        raise NotImplementedError

    @staticmethod
    def reply(text: str) -> tuple[int, dict, dict]:
        return 200, {"choices": [{"message": {"role": "assistant", "content": text}}]}, {}

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
