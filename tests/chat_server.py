"""A local OpenAI-compatible /v1/chat/completions endpoint for judge tests: 127.0.0.1, a port of its own.

ChatServer answers as a subclass's `respond` says; DripServer sends its answer one byte at a time (a judge alive but
never done); HugeReplyServer sends a reply of many megabytes. Both stop within a few seconds whatever the client does.
"""

from __future__ import annotations

import json
import threading
import time
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
                server.send(self, status, json.dumps(payload).encode(), headers)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    def respond(self, body: dict, request: BaseHTTPRequestHandler) -> tuple[int, dict, dict]:
        raise NotImplementedError

    def send(self, request: BaseHTTPRequestHandler, status: int, data: bytes, headers: dict) -> None:
        request.send_response(status)
        request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(data)))
        for key, value in headers.items():
            request.send_header(key, value)
        request.end_headers()
        request.wfile.write(data)

    @staticmethod
    def reply(text: str) -> tuple[int, dict, dict]:
        return 200, {"choices": [{"message": {"role": "assistant", "content": text}}]}, {}

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def _head(status: int, headers: dict) -> bytes:
    lines = [f"HTTP/1.0 {status} OK", "Content-Type: application/json", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class DripServer(ChatServer):
    """Answers "Rating: 7" as a chat completion, one byte every `interval` seconds: the body only, or the status line
    and headers too (`headers_too`). Each answer stops after `limit` seconds, or when the client hangs up."""

    def __init__(self, interval: float = 0.2, headers_too: bool = False, limit: float = 10.0):
        super().__init__()
        self.interval, self.headers_too, self.limit = interval, headers_too, limit

    def respond(self, body, request):
        return self.reply("Rating: 7")

    def send(self, request, status, data, headers):
        head = _head(status, {"Content-Length": len(data)})
        if not self.headers_too:
            request.wfile.write(head)
        stop = time.monotonic() + self.limit
        try:
            for byte in head + data if self.headers_too else data:
                if time.monotonic() > stop:
                    return
                request.wfile.write(bytes([byte]))
                time.sleep(self.interval)
        except OSError:  # the client hung up
            pass


class HugeReplyServer(ChatServer):
    """Answers with a chat completion of `size` bytes, streamed in 64 KiB pieces, its length declared or not
    (`declare`); `sent` counts the bytes the client took before it hung up. Each answer stops after `limit` seconds."""

    def __init__(self, size: int = 50 << 20, declare: bool = False, limit: float = 10.0):
        super().__init__()
        self.size, self.declare, self.limit, self.sent = size, declare, limit, 0

    def respond(self, body, request):
        return self.reply("")

    def send(self, request, status, data, headers):
        opening, closing = b'{"choices": [{"message": {"role": "assistant", "content": "Rating: 7', b'"}}]}'
        piece = b"x" * (64 << 10)
        request.wfile.write(_head(status, {"Content-Length": self.size} if self.declare else {}))
        stop = time.monotonic() + self.limit
        try:
            request.wfile.write(opening)
            left = self.size - len(opening) - len(closing)
            while left > 0 and time.monotonic() < stop:
                request.wfile.write(piece[:left])
                self.sent += min(left, len(piece))
                left -= len(piece)
            request.wfile.write(closing)
        except OSError:  # the client hung up
            pass
