//! The embedded CA: a self-signed root the agent makes itself, kept under `<data_dir>/ca/`, and
//! rotated with overlap so that no relying party ever meets a root it has not been given.
//!
//! 1. **Active**: signs every SVID. Created on first start.
//! 2. **Next**: at `prepare_at` of the active root's life a new root is made, persisted and
//!    published in the bundle. It signs nothing yet, so every relying party that follows the
//!    bundle learns it before meeting a certificate it signed.
//! 3. At `activate_at` of the active root's life (and never sooner after publication than the
//!    gap between the two fractions, nor later than the active root's end) the next root
//!    becomes active, and the old one is **retired**: it signs nothing more, but its root stays
//!    in the bundle until the last SVID it signed has expired.
//! 4. Then it is **removed** from the bundle.
//!
//! Everything lives in one file, `authorities.json` (mode 0600, replaced atomically), so a crash
//! leaves the old set or the new one, never half a rotation. Every change is persisted before
//! it is published. A data dir from before rotation (`ca.pem` and `ca.key`) is taken over on
//! first start.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::string::Ia5String;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyPair, KeyUsagePurpose,
    SanType, SerialNumber, PKCS_ECDSA_P256_SHA256,
};
use serde::{Deserialize, Serialize};
use spiffe::TrustDomain;
use zeroize::Zeroizing;

use super::files::{
    create_private_dir, exists, parse_certs_pem, parse_key_pem, read_certs_pem, read_key_pem,
    read_secret, warn_if_key_readable_by_others, write_atomic,
};
use super::issue::random_serial;
use super::{odt, unix_secs, CaError, CaEvent, CaInfo, CertFile, SigningCa, BACKDATE, SUBJECT_ORG};

/// Sub-directory of the data dir that holds the embedded CA.
const CA_DIR: &str = "ca";
const STATE_FILE: &str = "authorities.json";
/// The layout before rotation: one root, two files.
const LEGACY_CERT_FILE: &str = "ca.pem";
const LEGACY_KEY_FILE: &str = "ca.key";

/// When the embedded CA rotates.
#[derive(Clone, Debug)]
pub struct RotationPolicy {
    /// Each root's lifetime.
    pub ttl: Duration,
    /// The share of the active root's life after which the next one is made and published.
    pub prepare_at: f64,
    /// The share after which the next one signs instead.
    pub activate_at: f64,
    /// The longest SVID lifetime: how long a retired root may still be needed.
    pub max_svid_ttl: Duration,
}

impl RotationPolicy {
    pub const DEFAULT_PREPARE_AT: f64 = 0.5;
    pub const DEFAULT_ACTIVATE_AT: f64 = 0.75;

    /// The default shares for roots living `ttl`.
    pub fn with_ttl(ttl: Duration) -> RotationPolicy {
        RotationPolicy {
            ttl,
            prepare_at: Self::DEFAULT_PREPARE_AT,
            activate_at: Self::DEFAULT_ACTIVATE_AT,
            max_svid_ttl: Duration::from_secs(3600),
        }
    }
}

/// A root that signs, or will.
#[derive(Clone)]
struct Authority {
    ca: Arc<SigningCa>,
    cert_pem: String,
    key_pem: Zeroizing<String>,
    created_at: SystemTime,
}

impl Authority {
    fn life(&self) -> Duration {
        self.ca
            .not_after()
            .duration_since(self.created_at)
            .unwrap_or_default()
    }

    fn at_share(&self, share: f64) -> SystemTime {
        self.created_at + self.life().mul_f64(share)
    }
}

/// A root that signs no more but is still served.
#[derive(Clone)]
struct Retired {
    info: CaInfo,
    root_der: Vec<u8>,
    cert_pem: String,
    keep_until: SystemTime,
}

/// The embedded CA's roots: one active, perhaps a next, and the retired ones still served.
#[derive(Clone)]
pub struct EmbeddedCa {
    dir: PathBuf,
    trust_domain: TrustDomain,
    policy: RotationPolicy,
    active: Authority,
    next: Option<Authority>,
    retired: Vec<Retired>,
    /// What loading changed (a root made, or one that expired while the agent was down
    /// replaced): reported by the first `maintain`.
    startup: Vec<CaEvent>,
}

/// `authorities.json` as written.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFile {
    version: u32,
    active: StoredAuthority,
    next: Option<StoredAuthority>,
    #[serde(default)]
    retired: Vec<StoredRetired>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredAuthority {
    cert: String,
    key: String,
    created_at_ms: u64,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredRetired {
    cert: String,
    keep_until_ms: u64,
}

impl EmbeddedCa {
    /// Loads the embedded CA from `<data_dir>/ca/`, taking over a pre-rotation `ca.pem` and
    /// `ca.key`, or creates the first root. Roots that expired while the agent was down are
    /// replaced by a new one (`maintain` reports it).
    pub fn load_or_create(
        data_dir: &Path,
        trust_domain: &TrustDomain,
        policy: RotationPolicy,
    ) -> Result<EmbeddedCa, CaError> {
        let dir = data_dir.join(CA_DIR);
        let file = dir.join(STATE_FILE);
        if exists(&file)? {
            let ca = Self::load(dir, trust_domain, policy)?;
            tracing::info!(path = %file.display(), "loaded embedded CA");
            return Ok(ca);
        }
        let cert_path = dir.join(LEGACY_CERT_FILE);
        let key_path = dir.join(LEGACY_KEY_FILE);
        let mut startup = Vec::new();
        // The certificate was written last, so its presence marks a complete CA. A key without
        // a certificate is debris of an interrupted first start and gets replaced; a
        // certificate without its key is a lost CA that must not be silently replaced.
        let active = if exists(&cert_path)? {
            if !exists(&key_path)? {
                return Err(CaError::BadFile {
                    path: key_path,
                    problem: format!(
                        "missing, but CA certificate {} exists; restore the key or remove the \
                         certificate to create a new CA",
                        cert_path.display()
                    ),
                });
            }
            warn_if_key_readable_by_others(&key_path);
            let mut certs = read_certs_pem(&cert_path)?;
            if certs.len() != 1 {
                return Err(CaError::BadFile {
                    path: cert_path,
                    problem: format!("expected one CERTIFICATE block, found {}", certs.len()),
                });
            }
            let cert = certs.remove(0);
            let cert_pem = pem::encode(&pem::Pem::new("CERTIFICATE", cert.der.clone()));
            let key = read_key_pem(&key_path)?;
            let key_pem = Zeroizing::new(key.serialize_pem());
            let created_at = not_before_of(&cert.der) + BACKDATE;
            let ca = SigningCa::assemble(trust_domain, cert, &key_path, key, vec![], None)?;
            tracing::info!(cert = %cert_path.display(), path = %file.display(),
                "taking over the embedded CA into its rotation file");
            Authority {
                ca: Arc::new(ca),
                cert_pem,
                key_pem,
                created_at,
            }
        } else {
            let a = create_root(&dir, trust_domain, policy.ttl)?;
            tracing::info!(path = %file.display(), "created embedded CA");
            startup = first_root_events(&a);
            a
        };
        let ca = EmbeddedCa {
            dir,
            trust_domain: trust_domain.clone(),
            policy,
            active,
            next: None,
            retired: Vec::new(),
            startup,
        };
        create_private_dir(&ca.dir)?;
        ca.persist()?;
        for legacy in [cert_path, key_path] {
            if let Err(cause) = std::fs::remove_file(&legacy) {
                if cause.kind() != std::io::ErrorKind::NotFound {
                    return Err(CaError::Io {
                        op: "remove",
                        path: legacy,
                        cause,
                    });
                }
            }
        }
        Ok(ca)
    }

    fn load(
        dir: PathBuf,
        trust_domain: &TrustDomain,
        policy: RotationPolicy,
    ) -> Result<EmbeddedCa, CaError> {
        let path = dir.join(STATE_FILE);
        warn_if_key_readable_by_others(&path);
        let data = read_secret(&path)?;
        let bad = |problem: String| CaError::BadFile {
            path: path.clone(),
            problem,
        };
        let stored: StateFile =
            serde_json::from_slice(&data).map_err(|e| bad(format!("not a CA state file: {e}")))?;
        if stored.version != 1 {
            return Err(bad(format!("unknown version {}", stored.version)));
        }
        let now = SystemTime::now();
        let mut retired = Vec::new();
        let mut expired = Vec::new();
        for r in stored.retired {
            let mut certs = parse_certs_pem(&path, r.cert.as_bytes())?;
            if certs.len() != 1 {
                return Err(bad("a retired root is not one certificate".into()));
            }
            let der = certs.remove(0).der;
            retired.push(Retired {
                info: CaInfo::of_cert(&der),
                root_der: der,
                cert_pem: r.cert,
                keep_until: from_ms(r.keep_until_ms),
            });
        }
        // A root that expired while the agent was down can sign nothing: it is retired at
        // once, and `maintain` makes a new one.
        let mut load = |s: StoredAuthority| -> Result<Option<Authority>, CaError> {
            let key_pem = Zeroizing::new(s.key);
            let mut certs = parse_certs_pem(&path, s.cert.as_bytes())?;
            if certs.len() != 1 {
                return Err(bad("an authority is not one certificate".into()));
            }
            let cert = certs.remove(0);
            if not_after_of(&cert.der) <= now {
                expired.push(CaEvent::Retired {
                    ca: CaInfo::of_cert(&cert.der),
                    in_bundle_until: now,
                });
                retired.push(Retired {
                    info: CaInfo::of_cert(&cert.der),
                    root_der: cert.der,
                    cert_pem: s.cert,
                    keep_until: now,
                });
                return Ok(None);
            }
            let key = parse_key_pem(&path, key_pem.as_bytes())?;
            let ca = SigningCa::assemble(trust_domain, cert, &path, key, vec![], None)?;
            Ok(Some(Authority {
                ca: Arc::new(ca),
                cert_pem: s.cert,
                key_pem,
                created_at: from_ms(s.created_at_ms),
            }))
        };
        let active = load(stored.active)?;
        let next = match stored.next {
            Some(n) => load(n)?,
            None => None,
        };
        let (active, next, mut startup) = match (active, next) {
            (Some(a), n) => (a, n, Vec::new()),
            // The next root was published: it may sign at once.
            (None, Some(n)) => {
                let activated = vec![CaEvent::Activated(CaInfo::of(&n.ca))];
                (n, None, activated)
            }
            (None, None) => {
                let a = create_root(&dir, trust_domain, policy.ttl)?;
                let events = first_root_events(&a);
                (a, None, events)
            }
        };
        startup.extend(expired);
        let ca = EmbeddedCa {
            dir,
            trust_domain: trust_domain.clone(),
            policy,
            active,
            next,
            retired,
            startup,
        };
        ca.persist()?;
        Ok(ca)
    }

    /// The CA that signs now.
    pub fn signer(&self) -> Arc<SigningCa> {
        self.active.ca.clone()
    }

    /// Roots served beside the signer's: the next one's, then the retired ones'.
    pub fn also_trusted(&self) -> Vec<Vec<u8>> {
        let next = self.next.iter().map(|n| n.ca.roots_der()[0].clone());
        next.chain(self.retired.iter().map(|r| r.root_der.clone()))
            .collect()
    }

    /// The signer, for callers that want only it (tests and tools).
    pub fn into_signer(self) -> Arc<SigningCa> {
        self.active.ca
    }

    /// When `maintain` next has something to do.
    pub fn next_due(&self) -> SystemTime {
        if !self.startup.is_empty() {
            return UNIX_EPOCH;
        }
        let step = match &self.next {
            None => self.active.at_share(self.policy.prepare_at),
            Some(next) => self.activation_time(next),
        };
        self.retired
            .iter()
            .map(|r| r.keep_until)
            .fold(step, SystemTime::min)
    }

    /// When the next root is due to sign (or would be, once prepared).
    pub fn next_activation(&self) -> SystemTime {
        match &self.next {
            Some(next) => self.activation_time(next),
            None => self.active.at_share(self.policy.activate_at),
        }
    }

    fn activation_time(&self, next: &Authority) -> SystemTime {
        let gap = self
            .active
            .life()
            .mul_f64(self.policy.activate_at - self.policy.prepare_at);
        self.active
            .at_share(self.policy.activate_at)
            .max(next.created_at + gap)
            .min(self.active.ca.not_after())
    }

    /// Does what is due at `now`: prepare and publish the next root, activate it, remove
    /// retired roots whose SVIDs have all expired. Persists before it returns what changed;
    /// on an error nothing has changed, and the same is due again.
    pub fn maintain(&mut self, now: SystemTime) -> Result<Vec<CaEvent>, CaError> {
        let mut work = self.clone();
        let (events, changed) = work.step(now)?;
        if changed {
            work.persist()?;
        }
        *self = work;
        Ok(events)
    }

    fn step(&mut self, now: SystemTime) -> Result<(Vec<CaEvent>, bool), CaError> {
        // Loading persisted what it changed already.
        let mut events = std::mem::take(&mut self.startup);
        let before = self.retired.len();
        self.retired.retain(|r| {
            let keep = r.keep_until > now;
            if !keep {
                events.push(CaEvent::Removed(r.info.clone()));
            }
            keep
        });
        let mut changed = self.retired.len() != before;
        if self.next.is_none() && now >= self.active.at_share(self.policy.prepare_at) {
            let next = create_root(&self.dir, &self.trust_domain, self.policy.ttl)?;
            let info = CaInfo::of(&next.ca);
            self.next = Some(next);
            events.push(CaEvent::Prepared(info.clone()));
            events.push(CaEvent::Published(info));
            changed = true;
        }
        if let Some(next) = self.next.take() {
            if now >= self.activation_time(&next) {
                let old = std::mem::replace(&mut self.active, next);
                let keep_until = retire_until(&old.ca, now, self.policy.max_svid_ttl);
                let info = CaInfo::of(&old.ca);
                events.push(CaEvent::Activated(CaInfo::of(&self.active.ca)));
                events.push(CaEvent::Retired {
                    ca: info.clone(),
                    in_bundle_until: keep_until,
                });
                self.retired.push(Retired {
                    info,
                    root_der: old.ca.roots_der()[0].clone(),
                    cert_pem: old.cert_pem.clone(),
                    keep_until,
                });
                changed = true;
            } else {
                self.next = Some(next);
            }
        }
        Ok((events, changed))
    }

    fn persist(&self) -> Result<(), CaError> {
        let stored = |a: &Authority| StoredAuthority {
            cert: a.cert_pem.clone(),
            key: a.key_pem.to_string(),
            created_at_ms: ms(a.created_at),
        };
        let mut file = StateFile {
            version: 1,
            active: stored(&self.active),
            next: self.next.as_ref().map(stored),
            retired: self
                .retired
                .iter()
                .map(|r| StoredRetired {
                    cert: r.cert_pem.clone(),
                    keep_until_ms: ms(r.keep_until),
                })
                .collect(),
        };
        let json = serde_json::to_vec_pretty(&file).map(Zeroizing::new);
        // The copies of the keys made for writing are wiped too.
        use zeroize::Zeroize;
        file.active.key.zeroize();
        if let Some(n) = &mut file.next {
            n.key.zeroize();
        }
        let json = json.map_err(|e| CaError::Create(format!("encoding the CA state: {e}")))?;
        write_atomic(&self.dir.join(STATE_FILE), &json, 0o600)
    }
}

/// A root made at start signs at once: nothing was served before it.
fn first_root_events(a: &Authority) -> Vec<CaEvent> {
    let info = CaInfo::of(&a.ca);
    vec![
        CaEvent::Prepared(info.clone()),
        CaEvent::Published(info.clone()),
        CaEvent::Activated(info),
    ]
}

/// A retired CA's root stays until every SVID it signed has expired: the latest it signed,
/// or the longest an SVID signed just now could live, and never past its own end.
pub(super) fn retire_until(ca: &SigningCa, now: SystemTime, max_svid_ttl: Duration) -> SystemTime {
    let latest = ca.latest_leaf_not_after().unwrap_or(now);
    latest.max(now + max_svid_ttl).min(ca.not_after())
}

fn ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn from_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

fn not_before_of(der: &[u8]) -> SystemTime {
    x509_parser::parse_x509_certificate(der).map_or(UNIX_EPOCH, |(_, x)| {
        super::from_unix(x.validity().not_before.timestamp())
    })
}

fn not_after_of(der: &[u8]) -> SystemTime {
    x509_parser::parse_x509_certificate(der).map_or(UNIX_EPOCH, |(_, x)| {
        super::from_unix(x.validity().not_after.timestamp())
    })
}

/// Makes a self-signed ECDSA P-256 root living `ttl`.
fn create_root(
    dir: &Path,
    trust_domain: &TrustDomain,
    ttl: Duration,
) -> Result<Authority, CaError> {
    let err = |e: String| CaError::Create(e);
    let now = SystemTime::now();
    let nb = unix_secs(now.checked_sub(BACKDATE).unwrap_or(UNIX_EPOCH));
    let na = unix_secs(now)
        .checked_add(ttl.as_secs())
        .ok_or_else(|| err(format!("ca_ttl {ttl:?} is too large")))?;
    let mut params = CertificateParams::default();
    params.not_before = odt(nb).map_err(err)?;
    params.not_after = odt(na).map_err(|e| err(format!("ca_ttl {ttl:?}: {e}")))?;
    let serial = random_serial().map_err(err)?;
    params.serial_number = Some(SerialNumber::from_slice(&serial));
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, SUBJECT_ORG);
    // Each root has a name of its own, so relying parties never confuse two of them.
    dn.push(
        DnType::CommonName,
        format!("mayfly {trust_domain} root {}", &hex::encode(serial)[..8]),
    );
    params.distinguished_name = dn;
    // §3 (signing certificates) allows a signing certificate to carry the trust domain's
    // SPIFFE ID (no path); it tells operators what it signs.
    let uri = Ia5String::try_from(trust_domain.id_string()).map_err(|e| err(e.to_string()))?;
    params.subject_alt_names = vec![SanType::URI(uri)];
    // §4.1: signing certificates have cA=true. The root signs leaves only, so pathLen 0
    // forbids anyone from hanging intermediates off it.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    // §4.3: signing certificates must set keyCertSign and may set cRLSign.
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let key =
        KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| err(format!("key: {e}")))?;
    let cert = params
        .self_signed(&key)
        .map_err(|e| err(format!("self-signing: {e}")))?;
    let key_pem = Zeroizing::new(key.serialize_pem());
    let file = CertFile {
        path: dir.join(STATE_FILE),
        der: cert.der().to_vec(),
    };
    let ca = SigningCa::assemble(trust_domain, file, &dir.join(STATE_FILE), key, vec![], None)?;
    Ok(Authority {
        ca: Arc::new(ca),
        cert_pem: cert.pem(),
        key_pem,
        created_at: now,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authority::x509::chain::subject_key_id;
    use crate::authority::x509::test_support::*;
    use std::fs;
    use std::os::unix::fs::PermissionsExt;
    use x509_parser::extensions::GeneralName;

    fn policy() -> RotationPolicy {
        RotationPolicy {
            max_svid_ttl: Duration::from_secs(600),
            ..RotationPolicy::with_ttl(TTL)
        }
    }

    fn load(dir: &Path) -> EmbeddedCa {
        EmbeddedCa::load_or_create(dir, &td(), policy()).unwrap()
    }

    /// A CA whose start-up (a root made) has been reported.
    fn fresh(dir: &Path) -> EmbeddedCa {
        let mut ca = load(dir);
        ca.startup.clear();
        ca
    }

    #[test]
    fn a_first_root_is_reported_once_as_prepared_published_and_activated() {
        let tmp = tempfile::tempdir().unwrap();
        let mut ca = load(tmp.path());
        assert!(ca.next_due() <= SystemTime::now(), "due at once");
        let now = SystemTime::now();
        assert_eq!(
            names(&ca.maintain(now).unwrap()),
            ["prepared", "published", "activated"]
        );
        assert!(ca.maintain(now).unwrap().is_empty());
        assert!(
            load(tmp.path()).maintain(now).unwrap().is_empty(),
            "not on a restart"
        );
    }

    fn state(dir: &Path) -> serde_json::Value {
        serde_json::from_slice(&fs::read(dir.join("ca").join(STATE_FILE)).unwrap()).unwrap()
    }

    #[test]
    fn embedded_ca_is_created_then_reused() {
        let tmp = tempfile::tempdir().unwrap();
        let ca1 = embedded(tmp.path());
        let ca2 = embedded(tmp.path());
        assert_eq!(ca1.roots_der(), ca2.roots_der());
        assert_eq!(ca1.bundle_der(), ca1.signing_cert_der());
        assert_eq!(ca1.roots_der(), &[ca1.signing_cert_der().to_vec()]);
        assert_eq!(ca1.not_after(), ca2.not_after());
        let ca_dir = tmp.path().join("ca");
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&ca_dir.join(STATE_FILE)), 0o600);
        assert_eq!(mode(&ca_dir), 0o700);
        let names: Vec<_> = fs::read_dir(&ca_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, [STATE_FILE], "no temp files, no legacy files");

        // Root profile.
        let (_, x) = x509_parser::parse_x509_certificate(ca1.signing_cert_der()).unwrap();
        let bc = x.basic_constraints().unwrap().unwrap();
        assert!(bc.critical && bc.value.ca);
        let ku = x.key_usage().unwrap().unwrap();
        assert!(ku.critical);
        assert!(ku.value.key_cert_sign() && ku.value.crl_sign() && ku.value.digital_signature());
        assert!(subject_key_id(&x).is_some());
        let san = x.subject_alternative_name().unwrap().unwrap();
        assert_eq!(
            san.value.general_names,
            vec![GeneralName::URI("spiffe://example.org")]
        );
        let subject = x.subject().to_string();
        assert!(subject.contains("O=mayfly"), "{subject}");
        assert!(subject.contains("CN=mayfly example.org root "), "{subject}");
        let now = secs(SystemTime::now());
        let nb = x.validity().not_before.timestamp();
        let na = x.validity().not_after.timestamp();
        assert!((now - 12..=now - 9).contains(&nb), "{nb} vs {now}");
        assert!((now + TTL.as_secs() as i64 - 2..=now + TTL.as_secs() as i64).contains(&na));
    }

    #[test]
    fn embedded_ca_for_another_trust_domain_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        embedded(tmp.path());
        let other = TrustDomain::new("other.org").unwrap();
        let err = EmbeddedCa::load_or_create(tmp.path(), &other, policy())
            .err()
            .unwrap();
        let msg = err.to_string();
        assert!(matches!(err, CaError::InvalidCa { .. }), "{msg}");
        assert!(
            msg.contains(STATE_FILE) && msg.contains("example.org"),
            "{msg}"
        );
    }

    #[test]
    fn embedded_ca_with_a_foreign_key_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        embedded(tmp.path());
        let mut s = state(tmp.path());
        s["active"]["key"] = KeyPair::generate().unwrap().serialize_pem().into();
        fs::write(tmp.path().join("ca").join(STATE_FILE), s.to_string()).unwrap();
        let err = EmbeddedCa::load_or_create(tmp.path(), &td(), policy())
            .err()
            .unwrap();
        assert!(matches!(err, CaError::KeyMismatch { .. }), "{err}");
    }

    /// Writes a CA in the layout from before rotation.
    fn legacy(dir: &Path) -> Vec<u8> {
        let a = create_root(dir, &td(), TTL).unwrap();
        let ca_dir = dir.join("ca");
        create_private_dir(&ca_dir).unwrap();
        fs::write(ca_dir.join(LEGACY_KEY_FILE), a.key_pem.as_bytes()).unwrap();
        fs::set_permissions(
            ca_dir.join(LEGACY_KEY_FILE),
            fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        fs::write(ca_dir.join(LEGACY_CERT_FILE), &a.cert_pem).unwrap();
        a.ca.signing_cert_der().to_vec()
    }

    #[test]
    fn a_ca_from_before_rotation_is_taken_over_and_its_files_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let root = legacy(tmp.path());
        let ca = load(tmp.path());
        assert_eq!(ca.signer().signing_cert_der(), &root[..]);
        assert!(!tmp.path().join("ca").join(LEGACY_KEY_FILE).exists());
        assert!(!tmp.path().join("ca").join(LEGACY_CERT_FILE).exists());
        assert_eq!(load(tmp.path()).signer().signing_cert_der(), &root[..]);
    }

    #[test]
    fn a_ca_from_before_rotation_with_a_lost_key_is_an_error_not_a_new_root() {
        let tmp = tempfile::tempdir().unwrap();
        legacy(tmp.path());
        fs::remove_file(tmp.path().join("ca").join(LEGACY_KEY_FILE)).unwrap();
        let err = EmbeddedCa::load_or_create(tmp.path(), &td(), policy())
            .err()
            .unwrap();
        assert!(err.to_string().contains(LEGACY_KEY_FILE), "{err}");
    }

    fn names(events: &[CaEvent]) -> Vec<&'static str> {
        events.iter().map(CaEvent::name).collect()
    }

    #[test]
    fn the_next_root_is_published_before_it_signs_and_the_old_one_served_until_its_svids_expire() {
        let tmp = tempfile::tempdir().unwrap();
        let mut ca = fresh(tmp.path());
        let first = ca.signer();
        let born = ca.active.created_at;
        let life = ca.active.life();
        let at = |share: f64| born + life.mul_f64(share);

        assert!(ca.maintain(at(0.49)).unwrap().is_empty());
        assert!(ca.also_trusted().is_empty());
        assert_eq!(ca.next_due(), at(0.5));

        // Prepared and published: served beside the active root, signing nothing.
        let events = ca.maintain(at(0.5)).unwrap();
        assert_eq!(names(&events), ["prepared", "published"]);
        let next_root = ca.also_trusted();
        assert_eq!(next_root.len(), 1);
        assert!(Arc::ptr_eq(&ca.signer(), &first));
        assert!(state(tmp.path())["next"]["cert"].is_string());
        assert!(ca.maintain(at(0.6)).unwrap().is_empty());

        // A restart in between changes nothing.
        let mut ca = load(tmp.path());
        assert_eq!(ca.also_trusted(), next_root);
        assert_eq!(ca.signer().signing_cert_der(), first.signing_cert_der());

        // Activated: the next root signs, the old one is retired but still served.
        let leaf = first.issue_x509_svid(&id("/w"), in_an_hour()).unwrap();
        let events = ca.maintain(at(0.75)).unwrap();
        assert_eq!(names(&events), ["activated", "retired"]);
        let CaEvent::Retired {
            in_bundle_until, ..
        } = &events[1]
        else {
            unreachable!()
        };
        assert_eq!(ca.signer().roots_der(), &next_root[..]);
        assert_eq!(ca.also_trusted(), [first.signing_cert_der().to_vec()]);
        assert!(*in_bundle_until >= leaf.not_after);
        assert!(*in_bundle_until >= at(0.75) + Duration::from_secs(600));
        let svid = ca
            .signer()
            .issue_x509_svid(&id("/w"), in_an_hour())
            .unwrap();
        webpki_verify(&svid.chain_der, &next_root);

        // Removed once its last SVID has expired, and persisted so. (The new root's own
        // next root is due by then too, as these times are simulated.)
        let before = ca
            .maintain(*in_bundle_until - Duration::from_secs(1))
            .unwrap();
        assert!(!names(&before).contains(&"removed"));
        let events = ca.maintain(*in_bundle_until).unwrap();
        assert_eq!(names(&events)[0], "removed");
        let old_root = first.signing_cert_der().to_vec();
        assert!(!ca.also_trusted().contains(&old_root));
        let reloaded = load(tmp.path());
        assert_eq!(reloaded.also_trusted(), ca.also_trusted());
        assert_eq!(reloaded.signer().roots_der(), ca.signer().roots_der());
    }

    #[test]
    fn a_rotation_that_cannot_be_persisted_changes_nothing_and_is_due_again() {
        let tmp = tempfile::tempdir().unwrap();
        let mut ca = fresh(tmp.path());
        let due = ca.next_due();
        // The directory is gone (and a file in its way): no write can succeed, not even root's.
        let dir = tmp.path().join("ca");
        fs::rename(&dir, tmp.path().join("ca.saved")).unwrap();
        fs::write(&dir, b"in the way").unwrap();
        let err = ca.maintain(due).err().unwrap();
        assert!(err.to_string().contains(STATE_FILE), "{err}");
        assert!(ca.also_trusted().is_empty(), "nothing published");
        assert_eq!(ca.next_due(), due, "still due");

        fs::remove_file(&dir).unwrap();
        fs::rename(tmp.path().join("ca.saved"), &dir).unwrap();
        assert_eq!(names(&ca.maintain(due).unwrap()), ["prepared", "published"]);
        assert_eq!(load(tmp.path()).also_trusted(), ca.also_trusted());
    }

    #[test]
    fn a_root_prepared_late_is_served_for_the_whole_gap_before_it_signs() {
        let tmp = tempfile::tempdir().unwrap();
        let mut ca = fresh(tmp.path());
        let born = ca.active.created_at;
        let life = ca.active.life();
        // The agent was down past the preparation point: publish now, and activate only
        // after the whole gap between the two points, not at the usual time.
        let late = born + life.mul_f64(0.6);
        assert_eq!(
            names(&ca.maintain(late).unwrap()),
            ["prepared", "published"]
        );
        ca.next.as_mut().unwrap().created_at = late;
        let due = ca.next_due();
        assert_eq!(due, born + life.mul_f64(0.6) + life.mul_f64(0.25));
        assert!(ca.maintain(born + life.mul_f64(0.8)).unwrap().is_empty());
        assert_eq!(names(&ca.maintain(due).unwrap()), ["activated", "retired"]);
    }

    #[test]
    fn an_active_root_that_expired_while_the_agent_was_down_is_replaced() {
        let tmp = tempfile::tempdir().unwrap();
        let old = load(tmp.path()).signer();
        // Backdate the stored root: a certificate that expired a minute ago.
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.not_before = odt(unix_secs(SystemTime::now()) - 3600).unwrap();
        params.not_after = odt(unix_secs(SystemTime::now()) - 60).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let expired = params.self_signed(&key).unwrap();
        let mut s = state(tmp.path());
        s["active"]["cert"] = expired.pem().into();
        s["active"]["key"] = key.serialize_pem().into();
        fs::write(tmp.path().join("ca").join(STATE_FILE), s.to_string()).unwrap();

        let mut ca = load(tmp.path());
        assert_ne!(ca.signer().signing_cert_der(), old.signing_cert_der());
        assert!(ca.signer().not_after() > SystemTime::now());
        assert_eq!(
            names(&ca.maintain(SystemTime::now()).unwrap()),
            ["prepared", "published", "activated", "retired", "removed"]
        );
        ca.signer()
            .issue_x509_svid(&id("/w"), in_an_hour())
            .unwrap();
    }
}
