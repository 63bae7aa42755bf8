//! The agent's config file, loaded as the agent loads it (`Config::load`: read, TOML into
//! `FileConfig` with unknown keys refused, then `Config::resolve` with every check): never a
//! panic, and a configuration that loads keeps the bounds the rest of the agent relies on.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use mayfly::config::{Config, Overrides};

/// One file per fuzzing process, on a tmpfs when there is one.
fn path() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let dir = ["/dev/shm", "/tmp"]
            .into_iter()
            .map(PathBuf::from)
            .find(|d| d.is_dir())
            .unwrap_or_else(std::env::temp_dir);
        dir.join(format!("mayfly-fuzz-config-{}.toml", std::process::id()))
    })
}

fuzz_target!(|data: &[u8]| {
    std::fs::write(path(), data).expect("write the config file");
    let overrides = Overrides {
        trust_domain: None,
        socket: None,
        extra_sockets: Vec::new(),
        admin_socket: None,
        data_dir: None,
        health_addr: None,
    };
    let Ok(config) = Config::load(Some(path()), overrides) else {
        return;
    };
    let l = &config.limits;
    assert!(l.default_svid_ttl <= l.max_svid_ttl);
    assert!(l.default_jwt_ttl <= l.max_jwt_ttl);
    assert!(l.max_ttl >= mayfly::lease::MIN_TTL);
    assert_ne!(config.socket, config.admin_socket);
    assert!(!config.extra_sockets.contains(&config.socket));
    assert!(!config.extra_sockets.contains(&config.admin_socket));
    assert!(config.sds.aliases.problems().is_empty());
});
