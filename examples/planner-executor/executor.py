"""An executor: calls its tool with a JWT-SVID for that tool's audience until its identity
ends. It asks the Workload API itself, with py-spiffe (the `spiffe` package on PyPI), because
its lease is bound to its own process.

It also asks once for the other tool's audience, which its lease does not allow.
"""
import os
import sys
import time
import urllib.error
import urllib.request

from spiffe import WorkloadApiClient

tool = sys.argv[1]
other = "db" if tool == "search" else "search"
work = os.environ["DEMO_WORK"]
port = open(os.path.join(work, "tool.port")).read().strip()
client = WorkloadApiClient()

try:
    client.fetch_jwt_svid(audience={"tool." + other})
    print(f"executor {tool}: got a token for tool.{other} (unexpected)", flush=True)
except Exception as e:  # the lease does not allow that audience
    print(f"executor {tool}: no token for tool.{other}: {e}", flush=True)

while True:
    try:
        token = client.fetch_jwt_svid(audience={"tool." + tool}).token
    except Exception as e:
        print(f"executor {tool}: identity gone: {e}", flush=True)
        sys.exit(0)
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/{tool}", headers={"Authorization": "Bearer " + token}
    )
    try:
        with urllib.request.urlopen(req) as r:
            answer = r.read().decode()
        marker = os.path.join(work, tool + ".ok")
        if not os.path.exists(marker):
            print(f"executor {tool}: {answer}", flush=True)
            open(marker, "w").close()
    except urllib.error.HTTPError as e:
        print(f"executor {tool}: the tool refused: {e.read().decode()}", flush=True)
    time.sleep(0.3)
