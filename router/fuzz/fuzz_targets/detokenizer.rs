//! Arbitrary token id sequences through `IncrementalDecoder`, as `infer.rs` drives it: a
//! short prompt as left context, one `push` per generated token, `flush` at the end.
//!
//! Tokenizers: the real SmolLM2 tokenizer.json is 3.5 MB, too big to keep here, so two
//! small ones are built at startup with the structure of real models: byte-level BPE
//! (GPT-2/SmolLM2/Llama 3: ByteLevel decoder, multi-byte tokens that start or end inside a
//! UTF-8 character, special tokens) and SentencePiece with byte fallback (Llama 2/Mistral:
//! `▁` replacement, <0xNN> tokens, Strip decoder). Set TG_FUZZ_TOKENIZER=/path/tokenizer.json
//! to fuzz a real tokenizer instead (e.g. ~/.cache/tensorgate/models/*/tokenizer.json).
//!
//! Contract checked (detokenizer.rs): no panic; no pushed piece ends inside a character
//! (ends with U+FFFD); and when the whole generation decodes to text without U+FFFD, the
//! pieces plus `flush` are exactly that text — the prompt's own text excluded. For a
//! byte-level tokenizer, the pieces through its byte table (byte_level.rs, what the router
//! streams with) are the pieces through the tokenizer's own decoder, invalid UTF-8 included.
//!
//! Input layout: byte 0 picks the tokenizer (bit 0) and the prompt length (0..=5, within
//! the decoder's CONTEXT_TOKENS, so the whole prompt is context); then u16 LE ids mod the
//! vocabulary size.

#![no_main]

use std::collections::BTreeMap;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use serde_json::json;
use tensorgate_router::generation::byte_level::ByteLevelTable;
use tensorgate_router::generation::detokenizer::{DecodeIds, IncrementalDecoder};
use tokenizers::Tokenizer;

/// GPT-2's byte → printable char table, as the ByteLevel pre-tokenizer/decoder use.
fn byte_chars() -> Vec<char> {
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    let mut table = vec![' '; 256];
    for (b, c) in bs.into_iter().zip(cs) {
        table[b as usize] = char::from_u32(c).expect("valid char");
    }
    table
}

fn special(id: usize, content: &str) -> serde_json::Value {
    json!({"id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false,
           "normalized": false, "special": true})
}

/// SmolLM2-shaped: specials at 0..3, the 256 byte symbols, then multi-byte tokens, some of
/// them whole words, some splitting UTF-8 characters (é = C3 A9, 日 = E6 97 A5, 🦀 = F0 9F A6 80).
fn byte_level() -> Tokenizer {
    let table = byte_chars();
    let specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
    let mut vocab = BTreeMap::new();
    for (i, s) in specials.iter().enumerate() {
        vocab.insert(s.to_string(), i);
    }
    let mut tokens: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
    for t in [
        &b"Hello"[..],
        b" world",
        b"\n",
        b" ",
        b"  ",
        b"\xC3\xA9",
        b"h\xC3",
        b"\xA9t\xC3",
        b"\xE6\x97",
        b"\x97\xA5",
        b"\xA5\xE6",
        b"\xE6\x97\xA5\xE6\x9C\xAC",
        b"\xF0\x9F",
        b"\x9F\xA6\x80",
        b"\x80!",
        b"\xEF\xBF\xBD",
        b"\xFF",
    ] {
        tokens.push(t.to_vec());
    }
    for t in tokens {
        let s: String = t.iter().map(|&b| table[b as usize]).collect();
        let next = vocab.len();
        vocab.entry(s).or_insert(next);
    }
    let added: Vec<_> = specials
        .iter()
        .enumerate()
        .map(|(i, s)| special(i, s))
        .collect();
    let tokenizer = json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}]},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": false, "byte_fallback": false,
                  "ignore_merges": false, "vocab": vocab, "merges": []}
    });
    Tokenizer::from_bytes(tokenizer.to_string().as_bytes()).expect("byte-level tokenizer")
}

/// Llama 2 / Mistral-shaped: <unk> <s> </s>, <0x00>..<0xFF>, then ▁-words and pieces.
fn byte_fallback() -> Tokenizer {
    let mut vocab = BTreeMap::new();
    for (i, s) in ["<unk>", "<s>", "</s>"].iter().enumerate() {
        vocab.insert(s.to_string(), i);
    }
    for b in 0..=255u32 {
        vocab.insert(format!("<0x{b:02X}>"), 3 + b as usize);
    }
    for w in [
        "▁",
        "▁▁",
        "▁Hello",
        "▁world",
        "!",
        "▁a",
        "a",
        "é",
        "▁日本",
        "本",
        "🦀",
        "▁🦀",
    ] {
        let next = vocab.len();
        vocab.insert(w.to_string(), next);
    }
    let tokenizer = json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [special(0, "<unk>"), special(1, "<s>"), special(2, "</s>")],
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "▁"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]},
        "pre_tokenizer": null,
        "post_processor": null,
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": {"type": "BPE", "dropout": null, "unk_token": "<unk>", "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true,
                  "vocab": vocab, "merges": []}
    });
    Tokenizer::from_bytes(tokenizer.to_string().as_bytes()).expect("byte-fallback tokenizer")
}

/// The tokenizers with their vocabulary sizes (`get_vocab_size(true)` copies the whole
/// vocabulary: far too slow to call per input).
fn tokenizers() -> &'static [(Tokenizer, u32, Option<ByteLevelTable>)] {
    static TOKENIZERS: OnceLock<Vec<(Tokenizer, u32, Option<ByteLevelTable>)>> = OnceLock::new();
    TOKENIZERS.get_or_init(|| {
        let all = match std::env::var_os("TG_FUZZ_TOKENIZER") {
            Some(path) => {
                vec![Tokenizer::from_file(&path).expect("TG_FUZZ_TOKENIZER: tokenizer.json")]
            }
            None => vec![byte_level(), byte_fallback()],
        };
        all.into_iter()
            .map(|t| {
                let n = t.get_vocab_size(true) as u32;
                let table = ByteLevelTable::build(&t);
                (t, n, table)
            })
            .collect()
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&head, rest)) = data.split_first() else {
        return;
    };
    let all = tokenizers();
    let (tok, vocab, table) = &all[(head & 1) as usize % all.len()];
    let mut ids: Vec<u32> = rest
        .chunks(2)
        .map(|c| u32::from(u16::from_le_bytes([c[0], *c.get(1).unwrap_or(&0)])) % *vocab)
        .collect();
    let prompt_len = ((head >> 1) % 6) as usize;
    if ids.len() < prompt_len {
        return;
    }
    let generated = ids.split_off(prompt_len);
    let prompt = ids;

    if let Some(table) = table {
        let pieces = |d: &dyn DecodeIds| {
            let mut decoder = IncrementalDecoder::new(&prompt);
            let mut out: Vec<String> = generated.iter().map(|&id| decoder.push(d, id)).collect();
            out.push(decoder.flush(d));
            out
        };
        assert_eq!(
            pieces(table),
            pieces(tok),
            "prompt {prompt:?} generated {generated:?}: the byte table streams other pieces"
        );
    }

    let mut decoder = IncrementalDecoder::new(&prompt);
    let mut streamed = String::new();
    for &id in &generated {
        let piece = decoder.push(tok, id);
        assert!(
            !piece.ends_with('\u{FFFD}'),
            "piece {piece:?} ends inside a character"
        );
        streamed.push_str(&piece);
    }
    streamed.push_str(&decoder.flush(tok));

    let all_ids: Vec<u32> = prompt.iter().chain(&generated).copied().collect();
    let (Ok(prompt_text), Ok(full_text)) =
        (tok.decode(&prompt, false), tok.decode(&all_ids, false))
    else {
        return;
    };
    if prompt_text.contains('\u{FFFD}') || full_text.contains('\u{FFFD}') {
        return; // Not valid UTF-8: the contract says nothing about where the U+FFFD land.
    }
    let expected: String = full_text
        .chars()
        .skip(prompt_text.chars().count())
        .collect();
    assert_eq!(
        streamed, expected,
        "prompt {prompt:?} generated {generated:?}: streamed text differs from the full decode"
    );
});
