//! The contract's chained KV block hash (docs/architecture.md, "Block hash"): how the router
//! names a prompt's full blocks so that they can be looked up in a worker's cache index.

use blake2::digest::consts::U8;
use blake2::{Blake2b, Digest};

/// BLAKE2b with an 8-byte digest (the digest size is in the parameter block, so this is not
/// a truncated BLAKE2b-512), no key, salt or personalization.
type Blake2b64 = Blake2b<U8>;

/// `H(parent, tokens)`: the parent hash as u64 little-endian (absent, not zeros, for a
/// sequence's first block), then each token id as u32 little-endian; the digest read as a
/// little-endian u64.
pub fn block_hash(parent: Option<u64>, tokens: &[u32]) -> u64 {
    let mut hasher = Blake2b64::new();
    if let Some(parent) = parent {
        hasher.update(parent.to_le_bytes());
    }
    for token in tokens {
        hasher.update(token.to_le_bytes());
    }
    u64::from_le_bytes(hasher.finalize().into())
}

/// The chained hashes of the prompt's blocks that an engine can reuse: full blocks only, and
/// never the block holding the last token (its logits must be computed), so at most
/// `(len - 1) / block_size` of them. A block size of 0 (a worker that reported none) yields
/// nothing.
pub fn prompt_block_hashes(tokens: &[u32], block_size: usize) -> Vec<u64> {
    if block_size == 0 || tokens.is_empty() {
        return Vec::new();
    }
    let usable = (tokens.len() - 1) / block_size;
    let mut hashes = Vec::with_capacity(usable);
    let mut parent = None;
    for block in tokens.chunks_exact(block_size).take(usable) {
        let hash = block_hash(parent, block);
        hashes.push(hash);
        parent = Some(hash);
    }
    hashes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contract_test_vectors() {
        assert_eq!(block_hash(None, &[1, 2, 3, 4]), 0x9dfefa18f3387ac8);
        assert_eq!(
            block_hash(Some(0x9dfefa18f3387ac8), &[5, 6, 7, 8]),
            0x1ea95d1403a2d75b
        );
    }

    #[test]
    fn a_first_block_is_not_hashed_with_a_zero_parent() {
        assert_ne!(
            block_hash(None, &[1, 2, 3, 4]),
            block_hash(Some(0), &[1, 2, 3, 4])
        );
    }

    #[test]
    fn prompt_hashes_chain_and_skip_the_last_tokens_block() {
        // 9 tokens, B = 4: blocks [1..4] and [5..8] are full and the last token sits alone
        // in the third, so both full blocks are usable.
        let nine: Vec<u32> = (1..=9).collect();
        assert_eq!(
            prompt_block_hashes(&nine, 4),
            vec![0x9dfefa18f3387ac8, 0x1ea95d1403a2d75b]
        );
        // 8 tokens: the second block holds the last token, so only the first is usable.
        assert_eq!(prompt_block_hashes(&nine[..8], 4), vec![0x9dfefa18f3387ac8]);
        assert!(prompt_block_hashes(&nine[..4], 4).is_empty());
        assert!(prompt_block_hashes(&[], 4).is_empty());
        assert!(prompt_block_hashes(&nine, 0).is_empty());
    }
}
