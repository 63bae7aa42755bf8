//! `mayfly svid ...` and `mayfly jwt ...`: the Workload API through the `spiffe` crate, the
//! client real workloads use.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use futures::StreamExt;
use serde_json::{json, Value};

use crate::cli::Output;
use crate::config::{client_socket, Defaults};
use crate::time::rfc3339;

fn workload_socket(explicit: Option<&Path>) -> PathBuf {
    client_socket(explicit, "SPIFFE_ENDPOINT_SOCKET", Defaults::socket)
}

async fn workload_client(socket: Option<&Path>) -> Result<spiffe::WorkloadApiClient> {
    let path = workload_socket(socket);
    spiffe::WorkloadApiClient::connect_to(format!("unix://{}", path.display()))
        .await
        .with_context(|| format!("connecting to the Workload API at {}", path.display()))
}

/// A Workload API error as one line: a gRPC status is its message (the agent's messages say
/// what went wrong), not the client library's rendering of the whole status.
fn workload_error(e: spiffe::WorkloadApiError) -> anyhow::Error {
    use spiffe::transport::TransportError;
    match &e {
        spiffe::WorkloadApiError::Transport(TransportError::Status(s)) => {
            anyhow::anyhow!("{}", s.message())
        }
        _ => e.into(),
    }
}

/// Facts about one certificate for printing.
fn describe(svid: &spiffe::X509Svid) -> Value {
    let leaf = svid.leaf().as_bytes();
    let (serial, not_before, not_after) = match x509_parser::parse_x509_certificate(leaf) {
        Ok((_, cert)) => (
            crate::authority::x509::serial_hex(cert.raw_serial()),
            asn1_rfc3339(cert.validity().not_before),
            asn1_rfc3339(cert.validity().not_after),
        ),
        Err(_) => Default::default(),
    };
    json!({
        "spiffe_id": svid.spiffe_id().to_string(),
        "serial": serial,
        "not_before": not_before,
        "not_after": not_after,
    })
}

fn asn1_rfc3339(t: x509_parser::time::ASN1Time) -> String {
    let secs = t.timestamp().max(0) as u64;
    rfc3339(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs))
}

fn pem_blocks(tag: &str, ders: impl IntoIterator<Item = Vec<u8>>) -> String {
    ders.into_iter()
        .map(|d| pem::encode(&pem::Pem::new(tag, d)))
        .collect()
}

fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<()> {
    // Write beside the target and rename, so a reader never sees half a key.
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(contents)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

fn write_svid(dir: &Path, ctx: &spiffe::X509Context) -> Result<()> {
    let svid = ctx
        .default_svid()
        .context("the Workload API returned no SVID")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let chain = pem_blocks(
        "CERTIFICATE",
        svid.cert_chain().iter().map(|c| c.as_bytes().to_vec()),
    );
    write_file(&dir.join("svid.pem"), chain.as_bytes(), 0o644)?;
    let key = zeroize::Zeroizing::new(pem::encode(&pem::Pem::new(
        "PRIVATE KEY",
        svid.private_key().as_bytes().to_vec(),
    )));
    write_file(&dir.join("key.pem"), key.as_bytes(), 0o600)?;
    let bundle = ctx
        .bundle_set()
        .get(svid.spiffe_id().trust_domain())
        .context("the Workload API returned no bundle for the SVID's trust domain")?;
    let bundle = pem_blocks(
        "CERTIFICATE",
        bundle.authorities().iter().map(|c| c.as_bytes().to_vec()),
    );
    write_file(&dir.join("bundle.pem"), bundle.as_bytes(), 0o644)?;
    Ok(())
}

pub async fn svid_fetch(
    socket: Option<PathBuf>,
    write: Option<PathBuf>,
    output: Output,
) -> Result<()> {
    let client = workload_client(socket.as_deref()).await?;
    let ctx = client.fetch_x509_context().await.map_err(workload_error)?;
    if let Some(dir) = &write {
        write_svid(dir, &ctx)?;
    }
    let svids: Vec<Value> = ctx.svids().iter().map(|s| describe(s)).collect();
    match output {
        Output::Json => println!("{}", Value::Array(svids)),
        Output::Text => {
            for s in &svids {
                println!("spiffe_id  {}", s["spiffe_id"].as_str().unwrap_or(""));
                println!("serial     {}", s["serial"].as_str().unwrap_or(""));
                println!("not_after  {}", s["not_after"].as_str().unwrap_or(""));
            }
            if let Some(dir) = &write {
                println!(
                    "wrote      {}/{{svid.pem,key.pem,bundle.pem}}",
                    dir.display()
                );
            }
        }
    }
    Ok(())
}

/// Prints every update: text lines, or with `--output json` one JSON object per update
/// (`time`, `svids`), one per line.
pub async fn svid_watch(socket: Option<PathBuf>, output: Output) -> Result<()> {
    let client = workload_client(socket.as_deref()).await?;
    let mut stream = client
        .stream_x509_contexts()
        .await
        .map_err(workload_error)?;
    while let Some(update) = stream.next().await {
        let ctx = update.map_err(workload_error)?;
        let now = rfc3339(std::time::SystemTime::now());
        if let Output::Json = output {
            let svids: Vec<Value> = ctx.svids().iter().map(|s| describe(s)).collect();
            println!("{}", json!({ "time": now, "svids": svids }));
            continue;
        }
        for s in ctx.svids() {
            let d = describe(s);
            println!(
                "{now} {} serial={} not_after={}",
                d["spiffe_id"].as_str().unwrap_or(""),
                d["serial"].as_str().unwrap_or(""),
                d["not_after"].as_str().unwrap_or("")
            );
        }
    }
    bail!("the Workload API ended the stream")
}

/// The claims of a compact JWS, unverified (for printing what the agent issued or validated).
fn jwt_claims(token: &str) -> Value {
    token
        .split('.')
        .nth(1)
        .and_then(|p| {
            use base64::Engine;
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(p)
                .ok()
        })
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        .unwrap_or(Value::Null)
}

pub async fn jwt(cmd: crate::cli::JwtCommand) -> Result<()> {
    use crate::cli::JwtCommand;
    match cmd {
        JwtCommand::Fetch {
            audiences,
            spiffe_id,
            socket,
            output,
        } => {
            let client = workload_client(socket.as_deref()).await?;
            let id = spiffe_id
                .map(|s| spiffe::SpiffeId::new(&s).with_context(|| format!("--spiffe-id {s:?}")))
                .transpose()?;
            let token = client
                .fetch_jwt_token(&audiences, id.as_ref())
                .await
                .map_err(workload_error)?;
            match output {
                Output::Text => println!("{token}"),
                Output::Json => {
                    let claims = jwt_claims(&token);
                    let exp = claims["exp"].as_u64().map(|e| {
                        rfc3339(std::time::UNIX_EPOCH + std::time::Duration::from_secs(e))
                    });
                    println!(
                        "{}",
                        json!({
                            "token": token,
                            "spiffe_id": claims["sub"],
                            "audiences": claims["aud"],
                            "expires_at": exp,
                            "claims": claims,
                        })
                    );
                }
            }
        }
        JwtCommand::Validate {
            audience,
            token,
            socket,
        } => {
            let client = workload_client(socket.as_deref()).await?;
            let svid = client
                .validate_jwt_token(&audience, &token)
                .await
                .map_err(workload_error)?;
            // The agent has validated it; show everything the token says.
            let claims = jwt_claims(&token);
            println!(
                "{}",
                json!({ "spiffe_id": svid.spiffe_id().to_string(), "claims": claims })
            );
        }
    }
    Ok(())
}
