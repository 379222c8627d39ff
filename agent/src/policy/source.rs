//! A policy file's text, and positions in it.

use std::ops::Range;

/// A 1-based line and column in a policy file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct Pos {
    pub line: usize,
    pub column: usize,
}

/// The file a policy came from, for `file:line:col` in diagnostics.
#[derive(Clone, Debug)]
pub struct Source {
    pub path: String,
    pub text: String,
    line_starts: Vec<usize>,
    /// Every character boundary after a non-ASCII character, as (byte offset, characters before it):
    /// a column is then a binary search and a subtraction, not a count from the line's start (which
    /// made positions in a 1 MB line quadratic).
    wide: Vec<(usize, usize)>,
}

impl Source {
    pub fn new(path: impl Into<String>, text: impl Into<String>) -> Self {
        let text = text.into();
        let line_starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        let mut wide = vec![];
        for (chars, (at, c)) in text.char_indices().enumerate() {
            if !c.is_ascii() {
                wide.push((at + c.len_utf8(), chars + 1));
            }
        }
        Self {
            path: path.into(),
            text,
            line_starts,
            wide,
        }
    }

    /// Characters before byte offset `at` (a character boundary).
    fn chars_before(&self, at: usize) -> usize {
        // The last boundary after a non-ASCII character at or before `at`: only ASCII follows it.
        let i = self.wide.partition_point(|&(b, _)| b <= at);
        match i.checked_sub(1).map(|i| self.wide[i]) {
            Some((b, chars)) => chars + (at - b),
            None => at,
        }
    }

    /// 1-based line and column (in characters) of a byte offset.
    pub fn line_col(&self, offset: usize) -> (usize, usize) {
        let mut offset = offset.min(self.text.len());
        while !self.text.is_char_boundary(offset) {
            offset -= 1;
        }
        let line = self.line_starts.partition_point(|&s| s <= offset) - 1;
        let start = self.line_starts[line];
        (
            line + 1,
            self.chars_before(offset) - self.chars_before(start) + 1,
        )
    }

    /// Position of a span's start.
    pub fn pos(&self, span: &Range<usize>) -> Pos {
        let (line, column) = self.line_col(span.start);
        Pos { line, column }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// Columns count characters from the line's start, whatever mix of ASCII and wide characters.
        #[test]
        fn columns_count_characters(text in "[a\né€😀\t]{0,200}", offsets in prop::collection::vec(0usize..400, 1..20)) {
            let s = Source::new("p", text.clone());
            for o in offsets {
                let mut at = o.min(text.len());
                while !text.is_char_boundary(at) {
                    at -= 1;
                }
                let line_start = text[..at].rfind('\n').map_or(0, |i| i + 1);
                let line = text[..at].matches('\n').count() + 1;
                let col = text[line_start..at].chars().count() + 1;
                prop_assert_eq!(s.line_col(at), (line, col), "offset {}", at);
            }
        }
    }
}
