//! Byte-level BPE of the OpenAI-CLIP tokenizer (docs/design.md §3 "Vocabulary construction" steps 1-4,
//! "BPE of one word", and §9.1 special-token literals).
//!
//! Symbols are handled as vocabulary ids rather than strings: every symbol the Python
//! `SimpleTokenizer.bpe` can produce is a vocabulary entry (a mapped byte, a mapped byte plus
//! `</w>`, or the concatenation named by a merge), and the 49408 entries are distinct, so merging
//! ids is exactly equivalent to merging strings.

use std::collections::HashMap;
use std::io::Read;
use std::sync::{Mutex, MutexGuard};

use flate2::read::GzDecoder;

/// The OpenAI-CLIP merges file (MIT licence), as shipped by OpenCLIP (docs/design.md §3).
pub(crate) const MERGES_GZ: &[u8] = include_bytes!("../../assets/bpe_simple_vocab_16e6.txt.gz");

/// Number of merges kept: lines `1 ..= 49152 - 256 - 2` of the merges file (docs/design.md §3 step 2).
const NUM_MERGES: usize = 49152 - 256 - 2;

/// End-of-word marker appended to the last symbol of a word (docs/design.md §3).
const END_OF_WORD: &str = "</w>";

/// Literal text of the start-of-text special token (docs/design.md §3 step 3, §9.1).
const SOT_LITERAL: &str = "<start_of_text>";

/// Literal text of the end-of-text special token (docs/design.md §3 step 3, §9.1).
const EOT_LITERAL: &str = "<end_of_text>";

/// The per-word cache is cleared when it grows past this many words (Python's is unbounded;
/// clearing only costs recomputation, never changes ids).
const CACHE_CAPACITY: usize = 100_000;

/// `bytes_to_unicode()` (docs/design.md §3 step 1): the character each byte value is mapped to.
///
/// Printable bytes `!`..`~`, `¡`..`¬`, `®`..`ÿ` map to themselves; the other 68 byte values map,
/// in increasing order, to U+0100, U+0101, ….
fn bytes_to_unicode() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next_remapped = 256u32;
    for (byte, slot) in (0u32..).zip(table.iter_mut()) {
        let code = if is_printable_byte(byte) {
            byte
        } else {
            next_remapped += 1;
            next_remapped - 1
        };
        *slot = char::from_u32(code).unwrap_or(char::REPLACEMENT_CHARACTER);
    }
    table
}

/// Whether a byte value keeps its own code point in `bytes_to_unicode` (docs/design.md §3 step 1).
fn is_printable_byte(byte: u32) -> bool {
    matches!(byte, 0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF)
}

/// The ordered list `B` of docs/design.md §3 step 1: printable bytes ascending, then the remapped ones.
fn base_bytes_in_vocab_order() -> Vec<u8> {
    let printable = (0u8..=255).filter(|&b| is_printable_byte(u32::from(b)));
    let remapped = (0u8..=255).filter(|&b| !is_printable_byte(u32::from(b)));
    printable.chain(remapped).collect()
}

/// Vocabulary, merge ranks and word cache of the CLIP byte-level BPE (docs/design.md §3).
pub(crate) struct Bpe {
    /// Id of the single-byte symbol for each byte value (without `</w>`).
    byte_ids: [u32; 256],
    /// `bpe_ranks`: adjacent symbol pair -> (merge rank, id of the merged symbol).
    merges: HashMap<(u32, u32), (u32, u32)>,
    /// Vocabulary strings by id (byte-mapped characters, possibly ending in `</w>`).
    vocab: Vec<String>,
    /// Inverse of `bytes_to_unicode`.
    byte_decoder: HashMap<char, u8>,
    /// Per-word cache, keyed by the raw (unmapped) word text.
    cache: Mutex<HashMap<String, Vec<u32>>>,
}

impl Bpe {
    /// Builds the vocabulary from gzip-compressed merges text (docs/design.md §3 steps 1-4).
    pub(crate) fn from_gzip(gz: &[u8]) -> std::io::Result<Self> {
        let mut text = String::new();
        GzDecoder::new(gz).read_to_string(&mut text)?;
        let merges = parse_merges(&text)?;
        Ok(Self::from_merges(&merges))
    }

    /// Assembles `vocab = B + [c + "</w>"] + merges + specials` and the merge table.
    fn from_merges(merges: &[(String, String)]) -> Self {
        let to_char = bytes_to_unicode();
        let base: Vec<String> =
            base_bytes_in_vocab_order().iter().map(|&b| to_char[usize::from(b)].to_string()).collect();
        let mut vocab = base.clone();
        vocab.extend(base.iter().map(|c| format!("{c}{END_OF_WORD}")));
        vocab.extend(merges.iter().map(|(a, b)| format!("{a}{b}")));
        vocab.push(SOT_LITERAL.to_owned());
        vocab.push(EOT_LITERAL.to_owned());

        // Python builds `dict(zip(vocab, range(...)))`: a later duplicate would win.
        let ids: HashMap<&str, u32> = vocab.iter().map(String::as_str).zip(0u32..).collect();
        let mut byte_ids = [0u32; 256];
        for (byte, slot) in byte_ids.iter_mut().enumerate() {
            *slot = ids[to_char[byte].to_string().as_str()];
        }
        let merge_table = merge_table(merges, &ids);
        let byte_decoder = (0u8..=255).map(|b| (to_char[usize::from(b)], b)).collect();
        Self { byte_ids, merges: merge_table, vocab, byte_decoder, cache: Mutex::new(HashMap::new()) }
    }

    /// Number of vocabulary entries (49408 for the official merges, docs/design.md §3 step 3).
    pub(crate) fn vocab_size(&self) -> usize {
        self.vocab.len()
    }

    /// BPE-encodes one pre-tokenised word (one regex match, docs/design.md §3) into vocabulary ids.
    ///
    /// The literals `<start_of_text>` / `<end_of_text>` are never split (docs/design.md §9.1).
    pub(crate) fn encode_word(&self, word: &str) -> Vec<u32> {
        if let Some(id) = self.special_id(word) {
            return vec![id];
        }
        if let Some(ids) = self.lock_cache().get(word) {
            return ids.clone();
        }
        let ids = self.merge_word(self.initial_symbols(word));
        let mut cache = self.lock_cache();
        if cache.len() >= CACHE_CAPACITY {
            cache.clear();
        }
        cache.insert(word.to_owned(), ids.clone());
        ids
    }

    /// Decodes ids back to text: byte-mapped characters to bytes, lossy UTF-8, `</w>` -> space.
    ///
    /// Ids outside the vocabulary are ignored.
    pub(crate) fn decode(&self, ids: &[i64]) -> String {
        let symbols: String = ids
            .iter()
            .filter_map(|&id| usize::try_from(id).ok())
            .filter_map(|id| self.vocab.get(id))
            .map(String::as_str)
            .collect();
        let bytes: Vec<u8> = symbols.chars().filter_map(|c| self.byte_decoder.get(&c).copied()).collect();
        String::from_utf8_lossy(&bytes).replace(END_OF_WORD, " ")
    }

    /// Id of a special-token literal, pre-seeded in Python's BPE cache (docs/design.md §9.1).
    fn special_id(&self, word: &str) -> Option<u32> {
        let last = u32::try_from(self.vocab.len()).ok()?;
        match word {
            SOT_LITERAL => Some(last - 2),
            EOT_LITERAL => Some(last - 1),
            _ => None,
        }
    }

    /// One symbol per UTF-8 byte; the last one carries `</w>` (ids shifted by 256).
    fn initial_symbols(&self, word: &str) -> Vec<u32> {
        let mut symbols: Vec<u32> = word.bytes().map(|b| self.byte_ids[usize::from(b)]).collect();
        if let Some(last) = symbols.last_mut() {
            *last += 256;
        }
        symbols
    }

    /// Repeatedly merges the lowest-ranked adjacent pair, all occurrences left to right.
    fn merge_word(&self, mut symbols: Vec<u32>) -> Vec<u32> {
        while symbols.len() > 1 {
            let Some((pair, merged)) = self.best_pair(&symbols) else {
                break;
            };
            symbols = merge_pair(&symbols, pair, merged);
        }
        symbols
    }

    /// The adjacent pair with the lowest merge rank, with the id it merges into.
    fn best_pair(&self, symbols: &[u32]) -> Option<((u32, u32), u32)> {
        symbols
            .windows(2)
            .filter_map(|w| {
                let pair = (w[0], w[1]);
                self.merges.get(&pair).map(|&(rank, merged)| (rank, pair, merged))
            })
            .min_by_key(|&(rank, _, _)| rank)
            .map(|(_, pair, merged)| (pair, merged))
    }

    /// Locks the word cache, recovering it if another thread panicked while holding it.
    fn lock_cache(&self) -> MutexGuard<'_, HashMap<String, Vec<u32>>> {
        self.cache.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Reads merges lines `1 ..= NUM_MERGES` (line 0 is a header), each a whitespace-separated pair.
fn parse_merges(text: &str) -> std::io::Result<Vec<(String, String)>> {
    let lines: Vec<&str> = text.split('\n').skip(1).take(NUM_MERGES).collect();
    if lines.len() != NUM_MERGES {
        return Err(invalid_data(format!("merges file has {} merge lines, expected {NUM_MERGES}", lines.len())));
    }
    lines.iter().map(|line| parse_merge_line(line)).collect()
}

/// Splits one merges line into its two symbols.
fn parse_merge_line(line: &str) -> std::io::Result<(String, String)> {
    let mut parts = line.split_whitespace();
    match (parts.next(), parts.next(), parts.next()) {
        (Some(a), Some(b), None) => Ok((a.to_owned(), b.to_owned())),
        _ => Err(invalid_data(format!("malformed merge line {line:?}"))),
    }
}

/// An `InvalidData` I/O error with a message.
fn invalid_data(message: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, message)
}

/// `bpe_ranks` over ids; merges whose halves are not vocabulary entries can never fire.
fn merge_table(merges: &[(String, String)], ids: &HashMap<&str, u32>) -> HashMap<(u32, u32), (u32, u32)> {
    let mut table = HashMap::with_capacity(merges.len());
    for ((a, b), rank) in merges.iter().zip(0u32..) {
        let joined = format!("{a}{b}");
        if let (Some(&x), Some(&y), Some(&merged)) =
            (ids.get(a.as_str()), ids.get(b.as_str()), ids.get(joined.as_str()))
        {
            table.insert((x, y), (rank, merged));
        }
    }
    table
}

/// Replaces every non-overlapping occurrence of `pair`, scanning left to right.
fn merge_pair(symbols: &[u32], pair: (u32, u32), merged: u32) -> Vec<u32> {
    let mut out = Vec::with_capacity(symbols.len());
    let mut i = 0;
    while i < symbols.len() {
        if i + 1 < symbols.len() && (symbols[i], symbols[i + 1]) == pair {
            out.push(merged);
            i += 2;
        } else {
            out.push(symbols[i]);
            i += 1;
        }
    }
    out
}
