//! Removes `:authority` from every request a client sends, before h2 reads it.
//!
//! On a Unix socket `:authority` means nothing, and clients fill it in every way: gRPC C-core
//! (Python, C++, Ruby, PHP) sends the percent-encoded socket path, grpc-java the raw path,
//! grpc-go `localhost`, some clients none. h2 resets every stream whose authority the `http`
//! crate cannot parse, before tonic sees it, and cannot be told otherwise. So the client's
//! byte stream passes through this rewriter, which sits between the socket and h2:
//!
//! - the connection preface and every frame but HEADERS and CONTINUATION pass through
//!   unchanged (DATA payloads are not even copied when they arrive whole);
//! - each header block (HEADERS plus its CONTINUATIONs, padding and priority included) is
//!   decoded with the client's own dynamic table, and re-encoded without `:authority` as
//!   literals that h2 does not index, so h2's table stays empty and the two never drift;
//! - anything that is not a valid header block ends the connection, which h2 would end too
//!   (COMPRESSION_ERROR or PROTOCOL_ERROR are connection errors, RFC 9113 §4.3, §6.10); the
//!   client sees it close without the GOAWAY h2 would send, since only h2 writes frames.
//!
//! A stream that does not start with the HTTP/2 preface is passed on verbatim, for h2 to refuse.
//! Frames h2 sends are not touched.

use super::hpack::{self, Decoder, HpackError};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// SETTINGS_MAX_FRAME_SIZE's default and minimum (RFC 9113 §6.5.2): h2 is never configured
/// above it, so a larger header frame is h2's FRAME_SIZE_ERROR too, and our frames never
/// exceed it.
pub const MAX_FRAME: usize = 16_384;

/// Bounds, so that a client cannot make the rewriter hold or build much.
///
/// Re-encoding turns a one-byte reference to the client's dynamic table into a full literal,
/// so a block's output can be far larger than its input. Hence the decoded list is held near
/// what the servers accept anyway (h2 answers a list over 16 KiB with 431), and one `feed`
/// stops producing once `max_output` is reached, keeping the rest of its input for later.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// The compressed block, as received across HEADERS and CONTINUATION frames.
    pub max_block: usize,
    /// The decoded header list (RFC 9113 §6.5.2 sizing).
    pub max_list: usize,
    /// CONTINUATION frames in one block (h2 itself allows a handful; it never sees them).
    pub max_continuations: usize,
    /// Output produced by one `feed` before the rest of the input waits.
    pub max_output: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_block: 32 * 1024,
            max_list: 20 * 1024,
            max_continuations: 16,
            max_output: 64 * 1024,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RewriteError {
    #[error("header frame of {0} bytes exceeds the maximum frame size")]
    FrameTooLarge(usize),
    #[error("header block exceeds {0} bytes")]
    BlockTooLarge(usize),
    #[error("header block split into more than {0} CONTINUATION frames")]
    TooManyContinuations(usize),
    #[error("frame of type {0:#x} inside an unfinished header block")]
    ExpectedContinuation(u8),
    #[error("CONTINUATION without a header block open on its stream")]
    UnexpectedContinuation,
    #[error("padding longer than the frame")]
    Padding,
    #[error("HEADERS frame too short for its priority fields")]
    ShortPriority,
    #[error("the connection already failed")]
    Closed,
    #[error("header block: {0}")]
    Hpack(#[from] HpackError),
}

enum Phase {
    /// Matching the client preface; the number of bytes matched so far.
    Preface(usize),
    Frames,
    /// Not HTTP/2: everything goes to h2 unchanged, for it to refuse.
    Verbatim,
    Failed,
}

/// A header block being gathered across HEADERS and CONTINUATION frames.
struct OpenBlock {
    stream: u32,
    end_stream: bool,
    priority: Option<[u8; 5]>,
    fragment: Vec<u8>,
    continuations: usize,
}

/// The rewriter of one connection's client-to-server bytes, independent of any socket.
pub struct Rewriter {
    phase: Phase,
    limits: Limits,
    decoder: Decoder,
    /// Input not yet acted on: a partial frame header, or a partial header frame.
    pending: Vec<u8>,
    /// Bytes of the current pass-through frame's payload still to come.
    skip: usize,
    block: Option<OpenBlock>,
    encoded: Vec<u8>,
    /// Input not yet looked at because `max_output` was reached; it comes before any new
    /// input.
    backlog: Vec<u8>,
}

impl Default for Rewriter {
    fn default() -> Self {
        Rewriter::new(Limits::default())
    }
}

impl Rewriter {
    pub fn new(limits: Limits) -> Rewriter {
        Rewriter {
            phase: Phase::Preface(0),
            limits,
            decoder: Decoder::new(hpack::DEFAULT_TABLE_SIZE, limits.max_list),
            pending: Vec::new(),
            skip: 0,
            block: None,
            encoded: Vec::new(),
            backlog: Vec::new(),
        }
    }

    /// Whether input is waiting (see `Limits::max_output`): call `resume` before feeding more.
    pub fn has_backlog(&self) -> bool {
        !self.backlog.is_empty()
    }

    /// Continues with the waiting input, up to `max_output` more output.
    pub fn resume(&mut self, out: &mut Vec<u8>) -> Result<(), RewriteError> {
        let backlog = std::mem::take(&mut self.backlog);
        self.feed(&backlog, out)
    }

    /// How many of the next `n` input bytes pass through unchanged as they are, so that a
    /// caller holding them in place need not copy them. Call `pass` for the ones it keeps.
    pub fn verbatim_prefix(&self, n: usize) -> usize {
        if self.has_backlog() {
            return 0;
        }
        match self.phase {
            Phase::Verbatim => n,
            Phase::Frames if self.pending.is_empty() => n.min(self.skip),
            _ => 0,
        }
    }

    /// Records that `n` bytes (at most `verbatim_prefix(n)`) went on unchanged.
    pub fn pass(&mut self, n: usize) {
        if n == 0 {
            return;
        }
        if let Phase::Frames = self.phase {
            debug_assert!(n <= self.skip && self.pending.is_empty());
            self.skip -= n;
        }
    }

    /// Takes bytes read from the client and appends what h2 is to read to `out`. Once this
    /// call has produced `max_output`, the rest of `input` waits in the backlog (see
    /// `has_backlog`). After an error the connection must be closed; every later call fails.
    pub fn feed(&mut self, mut input: &[u8], out: &mut Vec<u8>) -> Result<(), RewriteError> {
        // New input after waiting input would reorder the stream.
        debug_assert!(self.backlog.is_empty(), "resume before feeding more");
        let limit = out.len() + self.limits.max_output;
        let r = self.feed_inner(&mut input, out, limit);
        match r {
            Ok(()) => {
                if !input.is_empty() {
                    self.backlog.extend_from_slice(input);
                }
            }
            Err(_) => {
                self.phase = Phase::Failed;
                self.pending = Vec::new();
                self.block = None;
                self.backlog = Vec::new();
            }
        }
        r
    }

    fn feed_inner(
        &mut self,
        input: &mut &[u8],
        out: &mut Vec<u8>,
        limit: usize,
    ) -> Result<(), RewriteError> {
        loop {
            if out.len() >= limit {
                return Ok(());
            }
            match self.phase {
                Phase::Failed => return Err(RewriteError::Closed),
                Phase::Verbatim => {
                    out.extend_from_slice(input);
                    *input = &[];
                    return Ok(());
                }
                Phase::Preface(matched) => {
                    let want = &PREFACE[matched..];
                    let n = want.len().min(input.len());
                    if input[..n] != want[..n] {
                        // Not HTTP/2 (or a broken client): h2 gets exactly what was sent.
                        out.extend_from_slice(&PREFACE[..matched]);
                        self.phase = Phase::Verbatim;
                        continue;
                    }
                    *input = &input[n..];
                    if matched + n == PREFACE.len() {
                        out.extend_from_slice(PREFACE);
                        self.phase = Phase::Frames;
                    } else {
                        self.phase = Phase::Preface(matched + n);
                        return Ok(());
                    }
                }
                Phase::Frames => {
                    if self.skip > 0 {
                        let n = self.skip.min(input.len());
                        out.extend_from_slice(&input[..n]);
                        *input = &input[n..];
                        self.skip -= n;
                        if self.skip > 0 {
                            return Ok(());
                        }
                    }
                    if !self.take(input, FRAME_HEADER) {
                        return Ok(());
                    }
                    let h = &self.pending;
                    let len = u32::from_be_bytes([0, h[0], h[1], h[2]]) as usize;
                    let (kind, flags) = (h[3], h[4]);
                    let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
                    if kind != HEADERS && kind != CONTINUATION {
                        if self.block.is_some() {
                            return Err(RewriteError::ExpectedContinuation(kind));
                        }
                        out.extend_from_slice(&self.pending);
                        self.pending.clear();
                        self.skip = len;
                        continue;
                    }
                    if len > MAX_FRAME {
                        return Err(RewriteError::FrameTooLarge(len));
                    }
                    if !self.take(input, FRAME_HEADER + len) {
                        return Ok(());
                    }
                    let mut frame = std::mem::take(&mut self.pending);
                    let r = self.header_frame(kind, flags, stream, &frame[FRAME_HEADER..], out);
                    // Keep a small buffer for the next frame, not a large one: idle
                    // connections are many.
                    if frame.capacity() <= 4 * 1024 {
                        frame.clear();
                        self.pending = frame;
                    }
                    r?;
                }
            }
        }
    }

    /// Moves input into `pending` until it holds at least `n` bytes (it may already hold
    /// more: a frame header stays there while its payload arrives); false if the input ran
    /// out first.
    fn take(&mut self, input: &mut &[u8], n: usize) -> bool {
        let need = n.saturating_sub(self.pending.len());
        let k = need.min(input.len());
        self.pending.extend_from_slice(&input[..k]);
        *input = &input[k..];
        self.pending.len() >= n
    }

    fn header_frame(
        &mut self,
        kind: u8,
        flags: u8,
        stream: u32,
        mut payload: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), RewriteError> {
        if kind == HEADERS {
            if self.block.is_some() {
                return Err(RewriteError::ExpectedContinuation(kind));
            }
            let mut pad = 0usize;
            if flags & PADDED != 0 {
                let (&n, rest) = payload.split_first().ok_or(RewriteError::Padding)?;
                pad = n as usize;
                payload = rest;
            }
            let mut priority = None;
            if flags & PRIORITY != 0 {
                if payload.len() < 5 {
                    return Err(RewriteError::ShortPriority);
                }
                let (p, rest) = payload.split_at(5);
                priority = Some(p.try_into().expect("five bytes"));
                payload = rest;
            }
            if pad > payload.len() {
                return Err(RewriteError::Padding);
            }
            let fragment = &payload[..payload.len() - pad];
            self.block = Some(OpenBlock {
                stream,
                end_stream: flags & END_STREAM != 0,
                priority,
                fragment: Vec::new(),
                continuations: 0,
            });
            self.extend_block(fragment)?;
        } else {
            match &mut self.block {
                Some(b) if b.stream == stream => {
                    b.continuations += 1;
                    if b.continuations > self.limits.max_continuations {
                        return Err(RewriteError::TooManyContinuations(
                            self.limits.max_continuations,
                        ));
                    }
                }
                _ => return Err(RewriteError::UnexpectedContinuation),
            }
            self.extend_block(payload)?;
        }
        if flags & END_HEADERS != 0 {
            let block = self.block.take().expect("a block is open");
            self.rewrite(block, out)?;
        }
        Ok(())
    }

    fn extend_block(&mut self, fragment: &[u8]) -> Result<(), RewriteError> {
        let block = self.block.as_mut().expect("a block is open");
        if block.fragment.len() + fragment.len() > self.limits.max_block {
            return Err(RewriteError::BlockTooLarge(self.limits.max_block));
        }
        block.fragment.extend_from_slice(fragment);
        Ok(())
    }

    /// Decodes the block and writes it again, without `:authority`, as HEADERS plus as many
    /// CONTINUATIONs as the maximum frame size needs.
    fn rewrite(&mut self, block: OpenBlock, out: &mut Vec<u8>) -> Result<(), RewriteError> {
        let mut encoded = std::mem::take(&mut self.encoded);
        encoded.clear();
        if let Some(p) = block.priority {
            encoded.extend_from_slice(&p);
        }
        self.decoder.decode(&block.fragment, |field| {
            if field.name != b":authority" {
                hpack::encode_literal(&mut encoded, field);
            }
        })?;
        let mut flags = if block.end_stream { END_STREAM } else { 0 };
        if block.priority.is_some() {
            flags |= PRIORITY;
        }
        let mut chunks = encoded.chunks(MAX_FRAME).peekable();
        let mut kind = HEADERS;
        // An empty block is still one HEADERS frame.
        let first: &[u8] = chunks.next().unwrap_or(&[]);
        let mut chunk = first;
        loop {
            let last = chunks.peek().is_none();
            let f = flags | if last { END_HEADERS } else { 0 };
            let len = (chunk.len() as u32).to_be_bytes();
            out.extend_from_slice(&[len[1], len[2], len[3], kind, f]);
            out.extend_from_slice(&block.stream.to_be_bytes());
            out.extend_from_slice(chunk);
            match chunks.next() {
                Some(next) => {
                    chunk = next;
                    kind = CONTINUATION;
                    flags = 0;
                }
                None => break,
            }
        }
        // Keep a buffer for the next block, but not a large one (idle connections are many).
        if encoded.capacity() <= 4 * 1024 {
            self.encoded = encoded;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::listen::huffman;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = (payload.len() as u32).to_be_bytes();
        let mut f = vec![len[1], len[2], len[3], kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    /// A literal with incremental indexing, Huffman-coded name and value: what gRPC C-core
    /// sends for its percent-encoded authority on the first request.
    fn indexed_literal(name: &[u8], value: &[u8]) -> Vec<u8> {
        let mut b = vec![0x40];
        for s in [name, value] {
            let h = huffman::encode(s);
            assert!(h.len() < 127);
            b.push(0x80 | h.len() as u8);
            b.extend(h);
        }
        b
    }

    /// Splits rewritten output into frames and decodes every header block with a fresh
    /// decoder, as h2 would.
    type Frames = Vec<(u8, u8, u32, Vec<u8>)>;
    type Blocks = Vec<Vec<(String, String)>>;

    fn parse_output(out: &[u8]) -> (Frames, Blocks) {
        assert!(out.starts_with(PREFACE));
        let mut rest = &out[PREFACE.len()..];
        let (mut frames, mut blocks) = (Vec::new(), Vec::new());
        let mut decoder = Decoder::new(hpack::DEFAULT_TABLE_SIZE, 1 << 20);
        let mut block = Vec::new();
        while !rest.is_empty() {
            let len = u32::from_be_bytes([0, rest[0], rest[1], rest[2]]) as usize;
            assert!(len <= MAX_FRAME);
            let (kind, flags) = (rest[3], rest[4]);
            let stream = u32::from_be_bytes([rest[5], rest[6], rest[7], rest[8]]);
            let payload = rest[9..9 + len].to_vec();
            rest = &rest[9 + len..];
            if kind == HEADERS || kind == CONTINUATION {
                assert_eq!(flags & PADDED, 0);
                let skip = if kind == HEADERS && flags & PRIORITY != 0 {
                    5
                } else {
                    0
                };
                block.extend_from_slice(&payload[skip..]);
                if flags & END_HEADERS != 0 {
                    let mut fields = Vec::new();
                    decoder
                        .decode(&block, |f| {
                            fields.push((
                                String::from_utf8(f.name.to_vec()).unwrap(),
                                String::from_utf8(f.value.to_vec()).unwrap(),
                            ))
                        })
                        .unwrap();
                    blocks.push(fields);
                    block.clear();
                }
            }
            frames.push((kind, flags, stream, payload));
        }
        (frames, blocks)
    }

    fn request(authority: &[u8], stream: u32, first: bool) -> Vec<u8> {
        // :method POST (3), :scheme http (6), :path as a literal, then the authority.
        let mut b = vec![0x83, 0x86, 0x04, 0x05];
        b.extend_from_slice(b"/a/bc");
        if first {
            b.extend(indexed_literal(b":authority", authority));
            b.extend(indexed_literal(b"workload.spiffe.io", b"true"));
        } else {
            // Both from the dynamic table: authority is the older entry.
            b.extend([0xbf, 0xbe]);
        }
        frame(HEADERS, END_HEADERS, stream, &b)
    }

    fn rewrite_all(input: &[u8]) -> Vec<u8> {
        let mut r = Rewriter::default();
        let mut out = Vec::new();
        r.feed(input, &mut out).unwrap();
        out
    }

    #[test]
    fn authority_is_removed_from_literal_and_indexed_forms_across_requests() {
        let mut input = PREFACE.to_vec();
        input.extend(frame(0x4, 0, 0, &[])); // SETTINGS
        input.extend(request(b"tmp%2Fx%2Fw.sock", 1, true));
        input.extend(frame(0x0, END_STREAM, 1, b"\0\0\0\0\0"));
        for i in 0..300u32 {
            input.extend(request(b"", 3 + 2 * i, false));
        }
        let out = rewrite_all(&input);
        let (frames, blocks) = parse_output(&out);
        assert_eq!(blocks.len(), 301);
        for b in &blocks {
            assert_eq!(
                b.iter()
                    .map(|(n, v)| (n.as_str(), v.as_str()))
                    .collect::<Vec<_>>(),
                [
                    (":method", "POST"),
                    (":scheme", "http"),
                    (":path", "/a/bc"),
                    ("workload.spiffe.io", "true"),
                ]
            );
        }
        // SETTINGS and DATA pass unchanged.
        assert_eq!(frames[0], (0x4, 0, 0, vec![]));
        assert_eq!(frames[2], (0x0, END_STREAM, 1, b"\0\0\0\0\0".to_vec()));
    }

    #[test]
    fn byte_by_byte_reads_give_the_same_bytes() {
        let mut input = PREFACE.to_vec();
        input.extend(request(b"/tmp/x/w.sock", 1, true));
        input.extend(frame(0x0, 0, 1, &[7; 100]));
        input.extend(request(b"", 3, false));
        let whole = rewrite_all(&input);
        let mut r = Rewriter::default();
        let mut out = Vec::new();
        for b in &input {
            let kept = r.verbatim_prefix(1);
            r.pass(kept);
            if kept == 1 {
                out.push(*b);
            } else {
                r.feed(std::slice::from_ref(b), &mut out).unwrap();
            }
        }
        assert_eq!(out, whole);
    }

    #[test]
    fn padding_priority_and_continuation_are_understood() {
        let block = {
            let mut b = vec![0x83, 0x86, 0x84];
            b.extend(indexed_literal(b":authority", b"localhost"));
            b.extend(indexed_literal(b"x-k", b"v"));
            b
        };
        let (a, b) = block.split_at(4);
        // HEADERS: padded (3 bytes), with priority (exclusive, on stream 0, weight 16).
        let mut payload = vec![3];
        payload.extend([0x80, 0, 0, 0, 15]);
        payload.extend(a);
        payload.extend([0, 0, 0]);
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, PADDED | PRIORITY | END_STREAM, 5, &payload));
        input.extend(frame(CONTINUATION, 0, 5, &b[..2]));
        input.extend(frame(CONTINUATION, END_HEADERS, 5, &b[2..]));
        let out = rewrite_all(&input);
        let (frames, blocks) = parse_output(&out);
        assert_eq!(frames.len(), 1);
        let (kind, flags, stream, payload) = &frames[0];
        assert_eq!(
            (*kind, *flags, *stream),
            (HEADERS, PRIORITY | END_STREAM | END_HEADERS, 5)
        );
        assert_eq!(payload[..5], [0x80, 0, 0, 0, 15]);
        assert_eq!(
            blocks[0]
                .iter()
                .map(|(n, _)| n.as_str())
                .collect::<Vec<_>>(),
            [":method", ":scheme", ":path", "x-k"]
        );
    }

    #[test]
    fn a_large_block_is_split_into_continuations() {
        let mut block = vec![0x83, 0x86, 0x84];
        for i in 0..40 {
            // Literal without indexing, literal name, 1000-byte raw value.
            block.extend([
                0x00,
                0x03,
                b'x',
                b'-',
                b'0' + (i % 10) as u8,
                0x7f,
                0xe9,
                0x06,
            ]);
            block.extend([b'v'; 1000]);
        }
        let mut input = PREFACE.to_vec();
        let mut chunks = block.chunks(MAX_FRAME).peekable();
        input.extend(frame(HEADERS, 0, 1, chunks.next().unwrap()));
        while let Some(c) = chunks.next() {
            let flags = if chunks.peek().is_none() {
                END_HEADERS
            } else {
                0
            };
            input.extend(frame(CONTINUATION, flags, 1, c));
        }
        let mut r = Rewriter::new(Limits {
            max_block: 1 << 20,
            max_list: 1 << 20,
            ..Limits::default()
        });
        let mut out = Vec::new();
        r.feed(&input, &mut out).unwrap();
        let (frames, blocks) = parse_output(&out);
        assert!(frames.len() >= 3);
        assert_eq!(frames[0].0, HEADERS);
        assert!(frames[1..].iter().all(|f| f.0 == CONTINUATION && f.2 == 1));
        assert_eq!(blocks[0].len(), 43);
        assert!(blocks[0][3..].iter().all(|(_, v)| v.len() == 1000));
    }

    #[test]
    fn protocol_violations_end_the_connection() {
        let ok = request(b"localhost", 1, true);
        let cases: Vec<(Vec<u8>, RewriteError)> = vec![
            // DATA inside an open header block.
            (
                [frame(HEADERS, 0, 1, &ok[9..]), frame(0, 0, 1, b"x")].concat(),
                RewriteError::ExpectedContinuation(0),
            ),
            // CONTINUATION on another stream, or with no block open.
            (
                [
                    frame(HEADERS, 0, 1, &ok[9..12]),
                    frame(CONTINUATION, END_HEADERS, 3, &ok[12..]),
                ]
                .concat(),
                RewriteError::UnexpectedContinuation,
            ),
            (
                frame(CONTINUATION, END_HEADERS, 1, &ok[9..]),
                RewriteError::UnexpectedContinuation,
            ),
            // Padding longer than the payload.
            (
                frame(HEADERS, PADDED | END_HEADERS, 1, &[9, 0x82]),
                RewriteError::Padding,
            ),
            (
                frame(HEADERS, PRIORITY | END_HEADERS, 1, &[0, 0]),
                RewriteError::ShortPriority,
            ),
            (
                frame(HEADERS, END_HEADERS, 1, &[0x80]),
                RewriteError::Hpack(HpackError::BadIndex(0)),
            ),
            (
                frame(HEADERS, END_HEADERS, 1, &vec![0x82; MAX_FRAME + 1]),
                RewriteError::FrameTooLarge(MAX_FRAME + 1),
            ),
        ];
        for (frames, want) in cases {
            let mut r = Rewriter::default();
            let mut out = Vec::new();
            let got = r.feed(&[PREFACE, &frames].concat(), &mut out);
            assert_eq!(got, Err(want.clone()));
            assert_eq!(r.feed(b"more", &mut out), Err(RewriteError::Closed));
        }
    }

    #[test]
    fn a_continuation_flood_is_bounded() {
        let mut r = Rewriter::default();
        let mut out = Vec::new();
        r.feed(PREFACE, &mut out).unwrap();
        r.feed(&frame(HEADERS, 0, 1, &[0x82]), &mut out).unwrap();
        let junk = frame(CONTINUATION, 0, 1, &[0x82; 16_000]);
        let mut err = None;
        for _ in 0..10 {
            if let Err(e) = r.feed(&junk, &mut out) {
                err = Some(e);
                break;
            }
        }
        assert_eq!(err, Some(RewriteError::BlockTooLarge(32 * 1024)));
        // Empty CONTINUATIONs never grow the block; their number is bounded instead.
        let mut r = Rewriter::default();
        r.feed(PREFACE, &mut out).unwrap();
        r.feed(&frame(HEADERS, 0, 1, &[0x82]), &mut out).unwrap();
        let empty = frame(CONTINUATION, 0, 1, &[]);
        let got = (0..20).find_map(|_| r.feed(&empty, &mut out).err());
        assert_eq!(got, Some(RewriteError::TooManyContinuations(16)));
    }

    /// One-byte references to a 4 KiB table entry re-encode as 4 KiB literals: a read of
    /// such blocks must not turn into megabytes at once. Output per call is bounded, the rest
    /// waits, and nothing is lost or reordered.
    #[test]
    fn amplified_output_is_produced_in_bounded_steps() {
        // Fill the table with one entry of 4096 bytes (1 + 4063 + 32).
        let mut fill = vec![0x40, 0x01, b'x', 0x7f, 0xe0, 0x1e];
        fill.extend(vec![b'v'; 4063]);
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, END_HEADERS, 1, &fill));
        // Four references per block: 4 * 4096 = 16 KiB, under the list bound.
        for i in 0..300u32 {
            input.extend(frame(HEADERS, END_HEADERS, 3 + 2 * i, &[0xbe; 4]));
        }
        let limits = Limits::default();
        let mut r = Rewriter::new(limits);
        let mut all = Vec::new();
        let mut out = Vec::new();
        r.feed(&input, &mut out).unwrap();
        let mut calls = 1;
        loop {
            // One call overshoots its bound by at most one block's frames.
            assert!(out.len() <= limits.max_output + limits.max_list + 2 * (9 + 5));
            all.append(&mut out);
            if !r.has_backlog() {
                break;
            }
            assert_eq!(r.verbatim_prefix(10), 0, "waiting input comes first");
            r.resume(&mut out).unwrap();
            calls += 1;
        }
        assert!(calls > 10, "{calls}");
        let (_, blocks) = parse_output(&all);
        assert_eq!(blocks.len(), 301);
        assert!(blocks[1..].iter().all(|b| b.len() == 4 && b[0].0 == "x"));
    }

    #[test]
    fn not_http2_passes_verbatim() {
        let input = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        assert_eq!(rewrite_all(input), input);
        // A preface that diverges late still arrives whole.
        let mut bad = PREFACE[..10].to_vec();
        bad.extend(b"garbage");
        let mut r = Rewriter::default();
        let mut out = Vec::new();
        r.feed(&bad[..5], &mut out).unwrap();
        r.feed(&bad[5..], &mut out).unwrap();
        assert_eq!(out, bad);
    }

    /// Mutations of a valid connection, as the fuzz target makes them, never panic, and
    /// whatever the rewriter emits is valid HTTP/2 framing with decodable header blocks.
    #[test]
    fn mutated_input_never_panics() {
        let mut base = PREFACE.to_vec();
        base.extend(request(b"tmp%2Fx%2Fw.sock", 1, true));
        base.extend(frame(0x0, 0, 1, &[1; 20]));
        base.extend(request(b"", 3, false));
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..20_000 {
            let mut input = base.clone();
            for _ in 0..(next() % 4 + 1) {
                let i = (next() as usize) % input.len();
                match next() % 3 {
                    0 => input[i] = next() as u8,
                    1 => input.insert(i, next() as u8),
                    _ => {
                        input.remove(i);
                    }
                }
            }
            let split = (next() as usize) % input.len();
            let mut r = Rewriter::default();
            let mut out = Vec::new();
            let _ = r
                .feed(&input[..split], &mut out)
                .and_then(|_| r.feed(&input[split..], &mut out));
        }
    }
}
