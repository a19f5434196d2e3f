//! Incremental detokenization: turns a growing list of token ids into text pieces that
//! never split a multi-byte character. A piece is held back while the decoded tail ends
//! in U+FFFD (an incomplete UTF-8 sequence from byte-level or byte-fallback tokens).

use tokenizers::Tokenizer;

use crate::generation::byte_level::ByteLevelTable;

/// Prompt tokens kept as left context, so that decoders which strip a leading space
/// (SentencePiece "▁") see the first generated token mid-sentence, as it is.
const CONTEXT_TOKENS: usize = 5;

/// Turns a window of token ids into text exactly as `Tokenizer::decode(ids, false)` does
/// (invalid UTF-8 replaced by U+FFFD, unknown ids skipped).
pub trait DecodeIds {
    fn decode_ids(&self, ids: &[u32]) -> String;

    /// The text that `ids[split..]` adds to the text of `ids[..split]`, or None while the
    /// whole ends inside a character (or adds nothing).
    fn new_text(&self, ids: &[u32], split: usize) -> Option<String> {
        compare(&self.decode_ids(&ids[..split]), &self.decode_ids(ids))
    }
}

impl DecodeIds for Tokenizer {
    fn decode_ids(&self, ids: &[u32]) -> String {
        self.decode(ids, false).unwrap_or_default()
    }
}

impl DecodeIds for ByteLevelTable {
    fn decode_ids(&self, ids: &[u32]) -> String {
        self.decode(ids)
    }

    fn new_text(&self, ids: &[u32], split: usize) -> Option<String> {
        ByteLevelTable::new_text(self, ids, split)
    }
}

/// The rule of `DecodeIds::new_text` over two decoded windows.
pub(crate) fn compare(prefix: &str, full: &str) -> Option<String> {
    (full.len() > prefix.len() && !full.ends_with('\u{FFFD}')).then(|| new_text(prefix, full))
}

pub struct IncrementalDecoder {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl IncrementalDecoder {
    pub fn new(prompt_ids: &[u32]) -> Self {
        let start = prompt_ids.len().saturating_sub(CONTEXT_TOKENS);
        let ids = prompt_ids[start..].to_vec();
        let read_offset = ids.len();
        Self {
            ids,
            prefix_offset: 0,
            read_offset,
        }
    }

    /// Adds one token and returns the text it completes ("" while a character is unfinished).
    pub fn push<D: DecodeIds + ?Sized>(&mut self, decoder: &D, id: u32) -> String {
        self.ids.push(id);
        let window = &self.ids[self.prefix_offset..];
        if let Some(text) = decoder.new_text(window, self.read_offset - self.prefix_offset) {
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            // Bound the window: keep only what the next decode needs.
            if self.prefix_offset > 64 {
                self.ids.drain(..self.prefix_offset);
                self.read_offset -= self.prefix_offset;
                self.prefix_offset = 0;
            }
            text
        } else {
            String::new()
        }
    }

    /// Text still held back (an unfinished character at the end of generation).
    pub fn flush<D: DecodeIds + ?Sized>(&self, decoder: &D) -> String {
        if self.read_offset == self.ids.len() {
            return String::new();
        }
        let prefix = decoder.decode_ids(&self.ids[self.prefix_offset..self.read_offset]);
        let full = decoder.decode_ids(&self.ids[self.prefix_offset..]);
        new_text(&prefix, &full)
    }
}

/// What `full` adds to `prefix`, char-wise, because decoders may normalise the prefix
/// differently (a SentencePiece strip). When `full` begins with `prefix`'s bytes, its first
/// chars are `prefix`'s: the same text without counting chars.
fn new_text(prefix: &str, full: &str) -> String {
    match full.strip_prefix(prefix) {
        Some(rest) => rest.to_string(),
        None => full.chars().skip(prefix.chars().count()).collect(),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A byte-level BPE tokenizer (GPT-2 style) whose vocabulary is the 256 byte symbols:
    /// every UTF-8 byte is its own token, so multi-byte characters span several tokens.
    pub(crate) fn byte_level_tokenizer() -> Tokenizer {
        let alphabet = tokenizers::pre_tokenizers::byte_level::ByteLevel::alphabet();
        let mut chars: Vec<char> = alphabet.into_iter().collect();
        chars.sort();
        let vocab: serde_json::Map<String, serde_json::Value> = chars
            .iter()
            .enumerate()
            .map(|(i, c)| (c.to_string(), serde_json::json!(i)))
            .collect();
        let json = serde_json::json!({
            "version": "1.0",
            "added_tokens": [],
            "normalizer": null,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                      "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                      "vocab": vocab, "merges": []}
        });
        Tokenizer::from_bytes(json.to_string().as_bytes()).expect("byte-level tokenizer")
    }

    /// A Llama/SentencePiece-style tokenizer with byte-fallback tokens <0x00>..<0xFF>.
    pub(crate) fn byte_fallback_tokenizer() -> Tokenizer {
        let mut vocab = serde_json::Map::new();
        vocab.insert("<unk>".into(), serde_json::json!(0));
        for b in 0..=255u32 {
            vocab.insert(format!("<0x{b:02X}>"), serde_json::json!(1 + b));
        }
        for (i, w) in ["▁Hello", "▁world", "!", "▁a"].iter().enumerate() {
            vocab.insert((*w).into(), serde_json::json!(257 + i));
        }
        let json = serde_json::json!({
            "version": "1.0",
            "added_tokens": [],
            "normalizer": {"type": "Sequence", "normalizers": [
                {"type": "Prepend", "prepend": "▁"}, {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]},
            "pre_tokenizer": null,
            "post_processor": null,
            "decoder": {"type": "Sequence", "decoders": [
                {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                {"type": "ByteFallback"}, {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
            "model": {"type": "BPE", "dropout": null, "unk_token": "<unk>", "continuing_subword_prefix": null,
                      "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true,
                      "vocab": vocab, "merges": []}
        });
        Tokenizer::from_bytes(json.to_string().as_bytes()).expect("byte-fallback tokenizer")
    }

    fn stream(tok: &Tokenizer, prompt: &[u32], ids: &[u32]) -> Vec<String> {
        let mut d = IncrementalDecoder::new(prompt);
        ids.iter().map(|&id| d.push(tok, id)).collect()
    }

    #[test]
    fn byte_level_multibyte_characters_are_never_split() {
        let tok = byte_level_tokenizer();
        let text = "héllo 日本 🦀!";
        let ids = tok.encode(text, false).expect("encode").get_ids().to_vec();
        assert_eq!(ids.len(), text.len(), "one token per byte");
        let pieces = stream(&tok, &[], &ids);
        assert_eq!(pieces.concat(), text);
        for p in &pieces {
            assert!(
                !p.contains('\u{FFFD}'),
                "piece {p:?} holds a broken character"
            );
        }
        // The crab is 4 bytes: three empty pieces, then the whole character.
        let crab = text.find('🦀').expect("crab");
        assert_eq!(&pieces[crab..crab + 4], &["", "", "", "🦀"]);
    }

    #[test]
    fn byte_fallback_tokens_join_into_characters() {
        let tok = byte_fallback_tokenizer();
        // "é" is 0xC3 0xA9 → byte tokens 1+0xC3, 1+0xA9.
        let ids = [257, 1 + 0xC3, 1 + 0xA9, 258, 259];
        let pieces = stream(&tok, &[260], &ids);
        assert_eq!(pieces, vec![" Hello", "", "é", " world", "!"]);
    }

    #[test]
    fn first_token_keeps_its_leading_space_after_a_prompt() {
        let tok = byte_fallback_tokenizer();
        let pieces = stream(&tok, &[257], &[258]);
        assert_eq!(pieces, vec![" world"]);
    }

    #[test]
    fn long_streams_match_a_full_decode() {
        let tok = byte_level_tokenizer();
        let text = "Ünïcödé ".repeat(40);
        let ids = tok
            .encode(text.as_str(), false)
            .expect("encode")
            .get_ids()
            .to_vec();
        let pieces = stream(&tok, &[], &ids);
        assert_eq!(pieces.concat(), text);
    }

    #[test]
    fn flush_returns_an_unfinished_tail() {
        let tok = byte_level_tokenizer();
        let ids = tok.encode("a日", false).expect("encode").get_ids().to_vec();
        let mut d = IncrementalDecoder::new(&[]);
        let mut out = String::new();
        for &id in &ids[..ids.len() - 1] {
            out.push_str(&d.push(&tok, id));
        }
        assert_eq!(out, "a");
        assert_eq!(d.flush(&tok), "\u{FFFD}");
    }
}
