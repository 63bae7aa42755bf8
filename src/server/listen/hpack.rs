//! HPACK (RFC 7541): a header-block decoder that keeps the peer's dynamic table, and the one
//! encoding the authority rewrite needs (literals that never touch the receiver's table).
//!
//! Hand-written because the crates that do this are either private to h2 or unmaintained;
//! it is the small, well-specified part of HPACK, tested against RFC 7541's own examples and
//! against real encoders (h2's, Python's `hpack`, gRPC C-core's).

use std::collections::VecDeque;

use super::huffman;

/// The dynamic table size every HTTP/2 endpoint starts with (SETTINGS_HEADER_TABLE_SIZE's
/// default, RFC 9113 §6.5.2). h2 never announces another one unless told to, and we never tell it.
pub const DEFAULT_TABLE_SIZE: usize = 4096;

/// Each table entry costs its name and value plus this (RFC 7541 §4.1).
const ENTRY_OVERHEAD: usize = 32;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HpackError {
    #[error("header block ends inside a field")]
    Truncated,
    #[error("integer too large")]
    IntegerOverflow,
    #[error("index {0} is not in the header table")]
    BadIndex(usize),
    #[error("invalid Huffman-coded string")]
    Huffman,
    #[error("dynamic table size update to {0} exceeds the limit {1}")]
    TableSize(usize, usize),
    #[error("dynamic table size update after a header field")]
    LateSizeUpdate,
    #[error("decoded header list exceeds {0} bytes")]
    ListTooLarge(usize),
}

/// One decoded header field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Field<'a> {
    pub name: &'a [u8],
    pub value: &'a [u8],
    /// Sent as "never indexed" (RFC 7541 §6.2.3): an intermediary must keep it so.
    pub sensitive: bool,
}

/// Decodes a connection's header blocks in order, keeping the dynamic table the peer's encoder
/// keeps.
pub struct Decoder {
    table: Table,
    /// The most the peer's encoder may set its table to: the SETTINGS value the receiver sent.
    limit: usize,
    max_list: usize,
    name: Vec<u8>,
    value: Vec<u8>,
}

impl Decoder {
    /// `limit`: the SETTINGS_HEADER_TABLE_SIZE in force; `max_list`: the largest decoded
    /// header list (RFC 9113 §6.5.2 sizing) accepted in one block.
    pub fn new(limit: usize, max_list: usize) -> Decoder {
        Decoder {
            table: Table::new(limit),
            limit,
            max_list,
            name: Vec::new(),
            value: Vec::new(),
        }
    }

    /// Decodes one complete header block, calling `f` with each field in order. After an
    /// error the table may be out of step with the peer's: the connection must end.
    pub fn decode(&mut self, block: &[u8], mut f: impl FnMut(Field<'_>)) -> Result<(), HpackError> {
        let r = self.decode_fields(block, &mut f);
        // Keep no large scratch buffer on an idle connection.
        for buf in [&mut self.name, &mut self.value] {
            if buf.capacity() > 4 * 1024 {
                *buf = Vec::new();
            }
        }
        r
    }

    fn decode_fields(
        &mut self,
        mut block: &[u8],
        f: &mut impl FnMut(Field<'_>),
    ) -> Result<(), HpackError> {
        let mut fields_seen = false;
        let mut list = 0usize;
        let mut count = |name: &[u8], value: &[u8]| {
            list += name.len() + value.len() + ENTRY_OVERHEAD;
            if list > self.max_list {
                Err(HpackError::ListTooLarge(self.max_list))
            } else {
                Ok(())
            }
        };
        while let Some(&first) = block.first() {
            if first & 0x80 != 0 {
                // Indexed field (§6.1).
                let index = integer(&mut block, 7)?;
                let (name, value) = self.table.get(index)?;
                count(name, value)?;
                f(Field {
                    name,
                    value,
                    sensitive: false,
                });
            } else if first & 0x40 != 0 {
                // Literal with incremental indexing (§6.2.1).
                let index = integer(&mut block, 6)?;
                let name: Box<[u8]> = match index {
                    0 => string(&mut block, &mut self.name)?.into(),
                    i => self.table.get(i)?.0.into(),
                };
                let value: Box<[u8]> = string(&mut block, &mut self.value)?.into();
                count(&name, &value)?;
                f(Field {
                    name: &name,
                    value: &value,
                    sensitive: false,
                });
                self.table.insert(name, value);
            } else if first & 0x20 != 0 {
                // Dynamic table size update (§6.3), allowed only before the first field (§4.2).
                if fields_seen {
                    return Err(HpackError::LateSizeUpdate);
                }
                let size = integer(&mut block, 5)?;
                if size > self.limit {
                    return Err(HpackError::TableSize(size, self.limit));
                }
                self.table.resize(size);
                continue;
            } else {
                // Literal without indexing (0000) or never indexed (0001) (§6.2.2, §6.2.3).
                let sensitive = first & 0x10 != 0;
                let index = integer(&mut block, 4)?;
                let value_buf = &mut self.value;
                let name = match index {
                    0 => string(&mut block, &mut self.name)?,
                    i => self.table.get(i)?.0,
                };
                let value = string(&mut block, value_buf)?;
                count(name, value)?;
                f(Field {
                    name,
                    value,
                    sensitive,
                });
            }
            fields_seen = true;
        }
        Ok(())
    }
}

/// Appends `field` as a literal that the receiver does not index (never indexed if the sender
/// marked it so), with a literal name and raw strings: the receiver's dynamic table stays
/// empty, so no state is shared with it.
pub fn encode_literal(dst: &mut Vec<u8>, field: Field<'_>) {
    dst.push(if field.sensitive { 0x10 } else { 0x00 });
    for s in [field.name, field.value] {
        encode_integer(dst, 7, 0x00, s.len());
        dst.extend_from_slice(s);
    }
}

/// RFC 7541 §5.1, with `flags` in the bits above the prefix of the first byte.
fn encode_integer(dst: &mut Vec<u8>, prefix: u8, flags: u8, mut value: usize) {
    let max = (1usize << prefix) - 1;
    if value < max {
        dst.push(flags | value as u8);
        return;
    }
    dst.push(flags | max as u8);
    value -= max;
    while value >= 0x80 {
        dst.push((value as u8 & 0x7f) | 0x80);
        value >>= 7;
    }
    dst.push(value as u8);
}

/// RFC 7541 §5.1. At most five continuation bytes: more than any table index or string length
/// this decoder could accept.
fn integer(block: &mut &[u8], prefix: u8) -> Result<usize, HpackError> {
    let max = (1usize << prefix) - 1;
    let (&first, rest) = block.split_first().ok_or(HpackError::Truncated)?;
    *block = rest;
    let mut value = (first as usize & max) as u64;
    if value < max as u64 {
        return Ok(value as usize);
    }
    let mut shift = 0u32;
    loop {
        let (&b, rest) = block.split_first().ok_or(HpackError::Truncated)?;
        *block = rest;
        // At most 7 * 5 = 35 bits: a u64 holds it on any target; usize may not.
        value += ((b & 0x7f) as u64) << shift;
        if b & 0x80 == 0 {
            return usize::try_from(value).map_err(|_| HpackError::IntegerOverflow);
        }
        shift += 7;
        if shift > 28 {
            return Err(HpackError::IntegerOverflow);
        }
    }
}

/// A string literal (§5.2): raw bytes borrowed from the block, or decoded into `scratch`.
fn string<'r, 'b: 'r, 's: 'r>(
    block: &mut &'b [u8],
    scratch: &'s mut Vec<u8>,
) -> Result<&'r [u8], HpackError> {
    let huffman = block.first().ok_or(HpackError::Truncated)? & 0x80 != 0;
    let len = integer(block, 7)?;
    if len > block.len() {
        return Err(HpackError::Truncated);
    }
    let (raw, rest) = block.split_at(len);
    *block = rest;
    if !huffman {
        return Ok(raw);
    }
    scratch.clear();
    huffman::decode(raw, scratch).map_err(|_| HpackError::Huffman)?;
    Ok(scratch)
}

/// The static table (RFC 7541 Appendix A), indices 1..=61.
const STATIC: [(&[u8], &[u8]); 61] = [
    (b":authority", b""),
    (b":method", b"GET"),
    (b":method", b"POST"),
    (b":path", b"/"),
    (b":path", b"/index.html"),
    (b":scheme", b"http"),
    (b":scheme", b"https"),
    (b":status", b"200"),
    (b":status", b"204"),
    (b":status", b"206"),
    (b":status", b"304"),
    (b":status", b"400"),
    (b":status", b"404"),
    (b":status", b"500"),
    (b"accept-charset", b""),
    (b"accept-encoding", b"gzip, deflate"),
    (b"accept-language", b""),
    (b"accept-ranges", b""),
    (b"accept", b""),
    (b"access-control-allow-origin", b""),
    (b"age", b""),
    (b"allow", b""),
    (b"authorization", b""),
    (b"cache-control", b""),
    (b"content-disposition", b""),
    (b"content-encoding", b""),
    (b"content-language", b""),
    (b"content-length", b""),
    (b"content-location", b""),
    (b"content-range", b""),
    (b"content-type", b""),
    (b"cookie", b""),
    (b"date", b""),
    (b"etag", b""),
    (b"expect", b""),
    (b"expires", b""),
    (b"from", b""),
    (b"host", b""),
    (b"if-match", b""),
    (b"if-modified-since", b""),
    (b"if-none-match", b""),
    (b"if-range", b""),
    (b"if-unmodified-since", b""),
    (b"last-modified", b""),
    (b"link", b""),
    (b"location", b""),
    (b"max-forwards", b""),
    (b"proxy-authenticate", b""),
    (b"proxy-authorization", b""),
    (b"range", b""),
    (b"referer", b""),
    (b"refresh", b""),
    (b"retry-after", b""),
    (b"server", b""),
    (b"set-cookie", b""),
    (b"strict-transport-security", b""),
    (b"transfer-encoding", b""),
    (b"user-agent", b""),
    (b"vary", b""),
    (b"via", b""),
    (b"www-authenticate", b""),
];

/// A dynamic table entry: name and value.
type Entry = (Box<[u8]>, Box<[u8]>);

/// The dynamic table (§2.3.2, §4): newest entry first.
struct Table {
    entries: VecDeque<Entry>,
    size: usize,
    max: usize,
}

impl Table {
    fn new(max: usize) -> Table {
        Table {
            entries: VecDeque::new(),
            size: 0,
            max,
        }
    }

    fn get(&self, index: usize) -> Result<(&[u8], &[u8]), HpackError> {
        match index {
            0 => Err(HpackError::BadIndex(0)),
            1..=61 => Ok(STATIC[index - 1]),
            _ => self
                .entries
                .get(index - 62)
                .map(|(n, v)| (&n[..], &v[..]))
                .ok_or(HpackError::BadIndex(index)),
        }
    }

    /// §4.4: evict from the end until the entry fits; an entry larger than the whole table
    /// empties it and is not added (not an error).
    fn insert(&mut self, name: Box<[u8]>, value: Box<[u8]>) {
        let size = name.len() + value.len() + ENTRY_OVERHEAD;
        if size > self.max {
            self.entries.clear();
            self.size = 0;
            return;
        }
        while self.size + size > self.max {
            self.evict();
        }
        self.size += size;
        self.entries.push_front((name, value));
    }

    /// §4.3: a smaller maximum evicts until the table fits.
    fn resize(&mut self, max: usize) {
        self.max = max;
        while self.size > max {
            self.evict();
        }
    }

    fn evict(&mut self) {
        if let Some((n, v)) = self.entries.pop_back() {
            self.size -= n.len() + v.len() + ENTRY_OVERHEAD;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        hex::decode(s.split_whitespace().collect::<String>()).unwrap()
    }

    fn decode(d: &mut Decoder, block: &[u8]) -> Result<Vec<(String, String, bool)>, HpackError> {
        let mut out = Vec::new();
        d.decode(block, |f| {
            out.push((
                String::from_utf8_lossy(f.name).into_owned(),
                String::from_utf8_lossy(f.value).into_owned(),
                f.sensitive,
            ))
        })?;
        Ok(out)
    }

    fn pairs(v: &[(String, String, bool)]) -> Vec<(&str, &str)> {
        v.iter().map(|(n, v, _)| (n.as_str(), v.as_str())).collect()
    }

    /// RFC 7541 Appendix C.3 (requests without Huffman) and C.4 (with), three requests each on
    /// one connection, so the dynamic table carries over.
    #[test]
    fn rfc7541_appendix_c3_and_c4() {
        let requests = [
            vec![
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                (":authority", "www.example.com"),
            ],
            vec![
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                (":authority", "www.example.com"),
                ("cache-control", "no-cache"),
            ],
            vec![
                (":method", "GET"),
                (":scheme", "https"),
                (":path", "/index.html"),
                (":authority", "www.example.com"),
                ("custom-key", "custom-value"),
            ],
        ];
        for blocks in [
            [
                "8286 8441 0f77 7777 2e65 7861 6d70 6c65 2e63 6f6d",
                "8286 84be 5808 6e6f 2d63 6163 6865",
                "8287 85bf 400a 6375 7374 6f6d 2d6b 6579 0c63 7573 746f 6d2d 7661 6c75 65",
            ],
            [
                "8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff",
                "8286 84be 5886 a8eb 1064 9cbf",
                "8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf",
            ],
        ] {
            let mut d = Decoder::new(DEFAULT_TABLE_SIZE, 1 << 16);
            for (block, want) in blocks.iter().zip(&requests) {
                assert_eq!(pairs(&decode(&mut d, &hex(block)).unwrap()), *want);
            }
            assert_eq!(d.table.size, 164);
        }
    }

    /// RFC 7541 Appendix C.5: responses with a 256-byte table, so entries are evicted.
    #[test]
    fn rfc7541_appendix_c5_eviction() {
        let mut d = Decoder::new(256, 1 << 16);
        let blocks = [
            "4803 3330 3258 0770 7269 7661 7465 611d 4d6f 6e2c 2032 3120 4f63 7420 3230 3133
             2032 303a 3133 3a32 3120 474d 546e 1768 7474 7073 3a2f 2f77 7777 2e65 7861 6d70
             6c65 2e63 6f6d",
            "4803 3330 37c1 c0bf",
            "88c1 611d 4d6f 6e2c 2032 3120 4f63 7420 3230 3133 2032 303a 3133 3a32 3220 474d
             54c0 5a04 677a 6970 7738 666f 6f3d 4153 444a 4b48 514b 425a 584f 5157 454f 5049
             5541 5857 5145 4f49 553b 206d 6178 2d61 6765 3d33 3630 303b 2076 6572 7369 6f6e
             3d31",
        ];
        let first = decode(&mut d, &hex(blocks[0])).unwrap();
        assert_eq!(first[0].1, "302");
        let second = decode(&mut d, &hex(blocks[1])).unwrap();
        assert_eq!(
            pairs(&second),
            [
                (":status", "307"),
                ("cache-control", "private"),
                ("date", "Mon, 21 Oct 2013 20:13:21 GMT"),
                ("location", "https://www.example.com"),
            ]
        );
        let third = decode(&mut d, &hex(blocks[2])).unwrap();
        assert_eq!(third[5].0, "set-cookie");
        assert_eq!(d.table.size, 215);
        assert_eq!(d.table.entries.len(), 3);
    }

    #[test]
    fn never_indexed_is_reported_and_not_added() {
        let mut d = Decoder::new(DEFAULT_TABLE_SIZE, 1 << 16);
        // C.2.3: never-indexed "password: secret".
        let got = decode(&mut d, &hex("1008 7061 7373 776f 7264 0673 6563 7265 74")).unwrap();
        assert_eq!(got, [("password".into(), "secret".into(), true)]);
        assert!(d.table.entries.is_empty());
    }

    #[test]
    fn size_updates_are_bounded_and_only_at_the_start() {
        let mut d = Decoder::new(DEFAULT_TABLE_SIZE, 1 << 16);
        // Insert an entry, then shrink the table to 0 and back: the entry is gone.
        decode(&mut d, &hex("4003 6162 6303 6465 66")).unwrap();
        assert!(d.table.get(62).is_ok());
        decode(&mut d, &[0x20, 0x3f, 0xe1, 0x1f]).unwrap(); // 0, then 4096
        assert_eq!(d.table.get(62), Err(HpackError::BadIndex(62)));
        // Above the limit.
        assert_eq!(
            decode(&mut d, &[0x3f, 0xe2, 0x1f]),
            Err(HpackError::TableSize(4097, 4096))
        );
        // After a field.
        assert_eq!(
            decode(&mut d, &[0x82, 0x20]),
            Err(HpackError::LateSizeUpdate)
        );
    }

    #[test]
    fn malformed_blocks_are_errors_not_panics() {
        for (block, err) in [
            (vec![0x80], HpackError::BadIndex(0)),
            (vec![0xbe], HpackError::BadIndex(62)),
            (
                vec![0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
                HpackError::IntegerOverflow,
            ),
            (vec![0xff], HpackError::Truncated),
            (vec![0x40, 0x05, b'a'], HpackError::Truncated),
            (vec![0x00, 0x81, 0xff, 0x00], HpackError::Huffman),
            (vec![0x41], HpackError::Truncated),
        ] {
            let mut d = Decoder::new(DEFAULT_TABLE_SIZE, 1 << 16);
            assert_eq!(decode(&mut d, &block), Err(err), "{block:02x?}");
        }
    }

    #[test]
    fn a_list_larger_than_the_bound_is_refused() {
        let mut d = Decoder::new(DEFAULT_TABLE_SIZE, 100);
        // One 40-byte entry referenced three times: 3 * (1+39+32) > 100.
        let mut block = vec![0x40, 0x01, b'x', 39];
        block.extend([b'v'; 39]);
        block.extend([0xbe, 0xbe]);
        assert_eq!(decode(&mut d, &block), Err(HpackError::ListTooLarge(100)));
    }

    #[test]
    fn an_entry_larger_than_the_table_empties_it() {
        let mut d = Decoder::new(64, 1 << 16);
        decode(&mut d, &hex("4001 6101 62")).unwrap(); // a: b, 34 bytes
        let mut big = vec![0x40, 0x01, b'c', 40];
        big.extend([b'd'; 40]);
        decode(&mut d, &big).unwrap();
        assert!(d.table.entries.is_empty());
        assert_eq!(d.table.size, 0);
    }

    #[test]
    fn literals_round_trip_through_the_decoder() {
        let mut d = Decoder::new(DEFAULT_TABLE_SIZE, 1 << 20);
        let long = vec![b'z'; 300];
        let mut block = Vec::new();
        for (name, value, sensitive) in [
            (
                &b":path"[..],
                &b"/SpiffeWorkloadAPI/FetchX509SVID"[..],
                false,
            ),
            (b"workload.spiffe.io", b"true", true),
            (b"x-long", &long[..], false),
            (b"empty", b"", false),
        ] {
            encode_literal(
                &mut block,
                Field {
                    name,
                    value,
                    sensitive,
                },
            );
        }
        let got = decode(&mut d, &block).unwrap();
        assert_eq!(got.len(), 4);
        assert_eq!(got[1], ("workload.spiffe.io".into(), "true".into(), true));
        assert_eq!(got[2].1.len(), 300);
        assert!(d.table.entries.is_empty());
    }
}
