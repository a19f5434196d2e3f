//! Byte-level vocabularies (GPT-2, Llama 3, Qwen, SmolLM: a `ByteLevel` decoder) decode token
//! by token: each token stands for a fixed byte string, and a window of tokens decodes to
//! those bytes joined, read as UTF-8 with invalid sequences replaced. This table holds each
//! token's bytes, built once per tokenizer, so that streaming a token costs a lookup and a
//! copy instead of a call through the tokenizer's decoder (a string per token, a decoder
//! chain, two allocations per window).
//!
//! Exactly `Tokenizer::decode(ids, false)` (tokenizers 0.22, `ByteLevel::decode_chain`):
//! a token's string comes from the added vocabulary first, then the model; every char maps
//! through GPT-2's byte alphabet, or, if any char is outside it, the string's own UTF-8 bytes
//! are used; unknown ids are skipped. The table is only built for a tokenizer whose decoder is
//! that one decoder alone, and only if the alphabet below is the library's.

use std::collections::HashMap;

use tokenizers::decoders::DecoderWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::Tokenizer;

pub struct ByteLevelTable {
    /// Indexed by token id; None for ids the tokenizer does not know (decode skips them).
    bytes: Vec<Option<Box<[u8]>>>,
}

impl ByteLevelTable {
    /// The table of `tokenizer`, or None when its decoder is not exactly `ByteLevel`.
    pub fn build(tokenizer: &Tokenizer) -> Option<Self> {
        if !matches!(tokenizer.get_decoder(), Some(DecoderWrapper::ByteLevel(_))) {
            return None;
        }
        let char_bytes = char_to_byte();
        // Guard against a library whose alphabet differs from GPT-2's: then the slow path.
        let alphabet = ByteLevel::alphabet();
        if alphabet.len() != char_bytes.len() || !char_bytes.keys().all(|c| alphabet.contains(c)) {
            return None;
        }
        let max_id = tokenizer.get_vocab(true).into_values().max()?;
        let bytes = (0..=max_id)
            .map(|id| {
                tokenizer.id_to_token(id).map(|token| {
                    let mapped: Option<Vec<u8>> =
                        token.chars().map(|c| char_bytes.get(&c).copied()).collect();
                    mapped
                        .unwrap_or_else(|| token.as_bytes().to_vec())
                        .into_boxed_slice()
                })
            })
            .collect();
        Some(Self { bytes })
    }

    /// Appends the bytes of `ids` to `out` (unknown ids add nothing).
    pub fn extend(&self, ids: &[u32], out: &mut Vec<u8>) {
        for &id in ids {
            if let Some(Some(b)) = self.bytes.get(id as usize) {
                out.extend_from_slice(b);
            }
        }
    }

    /// The text of `ids`, as `Tokenizer::decode(ids, false)` gives it.
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut buf = Vec::new();
        self.extend(ids, &mut buf);
        match String::from_utf8(buf) {
            Ok(s) => s,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        }
    }
}

/// GPT-2's map from bytes to printable chars, inverted: printable Latin-1 bytes stand for
/// themselves, the other 68 take the chars from U+0100 on, in byte order.
fn char_to_byte() -> HashMap<char, u8> {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut map = HashMap::with_capacity(256);
    let mut next = 256u32;
    for b in 0..=255u8 {
        let c = if printable(b) {
            char::from(b)
        } else {
            let c = char::from_u32(next).unwrap_or_default();
            next += 1;
            c
        };
        map.insert(c, b);
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generation::detokenizer::tests::{byte_fallback_tokenizer, byte_level_tokenizer};
    use proptest::prelude::*;

    /// A byte-level vocabulary with multi-byte merges and added tokens, special and not.
    fn merged_tokenizer() -> Tokenizer {
        let mut tok = byte_level_tokenizer();
        let added = [
            tokenizers::AddedToken::from("<|im_end|>", true),
            tokenizers::AddedToken::from("日本", false),
            tokenizers::AddedToken::from(" ünï", false),
        ];
        tok.add_special_tokens(&added[..1]);
        tok.add_tokens(&added[1..]);
        tok
    }

    #[test]
    fn only_a_lone_byte_level_decoder_gets_a_table() {
        assert!(ByteLevelTable::build(&byte_level_tokenizer()).is_some());
        assert!(ByteLevelTable::build(&byte_fallback_tokenizer()).is_none());
    }

    #[test]
    fn every_single_token_decodes_as_the_tokenizer_does() {
        let tok = merged_tokenizer();
        let table = ByteLevelTable::build(&tok).expect("byte-level");
        let max = tok.get_vocab_size(true) as u32 + 2;
        for id in 0..max {
            assert_eq!(
                table.decode(&[id]),
                tok.decode(&[id], false).expect("decode"),
                "id {id}"
            );
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Any window of ids (unknown ids, split characters, added tokens included).
        #[test]
        fn windows_decode_as_the_tokenizer_does(ids in proptest::collection::vec(0u32..262, 0..24)) {
            let tok = merged_tokenizer();
            let table = ByteLevelTable::build(&tok).expect("byte-level");
            prop_assert_eq!(table.decode(&ids), tok.decode(&ids, false).expect("decode"));
        }
    }
}
