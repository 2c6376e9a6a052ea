#!/usr/bin/env python3
"""A tiny example upstream for the demo: answers every request with JSON
naming itself, the method and the path; /healthz answers 200.

    python3 examples/upstream.py PORT NAME
"""
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def answer(self):
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length).decode("utf-8", "replace") if length else ""
        if self.path == "/healthz":
            data = b"ok\n"
            ctype = "text/plain"
        else:
            data = (json.dumps({"service": NAME, "method": self.command, "path": self.path, "body": body}) + "\n").encode()
            ctype = "application/json"
        self.send_response(200)
        self.send_header("content-type", ctype)
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_DELETE = answer

    def log_message(self, *args):
        pass


if __name__ == "__main__":
    PORT, NAME = int(sys.argv[1]), sys.argv[2]
    ThreadingHTTPServer(("127.0.0.1", PORT), Handler).serve_forever()
