#!/usr/bin/env bash
# Validates the deployment files under deploy/ without a cluster, a container engine or a helm
# binary:
#   * every YAML under deploy/kubernetes: parsed (duplicate keys refused) and checked against the
#     Kubernetes OpenAPI schemas in strict mode (kubernetes-validate, unknown fields rejected) for
#     the oldest and newest Kubernetes versions below; kustomization.yaml lists exactly them;
#   * the Helm chart deploy/helm/mayfly: Chart.yaml/values.yaml parsed, then rendered offline with
#     Helm's own Go engine (helm-python-sdk, a PyPI wheel bundling libhelm, no helm binary) for
#     several value sets, linted, and every rendered resource schema-checked like the above;
#   * the agent's TOML configs (the ConfigMap's, the chart's, deploy/systemd/mayfly.toml): parsed
#     with tomllib and held to the keys the agent accepts (it refuses unknown ones);
#   * policy the manifests must keep (hostPID, capabilities, probes, hostPaths, RBAC verbs...);
#   * deploy/systemd/mayfly.service with systemd-analyze verify when that is installed;
#   * deploy/Dockerfile: static checks only; it is NOT built (no container engine here).
# Installs its tools itself, from PyPI only, into a cached virtualenv; needs python3 >= 3.11.
# Usage: bash .ci/validate-deploy.sh      (env MAYFLY_DEPLOY_VENV overrides the venv path)
set -euo pipefail
cd "$(dirname "$0")/.."

KUBERNETES_VALIDATE_VERSION=1.37.0   # ships schemas for Kubernetes 1.25 .. 1.37
HELM_PYTHON_SDK_VERSION=0.2.2        # Helm SDK v4.2.3 behind a C ABI, binary wheels only
K8S_VERSIONS="1.30.0 1.37.0"         # oldest and newest we check against
VENV="${MAYFLY_DEPLOY_VENV:-${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/mayfly/validate-deploy-venv}"

python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
  echo "validate-deploy: python3 >= 3.11 is needed (tomllib)" >&2
  exit 1
}

# Is NAME installed in the venv at exactly VERSION?
have() {
  "$VENV/bin/python" - "$1" "$2" <<'PY' 2>/dev/null
import sys
from importlib.metadata import version
sys.exit(version(sys.argv[1]) != sys.argv[2])
PY
}
pip_install() {
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-input "$@"
}

if [ ! -x "$VENV/bin/python" ]; then
  rm -rf "$VENV"
  mkdir -p "$(dirname "$VENV")"
  python3 -m venv "$VENV"
fi
if ! have kubernetes-validate "$KUBERNETES_VALIDATE_VERSION"; then
  echo "installing kubernetes-validate==$KUBERNETES_VALIDATE_VERSION from PyPI"
  pip_install "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"
fi
HELM_UNAVAILABLE=""
if ! have helm-python-sdk "$HELM_PYTHON_SDK_VERSION"; then
  echo "installing helm-python-sdk==$HELM_PYTHON_SDK_VERSION from PyPI"
  # Binary wheels only: building its native library from source would need Go.
  if ! pip_install --only-binary=:all: "helm-python-sdk==$HELM_PYTHON_SDK_VERSION"; then
    HELM_UNAVAILABLE="helm-python-sdk==$HELM_PYTHON_SDK_VERSION has no wheel for this platform ($(uname -m)) or could not be installed from PyPI"
  fi
fi

export KV_BIN="$VENV/bin/kubernetes-validate" K8S_VERSIONS HELM_UNAVAILABLE
exec "$VENV/bin/python" - <<'PY'
import ipaddress
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib

import yaml

T0 = time.monotonic()
DEPLOY = pathlib.Path("deploy")
KV_BIN = os.environ["KV_BIN"]
K8S_VERSIONS = os.environ["K8S_VERSIONS"].split()
passed = 0
failed = 0
tomls_checked = 0
notes = []


def ok(what):
    global passed
    passed += 1
    print(f"ok    {what}")


def bad(what):
    global failed
    failed += 1
    print(f"FAIL  {what}")


def check(cond, what, detail=""):
    if cond:
        ok(what)
    else:
        bad(what + (f": {detail}" if detail else ""))
    return cond


# ---------------------------------------------------------------- YAML, duplicate keys refused
class UniqueKeyLoader(yaml.SafeLoader):
    pass


def _mapping(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep)


UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def load_docs(text, where):
    try:
        return [d for d in yaml.load_all(text, Loader=UniqueKeyLoader) if d is not None]
    except yaml.YAMLError as e:
        bad(f"{where}: YAML: {e}")
        return None


# ---------------------------------------------------------------- the agent's TOML config
DURATION = re.compile(r"^\d+(ns|us|ms|s|m|h|d|w)( ?\d+(ns|us|ms|s|m|h|d|w))*$")
STR, INT, BOOL, DUR, INTS = "string", "integer", "boolean", "duration", "list of integers"
ALLOWED = {
    None: {"trust_domain": STR, "socket": STR, "admin_socket": STR, "data_dir": STR,
           "log_format": STR, "health_addr": STR,
           # also accepted by src/config.rs, not used by these files
           "spiffe_id_template": STR},
    "leases": {k: DUR for k in ("max_ttl", "default_svid_ttl", "max_svid_ttl",
                                "default_jwt_ttl", "max_jwt_ttl", "retention")},
    "admin": {"allowed_uids": INTS, "allowed_gids": INTS},
    "ca": {"cert_file": STR, "key_file": STR, "chain_file": STR, "bundle_file": STR, "ttl": DUR},
    "attestation": {"max_digest_bytes": INT},
    "audit": {"max_segment_bytes": INT},
    "jwt": {"key_rotation": DUR},
    "kubernetes": {"kubelet_url": STR, "token_file": STR, "ca_file": STR,
                   "insecure_skip_verify": BOOL, "node_name": STR},
}


def type_ok(kind, v):
    if kind == STR:
        return isinstance(v, str)
    if kind == DUR:
        return isinstance(v, str) and bool(DURATION.match(v))
    if kind == INT:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0
    if kind == BOOL:
        return isinstance(v, bool)
    if kind == INTS:
        return isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v)
    return False


def socket_addr(text):
    """IPv4:PORT or [IPv6]:PORT, as Rust's SocketAddr parses it."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        return False
    try:
        if host.startswith("[") and host.endswith("]"):
            ipaddress.IPv6Address(host[1:-1])
        else:
            ipaddress.IPv4Address(host)
    except ValueError:
        return False
    return True


def check_config(text, where, kubernetes):
    """Parses the agent's TOML and holds it to the keys the agent accepts; returns the dict."""
    global tomls_checked
    tomls_checked += 1
    try:
        cfg = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        bad(f"{where}: TOML: {e}")
        return None
    problems = []
    for key, value in cfg.items():
        if key in ALLOWED[None]:
            if not type_ok(ALLOWED[None][key], value):
                problems.append(f"{key} must be a {ALLOWED[None][key]}, not {value!r}")
        elif key in ALLOWED and key is not None:
            if not isinstance(value, dict):
                problems.append(f"{key} must be a table [{key}]")
                continue
            for k, v in value.items():
                kind = ALLOWED[key].get(k)
                if kind is None:
                    problems.append(f"unknown key {key}.{k}")
                elif not type_ok(kind, v):
                    problems.append(f"{key}.{k} must be a {kind}, not {v!r}")
        else:
            problems.append(f"unknown key {key}")
    if cfg.get("log_format", "text") not in ("text", "json"):
        problems.append("log_format must be text or json")
    addr = cfg.get("health_addr")
    if addr is not None and not socket_addr(str(addr)):
        problems.append(f"health_addr {addr!r} is not IP:PORT (the agent wants a socket address)")
    sock, admin = cfg.get("socket"), cfg.get("admin_socket")
    if sock and admin and pathlib.PurePosixPath(sock).parent == pathlib.PurePosixPath(admin).parent:
        problems.append("the admin socket must not share the workload socket's directory")
    leases = cfg.get("leases", {})
    if kubernetes and "kubernetes" not in cfg:
        problems.append("no [kubernetes] section")
    k8s = cfg.get("kubernetes", {})
    if "kubelet_url" in k8s and not str(k8s["kubelet_url"]).startswith("https://"):
        problems.append("kubernetes.kubelet_url must be https://")
    check(not problems, f"{where}: TOML parses, only keys the agent accepts "
          f"({sum(len(v) if isinstance(v, dict) else 1 for v in cfg.values())} keys)",
          "; ".join(problems))
    return cfg


# ---------------------------------------------------------------- Kubernetes schemas
def kubernetes_validate(paths, where):
    """Strict schema validation of every document in paths, for each Kubernetes version."""
    for version in K8S_VERSIONS:
        r = subprocess.run([KV_BIN, "--strict", "-k", version, *map(str, paths)],
                           capture_output=True, text=True)
        out = (r.stdout + r.stderr).strip().splitlines()
        n_ok = sum(1 for line in out if line.startswith("INFO") and " passed " in line)
        problems = [line for line in out if not line.startswith("INFO")]
        check(r.returncode == 0 and not problems and n_ok > 0,
              f"{where}: {n_ok} resources valid against Kubernetes {version} (strict)",
              "\n      " + "\n      ".join(problems or out or [f"exit {r.returncode}"]))


# ---------------------------------------------------------------- policy the manifests keep
ALLOWED_CAPS = {"SYS_PTRACE", "DAC_READ_SEARCH"}


def check_policy(docs, where, socket_dir="/run/mayfly", admin_dir="/run/mayfly-admin",
                 data_dir="/var/lib/mayfly", kubelet=True):
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d.get("kind"), []).append(d)
    problems = []
    ds = by_kind.get("DaemonSet", [])
    if len(ds) != 1:
        problems.append(f"expected 1 DaemonSet, found {len(ds)}")
    else:
        spec = ds[0]["spec"]["template"]["spec"]
        if spec.get("hostPID") is not True:
            problems.append("DaemonSet needs hostPID: true")
        if spec.get("hostNetwork"):
            problems.append("DaemonSet must not use hostNetwork")
        if not any(t.get("operator") == "Exists" and "key" not in t for t in spec.get("tolerations", [])):
            problems.append("DaemonSet must tolerate every taint")
        for c in spec.get("initContainers", []) + spec["containers"]:
            sc = c.get("securityContext", {})
            caps = sc.get("capabilities", {})
            if caps.get("drop") != ["ALL"]:
                problems.append(f"container {c['name']}: capabilities must drop ALL")
            if not set(caps.get("add", [])) <= ALLOWED_CAPS:
                problems.append(f"container {c['name']}: capabilities beyond {sorted(ALLOWED_CAPS)}")
            if sc.get("privileged") or sc.get("allowPrivilegeEscalation") is not False:
                problems.append(f"container {c['name']}: privileged or privilege escalation")
            if sc.get("readOnlyRootFilesystem") is not True:
                problems.append(f"container {c['name']}: root filesystem must be read-only")
            if not c.get("resources", {}).get("limits") or not c.get("resources", {}).get("requests"):
                problems.append(f"container {c['name']}: resources requests and limits")
        agent = spec["containers"][0]
        if "SYS_PTRACE" not in agent.get("securityContext", {}).get("capabilities", {}).get("add", []):
            problems.append("agent container needs SYS_PTRACE")
        for probe, path in (("livenessProbe", "/healthz/live"), ("readinessProbe", "/healthz/ready")):
            got = agent.get(probe, {}).get("httpGet", {})
            port = got.get("port")
            ports = {p.get("name"): p["containerPort"] for p in agent.get("ports", [])}
            if got.get("path") != path or ports.get(port, port) != 9095:
                problems.append(f"agent {probe} must be httpGet {path} on port 9095")
        host_paths = {v["hostPath"]["path"]: v for v in spec["volumes"] if "hostPath" in v}
        mounts = {m["name"]: m for m in agent["volumeMounts"]}
        for p in (socket_dir, admin_dir, data_dir):
            v = host_paths.get(p)
            if v is None:
                problems.append(f"no hostPath volume for {p}")
            elif v["hostPath"].get("type") != "DirectoryOrCreate":
                problems.append(f"hostPath {p} should be DirectoryOrCreate")
            elif mounts.get(v["name"], {}).get("readOnly") or v["name"] not in mounts:
                problems.append(f"agent must mount {p} read-write")
        env = {e["name"]: e for e in agent.get("env", [])}
        if env.get("NODE_NAME", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") != "spec.nodeName":
            problems.append("agent needs NODE_NAME from the downward API")
    if kubelet:
        roles = by_kind.get("ClusterRole", [])
        rules = [r for role in roles for r in role.get("rules", [])]
        granted = {(g, res, verb) for r in rules for g in r.get("apiGroups", [])
                   for res in r.get("resources", []) for verb in r.get("verbs", [])}
        if granted != {("", "nodes", "get"), ("", "nodes/proxy", "get")}:
            problems.append(f"ClusterRole must grant exactly get on nodes and nodes/proxy, grants {sorted(granted)}")
        if not by_kind.get("ClusterRoleBinding"):
            problems.append("no ClusterRoleBinding")
    for pod in by_kind.get("Pod", []):
        spec = pod["spec"]
        vols = {v["name"]: v for v in spec.get("volumes", [])}
        for c in spec["containers"]:
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            if env.get("SPIFFE_ENDPOINT_SOCKET") != f"unix://{socket_dir}/workload.sock":
                problems.append(f"pod {pod['metadata']['name']}: SPIFFE_ENDPOINT_SOCKET")
            for m in c.get("volumeMounts", []):
                hp = vols.get(m["name"], {}).get("hostPath", {}).get("path")
                if hp == admin_dir:
                    problems.append(f"pod {pod['metadata']['name']} must not mount the admin socket dir")
                if hp == socket_dir and not m.get("readOnly"):
                    problems.append(f"pod {pod['metadata']['name']} must mount {socket_dir} read-only")
    check(not problems, f"{where}: deployment policy (hostPID, capabilities, probes, hostPaths, RBAC)",
          "; ".join(problems))


def configmap_toml(docs):
    for d in docs:
        if d.get("kind") == "ConfigMap" and "mayfly.toml" in d.get("data", {}):
            return d["data"]["mayfly.toml"]
    return None


# ================================================================ deploy/kubernetes
print("== deploy/kubernetes")
kdir = DEPLOY / "kubernetes"
files = sorted(p for p in kdir.iterdir() if p.suffix in (".yaml", ".yml"))
manifests = [p for p in files if p.name != "kustomization.yaml"]
plain_docs = []
for p in files:
    docs = load_docs(p.read_text(), str(p))
    if docs is None:
        continue
    ok(f"{p}: YAML parses ({len(docs)} documents)")
    if p.name == "kustomization.yaml":
        k = docs[0]
        listed = k.get("resources", [])
        check(k.get("kind") == "Kustomization" and sorted(listed) == sorted(m.name for m in manifests),
              f"{p}: lists exactly the manifests beside it",
              f"lists {sorted(listed)}, directory has {sorted(m.name for m in manifests)}")
    else:
        plain_docs += docs
kubernetes_validate(manifests, str(kdir))
check_policy(plain_docs, str(kdir))
plain_toml = configmap_toml(plain_docs)
plain_cfg = None
if check(plain_toml is not None, f"{kdir}/configmap.yaml: holds mayfly.toml"):
    plain_cfg = check_config(plain_toml, f"{kdir}/configmap.yaml mayfly.toml", kubernetes=True)

# ================================================================ deploy/helm/mayfly
print("== deploy/helm/mayfly")
chart_dir = DEPLOY / "helm" / "mayfly"
for name in ("Chart.yaml", "values.yaml"):
    docs = load_docs((chart_dir / name).read_text(), str(chart_dir / name))
    if docs is not None:
        check(len(docs) == 1 and isinstance(docs[0], dict), f"{chart_dir / name}: YAML parses")
        if name == "Chart.yaml":
            c = docs[0]
            check(c.get("apiVersion") == "v2" and c.get("name") == "mayfly" and c.get("version"),
                  f"{chart_dir / name}: apiVersion v2, name, version")
chart_rendered = False
helm_reason = os.environ.get("HELM_UNAVAILABLE", "")
if not helm_reason:
    try:
        import helm_python as helm
    except Exception as e:  # no wheel, or its native library does not load here
        helm_reason = f"helm-python-sdk does not load: {e}"
if helm_reason:
    notes.append(f"Helm chart NOT rendered or schema-validated: {helm_reason}")
    print(f"NOTE  {notes[-1]}")
else:
    lint = helm.lint(str(chart_dir), strict=True, kube_version="v" + K8S_VERSIONS[-1])
    serious = [m for m in lint.get("messages", []) if m.get("severity", 0) >= 2] + \
        [{"error": e} for e in lint.get("errors") or []]
    for m in lint.get("messages", []):
        if m.get("severity", 0) < 2:
            print(f"      lint info: {m.get('path')}: {m.get('error')}")
    check(not serious, f"{chart_dir}: helm lint --strict (Helm SDK {helm.helm_sdk_version()})",
          "; ".join(f"{m.get('path', '')}: {m['error']}" for m in serious))
    scenarios = {
        "defaults": ({}, True),
        "namespace+example": ({"namespace": {"create": True}, "example": {"enabled": True}}, True),
        "no-kubelet+ca+caps": ({"kubelet": {"enabled": False}, "extraCapabilities": ["DAC_READ_SEARCH"],
                                "config": {"ca": {"certFile": "/etc/mayfly-ca/ca.pem",
                                                  "keyFile": "/etc/mayfly-ca/ca-key.pem",
                                                  "ttl": "8760h"}}}, False),
    }
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="mayfly-helm-"))
    render_failures = 0
    try:
        with helm.Chart.load(str(chart_dir)) as chart:
            for label, (values, kubelet) in scenarios.items():
                where = f"helm render [{label}]"
                try:
                    out = chart.render(values, name="mayfly", namespace="mayfly-system", is_install=True)
                except Exception as e:
                    bad(f"{where}: {e}")
                    render_failures += 1
                    continue
                docs = []
                for tpl, text in sorted(out.items()):
                    if tpl.endswith("NOTES.txt") or not text.strip():
                        continue
                    got = load_docs(text, f"{where} {tpl}")
                    if got is not None:
                        docs += got
                ok(f"{where}: renders {len(docs)} resources")
                rendered = tmp / f"{label}.yaml"
                rendered.write_text(yaml.safe_dump_all(docs, sort_keys=False))
                kubernetes_validate([rendered], where)
                check_policy(docs, where, kubelet=kubelet)
                toml_text = configmap_toml(docs)
                if check(toml_text is not None, f"{where}: ConfigMap holds mayfly.toml"):
                    cfg = check_config(toml_text, f"{where} mayfly.toml", kubernetes=kubelet)
                    if label == "defaults" and plain_cfg is not None and cfg is not None:
                        check(cfg == plain_cfg, f"{where}: config equals deploy/kubernetes/configmap.yaml's",
                              f"chart {cfg} != plain {plain_cfg}")
                    if label == "defaults":
                        names = sorted(f"{d['kind']}/{d['metadata']['name']}" for d in docs)
                        plain = sorted(f"{d['kind']}/{d['metadata']['name']}" for d in plain_docs)
                        ns_plain = [n for n in plain if not n.startswith(("Namespace/", "Pod/", "ServiceAccount/reporter"))]
                        check(names == ns_plain, f"{where}: same resources as deploy/kubernetes (less namespace and example)",
                              f"{names} != {ns_plain}")
        chart_rendered = render_failures == 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

# ================================================================ deploy/systemd
print("== deploy/systemd")
sdir = DEPLOY / "systemd"
sys_cfg = check_config((sdir / "mayfly.toml").read_text(), str(sdir / "mayfly.toml"), kubernetes=False)
unit_path = sdir / "mayfly.service"
unit_text = unit_path.read_text()
unit = {}
section = None
for raw in unit_text.splitlines():
    line = raw.strip()
    if not line or line.startswith(("#", ";")):
        continue
    if line.startswith("[") and line.endswith("]"):
        section = line[1:-1]
        continue
    key, _, value = line.partition("=")
    unit.setdefault((section, key.strip()), []).append(value.strip())


def u(key, section="Service"):
    return " ".join(unit.get((section, key), []))


problems = []
if u("ExecStart") != "/usr/local/bin/mayfly agent --config /etc/mayfly/mayfly.toml":
    problems.append("ExecStart")
for key, want in (("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"), ("Restart", "on-failure"),
                  ("KillSignal", "SIGTERM"), ("StateDirectory", "mayfly")):
    if u(key) != want:
        problems.append(f"{key}={want}")
if "mayfly" not in u("RuntimeDirectory").split():
    problems.append("RuntimeDirectory=mayfly")
caps = set(u("CapabilityBoundingSet").split())
if not caps or not caps <= {"CAP_SYS_PTRACE", "CAP_DAC_READ_SEARCH"} or "CAP_SYS_PTRACE" not in caps:
    problems.append(f"CapabilityBoundingSet must be CAP_SYS_PTRACE [CAP_DAC_READ_SEARCH], is {sorted(caps)}")
if sys_cfg:
    rw = u("ReadWritePaths").split()
    for key in ("socket", "admin_socket"):
        d = str(pathlib.PurePosixPath(sys_cfg[key]).parent)
        if d not in rw:
            problems.append(f"ReadWritePaths lacks {d} ({key} in mayfly.toml)")
    if sys_cfg.get("data_dir") not in rw:
        problems.append(f"ReadWritePaths lacks data_dir {sys_cfg.get('data_dir')}")
check(not problems, f"{unit_path}: required settings, and paths agree with mayfly.toml", "; ".join(problems))
analyze = shutil.which("systemd-analyze")
if analyze:
    with tempfile.TemporaryDirectory() as d:
        # verify wants ExecStart's binary to exist; the agent is not installed here.
        copy = pathlib.Path(d) / "mayfly.service"
        copy.write_text(unit_text.replace("/usr/local/bin/mayfly", "/bin/true"))
        r = subprocess.run([analyze, "verify", "--man=no", str(copy)], capture_output=True, text=True)
        out = (r.stdout + r.stderr).strip()
        check(r.returncode == 0 and not out, f"{unit_path}: systemd-analyze verify (unknown keys are failures)", out)
else:
    notes.append("systemd-analyze not installed: the unit was checked by this script only")
    print(f"NOTE  {notes[-1]}")

# ================================================================ deploy/Dockerfile (not built)
print("== deploy/Dockerfile")
dockerfile = (DEPLOY / "Dockerfile").read_text()
ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
problems = []
froms = re.findall(r"^FROM\s+(\S+)", dockerfile, re.M)
if len(froms) < 2:
    problems.append("not multi-stage")
if "cargo build --release --locked" not in dockerfile:
    problems.append("no `cargo build --release --locked`")
final = dockerfile[dockerfile.rindex("\nFROM"):]
final_copies = re.findall(r"^COPY\s+(.*)$", final, re.M)
if final_copies != ["--from=builder /out/mayfly /usr/local/bin/mayfly"]:
    problems.append(f"final stage must copy only the binary, copies {final_copies}")
for src in re.findall(r"^COPY\s+(?!--from)(.+)\s+\S+$", dockerfile, re.M):
    for s in src.split():
        if not pathlib.Path(s).exists():
            problems.append(f"COPY source {s} missing from the repository")
        elif f"!{s.rstrip('/')}" not in [i.rstrip("/") for i in ignore]:
            problems.append(f"COPY source {s} excluded by Dockerfile.dockerignore")
check(not problems, "deploy/Dockerfile: static checks (multi-stage, --locked, binary-only image, COPY sources)",
      "; ".join(problems))
notes.append("deploy/Dockerfile is not built here (no container engine)")

# ================================================================ summary
secs = time.monotonic() - T0
status = "PASS" if failed == 0 else "FAIL"
chart = ("rendered (3 value sets), linted and schema-validated" if chart_rendered
         else "NOT rendered (see note)" if helm_reason else "FAILED to render")
print()
for n in notes:
    print(f"note: {n}")
print(f"validate-deploy {status}: Kubernetes {', '.join(K8S_VERSIONS)} strict schemas; "
      f"Helm chart {chart}; {len(files)} files in deploy/kubernetes; {tomls_checked} TOML configs; "
      f"systemd unit ({secs:.1f}s)")
print(f"validate-deploy: {passed} passed, {failed} failed")
sys.exit(1 if failed else 0)
PY
