//! The cost of the `:authority` rewrite (`mayfly::server::listen::authority::Rewriter`), per request,
//! in-process, next to a plain copy of the same bytes (what the layer must at least do).
//!
//! Run: `cargo bench --bench authority` (about 20 s). One element is one gRPC request (its
//! HEADERS and its DATA frame), so criterion's `thrpt` line is requests per second.
//!
//! - `steady_request`: a request of an established connection as gRPC clients send it: every
//!   header from the dynamic table (the authority too), one small DATA frame.
//! - `first_request`: a connection's first request: preface, SETTINGS, and literal headers
//!   that fill the dynamic table (a new `Rewriter` each time).
//! - `memcpy_request`: copying the steady request's bytes, the floor.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use mayfly::server::listen::authority::Rewriter;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = (payload.len() as u32).to_be_bytes();
    let mut f = vec![len[1], len[2], len[3], kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// A literal with incremental indexing and a literal name (raw strings).
fn literal(out: &mut Vec<u8>, name: &str, value: &str) {
    out.push(0x40);
    for s in [name, value] {
        out.push(s.len() as u8);
        out.extend_from_slice(s.as_bytes());
    }
}

/// The headers of FetchX509SVID as gRPC C-core sends them, as literals that enter the table.
fn first_block() -> Vec<u8> {
    let mut b = vec![0x83, 0x86]; // :method POST, :scheme http
    for (n, v) in [
        (":path", "/SpiffeWorkloadAPI/FetchX509SVID"),
        (":authority", "tmp%2Fmayfly%2Fworkload.sock"),
        ("te", "trailers"),
        ("content-type", "application/grpc"),
        (
            "user-agent",
            "grpc-python/1.85.3 grpc-c/52.0.0 (linux; chttp2)",
        ),
        ("workload.spiffe.io", "true"),
    ] {
        literal(&mut b, n, v);
    }
    b
}

/// The same headers once they are all in the table (newest first: 62 is workload.spiffe.io).
fn steady_block() -> Vec<u8> {
    vec![0x83, 0x86, 0xc3, 0xc2, 0xc1, 0xc0, 0xbf, 0xbe]
}

fn request(block: &[u8], stream: u32) -> Vec<u8> {
    let mut r = frame(0x1, 0x4, stream, block);
    r.extend(frame(0x0, 0x1, stream, &[0, 0, 0, 0, 0]));
    r
}

fn benches(c: &mut Criterion) {
    let mut g = c.benchmark_group("authority_rewrite");
    g.throughput(Throughput::Elements(1));

    let mut opening = PREFACE.to_vec();
    opening.extend(frame(0x4, 0, 0, &[]));
    opening.extend(request(&first_block(), 1));
    let steady = request(&steady_block(), 3);

    let mut rewriter = Rewriter::default();
    let mut out = Vec::new();
    rewriter.feed(&opening, &mut out).unwrap();
    g.bench_function("steady_request", |b| {
        b.iter(|| {
            out.clear();
            rewriter.feed(black_box(&steady), &mut out).unwrap();
            black_box(out.len())
        })
    });
    g.bench_function("first_request", |b| {
        b.iter(|| {
            let mut r = Rewriter::default();
            let mut out = Vec::new();
            r.feed(black_box(&opening), &mut out).unwrap();
            black_box(out.len())
        })
    });
    let mut copy = Vec::new();
    g.bench_function("memcpy_request", |b| {
        b.iter(|| {
            copy.clear();
            copy.extend_from_slice(black_box(&steady));
            black_box(copy.len())
        })
    });
    g.finish();
}

criterion_group!(authority, benches);
criterion_main!(authority);
