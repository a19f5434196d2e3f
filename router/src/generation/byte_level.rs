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
    /// Every token's bytes, back to back, in id order: one allocation, few cache lines.
    data: Vec<u8>,
    /// Token `id`'s bytes are `data[ends[id - 1]..ends[id]]` (from 0 for id 0). Ids the
    /// tokenizer does not know have none, as decode skips them.
    ends: Vec<u32>,
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
        let mut data = Vec::new();
        let mut ends = Vec::with_capacity(max_id as usize + 1);
        for id in 0..=max_id {
            if let Some(token) = tokenizer.id_to_token(id) {
                let mapped: Option<Vec<u8>> =
                    token.chars().map(|c| char_bytes.get(&c).copied()).collect();
                match mapped {
                    Some(bytes) => data.extend_from_slice(&bytes),
                    None => data.extend_from_slice(token.as_bytes()),
                }
            }
            ends.push(u32::try_from(data.len()).ok()?);
        }
        Some(Self { data, ends })
    }

    fn bytes(&self, id: u32) -> &[u8] {
        let id = id as usize;
        let (Some(&end), start) = (self.ends.get(id), id.checked_sub(1)) else {
            return &[];
        };
        let start = start.map_or(0, |s| self.ends[s]);
        &self.data[start as usize..end as usize]
    }

    /// Appends the bytes of `ids` to `out` (unknown ids add nothing).
    pub fn extend(&self, ids: &[u32], out: &mut Vec<u8>) {
        for &id in ids {
            out.extend_from_slice(self.bytes(id));
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

    /// What `ids[split..]` adds to the text of `ids[..split]`, as `DecodeIds::new_text`
    /// defines it, from one pass over the bytes: when both windows are valid UTF-8 (nearly
    /// always), the new text is the new bytes.
    pub fn new_text(&self, ids: &[u32], split: usize) -> Option<String> {
        let mut buf = Vec::with_capacity(32);
        self.extend(&ids[..split], &mut buf);
        let p = buf.len();
        self.extend(&ids[split..], &mut buf);
        match (std::str::from_utf8(&buf[..p]), std::str::from_utf8(&buf)) {
            (Ok(_), Ok(full)) => {
                (full.len() > p && !full.ends_with('\u{FFFD}')).then(|| full[p..].to_string())
            }
            _ => crate::generation::detokenizer::compare(
                &String::from_utf8_lossy(&buf[..p]),
                &String::from_utf8_lossy(&buf),
            ),
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
    use crate::generation::detokenizer::DecodeIds;
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

        /// The one-pass rule over a window split anywhere equals two decodes compared.
        #[test]
        fn new_text_is_the_two_decode_rule(
            ids in proptest::collection::vec(0u32..262, 1..24),
            cut in any::<proptest::sample::Index>(),
        ) {
            let tok = merged_tokenizer();
            let table = ByteLevelTable::build(&tok).expect("byte-level");
            let split = cut.index(ids.len());
            prop_assert_eq!(table.new_text(&ids, split), DecodeIds::new_text(&tok, &ids, split));
        }
    }
}
