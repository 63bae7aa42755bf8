//! The HPACK Huffman code (RFC 7541 Appendix B), decoding only.
//!
//! The code is canonical (Appendix B says so), so each symbol's code length is enough to
//! rebuild every code. Decoding walks a table of the code tree's internal nodes four bits at a
//! time; the shortest code is five bits, so a nibble completes at most one symbol.

use std::sync::OnceLock;

/// Code length in bits of each symbol 0..=255 and of EOS (256), RFC 7541 Appendix B.
const LENGTHS: [u8; 257] = [
    13, 23, 28, 28, 28, 28, 28, 28, 28, 24, 30, 28, 28, 30, 28, 28, 28, 28, 28, 28, 28, 28, 30, 28,
    28, 28, 28, 28, 28, 28, 28, 28, 6, 10, 10, 12, 13, 6, 8, 11, 10, 10, 8, 11, 8, 6, 6, 6, 5, 5,
    5, 6, 6, 6, 6, 6, 6, 6, 7, 8, 15, 6, 12, 10, 13, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7,
    7, 7, 7, 7, 7, 7, 7, 7, 8, 7, 8, 13, 19, 13, 14, 6, 15, 5, 6, 5, 6, 5, 6, 6, 6, 5, 7, 7, 6, 6,
    6, 5, 6, 7, 6, 5, 5, 6, 7, 7, 7, 7, 7, 15, 11, 14, 13, 28, 20, 22, 20, 20, 22, 22, 22, 23, 22,
    23, 23, 23, 23, 23, 24, 23, 24, 24, 22, 23, 24, 23, 23, 23, 23, 21, 22, 23, 22, 23, 23, 24, 22,
    21, 20, 22, 22, 23, 23, 21, 23, 22, 22, 24, 21, 22, 23, 23, 21, 21, 22, 21, 23, 22, 23, 23, 20,
    22, 22, 22, 23, 22, 22, 23, 26, 26, 20, 19, 22, 23, 22, 25, 26, 26, 26, 27, 27, 26, 24, 25, 19,
    21, 26, 27, 27, 26, 27, 24, 21, 21, 26, 26, 28, 27, 27, 27, 20, 24, 20, 21, 22, 21, 21, 23, 22,
    22, 25, 25, 24, 24, 26, 23, 26, 27, 26, 26, 27, 27, 27, 27, 27, 28, 27, 27, 27, 27, 27, 26, 30,
];

const EOS: u16 = 256;
const NO_SYMBOL: u16 = u16::MAX;

#[derive(Clone, Copy)]
struct Step {
    /// Internal node reached after the nibble (0 is the root).
    next: u16,
    /// Symbol completed within the nibble, if any.
    symbol: u16,
    /// The nibble completed EOS, which must never appear inside a string (RFC 7541 §5.2).
    eos: bool,
}

struct Tables {
    steps: Vec<[Step; 16]>,
    /// Nodes where a string may end: the root, or 1..=7 one-bits below it (padding must be the
    /// most significant bits of EOS and shorter than a byte, RFC 7541 §5.2).
    may_end: Vec<bool>,
}

/// Each symbol's code, from the lengths by the canonical rule: ordered by (length, symbol),
/// every code is the previous one plus one, shifted left by the growth in length.
pub(crate) fn codes() -> [(u32, u8); 257] {
    let mut order: Vec<usize> = (0..257).collect();
    order.sort_by_key(|&s| (LENGTHS[s], s));
    let mut out = [(0u32, 0u8); 257];
    let (mut code, mut prev) = (0u32, LENGTHS[order[0]]);
    for (i, &s) in order.iter().enumerate() {
        let len = LENGTHS[s];
        if i > 0 {
            code = (code + 1) << (len - prev);
        }
        prev = len;
        out[s] = (code, len);
    }
    out
}

fn tables() -> &'static Tables {
    static TABLES: OnceLock<Tables> = OnceLock::new();
    TABLES.get_or_init(|| {
        const LEAF: u32 = 1 << 16;
        // The code tree: children of internal nodes; 0 never names a child (it is the root).
        let mut nodes: Vec<[u32; 2]> = vec![[0, 0]];
        for (symbol, &(code, len)) in codes().iter().enumerate() {
            let mut node = 0usize;
            for i in (1..len).rev() {
                let bit = ((code >> i) & 1) as usize;
                if nodes[node][bit] == 0 {
                    nodes.push([0, 0]);
                    nodes[node][bit] = (nodes.len() - 1) as u32;
                }
                node = nodes[node][bit] as usize;
            }
            nodes[node][(code & 1) as usize] = LEAF | symbol as u32;
        }
        let steps = (0..nodes.len())
            .map(|start| {
                std::array::from_fn(|nibble| {
                    let mut step = Step {
                        next: start as u16,
                        symbol: NO_SYMBOL,
                        eos: false,
                    };
                    for i in (0..4).rev() {
                        let child = nodes[step.next as usize][(nibble >> i) & 1];
                        if child & LEAF != 0 {
                            let symbol = (child & 0xffff) as u16;
                            if symbol == EOS {
                                step.eos = true;
                                break;
                            }
                            step.symbol = symbol;
                            step.next = 0;
                        } else {
                            step.next = child as u16;
                        }
                    }
                    step
                })
            })
            .collect();
        let mut may_end = vec![false; nodes.len()];
        may_end[0] = true;
        let mut node = 0usize;
        for _ in 0..7 {
            node = nodes[node][1] as usize;
            may_end[node] = true;
        }
        Tables { steps, may_end }
    })
}

/// A Huffman-coded string that is not valid: EOS inside it, or bad padding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvalidHuffman;

/// Appends the decoding of `src` to `dst`.
pub fn decode(src: &[u8], dst: &mut Vec<u8>) -> Result<(), InvalidHuffman> {
    let t = tables();
    let mut state = 0usize;
    dst.reserve(src.len() + src.len() / 2);
    for &byte in src {
        for nibble in [byte >> 4, byte & 0x0f] {
            let step = t.steps[state][nibble as usize];
            if step.eos {
                return Err(InvalidHuffman);
            }
            if step.symbol != NO_SYMBOL {
                dst.push(step.symbol as u8);
            }
            state = step.next as usize;
        }
    }
    if t.may_end[state] {
        Ok(())
    } else {
        Err(InvalidHuffman)
    }
}

#[cfg(any(test, fuzzing))]
pub(crate) fn encode(src: &[u8]) -> Vec<u8> {
    let codes = codes();
    let (mut acc, mut bits, mut out) = (0u64, 0u32, Vec::new());
    for &b in src {
        let (code, len) = codes[b as usize];
        acc = (acc << len) | code as u64;
        bits += len as u32;
        while bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    if bits > 0 {
        out.push(((acc << (8 - bits)) as u8) | (0xff >> bits));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        hex::decode(s.replace(' ', "")).unwrap()
    }

    #[test]
    fn rfc7541_appendix_c4_and_c6_strings() {
        for (coded, plain) in [
            ("f1e3 c2e5 f23a 6ba0 ab90 f4ff", "www.example.com"),
            ("a8eb 1064 9cbf", "no-cache"),
            ("25a8 49e9 5ba9 7d7f", "custom-key"),
            ("25a8 49e9 5bb8 e8b4 bf", "custom-value"),
            ("6402", "302"),
            ("aec3 771a 4b", "private"),
            (
                "d07a be94 1054 d444 a820 0595 040b 8166 e082 a62d 1bff",
                "Mon, 21 Oct 2013 20:13:21 GMT",
            ),
            (
                "9d29 ad17 1863 c78f 0b97 c8e9 ae82 ae43 d3",
                "https://www.example.com",
            ),
        ] {
            let mut out = Vec::new();
            decode(&hex(coded), &mut out).unwrap();
            assert_eq!(out, plain.as_bytes());
            assert_eq!(encode(plain.as_bytes()), hex(coded));
        }
    }

    #[test]
    fn every_byte_round_trips() {
        let all: Vec<u8> = (0..=255).collect();
        let mut out = Vec::new();
        decode(&encode(&all), &mut out).unwrap();
        assert_eq!(out, all);
    }

    #[test]
    fn padding_longer_than_seven_bits_or_not_ones_is_refused() {
        let mut out = Vec::new();
        // 'a' is 00011 (5 bits): three bits of ones pad it.
        assert!(decode(&[0b0001_1111], &mut out).is_ok());
        assert!(decode(&[0b0001_1110], &mut out).is_err());
        // A whole byte of padding.
        assert!(decode(&[0b0001_1111, 0xff], &mut out).is_err());
        assert!(decode(&[0xff], &mut out).is_err());
        // EOS (30 ones) inside the string.
        assert!(decode(&[0xff, 0xff, 0xff, 0xff], &mut out).is_err());
        assert!(decode(&[], &mut out).is_ok());
    }
}
