//! The HPACK decoder (RFC 7541) on a connection's header blocks, sharing one dynamic table as
//! a connection does. Byte 0 picks the table size limit; then blocks, each a length byte and
//! that many bytes. Never a panic; a block that decodes stays within the header list bound,
//! and its fields survive `encode_literal` (what the authority rewrite emits) and a fresh
//! decoder unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mayfly::server::listen::hpack::{encode_literal, Decoder, Field, DEFAULT_TABLE_SIZE};

const MAX_LIST: usize = 16 * 1024;

fuzz_target!(|data: &[u8]| {
    let Some((&pick, mut rest)) = data.split_first() else {
        return;
    };
    let limit = [0, 64, 256, DEFAULT_TABLE_SIZE][usize::from(pick % 4)];
    let mut decoder = Decoder::new(limit, MAX_LIST);
    while let Some((&len, tail)) = rest.split_first() {
        let (block, tail) = tail.split_at(usize::from(len).min(tail.len()));
        rest = tail;
        let mut fields = Vec::new();
        let decoded = decoder.decode(block, |f| {
            fields.push((f.name.to_vec(), f.value.to_vec(), f.sensitive));
        });
        if decoded.is_err() {
            // The table may be out of step with the peer's now: the connection ends.
            return;
        }
        let list: usize = fields.iter().map(|(n, v, _)| n.len() + v.len() + 32).sum();
        assert!(list <= MAX_LIST);
        let mut again = Vec::new();
        for (name, value, sensitive) in &fields {
            encode_literal(
                &mut again,
                Field {
                    name,
                    value,
                    sensitive: *sensitive,
                },
            );
        }
        let mut back = Vec::new();
        Decoder::new(DEFAULT_TABLE_SIZE, usize::MAX)
            .decode(&again, |f| {
                back.push((f.name.to_vec(), f.value.to_vec(), f.sensitive));
            })
            .expect("encode_literal output decodes");
        assert_eq!(back, fields);
    }
});
