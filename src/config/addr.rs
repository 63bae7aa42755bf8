//! Where the health endpoint listens, and its default.

use std::net::SocketAddr;

/// Root's agent (a DaemonSet, a systemd unit) serves health on this TCP address by default.
/// Any other user's agent serves it on a Unix socket in its own runtime directory instead
/// (`Defaults::health_addr`): two users' agents never compete for one port, and a user's
/// `mayfly healthcheck` never hears another user's agent.
pub const ROOT_HEALTH_ADDR: &str = "127.0.0.1:9095";

/// Where the health endpoint listens: `IP:PORT`, or a Unix socket (`unix:/path`,
/// `unix:///path`, or an absolute path).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HealthAddr {
    Tcp(SocketAddr),
    Unix(std::path::PathBuf),
}

impl HealthAddr {
    pub fn parse(s: &str) -> Result<HealthAddr, String> {
        if s.starts_with("unix:") || s.starts_with('/') {
            let path = crate::config::socket_path(s);
            if path.is_absolute() {
                return Ok(HealthAddr::Unix(path));
            }
        }
        s.parse()
            .map(HealthAddr::Tcp)
            .map_err(|_| format!("{s:?}: must be IP:PORT or unix:/absolute/path"))
    }

    pub fn tcp(&self) -> Option<SocketAddr> {
        match self {
            HealthAddr::Tcp(a) => Some(*a),
            HealthAddr::Unix(_) => None,
        }
    }
}

impl std::fmt::Display for HealthAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HealthAddr::Tcp(a) => write!(f, "{a}"),
            HealthAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}
