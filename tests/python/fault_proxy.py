"""An HTTP proxy for tests/object_store.rs that breaks requests on a fixed schedule, between
troupe and the S3 server: of every 6 requests, the 2nd gets a 500 answer, the 4th has its
connection dropped before it reaches the server, and the 6th is held for 1.5 s before it is
passed on. The rest pass unchanged. Never two broken requests in a row, so a client that
retries gets through.

usage: fault_proxy.py UPSTREAM_URL — prints "READY http://127.0.0.1:PORT", runs until stdin
closes, then prints "INJECTED <500s> <drops> <delays>".
"""

import http.client
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

UPSTREAM = urllib.parse.urlsplit(sys.argv[1])
LOCK = threading.Lock()
COUNT = [0]
INJECTED = {"500": 0, "drop": 0, "delay": 0}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def relay(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        with LOCK:
            COUNT[0] += 1
            n = COUNT[0] % 6
            fault = {2: "500", 4: "drop", 0: "delay"}.get(n)
            if fault:
                INJECTED[fault] += 1
        if fault == "500":
            payload = b"<Error><Code>InternalError</Code><Message>injected</Message></Error>"
            self.send_response(500)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            return
        if fault == "drop":
            self.close_connection = True
            self.connection.shutdown(2)
            return
        if fault == "delay":
            time.sleep(1.5)
        upstream = http.client.HTTPConnection(UPSTREAM.hostname, UPSTREAM.port, timeout=60)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "keep-alive")}
        upstream.request(self.command, self.path, body=body, headers=headers)
        response = upstream.getresponse()
        data = response.read()
        self.send_response(response.status, response.reason)
        for key, value in response.getheaders():
            if key.lower() not in ("transfer-encoding", "connection", "content-length", "server", "date"):
                self.send_header(key, value)
        # A HEAD answer's length is the object's, with no body.
        length = response.getheader("Content-Length", "0") if self.command == "HEAD" else str(len(data))
        self.send_header("Content-Length", length)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        upstream.close()

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = relay


def main():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print(f"READY http://127.0.0.1:{server.server_address[1]}", flush=True)
    sys.stdin.read()
    print(f"INJECTED {INJECTED['500']} {INJECTED['drop']} {INJECTED['delay']}", flush=True)
    server.shutdown()


if __name__ == "__main__":
    main()
