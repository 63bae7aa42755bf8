//! JWT input to ValidateJWTSVID (`JwtKeys::validate`) against a real key set, made once.
//!
//! Byte 0 picks the mode. Even: the rest is the token, as a workload sends it. Odd: the rest is
//! header JSON, payload JSON and optionally the audience, separated by NUL bytes; `$kid` in the
//! header is replaced by the active key's ID and the harness signs the result with that key
//! (low-S, as the agent signs), so that the checks after the signature are reached too.
//! Never a panic; a token that validates has a subject in the trust domain, the audience, and
//! an `exp` in the future.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use libfuzzer_sys::fuzz_target;
use mayfly::authority::jwt_keys::{JwtKeys, KeyPolicy};
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use spiffe::TrustDomain;

const AUDIENCE: &str = "spiffe://example.org/db";

struct Keys {
    keys: JwtKeys,
    kid: String,
    signer: EcdsaKeyPair,
    rng: SystemRandom,
}

fn keys() -> &'static Keys {
    static KEYS: OnceLock<Keys> = OnceLock::new();
    KEYS.get_or_init(|| {
        let base = ["/dev/shm", "/tmp"]
            .into_iter()
            .map(PathBuf::from)
            .find(|d| d.is_dir())
            .unwrap_or_else(std::env::temp_dir);
        let dir = base.join(format!("mayfly-fuzz-jwt-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let policy = KeyPolicy {
            rotate_after: Duration::from_secs(24 * 3600),
            max_token_ttl: Duration::from_secs(3600),
        };
        let td = TrustDomain::new("example.org").unwrap();
        let keys = JwtKeys::load_or_create(&dir, &td, policy).expect("a key set");
        let kid = keys.active_kid();
        // The harness signs with the same key the agent would (read from the agent's own file).
        let file: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("keys.json")).unwrap()).unwrap();
        let pkcs8 = file["keys"]
            .as_array()
            .unwrap()
            .iter()
            .find(|k| k["kid"] == kid.as_str())
            .and_then(|k| k["pkcs8"].as_str())
            .map(|b64| STANDARD.decode(b64).unwrap())
            .expect("the active key in keys.json");
        let rng = SystemRandom::new();
        let signer = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &pkcs8, &rng)
            .expect("a P-256 key");
        let _ = std::fs::remove_dir_all(&dir);
        Keys {
            keys,
            kid,
            signer,
            rng,
        }
    })
}

fn signed(k: &Keys, header: &str, payload: &str) -> String {
    let header = header.replace("$kid", &k.kid);
    let mut token = URL_SAFE_NO_PAD.encode(header);
    token.push('.');
    URL_SAFE_NO_PAD.encode_string(payload, &mut token);
    let sig = k.signer.sign(&k.rng, token.as_bytes()).unwrap();
    let sig = p256::ecdsa::Signature::from_slice(sig.as_ref()).unwrap();
    let sig = sig.normalize_s().unwrap_or(sig);
    token.push('.');
    URL_SAFE_NO_PAD.encode_string(sig.to_bytes(), &mut token);
    token
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let k = keys();
    let (token, audience) = if mode & 1 == 0 {
        (text.to_owned(), AUDIENCE)
    } else {
        let mut parts = text.split('\0');
        let header = parts.next().unwrap_or_default();
        let payload = parts.next().unwrap_or_default();
        (signed(k, header, payload), parts.next().unwrap_or(AUDIENCE))
    };
    let now = SystemTime::now();
    let Ok(claims) = k.keys.validate(&token, audience, now) else {
        return;
    };
    let sub = claims["sub"].as_str().expect("sub is a string");
    assert!(sub.starts_with("spiffe://example.org/"), "{sub}");
    let aud = &claims["aud"];
    assert!(
        aud.as_str() == Some(audience)
            || aud
                .as_array()
                .is_some_and(|a| a.iter().any(|v| v.as_str() == Some(audience))),
        "{aud}"
    );
    let exp = claims["exp"].as_f64().expect("exp is a number");
    assert!(exp > now.duration_since(UNIX_EPOCH).unwrap().as_secs_f64());
});
