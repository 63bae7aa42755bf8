//! The authority rewriter on arbitrary client bytes, fed in arbitrary pieces: it must never
//! panic, never loop, and whatever it emits must be HTTP/2 frames whose header blocks decode.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mayfly::server::listen::authority::{Rewriter, MAX_FRAME};
use mayfly::server::listen::hpack::Decoder;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

fuzz_target!(|data: &[u8]| {
    // The first byte picks where the input is split; the preface is prepended so that most
    // inputs reach the frame parser.
    let Some((&split, body)) = data.split_first() else {
        return;
    };
    let mut input = PREFACE.to_vec();
    input.extend_from_slice(body);
    let mut r = Rewriter::default();
    let mut out = Vec::new();
    let at = (split as usize * input.len() / 256).min(input.len());
    let mut feed = |piece: &[u8], out: &mut Vec<u8>| {
        r.feed(piece, out)?;
        while r.has_backlog() {
            r.resume(out)?;
        }
        Ok::<_, mayfly::server::listen::authority::RewriteError>(())
    };
    if feed(&input[..at], &mut out).is_err() || feed(&input[at..], &mut out).is_err() {
        return;
    }
    // Valid so far: every header block it emitted decodes with a fresh table (it never
    // indexes), and no frame exceeds the maximum frame size.
    let mut rest = &out[PREFACE.len()..];
    let mut decoder = Decoder::new(4096, 1 << 20);
    let mut block = Vec::new();
    while rest.len() >= 9 {
        let len = u32::from_be_bytes([0, rest[0], rest[1], rest[2]]) as usize;
        let (kind, flags) = (rest[3], rest[4]);
        if rest.len() < 9 + len {
            break; // a pass-through frame still arriving
        }
        let payload = &rest[9..9 + len];
        if kind == 0x1 || kind == 0x9 {
            assert!(len <= MAX_FRAME);
            let skip = if kind == 0x1 && flags & 0x20 != 0 {
                5
            } else {
                0
            };
            block.extend_from_slice(&payload[skip..]);
            if flags & 0x4 != 0 {
                decoder
                    .decode(&block, |f| assert_ne!(f.name, b":authority"))
                    .expect("the rewriter emits valid blocks");
                block.clear();
            }
        }
        rest = &rest[9 + len..];
    }
});
