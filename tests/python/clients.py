#!/usr/bin/env python3
"""Clients we did not write, run against a live mayfly agent.

    python clients.py CHECK --socket WORKLOAD_SOCKET --admin-socket ADMIN_SOCKET \
        [--admin-addr HOST:PORT --admin-server-name NAME]

CHECK is one of:

  py-spiffe         py-spiffe (gRPC C-core), unmodified: X.509 context, chain verification,
                    rotation on a stream, teardown on revoke, JWT fetch/validate (online and
                    offline against the JWT bundle).
  grpcio-authority  grpcio's own stubs for proto/workload.proto over three channels, one per
                    `:authority` form (C-core default = percent-encoded path, `localhost`, the
                    raw path as grpc-java sends it), plus a call without the security header.
  raw-h2            a hand-driven HTTP/2 client (hyperframe frames, hpack encoder/decoder):
                    300 unary calls on one connection exercising HPACK and framing corners,
                    then a malformed header block that must cost only its own connection.
  admin             the admin API (Grant, Get, List, Renew, Revoke, Complete, errors) from a
                    Python client compiled at run time from proto/mayfly/admin/v1/admin.proto.
  delegation        the Delegation service (Delegate, List, End, refusals) from grpcio stubs
                    compiled at run time from proto/mayfly/delegation/v1/delegation.proto,
                    this process holding the parent lease.
  remote-admin      the remote admin API over mutual TLS from grpcio (C-core) as an
                    orchestrator would call it: its client certificate is its own X.509-SVID
                    from the Workload API (py-spiffe), and it checks the agent by the host name
                    it dialled (--admin-server-name, one of the agent's admin.server_names) and
                    the trust bundle. Grant, Get and Revoke; refusals without a client
                    certificate, with a self-signed one, with an SVID the allowlist lacks; and
                    the client's own refusal of a host name the agent's certificate lacks.
  all               the checks above in sequence, each in its own interpreter (remote-admin
                    only with --admin-addr).

Every lease a check grants is bound to this process (`unix:uid:<euid>` plus
`unix:pid:<pid>`), so checks running concurrently against one agent never see each other's
identities, and every lease still active when the check ends is revoked. Every network wait
is bounded; a watchdog ends a check that hangs anyway.
"""

import argparse
import atexit
import base64
import faulthandler
import importlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.parse
from datetime import datetime, timedelta, timezone
from pathlib import Path

import grpc

HERE = Path(__file__).resolve().parent
PROTO_DIR = HERE.parent.parent / "proto"

# Bound on every single RPC or network wait.
RPC_TIMEOUT = 15.0
# A whole check must end within this (the Rust harness gives 180 s).
CHECK_WATCHDOG = 160.0

CHECK_NAME = "clients"


def log(msg):
    print(f"[{CHECK_NAME}] {msg}", flush=True)


class CheckFailed(AssertionError):
    pass


def ensure(cond, msg):
    if not cond:
        raise CheckFailed(msg)


def rpc_error_text(err):
    try:
        return f"{err.code()}: {err.details()}"
    except Exception:  # not a grpc.Call
        return repr(err)


def ts_to_dt(ts):
    return ts.ToDatetime(tzinfo=timezone.utc)


def now_utc():
    return datetime.now(timezone.utc)


def wait_until(pred, timeout, what, poll=0.05):
    deadline = time.monotonic() + timeout
    while True:
        if pred():
            return
        if time.monotonic() >= deadline:
            raise CheckFailed(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(poll)


# ---------------------------------------------------------------------------------------------
# Protos compiled at run time with grpc_tools.protoc
# ---------------------------------------------------------------------------------------------

_GEN_DIR = None


def _gen_dir():
    global _GEN_DIR
    if _GEN_DIR is None:
        _GEN_DIR = tempfile.mkdtemp(prefix="mayfly-pyclients-")
        atexit.register(shutil.rmtree, _GEN_DIR, ignore_errors=True)
        sys.path.insert(0, _GEN_DIR)
    return _GEN_DIR


def compile_proto(rel_path):
    """Compiles PROTO_DIR/rel_path (and its gRPC stubs) into the temp dir; returns the
    (pb2, pb2_grpc) modules."""
    from grpc_tools import protoc

    out = _gen_dir()
    include = str(Path(protoc.__file__).resolve().parent / "_proto")
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_DIR}",
        f"-I{include}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        str(PROTO_DIR / rel_path),
    ]
    rc = protoc.main(args)
    ensure(rc == 0, f"grpc_tools.protoc failed (exit {rc}) on {PROTO_DIR / rel_path}")
    mod = rel_path[: -len(".proto")].replace("/", ".")
    importlib.invalidate_caches()
    return importlib.import_module(mod + "_pb2"), importlib.import_module(mod + "_pb2_grpc")


# ---------------------------------------------------------------------------------------------
# Admin client
# ---------------------------------------------------------------------------------------------


class Admin:
    """A thin client of mayfly.admin.v1.Tasks that remembers every lease it granted."""

    def __init__(self, admin_socket):
        self.pb, self.pb_grpc = compile_proto("mayfly/admin/v1/admin.proto")
        # No authority option: C-core's default (the percent-encoded path) is part of the test.
        self.channel = grpc.insecure_channel("unix:" + admin_socket)
        self.stub = self.pb_grpc.TasksStub(self.channel)
        self.granted = []
        self._n = 0

    def task_id(self, label=""):
        self._n += 1
        return f"{CHECK_NAME}-{os.getpid()}-{self._n}{('-' + label) if label else ''}"

    @staticmethod
    def selectors():
        return [f"unix:uid:{os.geteuid()}", f"unix:pid:{os.getpid()}"]

    def _dur(self, seconds):
        from google.protobuf import duration_pb2

        d = duration_pb2.Duration()
        d.FromMilliseconds(int(round(seconds * 1000)))
        return d

    def grant(
        self,
        task_id=None,
        ttl=60,
        svid_ttl=None,
        max_ttl=None,
        jwt_ttl=None,
        audiences=(),
        selectors=None,
        delegator="user/pyclients",
        agent="pyclients",
        reason=None,
        track=True,
        max_delegation_depth=0,
    ):
        req = self.pb.GrantRequest(
            task_id=task_id if task_id is not None else self.task_id(),
            delegator=delegator,
            agent=agent,
            selectors=list(selectors if selectors is not None else self.selectors()),
            audiences=list(audiences),
            reason=reason if reason is not None else f"clients.py {CHECK_NAME}",
            max_delegation_depth=max_delegation_depth,
        )
        req.ttl.CopyFrom(self._dur(ttl))
        if svid_ttl is not None:
            req.svid_ttl.CopyFrom(self._dur(svid_ttl))
        if max_ttl is not None:
            req.max_ttl.CopyFrom(self._dur(max_ttl))
        if jwt_ttl is not None:
            req.jwt_ttl.CopyFrom(self._dur(jwt_ttl))
        lease = self.stub.Grant(req, timeout=RPC_TIMEOUT)
        if track:
            self.granted.append(lease.lease_id)
        log(f"granted lease {lease.lease_id} task={lease.task_id} state={lease.state} "
            f"spiffe_id={lease.spiffe_id}")
        return lease

    def get(self, lease_id):
        return self.stub.Get(self.pb.GetRequest(lease_id=lease_id), timeout=RPC_TIMEOUT)

    def list(self, all=False):
        return list(self.stub.List(self.pb.ListRequest(all=all), timeout=RPC_TIMEOUT).leases)

    def renew(self, lease_id, ttl):
        req = self.pb.RenewRequest(lease_id=lease_id)
        req.ttl.CopyFrom(self._dur(ttl))
        return self.stub.Renew(req, timeout=RPC_TIMEOUT)

    def revoke(self, lease_id, reason="clients.py done"):
        lease = self.stub.Revoke(
            self.pb.RevokeRequest(lease_id=lease_id, reason=reason), timeout=RPC_TIMEOUT
        )
        log(f"revoked lease {lease_id}: state={lease.state}")
        return lease

    def complete(self, lease_id):
        return self.stub.Complete(self.pb.CompleteRequest(lease_id=lease_id), timeout=RPC_TIMEOUT)

    def cleanup(self):
        """Revokes every lease this client granted that has not ended. Returns the errors."""
        errors = []
        for lease_id in self.granted:
            try:
                state = self.get(lease_id).state
                if state in ("active", "pending"):
                    self.revoke(lease_id, reason="clients.py cleanup")
                    state = self.get(lease_id).state
                if state in ("active", "pending"):
                    errors.append(f"lease {lease_id} still {state} after revoke")
            except grpc.RpcError as e:
                errors.append(f"cleanup of lease {lease_id}: {rpc_error_text(e)}")
        return errors

    def close(self):
        self.channel.close()


def expect_rpc_error(code, fn, what):
    try:
        fn()
    except grpc.RpcError as e:
        ensure(e.code() == code, f"{what}: expected {code}, got {rpc_error_text(e)}")
        log(f"{what}: {rpc_error_text(e)} (as expected)")
        return e
    raise CheckFailed(f"{what}: expected {code}, but the call succeeded")


# ---------------------------------------------------------------------------------------------
# Check: admin
# ---------------------------------------------------------------------------------------------


def check_admin(args, admin):
    task = admin.task_id("admin")
    before = now_utc()
    lease = admin.grant(task_id=task, ttl=60, max_ttl=600, svid_ttl=30, audiences=["svc.x"])
    ensure(len(lease.lease_id) > 0, f"Grant returned no lease_id: {lease}")
    ensure(lease.task_id == task, f"Grant task_id {lease.task_id!r} != {task!r}")
    ensure(lease.delegator == "user/pyclients", f"Grant delegator {lease.delegator!r}")
    ensure(lease.agent == "pyclients", f"Grant agent {lease.agent!r}")
    ensure(lease.state == "active", f"Grant state {lease.state!r}, expected active")
    ensure(lease.spiffe_id.startswith("spiffe://"), f"bad spiffe_id {lease.spiffe_id!r}")
    ensure(
        lease.spiffe_id.endswith(f"/agent/pyclients/task/{task}/delegator/user/pyclients"),
        f"spiffe_id {lease.spiffe_id!r} does not name agent, task and delegator",
    )
    ensure(f"unix:uid:{os.geteuid()}" in lease.selectors, f"selectors {list(lease.selectors)}")
    ensure(
        any(s.startswith(f"unix:pid:{os.getpid()}:") for s in lease.selectors),
        f"bare unix:pid not shown bound to a start time: {list(lease.selectors)}",
    )
    ensure(list(lease.audiences) == ["svc.x"], f"audiences {list(lease.audiences)}")
    ensure(lease.svid_ttl.ToSeconds() == 30, f"svid_ttl {lease.svid_ttl}")
    exp, mx = ts_to_dt(lease.expires_at), ts_to_dt(lease.max_expires_at)
    ensure(abs((exp - before).total_seconds() - 60) < 10, f"expires_at {exp} not ~60 s from now")
    ensure(abs((mx - before).total_seconds() - 600) < 10, f"max_expires_at {mx} not ~600 s")
    ensure(lease.granted_by.uid == os.geteuid(), f"granted_by {lease.granted_by}")
    ensure(lease.granted_by.pid == os.getpid(), f"granted_by.pid {lease.granted_by.pid}")
    log("Grant: fields ok")

    got = admin.get(lease.lease_id)
    ensure(got.lease_id == lease.lease_id and got.state == "active", f"Get: {got}")
    ensure(got.spiffe_id == lease.spiffe_id, "Get: spiffe_id differs from Grant's")
    log("Get: ok")

    ids = [l.lease_id for l in admin.list()]
    ensure(lease.lease_id in ids, f"List does not contain {lease.lease_id}: {ids}")
    log(f"List: contains the lease ({len(ids)} active)")

    renewed = admin.renew(lease.lease_id, ttl=300)
    rexp = ts_to_dt(renewed.expires_at)
    ensure(renewed.state == "active", f"Renew state {renewed.state}")
    ensure(rexp > exp, f"Renew did not move expires_at later: {exp} -> {rexp}")
    ensure(rexp <= mx, f"Renew moved expires_at {rexp} past max_expires_at {mx}")
    ensure(abs((rexp - now_utc()).total_seconds() - 300) < 10, f"renewed expires_at {rexp}")
    log(f"Renew: expires_at {exp.isoformat()} -> {rexp.isoformat()}")
    # Beyond the ceiling: refused, or clamped to max_expires_at; never past it.
    try:
        clamped = admin.renew(lease.lease_id, ttl=3600)
        ensure(ts_to_dt(clamped.expires_at) <= mx, f"Renew past max_ttl: {clamped.expires_at}")
        log(f"Renew past max_expires_at: clamped to {ts_to_dt(clamped.expires_at).isoformat()}")
    except grpc.RpcError as e:
        ensure(e.code() == grpc.StatusCode.INVALID_ARGUMENT,
               f"Renew past max_expires_at: {rpc_error_text(e)}")
        after = admin.get(lease.lease_id)
        ensure(ts_to_dt(after.expires_at) == rexp and after.state == "active",
               f"a refused Renew changed the lease: {after}")
        log(f"Renew past max_expires_at refused: {rpc_error_text(e)}")

    revoked = admin.revoke(lease.lease_id, reason="admin check")
    ensure(revoked.state == "revoked", f"Revoke state {revoked.state!r}")
    got = admin.get(lease.lease_id)
    ensure(got.state == "revoked", f"Get after Revoke: state {got.state!r}")
    ensure(got.HasField("ended_at"), "Get after Revoke: no ended_at")
    ensure(ts_to_dt(got.ended_at) <= now_utc(), f"ended_at in the future: {got.ended_at}")
    ensure(got.ended_by.uid == os.geteuid(), f"ended_by {got.ended_by}")
    log(f"Revoke + Get: state revoked, ended_at {ts_to_dt(got.ended_at).isoformat()}")

    active_ids = [l.lease_id for l in admin.list()]
    ensure(lease.lease_id not in active_ids, "List (active) still contains the revoked lease")
    all_ids = [l.lease_id for l in admin.list(all=True)]
    ensure(lease.lease_id in all_ids, "List(all) does not contain the revoked lease")
    log("List: revoked lease only with all=true")

    # The status code for this is not specified; any refusal will do.
    try:
        admin.renew(lease.lease_id, ttl=60)
        raise CheckFailed("Renew of a revoked lease succeeded")
    except grpc.RpcError as e:
        log(f"Renew of a revoked lease refused: {rpc_error_text(e)}")

    second = admin.grant(ttl=60)
    done = admin.complete(second.lease_id)
    ensure(done.state == "completed", f"Complete state {done.state!r}")
    log("Complete: state completed")

    err = expect_rpc_error(
        grpc.StatusCode.INVALID_ARGUMENT,
        lambda: admin.grant(task_id="a/b", ttl=60),
        "Grant with task_id a/b",
    )
    ensure("task" in (err.details() or "").lower(), f"error does not name the field: {err.details()}")
    expect_rpc_error(
        grpc.StatusCode.INVALID_ARGUMENT,
        lambda: admin.grant(ttl=60, selectors=[]),
        "Grant without selectors",
    )
    expect_rpc_error(
        grpc.StatusCode.NOT_FOUND,
        lambda: admin.get("0123456789abcdef0123456789abcdef"),
        "Get of an unknown lease id",
    )
    expect_rpc_error(
        grpc.StatusCode.NOT_FOUND,
        lambda: admin.revoke("0123456789abcdef0123456789abcdef"),
        "Revoke of an unknown lease id",
    )


# ---------------------------------------------------------------------------------------------
# Check: py-spiffe
# ---------------------------------------------------------------------------------------------


def verify_x509_svid(svid, bundle_set, lease):
    """The SVID names the lease, ends no later than it, and chains to the bundle's CA."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    ensure(str(svid.spiffe_id) == lease.spiffe_id,
           f"SVID spiffe_id {svid.spiffe_id} != lease's {lease.spiffe_id}")
    leaf = svid.leaf
    not_after = leaf.not_valid_after_utc
    lease_end = ts_to_dt(lease.expires_at)
    ensure(not_after <= lease_end, f"leaf notAfter {not_after} is past the lease end {lease_end}")
    ensure(leaf.not_valid_before_utc <= now_utc(), f"leaf notBefore {leaf.not_valid_before_utc} in the future")

    # The private key belongs to the leaf.
    pub = lambda k: k.public_bytes(serialization.Encoding.DER,
                                   serialization.PublicFormat.SubjectPublicKeyInfo)
    ensure(pub(svid.private_key.public_key()) == pub(leaf.public_key()),
           "the SVID's private key does not match the leaf certificate")

    bundle = bundle_set.get_bundle_for_trust_domain(svid.spiffe_id.trust_domain)
    ensure(bundle is not None, f"no X.509 bundle for trust domain {svid.spiffe_id.trust_domain}")
    authorities = list(bundle.x509_authorities)
    ensure(authorities, "the X.509 bundle is empty")

    def verify_link(cert, issuer):
        ensure(cert.issuer == issuer.subject,
               f"issuer {cert.issuer.rfc4514_string()} != {issuer.subject.rfc4514_string()}")
        ensure(isinstance(cert.signature_hash_algorithm, hashes.SHA256),
               f"signature hash {cert.signature_hash_algorithm}, expected SHA-256")
        key = issuer.public_key()
        ensure(isinstance(key, ec.EllipticCurvePublicKey), f"issuer key is {type(key)}, not ECDSA")
        # Raises InvalidSignature when it does not verify.
        key.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(hashes.SHA256()))

    chain = list(svid.cert_chain)
    for cert, issuer in zip(chain, chain[1:]):
        verify_link(cert, issuer)
    top = chain[-1]
    roots = [a for a in authorities if a.subject == top.issuer]
    ensure(roots, f"no bundle authority named {top.issuer.rfc4514_string()}")
    verify_link(top, roots[0])
    return leaf


def check_py_spiffe(args, admin):
    from spiffe import WorkloadApiClient, JwtSvid
    import jwt as pyjwt

    target = "unix:" + args.socket

    # --- X.509: fetch, verify, stream, rotation, revoke -----------------------------------
    lease = admin.grant(ttl=60, svid_ttl=2)
    client = WorkloadApiClient(target, default_timeout=RPC_TIMEOUT)
    try:
        ctx = client.fetch_x509_context(timeout=RPC_TIMEOUT)
        ensure(len(ctx.x509_svids) == 1, f"expected one SVID, got {len(ctx.x509_svids)}")
        leaf = verify_x509_svid(ctx.default_svid, ctx.x509_bundle_set, lease)
        log(f"fetch_x509_context: {ctx.default_svid.spiffe_id}, serial {leaf.serial_number:x}, "
            f"notAfter {leaf.not_valid_after_utc.isoformat()}, chain verified against the bundle")

        cond = threading.Condition()
        updates, errors = [], []

        stream_t0 = time.monotonic()
        arrivals = []

        def on_success(c):
            with cond:
                updates.append(c)
                arrivals.append(time.monotonic() - stream_t0)
                cond.notify_all()

        def on_error(e):
            with cond:
                errors.append(e)
                cond.notify_all()

        handler = client.stream_x509_contexts(on_success, on_error, retry_connect=False)
        try:
            def serials():
                return {u.default_svid.leaf.serial_number for u in updates if u.x509_svids}

            with cond:
                ok = cond.wait_for(lambda: len(serials()) >= 2 or errors, timeout=15)
            ensure(not errors, f"stream failed before rotating: {errors}")
            ensure(ok, f"no rotation within 15 s with svid_ttl 2s: {len(updates)} update(s), "
                       f"serials {sorted(serials())}")
            with cond:
                snapshot = list(updates)
            for u in snapshot:
                verify_x509_svid(u.default_svid, u.x509_bundle_set, lease)
            log(f"stream_x509_contexts: {len(snapshot)} update(s), "
                f"{len({u.default_svid.leaf.serial_number for u in snapshot})} distinct serials, all verified")
            for u, at in zip(snapshot, arrivals):
                lf = u.default_svid.leaf
                log(f"  update at +{at * 1000:.0f} ms: serial {lf.serial_number:x}, valid "
                    f"{lf.not_valid_before_utc.time()}..{lf.not_valid_after_utc.time()}")

            t0 = time.monotonic()
            admin.revoke(lease.lease_id, reason="py-spiffe rotation test done")
            with cond:
                ok = cond.wait_for(lambda: bool(errors), timeout=5)
            ensure(ok, "the stream was not ended within 5 s of the revoke")
            took = time.monotonic() - t0
            err = errors[0]
            log(f"stream ended {took * 1000:.0f} ms after the revoke: {type(err).__name__}: {err}")
            ensure("PERMISSION_DENIED" in str(err),
                   f"stream should end with PermissionDenied, got: {err}")
        finally:
            handler.cancel()

        try:
            c = client.fetch_x509_context(timeout=RPC_TIMEOUT)
            raise CheckFailed(f"fetch_x509_context after the revoke succeeded: "
                              f"{[str(s.spiffe_id) for s in c.x509_svids]}")
        except CheckFailed:
            raise
        except Exception as e:
            log(f"fetch_x509_context after the revoke raised {type(e).__name__}: {e}")
            ensure("no identity issued" in str(e), f"unexpected error after the revoke: {e}")
    finally:
        client.close()

    # --- JWT: fetch, validate online and offline ----------------------------------------
    lease = admin.grant(ttl=60, svid_ttl=30)
    # This time through SPIFFE_ENDPOINT_SOCKET, as a deployed workload would find it.
    os.environ["SPIFFE_ENDPOINT_SOCKET"] = "unix://" + args.socket
    client = WorkloadApiClient(default_timeout=RPC_TIMEOUT)
    try:
        svid = client.fetch_jwt_svid(audience={"svc.a"}, timeout=RPC_TIMEOUT)
        token = svid.token
        ensure(str(svid.spiffe_id) == lease.spiffe_id,
               f"JWT-SVID spiffe_id {svid.spiffe_id} != {lease.spiffe_id}")
        ensure(svid.audience == {"svc.a"}, f"JWT-SVID audience {svid.audience}")
        header = pyjwt.get_unverified_header(token)
        ensure(header.get("typ") == "JWT", f"JWT header typ {header.get('typ')!r}")
        ensure(header.get("alg") == "ES256", f"JWT header alg {header.get('alg')!r}")
        ensure(header.get("kid"), f"JWT header has no kid: {header}")
        claims = pyjwt.decode(token, options={"verify_signature": False})
        ensure(claims.get("sub") == lease.spiffe_id, f"sub {claims.get('sub')}")
        ensure(claims.get("urn:mayfly:task_id") == lease.task_id, f"task claim: {claims}")
        ensure(claims.get("urn:mayfly:lease_id") == lease.lease_id, f"lease claim: {claims}")
        ensure(claims.get("urn:mayfly:delegator") == lease.delegator, f"delegator claim: {claims}")
        ensure(claims.get("jti"), f"no jti: {claims}")
        ensure(claims["exp"] <= ts_to_dt(lease.expires_at).timestamp(),
               f"exp {claims['exp']} past the lease end {lease.expires_at}")
        log(f"fetch_jwt_svid: sub {claims['sub']}, kid {header['kid']}, exp {claims['exp']}")

        v = client.validate_jwt_svid(token, "svc.a", timeout=RPC_TIMEOUT)
        ensure(str(v.spiffe_id) == lease.spiffe_id, f"validate_jwt_svid spiffe_id {v.spiffe_id}")
        log("validate_jwt_svid (agent): ok")
        try:
            client.validate_jwt_svid(token, "svc.other", timeout=RPC_TIMEOUT)
            raise CheckFailed("validate_jwt_svid accepted the wrong audience")
        except CheckFailed:
            raise
        except Exception as e:
            log(f"validate_jwt_svid with another audience refused: {e}")

        bundles = client.fetch_jwt_bundles(timeout=RPC_TIMEOUT)
        bundle = bundles.get_bundle_for_trust_domain(svid.spiffe_id.trust_domain)
        ensure(bundle is not None, f"no JWT bundle for {svid.spiffe_id.trust_domain}")
        ensure(header["kid"] in bundle.jwt_authorities,
               f"kid {header['kid']} not in the bundle ({list(bundle.jwt_authorities)})")
        offline = JwtSvid.parse_and_validate(token, bundle, {"svc.a"})
        ensure(str(offline.spiffe_id) == lease.spiffe_id, f"offline spiffe_id {offline.spiffe_id}")
        log(f"JwtSvid.parse_and_validate against the JWT bundle ({len(bundle.jwt_authorities)} key(s)): ok")
        try:
            JwtSvid.parse_and_validate(token, bundle, {"svc.other"})
            raise CheckFailed("parse_and_validate accepted the wrong audience")
        except CheckFailed:
            raise
        except Exception as e:
            log(f"parse_and_validate with another audience refused: {type(e).__name__}")
        tampered = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
        try:
            JwtSvid.parse_and_validate(tampered, bundle, {"svc.a"})
            raise CheckFailed("parse_and_validate accepted a tampered signature")
        except CheckFailed:
            raise
        except Exception as e:
            log(f"parse_and_validate with a tampered signature refused: {type(e).__name__}")

        admin.revoke(lease.lease_id, reason="py-spiffe jwt test done")
        try:
            client.validate_jwt_svid(token, "svc.a", timeout=RPC_TIMEOUT)
            raise CheckFailed("validate_jwt_svid accepted a token whose lease was revoked")
        except CheckFailed:
            raise
        except Exception as e:
            log(f"validate_jwt_svid after the revoke refused: {e}")
        try:
            client.fetch_jwt_svid(audience={"svc.a"}, timeout=RPC_TIMEOUT)
            raise CheckFailed("fetch_jwt_svid after the revoke succeeded")
        except CheckFailed:
            raise
        except Exception as e:
            log(f"fetch_jwt_svid after the revoke refused: {e}")
            ensure("no identity issued" in str(e), f"unexpected error after the revoke: {e}")
    finally:
        client.close()
        os.environ.pop("SPIFFE_ENDPOINT_SOCKET", None)


# ---------------------------------------------------------------------------------------------
# Check: grpcio-authority
# ---------------------------------------------------------------------------------------------


def check_grpcio_authority(args, admin):
    pb, pb_grpc = compile_proto("workload.proto")
    lease = admin.grant(ttl=60, svid_ttl=30)
    md = [("workload.spiffe.io", "true")]
    forms = [
        ("default (C-core: percent-encoded path)", []),
        ("localhost", [("grpc.default_authority", "localhost")]),
        ("raw socket path (as grpc-java)", [("grpc.default_authority", args.socket)]),
    ]
    for name, options in forms:
        with grpc.insecure_channel("unix:" + args.socket, options=options) as ch:
            stub = pb_grpc.SpiffeWorkloadAPIStub(ch)
            try:
                it = stub.FetchX509SVID(pb.X509SVIDRequest(), metadata=md, timeout=RPC_TIMEOUT)
                try:
                    first = next(it)
                finally:
                    it.cancel()
            except grpc.RpcError as e:
                raise CheckFailed(f"[{name}] FetchX509SVID failed: {rpc_error_text(e)}")
            ids = [s.spiffe_id for s in first.svids]
            ensure(ids == [lease.spiffe_id], f"[{name}] FetchX509SVID returned {ids}")
            ensure(first.svids[0].x509_svid and first.svids[0].x509_svid_key and first.svids[0].bundle,
                   f"[{name}] FetchX509SVID: empty certificate, key or bundle")
            try:
                resp = stub.FetchJWTSVID(pb.JWTSVIDRequest(audience=["svc.grpc"]), metadata=md,
                                         timeout=RPC_TIMEOUT)
            except grpc.RpcError as e:
                raise CheckFailed(f"[{name}] FetchJWTSVID failed: {rpc_error_text(e)}")
            ids = [s.spiffe_id for s in resp.svids]
            ensure(ids == [lease.spiffe_id], f"[{name}] FetchJWTSVID returned {ids}")
            ensure(resp.svids[0].svid.count(".") == 2, f"[{name}] not a JWS compact token")
            log(f"[{name}] FetchX509SVID + FetchJWTSVID: {lease.spiffe_id}")

            err = expect_rpc_error(
                grpc.StatusCode.INVALID_ARGUMENT,
                lambda: stub.FetchJWTSVID(pb.JWTSVIDRequest(audience=["svc.grpc"]),
                                          timeout=RPC_TIMEOUT),
                f"[{name}] FetchJWTSVID without workload.spiffe.io",
            )
            ensure("workload.spiffe.io" in (err.details() or ""),
                   f"[{name}] the error does not name the header: {err.details()}")

            def stream_without_header():
                it = stub.FetchX509SVID(pb.X509SVIDRequest(), timeout=RPC_TIMEOUT)
                try:
                    next(it)
                finally:
                    it.cancel()

            expect_rpc_error(grpc.StatusCode.INVALID_ARGUMENT, stream_without_header,
                             f"[{name}] FetchX509SVID without workload.spiffe.io")
            expect_rpc_error(
                grpc.StatusCode.INVALID_ARGUMENT,
                lambda: stub.FetchJWTSVID(pb.JWTSVIDRequest(audience=[]), metadata=md,
                                          timeout=RPC_TIMEOUT),
                f"[{name}] FetchJWTSVID with no audience",
            )
    admin.revoke(lease.lease_id, reason="grpcio-authority done")
    with grpc.insecure_channel("unix:" + args.socket) as ch:
        stub = pb_grpc.SpiffeWorkloadAPIStub(ch)
        expect_rpc_error(
            grpc.StatusCode.PERMISSION_DENIED,
            lambda: stub.FetchJWTSVID(pb.JWTSVIDRequest(audience=["svc.grpc"]), metadata=md,
                                      timeout=RPC_TIMEOUT),
            "FetchJWTSVID after the revoke",
        )


# ---------------------------------------------------------------------------------------------
# Check: raw-h2
# ---------------------------------------------------------------------------------------------

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
JWT_PATH = "/SpiffeWorkloadAPI/FetchJWTSVID"
# JWTSVIDRequest{audience: ["svc.raw"]}, encoded by hand.
JWT_REQ = b"\x0a\x07svc.raw"
GRPC_BODY = b"\x00" + len(JWT_REQ).to_bytes(4, "big") + JWT_REQ


class ConnectionClosed(CheckFailed):
    """The server closed (or reset) the connection."""


class RawH2:
    """One HTTP/2 client connection driven by hand: hyperframe for frames, one hpack.Decoder
    for everything the server sends on it."""

    def __init__(self, path, label):
        import hpack

        self.label = label
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(RPC_TIMEOUT)
        self.sock.connect(path)
        self.buf = bytearray()
        self.decoder = hpack.Decoder()
        # One encoder per connection: its dynamic table mirrors the server's decoder.
        self.encoder = hpack.Encoder()
        self.server_settings = {}
        self.got_settings = False
        self.our_settings_acked = False
        self.streams = {}
        self.block = None  # (stream_id, end_stream, bytearray) of a header block being read
        self.goaway = None
        self.eof = False
        self.counts = {}

    # -- writing --------------------------------------------------------------------------
    def send(self, data):
        try:
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError) as e:
            self.eof = True
            raise ConnectionClosed(f"{self.label}: the server closed the connection while we wrote: {e}"
                              f"{'' if self.goaway is None else f' (after GOAWAY {self.goaway})'}")

    def start(self):
        from hyperframe.frame import SettingsFrame, WindowUpdateFrame

        ours = SettingsFrame(0, settings={
            SettingsFrame.ENABLE_PUSH: 0,
            SettingsFrame.HEADER_TABLE_SIZE: 4096,
        })
        # Plenty of connection-level window; DATA received is handed back as it arrives.
        wu = WindowUpdateFrame(0, window_increment=16 * 1024 * 1024)
        self.send(PREFACE + ours.serialize() + wu.serialize())
        deadline = time.monotonic() + RPC_TIMEOUT
        while not self.got_settings:
            self.handle(self.read_frame(deadline))
        ts = self.server_settings.get(SettingsFrame.HEADER_TABLE_SIZE)
        ensure(ts in (None, 4096),
               f"server announced SETTINGS_HEADER_TABLE_SIZE {ts}, not 4096")
        return self

    @property
    def max_frame_size(self):
        from hyperframe.frame import SettingsFrame
        return self.server_settings.get(SettingsFrame.MAX_FRAME_SIZE, 16384)

    @property
    def max_concurrent(self):
        from hyperframe.frame import SettingsFrame
        return self.server_settings.get(SettingsFrame.MAX_CONCURRENT_STREAMS, 1 << 31)

    @property
    def max_header_list(self):
        from hyperframe.frame import SettingsFrame
        return self.server_settings.get(SettingsFrame.MAX_HEADER_LIST_SIZE)

    # -- reading --------------------------------------------------------------------------
    def _fill(self, n, deadline):
        while len(self.buf) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout(f"{self.label}: no frame from the server in time")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                raise socket.timeout(f"{self.label}: nothing from the server in time "
                                     f"(waiting for {n - len(self.buf)} more byte(s))")
            except (ConnectionResetError, BrokenPipeError) as e:
                self.eof = True
                raise ConnectionClosed(f"{self.label}: connection reset: {e}")
            if not chunk:
                self.eof = True
                raise ConnectionClosed(f"{self.label}: EOF from the server")
            self.buf += chunk

    def read_frame(self, deadline):
        from hyperframe.frame import Frame

        self._fill(9, deadline)
        frame, length = Frame.parse_frame_header(memoryview(bytes(self.buf[:9])))
        self._fill(9 + length, deadline)
        body = bytes(self.buf[9:9 + length])
        del self.buf[:9 + length]
        frame.parse_body(memoryview(body))
        return frame

    def stream(self, sid):
        return self.streams.setdefault(
            sid, {"blocks": [], "data": bytearray(), "done": False, "rst": None})

    def _end_block(self):
        sid, end_stream, data = self.block
        self.block = None
        headers = self.decoder.decode(bytes(data))
        st = self.stream(sid)
        st["blocks"].append(headers)
        if end_stream:
            st["done"] = True

    def handle(self, f):
        from hyperframe.frame import (ContinuationFrame, DataFrame, GoAwayFrame, HeadersFrame,
                                      PingFrame, RstStreamFrame, SettingsFrame, WindowUpdateFrame)

        kind = type(f).__name__
        self.counts[kind] = self.counts.get(kind, 0) + 1
        if self.block is not None and not isinstance(f, ContinuationFrame):
            raise CheckFailed(f"{self.label}: server sent {kind} inside an open header block")
        if isinstance(f, SettingsFrame):
            if "ACK" in f.flags:
                self.our_settings_acked = True
            else:
                self.server_settings.update(f.settings)
                self.got_settings = True
                self.send(SettingsFrame(0, flags=["ACK"]).serialize())
        elif isinstance(f, PingFrame):
            if "ACK" not in f.flags:
                self.send(PingFrame(0, flags=["ACK"], opaque_data=f.opaque_data).serialize())
        elif isinstance(f, WindowUpdateFrame):
            pass
        elif isinstance(f, GoAwayFrame):
            self.goaway = (f.error_code, f.last_stream_id, bytes(f.additional_data))
        elif isinstance(f, RstStreamFrame):
            st = self.stream(f.stream_id)
            st["rst"] = f.error_code
            st["done"] = True
        elif isinstance(f, HeadersFrame):
            self.block = (f.stream_id, "END_STREAM" in f.flags, bytearray(f.data))
            if "END_HEADERS" in f.flags:
                self._end_block()
        elif isinstance(f, ContinuationFrame):
            if self.block is None or self.block[0] != f.stream_id:
                raise CheckFailed(f"{self.label}: CONTINUATION without a header block")
            self.block[2].extend(f.data)
            if "END_HEADERS" in f.flags:
                self._end_block()
        elif isinstance(f, DataFrame):
            st = self.stream(f.stream_id)
            st["data"] += f.data
            n = f.flow_controlled_length
            if n:
                self.send(WindowUpdateFrame(0, window_increment=n).serialize())
            if "END_STREAM" in f.flags:
                st["done"] = True
        # Anything else (PRIORITY, unknown extension frames) is ignored, as RFC 9113 asks.

    def wait(self, sids, timeout=RPC_TIMEOUT):
        deadline = time.monotonic() + timeout
        while not all(self.stream(s)["done"] for s in sids):
            if self.goaway is not None:
                raise CheckFailed(f"{self.label}: GOAWAY while waiting for streams "
                                  f"{[s for s in sids if not self.stream(s)['done']]}: "
                                  f"code {self.goaway[0]}, last stream {self.goaway[1]}, "
                                  f"debug {self.goaway[2]!r}")
            try:
                self.handle(self.read_frame(deadline))
            except ConnectionClosed as e:
                raise CheckFailed(f"{e} while waiting for streams "
                                  f"{[s for s in sids if not self.stream(s)['done']]}"
                                  f"{'' if self.goaway is None else f' (after GOAWAY {self.goaway})'}")

    def check_response(self, sid, spiffe_id):
        st = self.stream(sid)
        ensure(st["rst"] is None, f"{self.label}: stream {sid} reset by the server, code {st['rst']}")
        blocks = [dict(b) for b in st["blocks"]]
        ensure(blocks, f"{self.label}: stream {sid}: no response headers")
        first, last = blocks[0], blocks[-1]
        ensure(first.get(":status") == "200", f"{self.label}: stream {sid}: status {first}")
        ensure(first.get("content-type", "").startswith("application/grpc"),
               f"{self.label}: stream {sid}: content-type {first.get('content-type')}")
        ensure(last.get("grpc-status") == "0",
               f"{self.label}: stream {sid}: grpc-status {last.get('grpc-status')!r} "
               f"grpc-message {urllib.parse.unquote(last.get('grpc-message', ''))!r}")
        ensure(len(blocks) == 2, f"{self.label}: stream {sid}: {len(blocks)} header blocks")
        data = bytes(st["data"])
        ensure(len(data) >= 5 and data[0] == 0 and int.from_bytes(data[1:5], "big") == len(data) - 5,
               f"{self.label}: stream {sid}: not one gRPC message: {data[:16]!r}...")
        ensure(spiffe_id.encode() in data,
               f"{self.label}: stream {sid}: the response does not carry {spiffe_id}")
        del self.streams[sid]

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


def split_evenly(block, pieces):
    pieces = max(1, min(pieces, len(block)))
    step = -(-len(block) // pieces)
    out = [block[i:i + step] for i in range(0, len(block), step)]
    return out or [b""]


def build_request(conn, sid, opt):
    """The frames of one unary FetchJWTSVID call, as bytes."""
    import hpack
    from hyperframe.frame import ContinuationFrame, DataFrame, HeadersFrame

    headers = [(":method", "POST"), (":scheme", "http"), (":path", JWT_PATH)]
    if opt.get("authority") is not None:
        if opt.get("authority_first"):
            headers.insert(0, (":authority", opt["authority"]))
        else:
            headers.append((":authority", opt["authority"]))
    headers += [("content-type", "application/grpc"), ("te", "trailers")]
    if opt.get("never_index"):
        headers.append(hpack.NeverIndexedHeaderTuple("workload.spiffe.io", "true"))
    else:
        headers.append(("workload.spiffe.io", "true"))
    if opt.get("big"):
        headers.append(("x-big", opt["big"]))
    headers.append(("grpc-timeout", "10S"))
    block = conn.encoder.encode(headers, huffman=opt.get("huffman", True))

    overhead = (18 if opt.get("padded") else 0) + (5 if opt.get("priority") else 0)
    if opt.get("chunk"):
        size = min(opt["chunk"], conn.max_frame_size - overhead)
        pieces = [block[i:i + size] for i in range(0, len(block), size)]
    else:
        pieces = split_evenly(block, opt.get("pieces", 1))
    ensure(len(pieces[0]) + overhead <= conn.max_frame_size, "HEADERS frame over max frame size")

    hf = HeadersFrame(sid, data=pieces[0])
    if opt.get("padded"):
        hf.flags.add("PADDED")
        hf.pad_length = 17
    if opt.get("priority"):
        hf.flags.add("PRIORITY")
        hf.exclusive = True
        hf.depends_on = 0
        hf.stream_weight = 199  # weight 200 on the wire is weight - 1
    frames = [hf]
    for p in pieces[1:]:
        frames.append(ContinuationFrame(sid, data=p))
    frames[-1].flags.add("END_HEADERS")
    frames.append(DataFrame(sid, data=GRPC_BODY, flags=["END_STREAM"]))
    out = b"".join(f.serialize() for f in frames)
    for f in frames:
        ensure(f.body_len <= conn.max_frame_size, f"frame of {f.body_len} bytes over max frame size")
    return out, len(frames), len(block)


def header_list_size(opt, authority_len):
    size = sum(len(n) + len(v) + 32 for n, v in [
        (":method", "POST"), (":scheme", "http"), (":path", JWT_PATH),
        ("content-type", "application/grpc"), ("te", "trailers"), ("workload.spiffe.io", "true"),
        ("grpc-timeout", "10S")])
    if opt.get("big"):
        size += len("x-big") + len(opt["big"]) + 32
    if authority_len is not None:
        size += len(":authority") + authority_len + 32
    return size


def check_raw_h2(args, admin):
    import hpack

    lease = admin.grant(ttl=120, svid_ttl=60)
    sock_path = args.socket
    percent = urllib.parse.quote(sock_path, safe="")
    total = 300

    conn = RawH2(sock_path, "conn#1").start()
    log(f"server SETTINGS: {conn.server_settings} (max frame {conn.max_frame_size})")
    encoder = conn.encoder
    rnd = random.Random(4242)
    big_value = base64.b64encode(rnd.randbytes(9000)).decode()  # 12000 bytes
    assert len(big_value) == 12000

    plan = []
    for i in range(total):
        opt = {"huffman": i % 3 != 0}
        if i % 10 == 1:
            opt["authority"] = percent
        elif i % 10 == 2:
            opt["authority"] = sock_path
        elif i % 10 == 3:
            opt["authority"] = "localhost"
            opt["authority_first"] = i % 20 == 3
        if i % 7 == 0:
            opt["never_index"] = True
        if i % 11 == 5:
            opt["padded"] = True
        if i % 13 == 6:
            opt["priority"] = True
        if i % 5 == 4:
            opt["pieces"] = 2 + (i // 5) % 2
        plan.append(opt)
    # A large metadata header, split into several frames; then one in a single frame.
    plan[150].update(big=big_value, chunk=5000, pieces=1)
    plan[151].update(big=big_value, chunk=conn.max_frame_size)
    plan[152].update(big=big_value, chunk=4000, padded=True, priority=True, authority=percent)
    for i in (150, 151, 152):
        hl = header_list_size(plan[i], len(plan[i].get("authority", "")) if "authority" in plan[i] else None)
        ensure(hl < 16 * 1024, f"x-big request header list {hl} is not under 16 KiB")
        if conn.max_header_list is not None:
            ensure(hl <= conn.max_header_list,
                   f"x-big request ({hl}) over the server's MAX_HEADER_LIST_SIZE {conn.max_header_list}")
    # Header table size changes mid-connection (the encoder emits size updates).
    table_changes = {100: [256], 200: [4096], 240: [0, 1024], 270: [4096]}
    # One request written byte by byte: split into HEADERS + CONTINUATIONs, padded, prioritised.
    bytewise = {77, 201}
    for i in bytewise:
        plan[i].update(pieces=3, padded=True, priority=True)

    # Batches: one at a time at first, then several requests per sendall.
    batches, i, pattern = [], 0, [1, 3, 1, 8, 2, 5, 1, 4]
    k = 0
    while i < total:
        n = 1 if i < 10 else pattern[k % len(pattern)]
        k += 1
        n = min(n, conn.max_concurrent, total - i)
        batch = []
        for j in range(i, i + n):
            if batch and j in bytewise:
                break
            batch.append(j)
            if j in bytewise:
                break
        batches.append(batch)
        i = batch[-1] + 1

    stats = {"authority": {}, "huffman": 0, "plain": 0, "never_index": 0, "padded": 0,
             "priority": 0, "continuation": 0, "big": 0, "size_updates": 0, "multi": 0,
             "bytewise": 0, "frames": 0}
    sid = 1
    t0 = time.monotonic()
    for batch in batches:
        wire = bytearray()
        sids = []
        for j in batch:
            opt = plan[j]
            for size in table_changes.get(j, []):
                encoder.header_table_size = size
                stats["size_updates"] += 1
            data, nframes, _ = build_request(conn, sid, opt)
            wire += data
            sids.append(sid)
            sid += 2
            a = {None: "none", percent: "percent-encoded", sock_path: "raw path",
                 "localhost": "localhost"}[opt.get("authority")]
            stats["authority"][a] = stats["authority"].get(a, 0) + 1
            stats["huffman" if opt["huffman"] else "plain"] += 1
            for key in ("never_index", "padded", "priority", "big"):
                stats[key] += bool(opt.get(key))
            stats["continuation"] += nframes > 2
            stats["frames"] += nframes
        if len(batch) > 1:
            stats["multi"] += 1
        if batch[0] in bytewise:
            stats["bytewise"] += 1
            for b in range(len(wire)):
                conn.send(wire[b:b + 1])
                time.sleep(0.002)
        else:
            conn.send(bytes(wire))
        conn.wait(sids)
        for s in sids:
            conn.check_response(s, lease.spiffe_id)
    took = time.monotonic() - t0
    ensure(conn.goaway is None, f"conn#1: GOAWAY {conn.goaway}")
    log(f"conn#1: {total} FetchJWTSVID calls on one connection in {took:.1f} s, all grpc-status 0 "
        f"with {lease.spiffe_id}")
    log(f"  :authority {stats['authority']}; huffman {stats['huffman']}, plain {stats['plain']}; "
        f"never-indexed {stats['never_index']}; padded {stats['padded']}; priority {stats['priority']}; "
        f"split into CONTINUATIONs {stats['continuation']}; x-big {stats['big']}; "
        f"table size updates {stats['size_updates']}; multi-request writes {stats['multi']}; "
        f"byte-by-byte {stats['bytewise']}; {stats['frames']} frames sent")
    log(f"  frames received: {conn.counts}")
    ensure(stats["authority"].get("none", 0) > total // 2, "most requests should carry no :authority")

    # --- a malformed header block costs only its own connection --------------------------
    from hyperframe.frame import HeadersFrame

    other = RawH2(sock_path, "conn#2").start()
    data, _, _ = build_request(other, 1, {"authority": percent})
    other.send(data)
    other.wait([1])
    other.check_response(1, lease.spiffe_id)

    bad = RawH2(sock_path, "conn#bad").start()
    bad.send(HeadersFrame(1, data=b"\x80", flags=["END_HEADERS"]).serialize())
    deadline = time.monotonic() + 5
    closed_how = None
    try:
        while closed_how is None:
            bad.handle(bad.read_frame(deadline))
            if bad.goaway is not None:
                closed_how = f"GOAWAY code {bad.goaway[0]} debug {bad.goaway[2]!r}"
    except ConnectionClosed as e:
        closed_how = str(e)
    except socket.timeout:
        raise CheckFailed("conn#bad: a garbage HPACK block (index 0) did not close the "
                          "connection within 5 s")
    ensure(not bad.stream(1)["blocks"], f"conn#bad: got a response to the garbage block: {bad.stream(1)}")
    if bad.goaway is not None and not bad.eof:
        # After GOAWAY the server must also close; wait for it.
        try:
            while True:
                bad.handle(bad.read_frame(time.monotonic() + 5))
        except ConnectionClosed:
            pass
        except socket.timeout:
            raise CheckFailed("conn#bad: GOAWAY but the connection stayed open 5 s")
    bad.close()
    log(f"conn#bad: a HEADERS with hpack block b'\\x80' closed the connection: {closed_how}")

    # The connection that was open meanwhile still works, and so does a new one.
    data, _, _ = build_request(other, 3, {"authority": sock_path, "huffman": False})
    other.send(data)
    other.wait([3])
    other.check_response(3, lease.spiffe_id)
    other.close()
    fresh = RawH2(sock_path, "conn#3").start()
    data, _, _ = build_request(fresh, 1, {})
    fresh.send(data)
    fresh.wait([1])
    fresh.check_response(1, lease.spiffe_id)
    fresh.close()
    log("after the malformed connection: the other open connection and a fresh one still work")

    conn.close()
    admin.revoke(lease.lease_id, reason="raw-h2 done")


# ---------------------------------------------------------------------------------------------
# Check: delegation
# ---------------------------------------------------------------------------------------------


def check_delegation(args, admin):
    pb, pb_grpc = compile_proto("mayfly/delegation/v1/delegation.proto")
    root = admin.grant(ttl=120, audiences=["db", "search"], max_delegation_depth=1)
    channel = grpc.insecure_channel("unix:" + args.socket)
    stub = pb_grpc.DelegationStub(channel)
    header = [("workload.spiffe.io", "true")]
    # The child is bound to a process this one started.
    kid = subprocess.Popen(["sleep", "60"])
    try:
        def request(audiences, task="py-child"):
            r = pb.DelegateRequest(task_id=admin.task_id(task), agent="py-executor",
                                   selectors=[f"unix:pid:{kid.pid}"], audiences=audiences)
            r.ttl.CopyFrom(admin._dur(60))
            return r

        expect_rpc_error(grpc.StatusCode.INVALID_ARGUMENT,
                         lambda: stub.Delegate(request(["db"]), timeout=RPC_TIMEOUT),
                         "Delegate without the security header")
        e = expect_rpc_error(grpc.StatusCode.PERMISSION_DENIED,
                             lambda: stub.Delegate(request(["mail"]), metadata=header,
                                                   timeout=RPC_TIMEOUT),
                             "Delegate for an audience the parent lacks")
        ensure("audiences" in e.details(), f"the refusal names the rule: {e.details()}")
        child = stub.Delegate(request(["db"]), metadata=header, timeout=RPC_TIMEOUT)
        admin.granted.append(child.lease_id)
        log(f"delegated lease {child.lease_id} spiffe_id={child.spiffe_id} state={child.state}")
        ensure(child.state == "active", f"child state {child.state}")
        ensure([l.lease_id for l in child.chain] == [root.lease_id], f"chain {child.chain}")
        ensure(list(child.audiences) == ["db"], f"audiences {child.audiences}")
        ensure(f"unix:pid:{kid.pid}:" in " ".join(child.selectors), f"selectors {child.selectors}")
        listed = stub.List(pb.ListRequest(), metadata=header, timeout=RPC_TIMEOUT).leases
        ensure([l.lease_id for l in listed] == [child.lease_id], f"List: {listed}")
        ended = stub.End(pb.EndRequest(lease_id=child.lease_id, reason="py done"),
                         metadata=header, timeout=RPC_TIMEOUT)
        ensure(ended.state == "revoked" and "py done" in ended.end_reason,
               f"End: {ended.state} {ended.end_reason}")
        # Revoking the parent ends a second child with it.
        second = stub.Delegate(request(["search"], "py-second"), metadata=header,
                               timeout=RPC_TIMEOUT)
        admin.granted.append(second.lease_id)
        admin.revoke(root.lease_id)
        ensure(admin.get(second.lease_id).state == "parent_ended", "the child ended with its parent")
        log("delegation: delegate, refusals, list, end and cascade: ok")
    finally:
        kid.kill()
        kid.wait()
        channel.close()


# ---------------------------------------------------------------------------------------------
# Check: remote-admin
# ---------------------------------------------------------------------------------------------


def check_remote_admin(args, admin):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    from spiffe import WorkloadApiClient

    ensure(args.admin_addr and args.admin_server_name,
           "remote-admin needs --admin-addr and --admin-server-name")
    pb = admin.pb
    pem = serialization.Encoding.PEM

    def key_pem(key):
        return key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    # Two identities of this process: one the agent's allowlist admits, one it does not.
    orchestrator = admin.grant(agent="py-orchestrator", ttl=120)
    stranger = admin.grant(agent="py-stranger", ttl=120)
    with WorkloadApiClient("unix:" + args.socket) as workload:
        ctx = workload.fetch_x509_context(timeout=RPC_TIMEOUT)
    svids = {str(s.spiffe_id): s for s in ctx.x509_svids}
    ensure({orchestrator.spiffe_id, stranger.spiffe_id} <= set(svids),
           f"both SVIDs from the Workload API, got {sorted(svids)}")
    bundle = ctx.x509_bundle_set.get_bundle_for_trust_domain(
        svids[orchestrator.spiffe_id].spiffe_id.trust_domain)
    roots = b"".join(a.public_bytes(pem) for a in bundle.x509_authorities)

    def identity(svid):
        return (key_pem(svid.private_key),
                b"".join(c.public_bytes(pem) for c in svid.cert_chain))

    channels = []

    def tasks(identity=None, host=args.admin_server_name):
        key, chain = identity or (None, None)
        creds = grpc.ssl_channel_credentials(root_certificates=roots, private_key=key,
                                             certificate_chain=chain)
        # The host name the client checks the agent's certificate against (C-core's only check
        # beside the chain), as a client that resolved it through DNS would.
        channel = grpc.secure_channel(args.admin_addr, creds,
                                      options=[("grpc.ssl_target_name_override", host)])
        channels.append(channel)
        return admin.pb_grpc.TasksStub(channel)

    def grant_request(task):
        req = pb.GrantRequest(task_id=admin.task_id(task), delegator="orchestrator/py",
                              agent="py-worker", selectors=["unix:uid:4242"],
                              reason="granted over the remote admin API by grpcio")
        req.ttl.CopyFrom(admin._dur(60))
        return req

    try:
        remote = tasks(identity(svids[orchestrator.spiffe_id]))
        lease = remote.Grant(grant_request("remote"), timeout=RPC_TIMEOUT)
        admin.granted.append(lease.lease_id)
        log(f"remote Grant: lease {lease.lease_id} granted by {lease.granted_by.spiffe_id}")
        ensure(lease.state == "active", f"state {lease.state}")
        ensure(lease.granted_by.spiffe_id == orchestrator.spiffe_id,
               f"grantor {lease.granted_by.spiffe_id}, want {orchestrator.spiffe_id}")
        local = admin.get(lease.lease_id)
        ensure(local.granted_by.spiffe_id == orchestrator.spiffe_id,
               f"the admin socket shows grantor {local.granted_by.spiffe_id}")
        got = remote.Get(pb.GetRequest(lease_id=lease.lease_id), timeout=RPC_TIMEOUT)
        ensure(got.lease_id == lease.lease_id, "remote Get")
        ended = remote.Revoke(pb.RevokeRequest(lease_id=lease.lease_id, reason="py remote done"),
                              timeout=RPC_TIMEOUT)
        ensure(ended.state == "revoked", f"remote Revoke: state {ended.state}")
        ensure(admin.get(lease.lease_id).state == "revoked", "revoked on the admin socket too")

        # Refused by the agent.
        expect_rpc_error(grpc.StatusCode.UNAVAILABLE,
                         lambda: tasks().Grant(grant_request("no-cert"), timeout=RPC_TIMEOUT),
                         "Grant without a client certificate")
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.now(timezone.utc)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "forged orchestrator")])
        forged = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                  .public_key(key.public_key()).serial_number(x509.random_serial_number())
                  .not_valid_before(now).not_valid_after(now + timedelta(hours=1))
                  .add_extension(x509.SubjectAlternativeName(
                      [x509.UniformResourceIdentifier(orchestrator.spiffe_id)]), critical=False)
                  .sign(key, hashes.SHA256()))
        expect_rpc_error(grpc.StatusCode.UNAVAILABLE,
                         lambda: tasks((key_pem(key), forged.public_bytes(pem)))
                         .Grant(grant_request("forged"), timeout=RPC_TIMEOUT),
                         "Grant with a self-signed certificate naming the allowed SPIFFE ID")
        e = expect_rpc_error(grpc.StatusCode.PERMISSION_DENIED,
                             lambda: tasks(identity(svids[stranger.spiffe_id]))
                             .Grant(grant_request("stranger"), timeout=RPC_TIMEOUT),
                             "Grant with an SVID whose SPIFFE ID the allowlist lacks")
        ensure("allowed_spiffe_ids" in e.details(), f"the refusal says why: {e.details()}")
        # Refused by the client: the agent's certificate does not name that host.
        expect_rpc_error(grpc.StatusCode.UNAVAILABLE,
                         lambda: tasks(identity(svids[orchestrator.spiffe_id]),
                                       host="elsewhere." + args.admin_server_name)
                         .Grant(grant_request("elsewhere"), timeout=RPC_TIMEOUT),
                         "Grant to a host name the agent's certificate lacks")
        ensure(not [l for l in admin.list() if l.task_id.endswith(("-no-cert", "-forged",
                                                                    "-stranger", "-elsewhere"))],
               "no refused grant made a lease")
        log("remote-admin: grant with an SVID, refusals by the agent and by the client: ok")
    finally:
        for channel in channels:
            channel.close()


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------

def check_federation(args, admin):
    """A federated trust domain's bundle (from a SPIFFE bundle file the test wrote) reaches
    py-spiffe on every bundle path: federated_bundles of the X.509 stream, FetchX509Bundles
    and FetchJWTBundles, each equal to py-spiffe's own reading of the file."""
    import json
    from cryptography.hazmat.primitives.serialization import Encoding
    from spiffe import JwtBundle, TrustDomain, WorkloadApiClient

    td = TrustDomain(args.federated_td)
    with open(args.federated_bundle, "rb") as f:
        doc = json.load(f)
    roots = {base64.b64decode(k["x5c"][0]) for k in doc["keys"] if k.get("use") == "x509-svid"}
    jwt_keys = [k for k in doc["keys"] if k.get("use") == "jwt-svid"]
    expected = JwtBundle.parse(td, json.dumps({"keys": jwt_keys}).encode())
    ensure(roots and jwt_keys, "the test's bundle has both kinds of keys")

    def ders(bundle):
        return {c.public_bytes(Encoding.DER) for c in bundle.x509_authorities}

    admin.grant(ttl=60)
    client = WorkloadApiClient("unix:" + args.socket, default_timeout=RPC_TIMEOUT)
    try:
        ctx = client.fetch_x509_context(timeout=RPC_TIMEOUT)
        fed = ctx.x509_bundle_set.get_bundle_for_trust_domain(td)
        ensure(fed is not None, f"no {td} bundle in the X.509 context")
        ensure(ders(fed) == roots, f"X.509 context: {td} roots differ from the file")
        own = ctx.x509_bundle_set.get_bundle_for_trust_domain(TrustDomain("example.org"))
        ensure(own is not None and own.x509_authorities, "the own bundle is still there")
        log(f"fetch_x509_context: {td} with {len(roots)} root(s) beside example.org")

        bundles = client.fetch_x509_bundles(timeout=RPC_TIMEOUT)
        fed = bundles.get_bundle_for_trust_domain(td)
        ensure(fed is not None and ders(fed) == roots, f"FetchX509Bundles: {td} differs")
        log(f"fetch_x509_bundles: {td} and example.org")

        jwt = client.fetch_jwt_bundles(timeout=RPC_TIMEOUT).get_bundle_for_trust_domain(td)
        ensure(jwt is not None, f"no {td} JWT bundle")
        ensure(set(jwt.jwt_authorities) == set(expected.jwt_authorities),
               f"JWT bundle kids {sorted(jwt.jwt_authorities)} != "
               f"{sorted(expected.jwt_authorities)}")
        for kid, key in expected.jwt_authorities.items():
            ensure(jwt.jwt_authorities[kid].public_numbers() == key.public_numbers(),
                   f"JWT key {kid} differs")
        log(f"fetch_jwt_bundles: {td} with kids {sorted(jwt.jwt_authorities)}")
    finally:
        client.close()


CHECKS = {
    "py-spiffe": check_py_spiffe,
    "grpcio-authority": check_grpcio_authority,
    "raw-h2": check_raw_h2,
    "admin": check_admin,
    "delegation": check_delegation,
    "remote-admin": check_remote_admin,
    "federation": check_federation,
}


def run_one(name, args):
    global CHECK_NAME
    CHECK_NAME = name
    # Watchdog: at CHECK_WATCHDOG, print every thread's stack and raise SystemExit in the main
    # thread (so the leases are still revoked); 15 s later, exit hard.
    def watchdog():
        print(f"[{name}] FAIL: watchdog: no result within {CHECK_WATCHDOG:.0f} s",
              file=sys.stderr, flush=True)
        faulthandler.dump_traceback(all_threads=True)
        os.kill(os.getpid(), signal.SIGTERM)

    dog = threading.Timer(CHECK_WATCHDOG, watchdog)
    dog.daemon = True
    dog.start()
    faulthandler.dump_traceback_later(CHECK_WATCHDOG + 15, exit=True)
    ensure(os.path.exists(args.socket), f"workload socket {args.socket} does not exist")
    ensure(os.path.exists(args.admin_socket), f"admin socket {args.admin_socket} does not exist")
    admin = Admin(args.admin_socket)
    t0 = time.monotonic()
    failure = None
    try:
        CHECKS[name](args, admin)
    except BaseException as e:  # report below, after the cleanup
        failure = e
        traceback.print_exc()
    finally:
        leftovers = admin.cleanup()
        admin.close()
    dog.cancel()
    faulthandler.cancel_dump_traceback_later()
    if failure is not None:
        msg = str(failure) or type(failure).__name__
        if isinstance(failure, grpc.RpcError):
            msg = rpc_error_text(failure)
        print(f"[{name}] FAIL: {type(failure).__name__}: {msg}", file=sys.stderr, flush=True)
        for l in leftovers:
            print(f"[{name}] cleanup: {l}", file=sys.stderr, flush=True)
        return 1
    if leftovers:
        print(f"[{name}] FAIL: leases left behind: {leftovers}", file=sys.stderr, flush=True)
        return 1
    log(f"PASS ({time.monotonic() - t0:.1f} s)")
    return 0


def run_all(args):
    failed, ran = [], []
    for name in CHECKS:
        cmd = [sys.executable, str(Path(__file__).resolve()), name,
               "--socket", args.socket, "--admin-socket", args.admin_socket]
        if name == "remote-admin":
            if not args.admin_addr:
                continue
            cmd += ["--admin-addr", args.admin_addr,
                    "--admin-server-name", args.admin_server_name or ""]
        if name == "federation":
            if not args.federated_bundle:
                continue
            cmd += ["--federated-td", args.federated_td,
                    "--federated-bundle", args.federated_bundle]
        ran.append(name)
        child = subprocess.Popen(cmd)
        try:
            rc = child.wait(timeout=CHECK_WATCHDOG + 25)
        except BaseException as e:
            # Timed out, or we were told to stop: let the child revoke its leases first.
            child.terminate()
            try:
                child.wait(timeout=20)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
            if not isinstance(e, subprocess.TimeoutExpired):
                raise
            rc = "timeout"
        if rc != 0:
            failed.append(f"{name} ({rc})")
    if failed:
        print(f"[all] FAIL: {', '.join(failed)}", file=sys.stderr, flush=True)
        return 1
    print(f"[all] PASS: {', '.join(ran)}", flush=True)
    return 0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("check", choices=list(CHECKS) + ["all"])
    p.add_argument("--socket", required=True, help="the agent's workload socket path")
    p.add_argument("--admin-socket", required=True, help="the agent's admin socket path")
    p.add_argument("--admin-addr", help="remote-admin: the agent's admin_addr, HOST:PORT")
    p.add_argument("--admin-server-name",
                   help="remote-admin: a host name the agent's admin.server_names holds")
    p.add_argument("--federated-td", help="federation: the federated trust domain")
    p.add_argument("--federated-bundle",
                   help="federation: the SPIFFE bundle file the agent was given for it")
    args = p.parse_args()
    args.socket = os.path.abspath(args.socket)
    args.admin_socket = os.path.abspath(args.admin_socket)

    def on_term(signum, _frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    if args.check == "all":
        return run_all(args)
    # Each check in its own interpreter: py-spiffe's generated workload.proto and ours would
    # clash in protobuf's default descriptor pool.
    return run_one(args.check, args)


if __name__ == "__main__":
    sys.exit(main())
