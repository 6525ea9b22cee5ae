"""A test receiver of Cairn's notifications: an independent check of what Cairn sends.

Usage: receiver.py LOG SECRET STATUSES
  LOG       a file to append one JSON line per request to
  SECRET    the Standard Webhooks secret (whsec_...), or "-" for Slack and Discord sinks (unsigned)
  STATUSES  comma-separated status codes to answer with, in order; the last one repeats

It prints "listening on PORT" once bound to 127.0.0.1:0. Each request is verified with the
`standardwebhooks` package from the Python package index (not Cairn's code) and logged with its
headers' webhook-id, whether the signature verified, the path, the status answered and the body.
"""

import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

log_path, secret, statuses = sys.argv[1], sys.argv[2], [int(s) for s in sys.argv[3].split(",")]
count = 0


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        global count
        length = int(self.headers.get("content-length", "0"))
        body = self.rfile.read(length)
        verified = None
        error = None
        if secret != "-":
            try:
                Webhook(secret).verify(body, dict(self.headers))
                verified = True
            except WebhookVerificationError as e:
                verified = False
                error = str(e)
        status = statuses[min(count, len(statuses) - 1)]
        count += 1
        with open(log_path, "a") as f:
            f.write(json.dumps({
                "path": self.path,
                "webhook_id": self.headers.get("webhook-id"),
                "verified": verified,
                "error": error,
                "status": status,
                "body": json.loads(body or b"null"),
            }) + "\n")
        self.send_response(status)
        self.send_header("content-type", "text/plain")
        self.end_headers()
        self.wfile.write(b"received %d" % count)

    def log_message(self, *args):
        pass


server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
print("listening on %d" % server.server_address[1], flush=True)
server.serve_forever()
