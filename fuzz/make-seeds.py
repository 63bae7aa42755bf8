#!/usr/bin/env python3
"""Writes fuzz/seeds/<target>/: a handful of valid inputs per fuzz target, taken from the
formats the unit tests, RFC 7541 and deploy/ use, framed as each harness expects (see the
comment at the top of each fuzz_targets/*.rs). Run from anywhere: python3 fuzz/make-seeds.py"""

import hashlib
import json
import os
import re
import shutil
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SEEDS = os.path.join(HERE, "seeds")


def write(target, name, data):
    d = os.path.join(SEEDS, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())


def unhex(s):
    return bytes.fromhex(re.sub(r"\s", "", s))


# --- selector: one per line, as a grant lists them -------------------------------------
SELECTORS = {
    "unix": "unix:uid:1000\nunix:gid:7\nunix:user:alice\nunix:group:staff\n"
    "unix:supplementary_gid:100\nunix:supplementary_group:docker\n"
    "unix:path:/usr/bin/python3\nunix:sha256:" + "ab" * 32 + "\nunix:pid:42:12345",
    "k8s": "k8s:ns:shop\nk8s:sa:web\nk8s:pod-uid:3a5b1f2e-0c1d-4e5f-8a9b-0c1d2e3f4a5b\n"
    "k8s:container-id:107f76d687d52ad32978772850e82de8c6b4a4be2d695311b3c8827eafaf7e0e\n"
    "k8s:pod-name:web-7d4b9c8f6d-x2kq9\nk8s:pod-label:app:web\nk8s:container-name:web\n"
    "k8s:container-image:docker.io/library/nginx:1.27\nk8s:node-name:node-1",
    "canonical": "unix:uid:0000\nunix:pid:0042\nunix:pid:07:000123\nunix:gid:007",
    "refused": "unix:path:/bin/sh\nunix:uid:0\nunix:uid:-1\nk8s:zone:a\nunix:sha256:ABC\nunix:pid:1:x",
}
for name, text in SELECTORS.items():
    write("selector", name, text)

# --- template: template NUL agent NUL task NUL delegator --------------------------------
DEFAULT = "spiffe://{trust_domain}/agent/{agent}/task/{task_id}/delegator/{delegator}"
write("template", "default", f"{DEFAULT}\0reporter\0report-42\0user/alice")
write("template", "no-agent", "spiffe://{trust_domain}/task/{task_id}/by/{delegator}\0a\0t-1\0bob")
write("template", "flat", "spiffe://{trust_domain}/{delegator}/{task_id}\0x\0y.z\0org/team/carol")
write("template", "refused", "spiffe://{trust_domain}/{task_id}/{nope}\0a\0b\0c")

# --- duration ----------------------------------------------------------------------------
for i, d in enumerate(["90s", "5m", "1h30m", "500ms", "24h", "8760h", "1y 2months 3d 4ns"]):
    write("duration", f"d{i}", d)

# --- config: the shipped files and README's snippets --------------------------------------
with open(os.path.join(ROOT, "deploy/systemd/mayfly.toml")) as f:
    write("config", "systemd", f.read())
with open(os.path.join(ROOT, "deploy/kubernetes/configmap.yaml")) as f:
    text = f.read()
body = text.split("mayfly.toml: |\n", 1)[1]
toml_lines = []
for line in body.splitlines():
    if line and not line.startswith("    "):
        break
    toml_lines.append(line[4:])
write("config", "kubernetes", "\n".join(toml_lines) + "\n")
write(
    "config",
    "policy",
    '[policy]\nfiles = ["/etc/mayfly/policies"]\nschema = "/etc/mayfly/mayfly.cedarschema"\n'
    'approval_timeout = "1h"\n\n[kubernetes]\nkubelet_url = "https://127.0.0.1:10250"\n'
    'token_file = "/var/run/secrets/kubernetes.io/serviceaccount/token"\ncache_ttl = "5s"\n',
)
write("config", "empty", "")


# --- admin: limits byte, u16 length, GrantRequest, RenewRequest (protobuf) ---------------
def varint(n):
    out = bytearray()
    n &= (1 << 64) - 1
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def field_bytes(num, data):
    return varint(num << 3 | 2) + varint(len(data)) + data


def field_str(num, s):
    return field_bytes(num, s.encode())


def duration(num, secs, nanos=0):
    body = (varint(1 << 3) + varint(secs) if secs else b"") + (
        varint(2 << 3) + varint(nanos) if nanos else b""
    )
    return field_bytes(num, body)


def grant(task, delegator, agent, ttl, selectors, max_ttl=None, svid=None, jwt=None, aud=(), reason=""):
    m = field_str(1, task) + field_str(2, delegator) + field_str(3, agent) + duration(4, ttl)
    if max_ttl is not None:
        m += duration(5, max_ttl)
    if svid is not None:
        m += duration(6, svid)
    m += b"".join(field_str(7, s) for s in selectors)
    m += b"".join(field_str(8, a) for a in aud)
    if reason:
        m += field_str(9, reason)
    if jwt is not None:
        m += duration(10, jwt)
    return m


def renew(ttl, lease_id=""):
    return (field_str(1, lease_id) if lease_id else b"") + duration(2, ttl)


def admin(pick, g, r=b""):
    return bytes([pick]) + struct.pack(">H", len(g)) + g + r


write("admin", "grant-renew", admin(0, grant("report-42", "user/alice", "reporter", 600, ["unix:uid:1000"], max_ttl=3600, reason="weekly report"), renew(1200)))
write("admin", "jwt", admin(0, grant("t-1", "bob", "db-reader", 300, ["k8s:ns:shop", "k8s:sa:web"], svid=60, jwt=30, aud=["spiffe://example.org/db"]), renew(30)))
write("admin", "tight", admin(1, grant("a", "b", "c", 1, ["unix:user:alice"], svid=1, jwt=1), renew(1)))
write("admin", "large-limits", admin(2, grant("long", "ops/oncall", "batch", 86400, ["unix:path:/usr/bin/batch"], max_ttl=7 * 86400), renew(2 * 86400)))
write("admin", "grant-only", admin(0, grant("x", "y", "z", 60, ["unix:gid:100"], max_ttl=120, svid=10)))
write("admin", "renew-other", admin(0, grant("x", "y", "z", 60, ["unix:uid:0"], max_ttl=120), renew(90, "9f2c4e6a8b0d1f3e5a7c9b1d3f5e7a9c")))

# --- delegate: parent pick byte (1: audiences, 2: bound to a process, 4: depth 3), then a
# DelegateRequest (mayfly/delegation/v1/delegation.proto)
def delegate(task, agent, ttl, selectors, aud, max_ttl=None, svid=None, jwt=None, parent="", depth=None):
    m = (field_str(1, parent) if parent else b"") + field_str(2, task) + field_str(3, agent) + duration(4, ttl)
    if max_ttl is not None:
        m += duration(5, max_ttl)
    if svid is not None:
        m += duration(6, svid)
    if jwt is not None:
        m += duration(7, jwt)
    m += b"".join(field_str(8, s) for s in selectors) + b"".join(field_str(9, a) for a in aud)
    if depth is not None:
        m += varint(11 << 3) + varint(depth)
    return m


write("delegate", "narrower", b"\x00" + delegate("step-1", "executor", 60, ["unix:gid:6"], ["db"]))
write("delegate", "scoped-audiences", b"\x01" + delegate("step-2", "executor", 600, ["unix:user:alice"], ["db", "search"], max_ttl=1200, svid=120, jwt=60))
write("delegate", "bound-parent", b"\x02" + delegate("step-3", "tool", 30, ["unix:pid:1"], ["mail"]))
write("delegate", "deeper", b"\x05" + delegate("step-4", "executor", 60, ["unix:gid:6"], ["db"], depth=1, parent="spiffe://example.org/agent/planner/task/plan/delegator/user/alice"))
write("delegate", "too-long", b"\x00" + delegate("step-5", "executor", 601, ["unix:gid:6"], ["db"]))

# --- cgroup: /proc/PID/cgroup texts from cgroup.rs's tests --------------------------------
# The first byte is how deep the agent's own cgroup namespace is rooted (0: the host's).
UID = "3a5b1f2e-0c1d-4e5f-8a9b-0c1d2e3f4a5b"
UID_ = UID.replace("-", "_")
CID = "107f76d687d52ad32978772850e82de8c6b4a4be2d695311b3c8827eafaf7e0e"
write("cgroup", "v2-systemd-containerd", b"\x00" + (f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID}.scope\n").encode())
write("cgroup", "v2-cgroupfs-crio", b"\x00" + (f"0::/kubepods/besteffort/pod{UID}/crio-{CID}\n").encode())
p = f"/kubepods/besteffort/pod{UID}/{CID}"
write("cgroup", "v1-cgroupfs", b"\x00" + (f"12:hugetlb:{p}\n11:memory:{p}\n10:cpu,cpuacct:{p}\n9:pids:{p}\n1:name=systemd:{p}\n0::/\n").encode())
write("cgroup", "inline-containerd", b"\x00" + (f"0::/system.slice/containerd.service/kubepods-burstable-pod{UID_}.slice:cri-containerd:{CID}\n").encode())
write("cgroup", "namespaced", b"\x04" + (f"0::/../../kubepods-besteffort-pod{UID_}.slice/cri-containerd-{CID}.scope\n").encode())
write("cgroup", "not-a-pod", b"\x00" + ("12:memory:/\n11:cpu,cpuacct:/user.slice\n1:name=systemd:/user.slice/user-1000.slice/session-3.scope\n0::/user.slice/user-1000.slice/session-3.scope\n").encode())

# --- jwt: mode byte, then a token (even) or header NUL payload [NUL audience] (odd) --------
def b64(d):
    import base64

    return base64.urlsafe_b64encode(d).rstrip(b"=").decode()


HEADER = '{"alg":"ES256","kid":"$kid","typ":"JWT"}'
CLAIMS = '{"aud":["spiffe://example.org/db","other"],"exp":4102444800,"iat":1764633600,"jti":"abc","sub":"spiffe://example.org/web"}'
write("jwt", "signed", b"\x01" + f"{HEADER}\0{CLAIMS}".encode())
write("jwt", "signed-string-aud", b"\x01" + (HEADER + '\0{"aud":"x","exp":4102444800.5,"nbf":1,"sub":"spiffe://example.org/agent/a/task/t/delegator/d","mayfly.task_id":"t"}\0x').encode())
write("jwt", "signed-expired", b"\x01" + (HEADER + '\0{"aud":"spiffe://example.org/db","exp":1,"sub":"spiffe://example.org/web"}').encode())
write("jwt", "signed-foreign", b"\x01" + ('{"alg":"ES256","kid":"$kid"}\0{"aud":["spiffe://example.org/db"],"exp":4102444800,"sub":"spiffe://evil.org/web"}').encode())
fake_sig = b64(bytes(range(64)))
write("jwt", "token", b"\x00" + f"{b64(HEADER.replace('$kid', 'k1').encode())}.{b64(CLAIMS.encode())}.{fake_sig}".encode())
NONE = b64(b'{"alg":"none","typ":"JWT"}')
write("jwt", "alg-none", b"\x00" + f"{NONE}.{b64(CLAIMS.encode())}.".encode())

# --- pods: the kubelet document of the k8s tests, and one with nulls ----------------------
os.makedirs(os.path.join(SEEDS, "pods"), exist_ok=True)
shutil.copy(os.path.join(ROOT, "testdata/k8s/pods.json"), os.path.join(SEEDS, "pods", "testdata"))
write("pods", "nulls", '{"items":[{"metadata":{"uid":"x","labels":null},"spec":null,"status":{"containerStatuses":null}}]}')
write("pods", "minimal", json.dumps({"kind": "PodList", "items": [{"metadata": {"uid": UID.upper(), "name": "web", "namespace": "shop", "labels": {"app": "web"}}, "spec": {"serviceAccountName": "web", "nodeName": "node-1"}, "status": {"containerStatuses": [{"name": "web", "image": "nginx", "containerID": "containerd://" + CID}], "initContainerStatuses": [{"name": "init", "containerID": ""}]}}]}))


# --- audit: flags byte, [HEAD NUL] segments separated by NUL -------------------------------
def record(seq, prev, event, **fields):
    rec = dict(fields, event=event, seq=seq, prev=prev, time=f"2026-12-02T10:00:0{seq % 10}.123456789Z")
    unsigned = json.dumps(rec, separators=(",", ":"), sort_keys=True, ensure_ascii=False)
    h = hashlib.sha256(unsigned.encode()).hexdigest()
    rec["hash"] = h
    return json.dumps(rec, separators=(",", ":"), sort_keys=True, ensure_ascii=False), h


ZERO = "0" * 64
l1, h1 = record(1, ZERO, "agent_started", version="0.1.0")
l2, h2 = record(2, h1, "lease_granted", lease_id="9f2c4e6a8b0d1f3e5a7c9b1d3f5e7a9c", task_id="report-42", selectors=["unix:uid:1000"])
l3, h3 = record(3, h2, "lease_ended", lease_id="9f2c4e6a8b0d1f3e5a7c9b1d3f5e7a9c", state="revoked", reason="done")
head = json.dumps({"seq": 3, "hash": h3}, separators=(",", ":"))
write("audit", "real", f"\x01{head}\0{l1}\n{l2}\n{l3}\n")
write("audit", "real-two-segments", f"\x01{head}\0{l1}\n{l2}\n\0{l3}\n")
write("audit", "empty", "\x00")
P = '"prev":"@"'
H = '"hash":"@"'
lines = [
    '{"event":"agent_started",' + H + ',' + P + ',"seq":1,"time":"2026-12-02T10:00:00.000000001Z"}',
    '{"event":"lease_granted",' + H + ',"lease_id":"x",' + P + ',"seq":2,"time":"2026-12-02T10:00:01Z"}',
    '{"event":"admin_denied",' + P + ',"rpc":"Grant","seq":3,"time":"2026-12-02T10:00:02+01:00","uid":1000,' + H + '}',
]
write("audit", "placeholders", "\x01" + '{"seq":3,' + H + '}' + "\0" + "\n".join(lines) + "\n")
write("audit", "placeholders-torn", "\x00" + "\n".join(lines) + "\n" + lines[0][:40])

# --- store_record: the frozen records of store/redb.rs's tests ----------------------------
with open(os.path.join(ROOT, "src/store/redb.rs")) as f:
    src = f.read()
fmt1 = re.search(r'const FROZEN_FORMAT_1: &str = r#"(.*?)"#;', src).group(1)
fmt2 = "".join(re.findall(r'"([0-9a-f]+)"', re.search(r"const FROZEN_FORMAT_2: &str = concat!\((.*?)\);", src, re.S).group(1)))
fmt3 = "".join(re.findall(r'"([0-9a-f]+)"', re.search(r"const FROZEN_FORMAT_3: &str = concat!\((.*?)\);", src, re.S).group(1)))
write("store_record", "format-1", fmt1)
write("store_record", "format-2", bytes.fromhex(fmt2))
write("store_record", "format-3", bytes.fromhex(fmt3))
write("store_record", "format-3-no-reason", bytes.fromhex("03" + fmt2[2:] + "00"))
fmt4 = "".join(re.findall(r'"([0-9a-f]+)"', re.search(r"const FROZEN_FORMAT_4: &str = concat!\((.*?)\);", src, re.S).group(1)))
write("store_record", "format-4-delegated", bytes.fromhex(fmt4))
write("store_record", "format-4-plain", bytes.fromhex("04" + fmt3[2:] + "00"))
# Format 5: format 4 with the node and the remote callers (src/store/redb.rs, the frozen test).
text = lambda t: "%02x" % len(t) + t.encode().hex()
write("store_record", "format-5-plain", bytes.fromhex("05" + fmt4[2:] + "0000"))
write("store_record", "format-5-remote", bytes.fromhex(
    "05" + fmt4[2:] + "01" + text("node-a") + "01" + "01" + text("spiffe://example.org/orchestrator") + "0000"))
rec = json.loads(fmt1)
rec.pop("approval_deadline"), rec.pop("approved_at"), rec.pop("approved_by"), rec.pop("jwt_ttl_nanos")
rec["state"], rec["ended_at"], rec["ended_by"] = "active", None, None
write("store_record", "format-1-bare", json.dumps(rec, separators=(",", ":")))

# --- hpack: table-limit byte, then blocks, each a length byte and its bytes (RFC 7541 C.3-C.6)
def blocks(pick, *hexes):
    out = bytearray([pick])
    for h in hexes:
        b = unhex(h)
        assert len(b) < 256
        out += bytes([len(b)]) + b
    return bytes(out)


write("hpack", "c3-requests", blocks(3, "8286 8441 0f77 7777 2e65 7861 6d70 6c65 2e63 6f6d", "8286 84be 5808 6e6f 2d63 6163 6865", "8287 85bf 400a 6375 7374 6f6d 2d6b 6579 0c63 7573 746f 6d2d 7661 6c75 65"))
write("hpack", "c4-huffman", blocks(3, "8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff", "8286 84be 5886 a8eb 1064 9cbf", "8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf"))
write("hpack", "c5-eviction", blocks(2,
    "4803 3330 3258 0770 7269 7661 7465 611d 4d6f 6e2c 2032 3120 4f63 7420 3230 3133 2032 303a 3133 3a32 3120 474d 546e 1768 7474 7073 3a2f 2f77 7777 2e65 7861 6d70 6c65 2e63 6f6d",
    "4803 3330 37c1 c0bf",
    "88c1 611d 4d6f 6e2c 2032 3120 4f63 7420 3230 3133 2032 303a 3133 3a32 3220 474d 54c0 5a04 677a 6970 7738 666f 6f3d 4153 444a 4b48 514b 425a 584f 5157 454f 5049 5541 5857 5145 4f49 553b 206d 6178 2d61 6765 3d33 3630 303b 2076 6572 7369 6f6e 3d31"))
write("hpack", "never-indexed-size-update", blocks(1, "3f21 1008 7061 7373 776f 7264 0673 6563 7265 74", "20 82"))

# --- huffman: RFC 7541 C.4 and C.6 strings -------------------------------------------------
for i, h in enumerate(["f1e3 c2e5 f23a 6ba0 ab90 f4ff", "a8eb 1064 9cbf", "25a8 49e9 5bb8 e8b4 bf", "6402",
                       "d07a be94 1054 d444 a820 0595 040b 8166 e082 a62d 1bff", "9d29 ad17 1863 c78f 0b97 c8e9 ae82 ae43 d3"]):
    write("huffman", f"rfc{i}", unhex(h))


# --- authority: split byte, then what follows the preface (HTTP/2 frames) ------------------
def frame(kind, flags, stream, payload):
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def literal(name, value, prefix=0x40):
    return bytes([prefix, len(name)]) + name + bytes([len(value)]) + value


HEADERS, CONTINUATION, DATA, SETTINGS = 0x1, 0x9, 0x0, 0x4
req1 = bytes([0x83, 0x86, 0x04, 0x05]) + b"/a/bc" + literal(b":authority", b"tmp%2Fx%2Fw.sock") + literal(b"workload.spiffe.io", b"true")
req2 = bytes([0x83, 0x86, 0x04, 0x05]) + b"/a/bc" + bytes([0xBF, 0xBE])
write("authority", "two-requests", b"\x80" + frame(SETTINGS, 0, 0, b"") + frame(HEADERS, 0x4, 1, req1) + frame(DATA, 0x1, 1, b"\x00\x00\x00\x00\x00") + frame(HEADERS, 0x4, 3, req2))
write("authority", "continuation", b"\x10" + frame(HEADERS, 0x0, 1, req1[:9]) + frame(CONTINUATION, 0x4, 1, req1[9:]))
write("authority", "huffman-padded-priority", b"\xf0" + frame(HEADERS, 0x4 | 0x8 | 0x20, 5, b"\x03" + b"\x00\x00\x00\x00\x10" + unhex("8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff") + b"\x00\x00\x00"))
write("authority", "no-authority", b"\x00" + frame(HEADERS, 0x5, 1, bytes([0x83, 0x86, 0x84]) + literal(b"te", b"trailers", 0x00)))
