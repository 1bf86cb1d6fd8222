//! CLIP text tokenizer against the reference fixture `clip-tokenizer.json` (fixtures README §4)
//! and the test vectors of docs/design.md §3 / §9.1-§9.2.

use std::path::PathBuf;

use serde_json::Value;
use vtp::tokenizer::clean::{clean, collapse_whitespace, fix_text, html_unescape};
use vtp::tokenizer::{ClipTokenizer, DEFAULT_CONTEXT_LENGTH, EOT_TOKEN, PAD_TOKEN, SOT_TOKEN};

/// Fixture directory: `$VTP_FIXTURES`, else `../shared/fixtures` next to the crate.
fn fixtures_dir() -> PathBuf {
    std::env::var_os("VTP_FIXTURES")
        .map_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/fixtures")), PathBuf::from)
}

/// Parsed `clip-tokenizer.json`; a missing or unreadable file fails the test.
fn load_fixture() -> Value {
    let path = fixtures_dir().join("clip-tokenizer.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!("cannot read tokenizer fixture {} ({e}); set VTP_FIXTURES to the fixtures directory", path.display())
    });
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("fixture {} is not valid JSON: {e}", path.display()))
}

/// The texts of a fixture case (`input` is a string or a list of strings).
fn case_texts(case: &Value) -> Vec<String> {
    match &case["input"] {
        Value::String(text) => vec![text.clone()],
        Value::Array(items) => {
            items.iter().map(|item| item.as_str().expect("input list holds strings").to_owned()).collect()
        }
        other => panic!("unexpected fixture input {other}"),
    }
}

/// The expected `[n_texts][context_length]` id rows of a fixture case.
fn case_ids(case: &Value) -> Vec<Vec<i64>> {
    case["ids"]
        .as_array()
        .expect("ids is a list of rows")
        .iter()
        .map(|row| {
            row.as_array().expect("row is a list").iter().map(|id| id.as_i64().expect("id is an integer")).collect()
        })
        .collect()
}

/// `[SOT] + ids + [EOT]`, zero-padded to 77 (a docs/design.md §3 table row).
fn padded(ids: &[i64]) -> Vec<i64> {
    let mut row = vec![SOT_TOKEN];
    row.extend_from_slice(ids);
    row.push(EOT_TOKEN);
    row.resize(DEFAULT_CONTEXT_LENGTH, PAD_TOKEN);
    row
}

#[test]
fn fixture_metadata_matches_constants() {
    let fixture = load_fixture();
    let tokenizer = ClipTokenizer::new();
    assert_eq!(fixture["vocab_size"].as_u64(), Some(49408));
    assert_eq!(tokenizer.vocab_size(), 49408);
    assert_eq!(fixture["sot_token_id"].as_i64(), Some(SOT_TOKEN));
    assert_eq!(fixture["eot_token_id"].as_i64(), Some(EOT_TOKEN));
    assert_eq!(fixture["pad_id"].as_i64(), Some(PAD_TOKEN));
    assert_eq!(fixture["default_context_length"].as_u64(), Some(DEFAULT_CONTEXT_LENGTH as u64));
}

#[test]
fn all_fixture_cases_match_exactly() {
    let fixture = load_fixture();
    let cases = fixture["cases"].as_array().expect("cases is a list");
    assert_eq!(cases.len(), 14, "fixture should hold 14 cases");
    let tokenizer = ClipTokenizer::new();
    for case in cases {
        let name = case["name"].as_str().unwrap_or("?");
        let texts = case_texts(case);
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let context_length = case["context_length_argument"].as_u64().map_or(DEFAULT_CONTEXT_LENGTH, |n| n as usize);
        let expected = case_ids(case);
        let actual = tokenizer.tokenize(&refs, context_length);
        assert_eq!(actual, expected, "fixture case {name:?}");
        assert!(actual.iter().all(|row| row.len() == context_length), "{name}");
    }
}

#[test]
fn spec_section_3_test_vectors() {
    let tokenizer = ClipTokenizer::new();
    let table: [(&str, &[i64]); 4] = [
        ("a photo of a dog.", &[320, 1125, 539, 320, 1929, 269]),
        ("A  Photo of the  CAT!!", &[320, 1125, 539, 518, 2368, 748]),
        ("kite (bird of prey)", &[19867, 263, 3329, 539, 17131, 264]),
        ("&amp; hello", &[261, 3306]),
    ];
    for (text, ids) in table {
        assert_eq!(tokenizer.encode(text), ids, "{text:?}");
        assert_eq!(tokenizer.tokenize(&[text], 77), vec![padded(ids)], "{text:?}");
    }
    let dogs = "dog ".repeat(100);
    let mut expected = vec![SOT_TOKEN];
    expected.extend([1929; 75]);
    expected.push(EOT_TOKEN);
    assert_eq!(tokenizer.tokenize(&[&dogs], 77), vec![expected]);
}

#[test]
fn special_literals_map_to_special_ids() {
    // docs/design.md §9.1: the literals are not split by BPE, whatever their capitalisation.
    let tokenizer = ClipTokenizer::new();
    assert_eq!(tokenizer.encode("cafÃ© <start_of_text> <END_OF_TEXT>"), vec![15304, SOT_TOKEN, EOT_TOKEN]);
}

#[test]
fn ignorecase_quirks_of_the_split_regex() {
    // Python's IGNORECASE split regex (docs/design.md §3): `'ſ` is a contraction, `<ſtart_of_text>` matches
    // the literal alternative but is not the special token, and U+0345 matches no alternative.
    let tokenizer = ClipTokenizer::new();
    assert_eq!(
        tokenizer.encode("it'\u{17f} quick\u{345} <\u{17f}tart_of_text>"),
        vec![585, 6, 129, 379, 3712, 27, 129, 123, 16707, 62, 684, 62, 18169, 285]
    );
}

#[test]
fn clones_share_one_vocabulary_across_threads() {
    let tokenizer = ClipTokenizer::default();
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let tokenizer = tokenizer.clone();
            std::thread::spawn(move || tokenizer.encode("a photo of a dog."))
        })
        .collect();
    for handle in handles {
        assert_eq!(handle.join().expect("thread panicked"), vec![320, 1125, 539, 320, 1929, 269]);
    }
}

#[test]
fn custom_context_lengths() {
    // docs/design.md §9.2: rows are exactly L long and a truncated row still ends with EOT.
    let tokenizer = ClipTokenizer::new();
    let text = "a photo of a small red car parked on the street";
    assert_eq!(tokenizer.tokenize(&[text], 8), vec![vec![SOT_TOKEN, 320, 1125, 539, 320, 2442, 736, EOT_TOKEN]]);
    assert_eq!(tokenizer.tokenize(&[text], 1), vec![vec![EOT_TOKEN]]);
    assert_eq!(tokenizer.tokenize(&[""], 0), tokenizer.tokenize(&[""], 77));
    assert!(tokenizer.tokenize(&[], 77).is_empty());
}

#[test]
fn decode_inverts_encode() {
    let tokenizer = ClipTokenizer::new();
    let rows = tokenizer.tokenize(&["Hello, world! Café 🍕 and 42"], 77);
    assert_eq!(tokenizer.decode(&rows[0]), "hello , world ! café 🍕 and 4 2 ");
}

#[test]
fn tokenizer_is_send_sync_and_clone() {
    fn assert_traits<T: Send + Sync + Clone + Default>() {}
    assert_traits::<ClipTokenizer>();
}

#[test]
fn html_is_unescaped_twice() {
    assert_eq!(clean("&amp;amp;"), "&");
    assert_eq!(clean("Tom &amp; Jerry &lt;3"), "tom & jerry <3");
    assert_eq!(html_unescape("&amp;amp;"), "&amp;");
    assert_eq!(html_unescape("&eacute &notit; &#x41;&#66 &#0; &#128;"), "é ¬it; AB � €");
    assert_eq!(html_unescape("&bogus; a&b &#xyz;"), "&bogus; a&b &#xyz;");
}

#[test]
fn mojibake_is_repaired() {
    assert_eq!(fix_text("cafÃ©"), "café");
    assert_eq!(fix_text("schÃ¶n"), "schön");
    assert_eq!(fix_text("âœ” No problems"), "✔ No problems");
    assert_eq!(fix_text("voilÃ le travail"), "voilà le travail");
    assert_eq!(fix_text("â€œ like this â€\u{fffd}"), "\" like this \u{fffd}");
    // Genuine accented text is left alone.
    assert_eq!(fix_text("Ångström naïve façade"), "Ångström naïve façade");
}

#[test]
fn ftfy_character_fixes() {
    assert_eq!(fix_text("dog’s “bone”"), "dog's \"bone\"");
    assert_eq!(fix_text("ﬂubberiﬁc"), "flubberific");
    assert_eq!(fix_text("ＬＯＵＤ\u{3000}ＮＯＩＳＥＳ"), "LOUD NOISES");
    assert_eq!(fix_text("P&EACUTE;REZ &ntilde; &nTILDE;"), "PÉREZ ñ &nTILDE;");
    assert_eq!(fix_text("<b>&amp;</b>"), "<b>&amp;</b>");
    assert_eq!(fix_text("a\r\nb\u{2028}c\u{1b}[31md\u{feff}"), "a\nb\ncd");
    assert_eq!(fix_text("e\u{301}"), "é");
}

#[test]
fn whitespace_is_collapsed() {
    assert_eq!(collapse_whitespace("  lots\tof \u{a0} space\n\nand\r\nlines \u{1f} "), "lots of space and lines");
    assert_eq!(clean("  A\u{3000}B\t"), "a b");
    assert_eq!(clean(""), "");
}
