//! `mayfly healthcheck`.

use std::time::Duration;

use crate::config::HealthAddr;
use crate::server::health::UID_HEADER;

/// `mayfly healthcheck`: asks `/healthz/ready` over plain HTTP/1.1; Ok when ready.
/// `mayfly healthcheck`: exits 0 when the agent at `addr` is ready. Without an explicit
/// address it asks this user's default one and refuses an answer from an agent of another uid.
pub async fn healthcheck(explicit: Option<&str>) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = match explicit {
        Some(a) => HealthAddr::parse(a).map_err(|e| anyhow::anyhow!("--health-addr {e}"))?,
        None => crate::config::Defaults::for_current_user().health_addr(),
    };
    let request = b"GET /healthz/ready HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
    let fut = async {
        let mut body = String::new();
        match &addr {
            HealthAddr::Tcp(a) => {
                let mut s = tokio::net::TcpStream::connect(a).await?;
                s.write_all(request).await?;
                s.read_to_string(&mut body).await?;
            }
            HealthAddr::Unix(p) => {
                let mut s = tokio::net::UnixStream::connect(p).await?;
                s.write_all(request).await?;
                s.read_to_string(&mut body).await?;
            }
        }
        Ok::<_, std::io::Error>(body)
    };
    let body = tokio::time::timeout(Duration::from_secs(5), fut)
        .await
        .map_err(|_| anyhow::anyhow!("no answer from {addr} within 5s"))?
        .map_err(|e| anyhow::anyhow!("no agent answers at {addr}: {e}"))?;
    let (head, text) = body.split_once("\r\n\r\n").unwrap_or((&body, ""));
    let status = head.lines().next().unwrap_or_default();
    let agent_uid = head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case(UID_HEADER)
            .then(|| v.trim().parse::<u32>().ok())
            .flatten()
    });
    let me = rustix::process::geteuid().as_raw();
    if explicit.is_none() && agent_uid != Some(me) {
        anyhow::bail!(
            "the agent answering at {addr} runs as uid {}, not as you (uid {me}); \
             pass --health-addr to ask it anyway",
            agent_uid.map_or("unknown".to_owned(), |u| u.to_string())
        );
    }
    let text = text.trim();
    if status.contains(" 200 ") {
        println!("{text}");
        Ok(())
    } else {
        anyhow::bail!("{status}: {text}")
    }
}
