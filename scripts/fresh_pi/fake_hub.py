"""A loopback stand-in for the Hugging Face Hub's file endpoint, for HF_ENDPOINT (scripts/ci_fresh_pi.sh).

    python3 fake_hub.py ROOT PORT_FILE

Serves ROOT/OWNER/REPO/FILE as /OWNER/REPO/resolve/REVISION/FILE on 127.0.0.1 (a free port,
written to PORT_FILE once listening) with the headers huggingface_hub's downloads read: HEAD and
GET answer X-Repo-Commit, an ETag (the file's sha256, as the Hub gives for large files),
Content-Length and Accept-Ranges; a Range request gets 206 and Content-Range. Anything else is a
404 with X-Error-Code EntryNotFound. One line per request on stdout: METHOD PATH STATUS.
Standard library only: it runs on the host's python3.
"""

import hashlib
import http.server
import os
import re
import sys
import urllib.parse

COMMIT = "f" * 40  # the revision every file is reported at


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _file(self):
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        match = re.fullmatch(r"/([^/]+)/([^/]+)/resolve/[^/]+/(.+)", path)
        if not match or ".." in [match.group(1), match.group(2), *match.group(3).split("/")]:
            return None
        full = os.path.join(self.server.root, match.group(1), match.group(2), match.group(3))
        return full if os.path.isfile(full) else None

    def _answer(self, body):
        path = self._file()
        if path is None:
            self._send(404, {"X-Error-Code": "EntryNotFound", "Content-Length": "0"})
            return
        size = os.path.getsize(path)
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        start = int(match.group(1)) if match else 0
        if start >= size > 0:
            self._send(416, {"Content-Range": f"bytes */{size}", "Content-Length": "0"})
            return
        headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{self.server.digest(path)}"', "Accept-Ranges": "bytes",
                   "Content-Length": str(size - start)}
        if start:
            headers["Content-Range"] = f"bytes {start}-{size - 1}/{size}"
        self._send(206 if start else 200, headers)
        if body:
            with open(path, "rb") as f:
                f.seek(start)
                while chunk := f.read(1 << 20):
                    self.wfile.write(chunk)

    def _send(self, status, headers):
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        print(f"{self.command} {self.path} {status}", flush=True)

    def do_HEAD(self):
        self._answer(body=False)

    def do_GET(self):
        self._answer(body=True)

    def log_message(self, *args):
        pass  # one line per request is printed by _send


class Hub(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root):
        super().__init__(("127.0.0.1", 0), Handler)
        self.root = root
        self._digests = {}

    def digest(self, path):
        if path not in self._digests:
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
            self._digests[path] = digest.hexdigest()
        return self._digests[path]


def main():
    if len(sys.argv) != 3:
        sys.exit("usage: fake_hub.py ROOT PORT_FILE")
    hub = Hub(sys.argv[1])
    with open(sys.argv[2] + ".tmp", "w") as f:
        f.write(f"{hub.server_address[1]}\n")
    os.replace(sys.argv[2] + ".tmp", sys.argv[2])
    hub.serve_forever()


if __name__ == "__main__":
    main()
