//! Stop sequences: the one place that finds them in generated text (for every route) and
//! says how much of a stream's text must be held back because it could still become one.

/// The stop sequences of one request, scanned incrementally over the growing text.
#[derive(Debug, Clone, Default)]
pub struct StopSequences {
    sequences: Vec<String>,
    longest: usize,
    /// Text before this byte offset has been searched and holds no match.
    searched: usize,
}

impl StopSequences {
    pub fn new(sequences: Vec<String>) -> Self {
        let longest = sequences.iter().map(String::len).max().unwrap_or(0);
        Self {
            sequences,
            longest,
            searched: 0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.sequences.is_empty()
    }

    /// Scans `text` (the whole text so far; it only ever grows) and returns the byte offset
    /// where the earliest stop sequence begins, if one now appears.
    pub fn scan(&mut self, text: &str) -> Option<usize> {
        if self.sequences.is_empty() {
            return None;
        }
        // Only the tail can hold a new match: text already searched stays searched.
        let from = self.searched;
        let hit = self
            .sequences
            .iter()
            .filter_map(|s| text[from..].find(s.as_str()).map(|i| from + i))
            .min();
        let keep = text.len().saturating_sub(self.longest);
        self.searched = floor_char_boundary(text, keep).max(from);
        hit
    }

    /// How many bytes at the end of a stream's text to hold back: they could still be the
    /// start of a stop sequence, which OpenAI routes trim from the answer.
    pub fn hold_back(&self) -> usize {
        self.longest.saturating_sub(1)
    }
}

/// The largest char boundary of `text` at or below `i`.
pub fn floor_char_boundary(text: &str, mut i: usize) -> usize {
    i = i.min(text.len());
    while !text.is_char_boundary(i) {
        i -= 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_match_that_spans_two_pieces() {
        let mut s = StopSequences::new(vec!["END".into()]);
        let mut text = String::from("hello E");
        assert_eq!(s.scan(&text), None);
        text.push_str("ND more");
        assert_eq!(s.scan(&text), Some(6));
    }

    #[test]
    fn earliest_of_several_sequences_wins() {
        let mut s = StopSequences::new(vec!["cd".into(), "b".into()]);
        assert_eq!(s.scan("abcd"), Some(1));
    }

    #[test]
    fn searched_text_is_not_searched_again_and_boundaries_hold() {
        let mut s = StopSequences::new(vec!["zz".into()]);
        let mut text = String::from("ééééé");
        assert_eq!(s.scan(&text), None);
        assert!(text.is_char_boundary(s.searched));
        text.push('z');
        assert_eq!(s.scan(&text), None);
        text.push('z');
        assert_eq!(s.scan(&text), Some(10));
    }

    #[test]
    fn no_sequences_hold_nothing_back() {
        let s = StopSequences::new(vec![]);
        assert!(s.is_empty());
        assert_eq!(s.hold_back(), 0);
        assert_eq!(StopSequences::new(vec!["abc".into()]).hold_back(), 2);
    }
}
