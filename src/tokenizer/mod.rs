//! OpenAI-CLIP byte-level BPE text tokenizer, as used by VTP's text tower (docs/design.md §3, §9.1-§9.2).
//!
//! Produces exactly the ids of OpenCLIP's `SimpleTokenizer` (`clean='lower'`): text cleaning
//! ([`clean::clean`]), the pre-tokenisation regex, per-word BPE, and `[SOT] + ids + [EOT]` rows
//! truncated / zero-padded to the context length.

mod bpe;
pub mod clean;

use std::sync::Arc;

use regex::Regex;

use bpe::Bpe;

/// Id of `<start_of_text>`, the first token of every row (docs/design.md §3 step 3).
pub const SOT_TOKEN: i64 = 49406;

/// Id of `<end_of_text>`, which ends every row, even a truncated one (docs/design.md §3, §9.2).
pub const EOT_TOKEN: i64 = 49407;

/// Padding id appended after the EOT token (docs/design.md §3; id 0 is also the vocabulary entry `!`).
pub const PAD_TOKEN: i64 = 0;

/// Context length of the released CLIP text towers (docs/design.md §3, §9.2).
pub const DEFAULT_CONTEXT_LENGTH: usize = 77;

/// Pre-tokenisation regex of docs/design.md §3: special literals, contractions, letter runs, single
/// digits, runs of other non-space symbols.
///
/// Python compiles it with `regex.IGNORECASE`, which matters only on already lower-cased text:
/// the literals also match with `ſ` (U+017F) for `s`, and U+0345 (a combining mark that
/// case-folds to `ι`) is matched by no alternative (it is dropped). The `regex` crate would close
/// `\p{L}` under case folding instead, so IGNORECASE is applied to the literals only and U+0345
/// is excluded explicitly.
const SPLIT_PATTERN: &str =
    r"(?i:<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d)|\p{L}+|\p{N}|[^\s\p{L}\p{N}\x{345}]+";

/// The CLIP text tokenizer of docs/design.md §3 (OpenCLIP `SimpleTokenizer`, `clean='lower'`).
///
/// Cloning is cheap (the vocabulary is shared behind an [`Arc`]); the type is `Send + Sync`.
#[derive(Clone)]
pub struct ClipTokenizer {
    inner: Arc<Inner>,
}

/// Shared state of a [`ClipTokenizer`].
struct Inner {
    bpe: Bpe,
    split: Regex,
}

impl ClipTokenizer {
    /// Builds the tokenizer from the built-in OpenAI-CLIP merges file (docs/design.md §3 steps 1-4).
    ///
    /// # Panics
    /// Only if the merges asset compiled into the crate is corrupt, which cannot happen for the
    /// shipped `assets/bpe_simple_vocab_16e6.txt.gz`.
    pub fn new() -> Self {
        let bpe = Bpe::from_gzip(bpe::MERGES_GZ).expect("built-in CLIP BPE merges asset is valid");
        let split = Regex::new(SPLIT_PATTERN).expect("CLIP split pattern is a valid regex");
        Self { inner: Arc::new(Inner { bpe, split }) }
    }

    /// Cleans `text` and BPE-encodes it, without SOT/EOT (docs/design.md §3 "Text cleaning",
    /// "Pre-tokenisation regex", "BPE of one word"; Python `SimpleTokenizer.encode`).
    pub fn encode(&self, text: &str) -> Vec<i64> {
        let cleaned = clean::clean(text);
        self.inner
            .split
            .find_iter(&cleaned)
            .flat_map(|word| self.inner.bpe.encode_word(word.as_str()))
            .map(i64::from)
            .collect()
    }

    /// Tokenizes a batch into rows of exactly `context_length` ids (docs/design.md §9.2):
    /// `[SOT] + encode(text) + [EOT]`, cut to `context_length` with the last id forced to EOT,
    /// then padded with [`PAD_TOKEN`].
    ///
    /// As in Python (`context_length or self.context_length`), `0` means
    /// [`DEFAULT_CONTEXT_LENGTH`].
    pub fn tokenize(&self, texts: &[&str], context_length: usize) -> Vec<Vec<i64>> {
        let length = if context_length == 0 { DEFAULT_CONTEXT_LENGTH } else { context_length };
        texts.iter().map(|text| self.row(text, length)).collect()
    }

    /// Decodes ids back to text for debugging (inverse of docs/design.md §3's byte mapping; `</w>` becomes
    /// a space). SOT/EOT ids and the trailing padding of a row are skipped; a [`PAD_TOKEN`]
    /// inside the sequence is the vocabulary entry `!` and is kept.
    pub fn decode(&self, ids: &[i64]) -> String {
        let end = ids.iter().rposition(|&id| id != PAD_TOKEN).map_or(0, |last| last + 1);
        let content: Vec<i64> = ids[..end].iter().copied().filter(|&id| id != SOT_TOKEN && id != EOT_TOKEN).collect();
        self.inner.bpe.decode(&content)
    }

    /// Vocabulary size, 49408 = 256 bytes + 256 end-of-word bytes + 48894 merges + 2 specials
    /// (docs/design.md §3 step 3).
    pub fn vocab_size(&self) -> usize {
        self.inner.bpe.vocab_size()
    }

    /// One `context_length`-long row of docs/design.md §9.2.
    fn row(&self, text: &str, context_length: usize) -> Vec<i64> {
        let mut tokens = Vec::with_capacity(context_length.max(2));
        tokens.push(SOT_TOKEN);
        tokens.extend(self.encode(text));
        tokens.push(EOT_TOKEN);
        if tokens.len() > context_length {
            tokens.truncate(context_length);
            tokens[context_length - 1] = EOT_TOKEN;
        }
        tokens.resize(context_length, PAD_TOKEN);
        tokens
    }
}

impl Default for ClipTokenizer {
    /// Same as [`ClipTokenizer::new`] (docs/design.md §3).
    fn default() -> Self {
        Self::new()
    }
}
