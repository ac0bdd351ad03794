#!/usr/bin/env python3
"""A GCE metadata server that hands out identity tokens, for the benchmark only.

Speaks the real protocol: requests without `Metadata-Flavor: Google` get 403, every reply
carries `Metadata-Flavor: Google`, and `.../identity?audience=A&format=full` returns an unsigned
JWT whose `exp` is ten years away (the agent reads `exp`, never the signature). It counts the
tokens it issued so the benchmark can show the agent's cache stayed warm.

Usage: fake_metadata.py PORT
"""

import base64
import json
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

IDENTITY = "/computeMetadata/v1/instance/service-accounts/default/identity"
issued = 0


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def reply(self, status: int, body: str) -> None:
        data = body.encode()
        self.send_response(status)
        self.send_header("Metadata-Flavor", "Google")
        self.send_header("Content-Type", "application/text")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        global issued
        if self.headers.get("Metadata-Flavor") != "Google":
            self.reply(403, "Missing required header: Metadata-Flavor\n")
            return
        url = urlparse(self.path)
        if url.path == "/issued":
            self.reply(200, f"{issued}\n")
            return
        if url.path != IDENTITY:
            self.reply(404, "not found\n")
            return
        audience = parse_qs(url.query).get("audience", [""])[0]
        if not audience:
            self.reply(400, "non-empty audience parameter required\n")
            return
        now = int(time.time())
        header = b64url(json.dumps({"alg": "RS256", "typ": "JWT"}).encode())
        claims = {
            "aud": audience,
            "iss": "https://accounts.google.com",
            "iat": now,
            "exp": now + 10 * 365 * 86400,
            "sub": "1234567890",
        }
        payload = b64url(json.dumps(claims).encode())
        issued += 1
        self.reply(200, f"{header}.{payload}.{b64url(b'not-a-signature')}")

    def log_message(self, *args) -> None:
        pass


if __name__ == "__main__":
    ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
