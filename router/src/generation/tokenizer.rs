//! Loading the model's tokenizer and running it off the async threads.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use tokenizers::Tokenizer;

use crate::errors::RouterError;
use crate::generation::byte_level::ByteLevelTable;
use crate::generation::detokenizer::DecodeIds;

#[derive(Clone)]
pub struct TextTokenizer {
    inner: Arc<Tokenizer>,
    special_ids: Arc<HashSet<u32>>,
    /// Each token's bytes, for a byte-level vocabulary: streaming decodes through it.
    byte_table: Option<Arc<ByteLevelTable>>,
}

impl TextTokenizer {
    /// `path` is a tokenizer.json file or a directory holding one.
    pub fn load(path: &Path) -> Result<Self, String> {
        let file = if path.is_dir() {
            path.join("tokenizer.json")
        } else {
            path.to_path_buf()
        };
        let inner = Tokenizer::from_file(&file)
            .map_err(|e| format!("cannot load tokenizer from {}: {e}", file.display()))?;
        Ok(Self::from_tokenizer(inner))
    }

    pub fn from_tokenizer(inner: Tokenizer) -> Self {
        let special_ids = inner
            .get_added_tokens_decoder()
            .iter()
            .filter(|(_, t)| t.special)
            .map(|(id, _)| *id)
            .collect();
        Self {
            byte_table: ByteLevelTable::build(&inner).map(Arc::new),
            inner: Arc::new(inner),
            special_ids: Arc::new(special_ids),
        }
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.inner
    }

    /// Streamed text is decoded through the byte table when there is one.
    pub fn has_byte_table(&self) -> bool {
        self.byte_table.is_some()
    }

    pub fn is_special(&self, id: u32) -> bool {
        self.special_ids.contains(&id)
    }

    /// Encodes on the blocking pool: long prompts take milliseconds of CPU.
    pub async fn encode(
        &self,
        text: String,
        add_special_tokens: bool,
    ) -> Result<Vec<u32>, RouterError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            inner
                .encode(text, add_special_tokens)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| RouterError::Tokenizer(e.to_string()))
        })
        .await
        .map_err(|e| RouterError::Tokenizer(format!("tokenizer task failed: {e}")))?
    }

    /// Decodes on the blocking pool (a token-id prompt echoed or prefixed back as text).
    pub async fn decode(&self, ids: Vec<u32>) -> Result<String, RouterError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            inner
                .decode(&ids, false)
                .map_err(|e| RouterError::Tokenizer(e.to_string()))
        })
        .await
        .map_err(|e| RouterError::Tokenizer(format!("tokenizer task failed: {e}")))?
    }

    /// Tokens with their text and byte offsets in `text` (for /tokenize).
    pub async fn encode_with_offsets(
        &self,
        text: String,
        add_special_tokens: bool,
    ) -> Result<Vec<(u32, String, usize, usize)>, RouterError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let enc = inner
                .encode(text.as_str(), add_special_tokens)
                .map_err(|e| RouterError::Tokenizer(e.to_string()))?;
            Ok(enc
                .get_ids()
                .iter()
                .zip(enc.get_offsets())
                .map(|(&id, &(start, stop))| {
                    let piece = text.get(start..stop).unwrap_or_default().to_string();
                    (id, piece, start, stop)
                })
                .collect())
        })
        .await
        .map_err(|e| RouterError::Tokenizer(format!("tokenizer task failed: {e}")))?
    }
}

impl DecodeIds for TextTokenizer {
    fn decode_ids(&self, ids: &[u32]) -> String {
        match &self.byte_table {
            Some(table) => table.decode(ids),
            None => self.inner.decode_ids(ids),
        }
    }

    fn new_text(&self, ids: &[u32], split: usize) -> Option<String> {
        match &self.byte_table {
            Some(table) => table.new_text(ids, split),
            None => self.inner.new_text(ids, split),
        }
    }
}
