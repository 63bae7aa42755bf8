//! Federation against real files and a real HTTPS bundle endpoint.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{json, Value};
use spiffe::{SpiffeId, TrustDomain};
use tokio_util::sync::CancellationToken;

use super::testing::*;
use super::*;

const BOB: &str = "bob.example";
const ENDPOINT_ID: &str = "spiffe://bob.example/bundle-endpoint";
const QUICK: Duration = Duration::from_millis(100);

fn td(name: &str) -> TrustDomain {
    TrustDomain::new(name).unwrap()
}

/// Bob's trust domain: its root, a bundle endpoint serving as its SVID, the root as a PEM
/// bootstrap bundle on disk.
struct Bob {
    root: Vec<u8>,
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
    endpoint: TestEndpoint,
    bootstrap: PathBuf,
    _dir: tempfile::TempDir,
}

impl Bob {
    async fn new() -> Bob {
        let (root, issuer) = root(BOB);
        let endpoint = TestEndpoint::start(server_cert(&issuer, &[ENDPOINT_ID], &[])).await;
        let dir = tempfile::tempdir().unwrap();
        let bootstrap = dir.path().join("bob-bootstrap.pem");
        std::fs::write(&bootstrap, issuer.pem()).unwrap();
        Bob {
            root,
            issuer,
            endpoint,
            bootstrap,
            _dir: dir,
        }
    }

    /// Serves a bundle of Bob's root and JWT keys with these kids at `/bundle`.
    fn serve(&self, sequence: Option<u64>, kids: &[&str]) {
        let mut keys = vec![x509_jwk(&self.root)];
        keys.extend(kids.iter().map(|k| jwt_jwk(k)));
        self.endpoint
            .reply("/bundle", Reply::Bundle(document(keys, sequence)));
    }

    fn settings(&self, path: &str) -> FederationSettings {
        FederationSettings {
            trust_domain: td(BOB),
            source: BundleSource::Endpoint(EndpointSettings {
                url: self.endpoint.url("127.0.0.1", path),
                profile: EndpointProfile::HttpsSpiffe {
                    endpoint_spiffe_id: SpiffeId::new(ENDPOINT_ID).unwrap(),
                    bootstrap_bundle_file: Some(self.bootstrap.clone()),
                },
                refresh: Some(QUICK),
            }),
        }
    }

    fn tls(&self) -> Arc<ClientConfig> {
        let url = self.endpoint.url("127.0.0.1", "/");
        let id = SpiffeId::new(ENDPOINT_ID).unwrap();
        endpoint::spiffe_tls(&url, &id, std::slice::from_ref(&self.root)).unwrap()
    }

    /// A federation with Bob's `/bundle` endpoint, once it has fetched `sequence`.
    async fn run_until_fetched(&self, sequence: u64) -> Running {
        let running = run(vec![self.settings("/bundle")]);
        running
            .until(BOB, "the first fetch", |b| b.sequence == Some(sequence))
            .await;
        running
    }

    async fn fetch(&self, path: &str) -> Result<endpoint::Fetched, FetchError> {
        let url = self.endpoint.url("127.0.0.1", path);
        endpoint::fetch(&td(BOB), &url, self.tls(), Duration::from_secs(5)).await
    }
}

/// A federation running until dropped.
struct Running {
    federation: Arc<Federation>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn run(settings: Vec<FederationSettings>) -> Running {
    let federation = Federation::start_polling(settings, Duration::from_millis(20)).unwrap();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(federation.clone().run(shutdown.clone()));
    Running {
        federation,
        shutdown,
        task,
    }
}

impl Running {
    fn current(&self, name: &str) -> Option<Arc<FederatedBundle>> {
        self.federation.bundle(&td(name))
    }

    async fn until(&self, name: &str, what: &str, done: impl Fn(&FederatedBundle) -> bool) {
        eventually(what, || self.current(name).is_some_and(|b| done(&b))).await;
    }
}

fn kids(b: &FederatedBundle) -> Vec<&str> {
    b.jwt_keys
        .iter()
        .map(|k| k["kid"].as_str().unwrap())
        .collect()
}

#[tokio::test]
async fn https_spiffe_serves_the_bootstrap_bundle_until_the_first_fetch_replaces_it() {
    let bob = Bob::new().await;
    bob.serve(Some(1), &["k1"]);
    let fed = Federation::start(vec![bob.settings("/bundle")]).unwrap();
    assert!(!fed.is_empty());
    // Before any fetch: the bootstrap bundle, PEM roots only.
    let [bootstrap] = &fed.bundles()[..] else {
        panic!("{:?}", fed.bundles());
    };
    assert_eq!(bootstrap.x509_roots_der, vec![bob.root.clone()]);
    assert!(bootstrap.jwt_keys.is_empty());
    let mut changes = fed.subscribe();
    changes.borrow_and_update();

    let shutdown = CancellationToken::new();
    let task = tokio::spawn(fed.clone().run(shutdown.clone()));
    eventually("the first fetch", || {
        fed.bundle(&td(BOB)).is_some_and(|b| b.sequence == Some(1))
    })
    .await;
    let fetched = fed.bundle(&td(BOB)).unwrap();
    assert_eq!(kids(&fetched), ["k1"]);
    assert_eq!(fetched.x509_roots_der, vec![bob.root.clone()]);
    assert!(changes.has_changed().unwrap());

    // And it stops when told.
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(2), task)
        .await
        .expect("run ends at shutdown")
        .unwrap();
}

#[tokio::test]
async fn https_spiffe_refuses_a_wrong_id_or_another_root_and_keeps_the_last_good_bundle() {
    let bob = Bob::new().await;
    bob.serve(Some(1), &["k1"]);
    let running = bob.run_until_fetched(1).await;
    let mut changes = running.federation.subscribe();
    changes.borrow_and_update();

    // A newer bundle, behind certificates that must not be trusted.
    bob.serve(Some(2), &["k1", "k2"]);
    let (_, stranger) = root(BOB);
    for cert in [
        server_cert(&bob.issuer, &["spiffe://bob.example/not-the-endpoint"], &[]),
        server_cert(&stranger, &[ENDPOINT_ID], &[]),
        server_cert(&bob.issuer, &[], &["127.0.0.1"]),
    ] {
        bob.endpoint.set_cert(cert);
        bob.endpoint.wait_connections(2).await;
        assert_eq!(running.current(BOB).unwrap().sequence, Some(1));
        assert!(!changes.has_changed().unwrap());
    }

    bob.endpoint
        .set_cert(server_cert(&bob.issuer, &[ENDPOINT_ID], &[]));
    running
        .until(BOB, "the good endpoint again", |b| b.sequence == Some(2))
        .await;
    assert_eq!(kids(&running.current(BOB).unwrap()), ["k1", "k2"]);
    assert!(changes.has_changed().unwrap());
}

#[tokio::test]
async fn a_fetch_says_why_the_server_is_not_the_endpoint() {
    let bob = Bob::new().await;
    bob.serve(Some(1), &[]);
    assert_eq!(bob.fetch("/bundle").await.unwrap().bundle.sequence, Some(1));

    bob.endpoint.set_cert(server_cert(
        &bob.issuer,
        &["spiffe://bob.example/impostor"],
        &[],
    ));
    let err = bob.fetch("/bundle").await.unwrap_err().to_string();
    assert!(
        err.contains(
            "the server is spiffe://bob.example/impostor, not spiffe://bob.example/bundle-endpoint"
        ),
        "{err}"
    );
    let (_, stranger) = root(BOB);
    bob.endpoint
        .set_cert(server_cert(&stranger, &[ENDPOINT_ID], &[]));
    let err = bob.fetch("/bundle").await.unwrap_err();
    assert!(matches!(err, FetchError::Tls { .. }), "{err}");
    // Its issuer has the same name as Bob's root, but not its key.
    assert!(
        err.to_string().contains("InvalidSignatureForPublicKey"),
        "{err}"
    );

    // Without roots for the endpoint's trust domain there is nothing to trust.
    let url = bob.endpoint.url("127.0.0.1", "/bundle");
    let id = SpiffeId::new(ENDPOINT_ID).unwrap();
    let err = endpoint::spiffe_tls(&url, &id, &[]).unwrap_err();
    assert!(matches!(err, FetchError::NoRoots { .. }), "{err}");
}

#[tokio::test]
async fn https_web_checks_the_host_name_against_the_web_roots_file() {
    let (_, web_ca) = root("web-ca.example");
    let server = TestEndpoint::start(server_cert(&web_ca, &[], &["localhost"])).await;
    server.reply(
        "/bundle",
        Reply::Bundle(document(vec![jwt_jwk("w1")], Some(4))),
    );
    let dir = tempfile::tempdir().unwrap();
    let roots_file = dir.path().join("web-roots.pem");
    std::fs::write(&roots_file, web_ca.pem()).unwrap();
    let web = |url: url::Url| FederationSettings {
        trust_domain: td("web.example"),
        source: BundleSource::Endpoint(EndpointSettings {
            url,
            profile: EndpointProfile::HttpsWeb {
                web_roots_file: Some(roots_file.clone()),
            },
            refresh: Some(QUICK),
        }),
    };

    // The name in the URL is the name in the certificate: accepted.
    let running = run(vec![web(server.url("localhost", "/bundle"))]);
    assert!(
        running.federation.bundles().is_empty(),
        "nothing before the first fetch"
    );
    running
        .until("web.example", "the web fetch", |b| b.sequence == Some(4))
        .await;

    // The same server by an address its certificate does not name: refused.
    let tls = super::web_tls(Some(&roots_file)).unwrap();
    let err = endpoint::fetch(
        &td("web.example"),
        &server.url("127.0.0.1", "/bundle"),
        tls.clone(),
        Duration::from_secs(5),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, FetchError::Tls { .. }), "{err}");
    assert!(err.to_string().contains("not valid for name"), "{err}");
    let ok = endpoint::fetch(
        &td("web.example"),
        &server.url("localhost", "/bundle"),
        tls,
        Duration::from_secs(5),
    )
    .await;
    assert!(ok.is_ok(), "{ok:?}");

    // The built-in web roots do not know the test CA.
    let builtin = super::web_tls(None).unwrap();
    let err = endpoint::fetch(
        &td("web.example"),
        &server.url("localhost", "/bundle"),
        builtin,
        Duration::from_secs(5),
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("UnknownIssuer"), "{err}");
}

#[tokio::test]
async fn only_a_200_with_a_valid_bundle_of_at_most_one_mebibyte_is_taken() {
    let bob = Bob::new().await;
    bob.endpoint.reply("/gone", Reply::Status(404));
    bob.endpoint.reply("/error", Reply::Status(500));
    bob.endpoint.reply("/empty", Reply::Status(204));
    bob.endpoint.reply("/not-modified", Reply::Status(304));
    let mut huge = br#"{"keys": [], "padding": ""#.to_vec();
    huge.resize(MAX_BUNDLE_BYTES + 10, b'a');
    huge.extend_from_slice(br#""}"#);
    bob.endpoint.reply("/huge", Reply::Bundle(huge));
    bob.endpoint
        .reply("/html", Reply::Bundle(b"<html>moved</html>".to_vec()));
    bob.endpoint.reply(
        "/no-kid",
        Reply::Bundle(document(
            vec![json!({"use": "jwt-svid", "kty": "RSA", "n": "AQAB", "e": "AQAB"})],
            None,
        )),
    );
    for (path, status) in [
        ("/gone", 404),
        ("/error", 500),
        ("/empty", 204),
        ("/missing", 404),
    ] {
        match bob.fetch(path).await {
            Err(FetchError::Status { status: got, url }) => {
                assert_eq!(got, status);
                assert!(url.ends_with(path), "{url}");
            }
            other => panic!("{path}: {other:?}"),
        }
    }
    assert!(matches!(
        bob.fetch("/not-modified").await,
        Err(FetchError::Status { status: 304, .. })
    ));
    let err = bob.fetch("/huge").await.unwrap_err();
    assert!(matches!(err, FetchError::TooLarge { .. }), "{err}");
    for path in ["/html", "/no-kid"] {
        let err = bob.fetch(path).await.unwrap_err();
        assert!(matches!(err, FetchError::Bundle { .. }), "{err}");
        assert!(err.to_string().contains(path), "the URL is named: {err}");
    }

    // Through `run`: the last good bundle stays.
    bob.serve(Some(1), &["k1"]);
    let running = run(vec![bob.settings("/bundle")]);
    running
        .until(BOB, "the good bundle", |b| b.sequence == Some(1))
        .await;
    bob.endpoint.reply("/bundle", Reply::Status(404));
    bob.endpoint.wait_connections(2).await;
    assert_eq!(running.current(BOB).unwrap().sequence, Some(1));
}

#[tokio::test]
async fn redirects_are_followed_to_valid_bundle_endpoint_urls_only() {
    let bob = Bob::new().await;
    bob.serve(Some(1), &[]);
    let port = bob.endpoint.addr.port();
    let ep = &bob.endpoint;
    ep.reply("/relative", Reply::Redirect(302, "/bundle".into()));
    ep.reply(
        "/absolute",
        Reply::Redirect(308, format!("https://127.0.0.1:{port}/bundle#frag")),
    );
    ep.reply("/twice", Reply::Redirect(301, "/relative".into()));
    ep.reply(
        "/plain-http",
        Reply::Redirect(302, format!("http://127.0.0.1:{port}/bundle")),
    );
    ep.reply(
        "/userinfo",
        Reply::Redirect(307, format!("https://me:pw@127.0.0.1:{port}/bundle")),
    );
    ep.reply("/loop", Reply::Redirect(302, "/loop".into()));
    ep.reply("/no-location", Reply::Status(302));

    for path in ["/relative", "/absolute", "/twice"] {
        let fetched = bob.fetch(path).await.unwrap();
        assert_eq!(fetched.bundle.sequence, Some(1));
        assert_eq!(
            fetched.from.as_str(),
            format!("https://127.0.0.1:{port}/bundle")
        );
    }
    for (path, expect) in [
        ("/plain-http", "must be https"),
        ("/userinfo", "userinfo"),
        ("/loop", "more than 5 redirects"),
        ("/no-location", "without a readable Location"),
    ] {
        let err = bob.fetch(path).await.unwrap_err();
        assert!(matches!(err, FetchError::Redirect { .. }), "{path}: {err}");
        assert!(err.to_string().contains(expect), "{path}: {err}");
    }

    // The target must pass the same TLS checks: here an SVID for another ID.
    let elsewhere =
        TestEndpoint::start(server_cert(&bob.issuer, &["spiffe://bob.example/cdn"], &[])).await;
    elsewhere.reply("/bundle", Reply::Bundle(document(vec![], Some(9))));
    ep.reply(
        "/away",
        Reply::Redirect(307, elsewhere.url("127.0.0.1", "/bundle").to_string()),
    );
    let err = bob.fetch("/away").await.unwrap_err();
    assert!(matches!(err, FetchError::Tls { .. }), "{err}");

    // A redirect is never remembered: the next poll asks the configured URL again.
    let running = run(vec![bob.settings("/relative")]);
    running
        .until(BOB, "the redirected fetch", |b| b.sequence == Some(1))
        .await;
    ep.reply(
        "/relative",
        Reply::Bundle(document(
            vec![x509_jwk(&bob.root), jwt_jwk("direct")],
            Some(2),
        )),
    );
    running
        .until(BOB, "the configured URL", |b| b.sequence == Some(2))
        .await;
}

#[tokio::test]
async fn an_older_sequence_is_refused_and_a_bundle_without_one_is_the_latest() {
    let bob = Bob::new().await;
    bob.serve(Some(5), &["k5"]);
    let running = bob.run_until_fetched(5).await;

    bob.serve(Some(3), &["k3"]);
    bob.endpoint.wait_connections(2).await;
    assert_eq!(kids(&running.current(BOB).unwrap()), ["k5"]);

    bob.serve(None, &["unsequenced"]);
    running
        .until(BOB, "the bundle without a sequence", |b| {
            kids(b) == ["unsequenced"]
        })
        .await;
    // After which any sequence is newer.
    bob.serve(Some(1), &["k1"]);
    running
        .until(BOB, "sequence 1", |b| b.sequence == Some(1))
        .await;
}

#[tokio::test]
async fn the_watch_changes_only_when_the_keys_do() {
    let bob = Bob::new().await;
    let a = jwt_jwk("a");
    let b = jwt_jwk("b");
    let serve = |seq, keys: Vec<Value>| {
        bob.endpoint
            .reply("/bundle", Reply::Bundle(document(keys, Some(seq))));
    };
    serve(1, vec![x509_jwk(&bob.root), a.clone(), b.clone()]);
    let running = bob.run_until_fetched(1).await;
    let mut changes = running.federation.subscribe();
    changes.borrow_and_update();

    // The same bundle, polled again and again.
    bob.endpoint.wait_connections(3).await;
    assert!(!changes.has_changed().unwrap());
    // The same keys in another order under a new sequence number: stored, not announced.
    serve(2, vec![b.clone(), a.clone(), x509_jwk(&bob.root)]);
    running
        .until(BOB, "sequence 2", |b| b.sequence == Some(2))
        .await;
    assert!(!changes.has_changed().unwrap());
    // A key less: announced, once.
    serve(3, vec![x509_jwk(&bob.root), a]);
    running
        .until(BOB, "sequence 3", |b| b.sequence == Some(3))
        .await;
    assert!(changes.has_changed().unwrap());
    let seen = *changes.borrow_and_update();
    bob.endpoint.wait_connections(3).await;
    assert_eq!(*changes.borrow(), seen);
}

fn file_settings(name: &str, path: PathBuf) -> FederationSettings {
    FederationSettings {
        trust_domain: td(name),
        source: BundleSource::File(path),
    }
}

/// Several looks of a 20 ms file poll.
async fn a_few_polls() {
    tokio::time::sleep(Duration::from_millis(150)).await;
}

#[tokio::test]
async fn a_bundle_file_replaced_in_place_is_picked_up_and_a_broken_one_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("partner.json");
    let (r, _) = root("partner.example");
    let doc = |seq: u64, kid: &str| document(vec![x509_jwk(&r), jwt_jwk(kid)], Some(seq));
    std::fs::write(&path, doc(1, "one")).unwrap();
    let running = run(vec![file_settings("partner.example", path.clone())]);
    assert_eq!(
        running.current("partner.example").unwrap().sequence,
        Some(1)
    );
    let mut changes = running.federation.subscribe();
    changes.borrow_and_update();

    std::fs::write(&path, doc(2, "two")).unwrap();
    running
        .until("partner.example", "the rewritten file", |b| {
            b.sequence == Some(2)
        })
        .await;
    assert!(changes.has_changed().unwrap());
    changes.borrow_and_update();

    // Broken, truncated, gone: the last good bundle stays, and nothing is announced.
    for broken in [
        &b"{\"keys\": [{"[..],
        b"",
        b"-----BEGIN CERTIFICATE-----\nAAAA\n",
    ] {
        std::fs::write(&path, broken).unwrap();
        a_few_polls().await;
        assert_eq!(
            running.current("partner.example").unwrap().sequence,
            Some(2)
        );
    }
    std::fs::remove_file(&path).unwrap();
    a_few_polls().await;
    assert_eq!(
        running.current("partner.example").unwrap().sequence,
        Some(2)
    );
    assert!(!changes.has_changed().unwrap());

    // A local update is the latest bundle (Federation §4.2), whatever its sequence.
    std::fs::write(&path, doc(1, "older-but-local")).unwrap();
    running
        .until("partner.example", "the restored file", |b| {
            kids(b) == ["older-but-local"]
        })
        .await;
    assert!(changes.has_changed().unwrap());
}

#[tokio::test]
async fn a_bundle_file_swapped_by_symlink_as_kubernetes_does_is_picked_up() {
    // A ConfigMap volume: bundle.json -> ..data/bundle.json, ..data -> ..<timestamp>/, and
    // an update renames a new ..data link over the old one.
    let dir = tempfile::tempdir().unwrap();
    let (r1, i1) = root("partner.example");
    let (r2, i2) = root("partner.example");
    let version = |name: &str, pem: String| {
        let v = dir.path().join(name);
        std::fs::create_dir(&v).unwrap();
        std::fs::write(v.join("bundle.pem"), pem).unwrap();
    };
    version("..2026_07_01", i1.pem());
    std::os::unix::fs::symlink("..2026_07_01", dir.path().join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/bundle.pem", dir.path().join("bundle.pem")).unwrap();

    let running = run(vec![file_settings(
        "partner.example",
        dir.path().join("bundle.pem"),
    )]);
    assert_eq!(
        running.current("partner.example").unwrap().x509_roots_der,
        vec![r1]
    );
    let mut changes = running.federation.subscribe();
    changes.borrow_and_update();

    // A resync that changes nothing: the same contents behind a new link.
    version("..2026_07_02", i1.pem());
    std::os::unix::fs::symlink("..2026_07_02", dir.path().join("..data_tmp")).unwrap();
    std::fs::rename(dir.path().join("..data_tmp"), dir.path().join("..data")).unwrap();
    a_few_polls().await;
    assert!(!changes.has_changed().unwrap());

    version("..2026_07_03", i2.pem());
    std::os::unix::fs::symlink("..2026_07_03", dir.path().join("..data_tmp")).unwrap();
    std::fs::rename(dir.path().join("..data_tmp"), dir.path().join("..data")).unwrap();
    running
        .until("partner.example", "the swapped file", |b| {
            b.x509_roots_der == [r2.clone()]
        })
        .await;
    assert!(changes.has_changed().unwrap());
}

#[tokio::test]
async fn start_reads_every_file_now_and_names_a_broken_one() {
    assert!(Federation::start(vec![]).unwrap().is_empty());
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.json");
    let err = Federation::start(vec![file_settings("a.example", missing.clone())]).unwrap_err();
    assert!(matches!(err, FederationError::Read { .. }), "{err}");
    assert!(err.to_string().contains("missing.json"), "{err}");

    let broken = dir.path().join("broken.json");
    std::fs::write(&broken, "{\"keys\": 1}").unwrap();
    let err = Federation::start(vec![file_settings("a.example", broken.clone())]).unwrap_err();
    assert!(matches!(err, FederationError::File { .. }), "{err}");
    assert!(
        err.to_string().starts_with(&broken.display().to_string()),
        "{err}"
    );

    let mut bob = Bob::new().await;
    bob.bootstrap = broken.clone();
    let err = Federation::start(vec![bob.settings("/bundle")]).unwrap_err();
    assert!(err.to_string().contains("broken.json"), "{err}");

    let web = FederationSettings {
        trust_domain: td("web.example"),
        source: BundleSource::Endpoint(EndpointSettings {
            url: url::Url::parse("https://bundles.web.example/b").unwrap(),
            profile: EndpointProfile::HttpsWeb {
                web_roots_file: Some(broken),
            },
            refresh: None,
        }),
    };
    let err = Federation::start(vec![web]).unwrap_err();
    assert!(matches!(err, FederationError::WebRoots { .. }), "{err}");
    assert!(err.to_string().contains("web_roots_file") && err.to_string().contains("broken.json"));
}

#[tokio::test]
async fn a_non_self_serving_endpoint_is_authenticated_with_its_trust_domains_bundle() {
    // Federation §5.2.2.2 figure 4: example.com's endpoint serves prod.example's bundle too.
    let (hub_root, hub) = root("example.com");
    let (prod_root, _) = root("prod.example");
    let hub_id = "spiffe://example.com/bundle-server";
    let server = TestEndpoint::start(server_cert(&hub, &[hub_id], &[])).await;
    server.reply(
        "/hub",
        Reply::Bundle(document(vec![x509_jwk(&hub_root)], Some(1))),
    );
    server.reply(
        "/prod",
        Reply::Bundle(document(vec![x509_jwk(&prod_root), jwt_jwk("p")], Some(1))),
    );
    let dir = tempfile::tempdir().unwrap();
    let bootstrap = dir.path().join("hub.pem");
    std::fs::write(&bootstrap, hub.pem()).unwrap();
    let endpoint = |name: &str, path: &str, bootstrap: Option<PathBuf>| FederationSettings {
        trust_domain: td(name),
        source: BundleSource::Endpoint(EndpointSettings {
            url: server.url("127.0.0.1", path),
            profile: EndpointProfile::HttpsSpiffe {
                endpoint_spiffe_id: SpiffeId::new(hub_id).unwrap(),
                bootstrap_bundle_file: bootstrap,
            },
            refresh: Some(QUICK),
        }),
    };
    let running = run(vec![
        endpoint("prod.example", "/prod", None),
        endpoint("example.com", "/hub", Some(bootstrap)),
    ]);
    running
        .until("prod.example", "prod.example's bundle", |b| {
            b.x509_roots_der == [prod_root.clone()] && kids(b) == ["p"]
        })
        .await;
    let names: Vec<String> = running
        .federation
        .bundles()
        .iter()
        .map(|b| b.trust_domain.to_string())
        .collect();
    assert_eq!(
        names,
        ["example.com", "prod.example"],
        "sorted by trust domain"
    );
}

#[tokio::test]
async fn run_ends_at_shutdown_even_mid_fetch() {
    // An endpoint that accepts connections and never answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let _hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((tcp, _)) = listener.accept().await {
            held.push(tcp);
        }
    });
    let bob = Bob::new().await;
    let mut settings = bob.settings("/bundle");
    if let BundleSource::Endpoint(e) = &mut settings.source {
        e.url = url::Url::parse(&format!("https://127.0.0.1:{port}/bundle")).unwrap();
    }
    let mut running = run(vec![settings]);
    tokio::time::sleep(Duration::from_millis(50)).await;
    running.shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(2), &mut running.task)
        .await
        .expect("run ends at shutdown")
        .unwrap();
}

#[tokio::test]
async fn https_spiffe_authenticates_with_the_latest_fetched_bundle() {
    // Federation §5.2.2.4: after the bootstrap, "the latest available bundle MUST be used".
    let bob = Bob::new().await;
    let (new_root, new_issuer) = root(BOB);
    let both = vec![x509_jwk(&bob.root), x509_jwk(&new_root)];
    bob.endpoint
        .reply("/bundle", Reply::Bundle(document(both, Some(1))));
    let running = bob.run_until_fetched(1).await;

    // The endpoint moves to the new root, which only the fetched bundle has.
    bob.endpoint
        .set_cert(server_cert(&new_issuer, &[ENDPOINT_ID], &[]));
    bob.endpoint.reply(
        "/bundle",
        Reply::Bundle(document(vec![x509_jwk(&new_root)], Some(2))),
    );
    running
        .until(BOB, "the rotated bundle", |b| b.sequence == Some(2))
        .await;

    // The old root is gone from the latest bundle: a certificate from it is no longer trusted,
    // although the bootstrap bundle had it.
    bob.endpoint
        .set_cert(server_cert(&bob.issuer, &[ENDPOINT_ID], &[]));
    bob.endpoint.reply(
        "/bundle",
        Reply::Bundle(document(vec![x509_jwk(&bob.root)], Some(3))),
    );
    bob.endpoint.wait_connections(2).await;
    assert_eq!(running.current(BOB).unwrap().sequence, Some(2));
}

#[tokio::test]
async fn an_empty_bundle_revokes_every_key_and_is_served() {
    // Trust Domain and Bundle §4.1.3: an empty key set means every key is revoked.
    let bob = Bob::new().await;
    bob.serve(Some(1), &["k1"]);
    let running = bob.run_until_fetched(1).await;
    bob.endpoint
        .reply("/bundle", Reply::Bundle(document(vec![], Some(2))));
    running
        .until(BOB, "the empty bundle", |b| b.sequence == Some(2))
        .await;
    let revoked = running.current(BOB).unwrap();
    assert!(revoked.x509_roots_der.is_empty() && revoked.jwt_keys.is_empty());
    assert_eq!(revoked.jwks_document(), br#"{"keys":[]}"#);
    // With no roots left, the self-serving endpoint cannot be authenticated any more: what
    // it serves next is not taken (a few refresh intervals pass), until re-bootstrapped.
    bob.serve(Some(3), &["k3"]);
    tokio::time::sleep(3 * QUICK).await;
    assert_eq!(running.current(BOB).unwrap().sequence, Some(2));
    let url = bob.endpoint.url("127.0.0.1", "/bundle");
    let id = SpiffeId::new(ENDPOINT_ID).unwrap();
    let roots = revoked.x509_roots_der.clone();
    assert!(matches!(
        endpoint::spiffe_tls(&url, &id, &roots),
        Err(FetchError::NoRoots { .. })
    ));
}
