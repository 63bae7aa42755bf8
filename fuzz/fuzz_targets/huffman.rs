//! HPACK's Huffman code (RFC 7541 §5.2): decoding arbitrary bytes never panics; what decodes
//! re-encodes to the same bytes (the padding rules make the code canonical), and every byte
//! string survives encoding and decoding.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mayfly::fuzzing::{huffman_decode, huffman_encode};

fuzz_target!(|data: &[u8]| {
    let mut out = Vec::new();
    if huffman_decode(data, &mut out) {
        assert_eq!(huffman_encode(&out), data);
    }
    let encoded = huffman_encode(data);
    let mut back = Vec::new();
    assert!(huffman_decode(&encoded, &mut back));
    assert_eq!(back, data);
});
