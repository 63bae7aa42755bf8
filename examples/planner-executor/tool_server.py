"""A tool server: /search and /db accept a JWT-SVID for their own audience (tool.search,
tool.db) from an executor acting for a planner. The token is checked by the agent's
ValidateJWTSVID (`mayfly jwt validate`: signature, audience, expiry and a live lease), then its
delegation chain: the caller must act for a planner's lease.
"""
import http.server
import json
import os
import subprocess
import sys

mayfly = os.environ["MAYFLY"]


class Tool(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        tool = self.path.strip("/")
        auth = self.headers.get("Authorization", "")
        if tool not in ("search", "db") or not auth.startswith("Bearer "):
            return self.answer(404, "no such tool")
        r = subprocess.run([mayfly, "jwt", "validate", "--audience", "tool." + tool, auth[7:]],
                           capture_output=True, text=True)
        if r.returncode != 0:
            return self.answer(403, "invalid token: " + r.stderr.strip())
        claims = json.loads(r.stdout)["claims"]
        chain = claims.get("urn:mayfly:chain", [])
        if not chain or "/agent/planner/" not in chain[0]["sub"]:
            return self.answer(403, "not acting for a planner")
        self.answer(200, f"{tool} ok for {claims['sub']}, acting for {chain[0]['sub']} "
                         f"on behalf of {claims['urn:mayfly:delegator']}")

    def answer(self, code, text):
        body = text.encode()
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


server = http.server.HTTPServer(("127.0.0.1", 0), Tool)
with open(sys.argv[1] + ".tmp", "w") as f:
    f.write(str(server.server_port))
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
server.serve_forever()
