//! Text cleaning of the CLIP tokenizer (docs/design.md §3 "Text cleaning", `clean='lower'`):
//! `ftfy.fix_text`, Python's `html.unescape` applied twice, whitespace collapse, lower-casing.
//!
//! ftfy has no Rust port, so [`fix_text`] re-implements what `ftfy.fix_text` (6.3, default
//! configuration) does to a string: HTML entities (unless the text looks like HTML), mojibake
//! detection with ftfy's "badness" heuristic and re-decoding through the same ten single-byte
//! encodings (including its "sloppy" codecs, `restore_byte_a0`, `replace_lossy_sequences`,
//! `decode_inconsistent_utf8`, the `utf-8-variants` decoder), C1 controls, Latin ligatures,
//! character width, curly quotes, line breaks, terminal escapes, control characters and NFC.
//! Character tables are copied from ftfy 6.3.1 (Apache-2.0) and Python 3's `html` module.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::LazyLock;

use regex::bytes::{Captures as ByteCaptures, Regex as ByteRegex};
use regex::Regex;
use unicode_normalization::UnicodeNormalization;

/// Full cleaning of docs/design.md §3: `whitespace_clean(basic_clean(text)).lower()`, where
/// `basic_clean = html.unescape(html.unescape(ftfy.fix_text(text))).strip()`.
pub fn clean(text: &str) -> String {
    let fixed = fix_text(text);
    let unescaped = html_unescape(&html_unescape(&fixed));
    collapse_whitespace(&unescaped).to_lowercase()
}

/// Python's `" ".join(text.split())` (docs/design.md §3): splits on runs of [`is_python_whitespace`]
/// characters, drops empty pieces and joins with single spaces (this also strips both ends).
pub fn collapse_whitespace(text: &str) -> String {
    text.split(is_python_whitespace).filter(|piece| !piece.is_empty()).collect::<Vec<_>>().join(" ")
}

/// Python's `str.isspace()`, the separator set of `str.split()` / `str.strip()` (docs/design.md §3):
/// Unicode `White_Space` plus the information separators U+001C..U+001F.
fn is_python_whitespace(c: char) -> bool {
    matches!(
        c,
        '\t'..='\r'
            | '\u{1c}'..='\u{20}'
            | '\u{85}'
            | '\u{a0}'
            | '\u{1680}'
            | '\u{2000}'..='\u{200a}'
            | '\u{2028}'
            | '\u{2029}'
            | '\u{202f}'
            | '\u{205f}'
            | '\u{3000}'
    )
}

// ------------------------------------------------------------------------------------------------
// Python `html.unescape`
// ------------------------------------------------------------------------------------------------

/// Longest entity name Python's `html.unescape` considers (`[^\t\n\f <&#;]{1,32}`).
const MAX_ENTITY_NAME_CHARS: usize = 32;

/// Python's `html.unescape` (used twice by docs/design.md §3): all HTML5 named character references
/// (with the legacy semicolon-less prefixes, longest first), decimal and hexadecimal references
/// with the HTML5 replacement rules for invalid code points.
pub fn html_unescape(text: &str) -> String {
    if !text.contains('&') {
        return text.to_owned();
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(amp) = rest.find('&') {
        out.push_str(&rest[..amp]);
        let after = &rest[amp + 1..];
        match char_reference(after) {
            Some((replacement, consumed)) => {
                out.push_str(&replacement);
                rest = &after[consumed..];
            }
            None => {
                out.push('&');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// Decodes the reference that follows an `&`: its replacement and the bytes it consumed.
fn char_reference(after: &str) -> Option<(String, usize)> {
    match after.strip_prefix('#') {
        Some(body) => numeric_reference(body).map(|(text, len)| (text, len + 1)),
        None => named_reference(after),
    }
}

/// `#[0-9]+;?` or `#[xX][0-9a-fA-F]+;?` (the text after `#`).
fn numeric_reference(body: &str) -> Option<(String, usize)> {
    let (digits_at, radix) = match body.as_bytes().first()? {
        b'0'..=b'9' => (0, 10),
        b'x' | b'X' => (1, 16),
        _ => return None,
    };
    let digits = &body[digits_at..];
    let count = digits.bytes().take_while(|b| char::from(*b).is_digit(radix)).count();
    if count == 0 {
        return None;
    }
    let value = digits[..count]
        .chars()
        .filter_map(|d| d.to_digit(radix))
        .fold(0u32, |acc, d| acc.saturating_mul(radix).saturating_add(d));
    let semicolon = usize::from(digits[count..].starts_with(';'));
    Some((numeric_reference_text(value), digits_at + count + semicolon))
}

/// Replacement for `&#value;` (Python's `_invalid_charrefs` / `_invalid_codepoints` rules).
fn numeric_reference_text(value: u32) -> String {
    match value {
        0x00 | 0xD800..=0xDFFF | 0x11_0000.. => char::REPLACEMENT_CHARACTER.to_string(),
        0x0D => "\r".to_owned(),
        0x80..=0x9F => windows_1252_char(value as u8).to_string(),
        _ if is_invalid_code_point(value) => String::new(),
        _ => char::from_u32(value).map_or_else(String::new, String::from),
    }
}

/// Python's `html._invalid_codepoints` (C0/C1 controls, noncharacters); such references vanish.
fn is_invalid_code_point(value: u32) -> bool {
    matches!(value, 0x01..=0x08 | 0x0B | 0x0E..=0x1F | 0x7F..=0x9F | 0xFDD0..=0xFDEF) || value & 0xFFFE == 0xFFFE
}

/// `[^\t\n\f <&#;]{1,32};?`: exact HTML5 name, else the longest legacy (semicolon-less) prefix
/// followed by the rest of the name, else the text unchanged.
fn named_reference(after: &str) -> Option<(String, usize)> {
    let name_len: usize = after
        .chars()
        .take_while(|c| !matches!(c, '\t' | '\n' | '\x0c' | ' ' | '<' | '&' | '#' | ';'))
        .take(MAX_ENTITY_NAME_CHARS)
        .map(char::len_utf8)
        .sum();
    if name_len == 0 {
        return None;
    }
    let len = name_len + usize::from(after[name_len..].starts_with(';'));
    let reference = &after[..len];
    if let Some(expansion) = html5_entity(reference) {
        return Some((expansion.to_owned(), len));
    }
    let starts: Vec<usize> = reference.char_indices().map(|(i, _)| i).collect();
    for &cut in starts.iter().skip(2).rev() {
        if let Some(expansion) = html5_entity(&reference[..cut]) {
            return Some((format!("{expansion}{}", &reference[cut..]), len));
        }
    }
    Some((format!("&{reference}"), len))
}

/// Looks a name (without `&`, with its `;` if any) up in the HTML5 entity table, which is
/// identical to Python's `html.entities.html5` (2231 names).
fn html5_entity(name: &str) -> Option<&'static str> {
    let key = format!("&{name}");
    htmlize::ENTITIES.get(key.as_bytes()).and_then(|expansion| std::str::from_utf8(expansion).ok())
}

// ------------------------------------------------------------------------------------------------
// ftfy.fix_text
// ------------------------------------------------------------------------------------------------

/// ftfy's `max_decode_length`: segments are at most this many characters.
const MAX_DECODE_LENGTH: usize = 1_000_000;

/// `ftfy.fix_text(text)` with the default configuration (docs/design.md §3).
///
/// The text is fixed line by line (ftfy's segments). HTML entities are decoded only until a
/// segment containing `<` is seen: from then on ftfy treats the text as HTML and leaves them.
pub fn fix_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut unescape_html = true;
    for line in text.split_inclusive('\n') {
        for segment in char_chunks(line, MAX_DECODE_LENGTH) {
            unescape_html &= !segment.contains('<');
            out.push_str(&fix_segment(segment, unescape_html));
        }
    }
    out
}

/// Splits `text` into pieces of at most `max_chars` characters.
fn char_chunks(text: &str, max_chars: usize) -> Vec<&str> {
    let mut chunks = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        let cut = rest.char_indices().nth(max_chars).map_or(rest.len(), |(i, _)| i);
        chunks.push(&rest[..cut]);
        rest = &rest[cut..];
    }
    chunks
}

/// ftfy's `fix_and_explain` loop: apply every fixer in order until nothing changes.
fn fix_segment(segment: &str, unescape_html: bool) -> String {
    let mut text = segment.to_owned();
    loop {
        let original = text.clone();
        if unescape_html {
            text = ftfy_unescape_html(&text);
        }
        text = fix_encoding(&text);
        text = fix_c1_controls(&text);
        text = fix_latin_ligatures(&text);
        text = fix_character_width(&text);
        text = uncurl_quotes(&text);
        text = fix_line_breaks(&text);
        // `fix_surrogates` is a no-op: a Rust `str` cannot hold unpaired surrogates.
        text = remove_terminal_escapes(&text);
        text = remove_control_chars(&text);
        text = text.nfc().collect();
        if text == original {
            return text;
        }
    }
}

/// ftfy's conservative entity decoder: only `&name;` HTML5 entities (plus all-caps forms of
/// lower-case names, e.g. `&EACUTE;`) and numeric references whose decoding has no `;`.
fn ftfy_unescape_html(text: &str) -> String {
    static ENTITY: LazyLock<Regex> = LazyLock::new(|| compile(r"&#?[0-9A-Za-z]{1,24};"));
    ENTITY.replace_all(text, |caps: &regex::Captures| unescape_entity(&caps[0])).into_owned()
}

/// Replacement of one `&…;` match in [`ftfy_unescape_html`].
fn unescape_entity(entity: &str) -> String {
    if let Some(expansion) = FTFY_ENTITIES.get(entity) {
        return expansion.clone();
    }
    if entity.starts_with("&#") {
        let decoded = html_unescape(entity);
        if !decoded.contains(';') {
            return decoded;
        }
    }
    entity.to_owned()
}

/// ftfy's `HTML_ENTITIES`: `&name;` -> text for every HTML5 name ending in `;`, plus
/// `&NAME;` -> upper-cased text for all-lower-case names whose upper-case form is not already
/// decoded by `html.unescape`.
static FTFY_ENTITIES: LazyLock<HashMap<String, String>> = LazyLock::new(|| {
    let mut entities = HashMap::new();
    for (key, value) in htmlize::ENTITIES.entries() {
        let (Ok(key), Ok(value)) = (std::str::from_utf8(key), std::str::from_utf8(value)) else {
            continue;
        };
        if !key.ends_with(';') {
            continue;
        }
        entities.insert(key.to_owned(), value.to_owned());
        if key == key.to_lowercase() {
            let upper = key.to_uppercase();
            if html_unescape(&upper) == upper {
                entities.insert(upper, value.to_uppercase());
            }
        }
    }
    entities
});

/// ftfy's `fix_c1_controls`: U+0080..U+009F become their (sloppy) Windows-1252 characters.
fn fix_c1_controls(text: &str) -> String {
    text.chars()
        .map(|c| match u8::try_from(u32::from(c)) {
            Ok(byte @ 0x80..=0x9F) => windows_1252_char(byte),
            _ => c,
        })
        .collect()
}

/// ftfy's `fix_latin_ligatures`: Latin typographic ligatures and legacy digraphs.
fn fix_latin_ligatures(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match latin_ligature(c) {
            Some(letters) => out.push_str(letters),
            None => out.push(c),
        }
    }
    out
}

/// The letters a Latin ligature stands for (ftfy's `LIGATURES`).
fn latin_ligature(c: char) -> Option<&'static str> {
    Some(match c {
        '\u{132}' => "IJ",
        '\u{133}' => "ij",
        '\u{149}' => "\u{2bc}n",
        '\u{1f1}' => "DZ",
        '\u{1f2}' => "Dz",
        '\u{1f3}' => "dz",
        '\u{1c4}' => "D\u{17d}",
        '\u{1c5}' => "D\u{17e}",
        '\u{1c6}' => "d\u{17e}",
        '\u{1c7}' => "LJ",
        '\u{1c8}' => "Lj",
        '\u{1c9}' => "lj",
        '\u{1ca}' => "NJ",
        '\u{1cb}' => "Nj",
        '\u{1cc}' => "nj",
        '\u{fb00}' => "ff",
        '\u{fb01}' => "fi",
        '\u{fb02}' => "fl",
        '\u{fb03}' => "ffi",
        '\u{fb04}' => "ffl",
        '\u{fb05}' => "\u{17f}t",
        '\u{fb06}' => "st",
        _ => return None,
    })
}

/// ftfy's `fix_character_width`: U+3000 becomes a space and the halfwidth/fullwidth forms
/// U+FF01..U+FFEF their NFKC equivalents.
fn fix_character_width(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\u{3000}' => out.push(' '),
            '\u{ff01}'..='\u{ffef}' => out.extend(std::iter::once(c).nfkc()),
            _ => out.push(c),
        }
    }
    out
}

/// ftfy's `uncurl_quotes`: U+02BC, U+2018..U+201B -> `'` and U+201C..U+201F -> `"`.
fn uncurl_quotes(text: &str) -> String {
    text.chars()
        .map(|c| match c {
            '\u{2bc}' | '\u{2018}'..='\u{201b}' => '\'',
            '\u{201c}'..='\u{201f}' => '"',
            _ => c,
        })
        .collect()
}

/// ftfy's `fix_line_breaks`: CRLF, CR, U+2028, U+2029 and U+0085 become `\n`.
fn fix_line_breaks(text: &str) -> String {
    text.replace("\r\n", "\n")
        .chars()
        .map(|c| match c {
            '\r' | '\u{2028}' | '\u{2029}' | '\u{85}' => '\n',
            _ => c,
        })
        .collect()
}

/// ftfy's `remove_terminal_escapes`: ANSI `ESC [ … letter` sequences.
fn remove_terminal_escapes(text: &str) -> String {
    static ANSI: LazyLock<Regex> = LazyLock::new(|| compile(r"\x1b\[[\d;]*[a-zA-Z]"));
    ANSI.replace_all(text, "").into_owned()
}

/// ftfy's `remove_control_chars`: C0 controls other than `\t \n \f \r`, DEL, deprecated
/// Arabic format characters, interlinear annotation characters, U+FFFC and the BOM.
fn remove_control_chars(text: &str) -> String {
    text.chars()
        .filter(|c| {
            !matches!(
                c,
                '\0'..='\u{8}'
                    | '\u{b}'
                    | '\u{e}'..='\u{1f}'
                    | '\u{7f}'
                    | '\u{206a}'..='\u{206f}'
                    | '\u{feff}'
                    | '\u{fff9}'..='\u{fffc}'
            )
        })
        .collect()
}

// ------------------------------------------------------------------------------------------------
// ftfy.fix_encoding: mojibake detection and repair
// ------------------------------------------------------------------------------------------------

/// A single-byte encoding that mojibake may have been decoded with (ftfy's `CHARMAP_ENCODINGS`).
struct Charmap {
    /// The 128 characters bytes 0x80..=0xFF decode to.
    high: &'static str,
    /// ftfy's "sloppy" codecs: byte 0x1A stands for U+FFFD (a lost character).
    sloppy: bool,
    /// Whether `restore_byte_a0` may be tried (all but MacRoman).
    restore_byte_a0: bool,
}

impl Charmap {
    /// `text.encode(encoding)`, or `None` if some character is not in the encoding.
    fn encode(&self, text: &str) -> Option<Vec<u8>> {
        text.chars().map(|c| self.encode_char(c)).collect()
    }

    /// The byte one character encodes to.
    fn encode_char(&self, c: char) -> Option<u8> {
        match c {
            '\u{1a}' if self.sloppy => None,
            '\u{fffd}' if self.sloppy => Some(0x1A),
            _ if c.is_ascii() => u8::try_from(c).ok(),
            _ => self.high.chars().position(|h| h == c).and_then(|i| u8::try_from(0x80 + i).ok()),
        }
    }
}

/// Latin-1 high half.
const LATIN_1: &str = "\u{80}\u{81}\u{82}\u{83}\u{84}\u{85}\u{86}\u{87}\u{88}\u{89}\u{8a}\u{8b}\u{8c}\u{8d}\u{8e}\u{8f}\u{90}\u{91}\u{92}\u{93}\u{94}\u{95}\u{96}\u{97}\u{98}\u{99}\u{9a}\u{9b}\u{9c}\u{9d}\u{9e}\u{9f}\u{a0}¡¢£¤¥¦§¨©ª«¬\u{ad}®¯°±²³´µ¶·¸¹º»¼½¾¿ÀÁÂÃÄÅÆÇÈÉÊËÌÍÎÏÐÑÒÓÔÕÖ×ØÙÚÛÜÝÞßàáâãäåæçèéêëìíîïðñòóôõö÷øùúûüýþÿ";
/// Windows-1252 high half, undefined bytes kept as C1 controls (ftfy's `sloppy-windows-1252`).
const WINDOWS_1252: &str = "€\u{81}‚ƒ„…†‡ˆ‰Š‹Œ\u{8d}Ž\u{8f}\u{90}‘’“”•–—˜™š›œ\u{9d}žŸ\u{a0}¡¢£¤¥¦§¨©ª«¬\u{ad}®¯°±²³´µ¶·¸¹º»¼½¾¿ÀÁÂÃÄÅÆÇÈÉÊËÌÍÎÏÐÑÒÓÔÕÖ×ØÙÚÛÜÝÞßàáâãäåæçèéêëìíîïðñòóôõö÷øùúûüýþÿ";
/// Sloppy Windows-1251 high half.
const WINDOWS_1251: &str = "ЂЃ‚ѓ„…†‡€‰Љ‹ЊЌЋЏђ‘’“”•–—\u{98}™љ›њќћџ\u{a0}ЎўЈ¤Ґ¦§Ё©Є«¬\u{ad}®Ї°±Ііґµ¶·ё№є»јЅѕїАБВГДЕЖЗИЙКЛМНОПРСТУФХЦЧШЩЪЫЬЭЮЯабвгдежзийклмнопрстуфхцчшщъыьэюя";
/// Sloppy Windows-1250 high half.
const WINDOWS_1250: &str = "€\u{81}‚\u{83}„…†‡\u{88}‰Š‹ŚŤŽŹ\u{90}‘’“”•–—\u{98}™š›śťžź\u{a0}ˇ˘Ł¤Ą¦§¨©Ş«¬\u{ad}®Ż°±˛ł´µ¶·¸ąş»Ľ˝ľżŔÁÂĂÄĹĆÇČÉĘËĚÍÎĎĐŃŇÓÔŐÖ×ŘŮÚŰÜÝŢßŕáâăäĺćçčéęëěíîďđńňóôőö÷řůúűüýţ˙";
/// Sloppy Windows-1253 high half.
const WINDOWS_1253: &str = "€\u{81}‚ƒ„…†‡\u{88}‰\u{8a}‹\u{8c}\u{8d}\u{8e}\u{8f}\u{90}‘’“”•–—\u{98}™\u{9a}›\u{9c}\u{9d}\u{9e}\u{9f}\u{a0}΅Ά£¤¥¦§¨©ª«¬\u{ad}®―°±²³΄µ¶·ΈΉΊ»Ό½ΎΏΐΑΒΓΔΕΖΗΘΙΚΛΜΝΞΟΠΡÒΣΤΥΦΧΨΩΪΫάέήίΰαβγδεζηθικλμνξοπρςστυφχψωϊϋόύώÿ";
/// Sloppy Windows-1254 high half.
const WINDOWS_1254: &str = "€\u{81}‚ƒ„…†‡ˆ‰Š‹Œ\u{8d}\u{8e}\u{8f}\u{90}‘’“”•–—˜™š›œ\u{9d}\u{9e}Ÿ\u{a0}¡¢£¤¥¦§¨©ª«¬\u{ad}®¯°±²³´µ¶·¸¹º»¼½¾¿ÀÁÂÃÄÅÆÇÈÉÊËÌÍÎÏĞÑÒÓÔÕÖ×ØÙÚÛÜİŞßàáâãäåæçèéêëìíîïğñòóôõö÷øùúûüışÿ";
/// Sloppy Windows-1257 high half.
const WINDOWS_1257: &str = "€\u{81}‚\u{83}„…†‡\u{88}‰\u{8a}‹\u{8c}¨ˇ¸\u{90}‘’“”•–—\u{98}™\u{9a}›\u{9c}¯˛\u{9f}\u{a0}¡¢£¤¥¦§Ø©Ŗ«¬\u{ad}®Æ°±²³´µ¶·ø¹ŗ»¼½¾æĄĮĀĆÄÅĘĒČÉŹĖĢĶĪĻŠŃŅÓŌÕÖ×ŲŁŚŪÜŻŽßąįāćäåęēčéźėģķīļšńņóōõö÷ųłśūüżž˙";
/// ISO-8859-2 high half.
const ISO_8859_2: &str = "\u{80}\u{81}\u{82}\u{83}\u{84}\u{85}\u{86}\u{87}\u{88}\u{89}\u{8a}\u{8b}\u{8c}\u{8d}\u{8e}\u{8f}\u{90}\u{91}\u{92}\u{93}\u{94}\u{95}\u{96}\u{97}\u{98}\u{99}\u{9a}\u{9b}\u{9c}\u{9d}\u{9e}\u{9f}\u{a0}Ą˘Ł¤ĽŚ§¨ŠŞŤŹ\u{ad}ŽŻ°ą˛ł´ľśˇ¸šşťź˝žżŔÁÂĂÄĹĆÇČÉĘËĚÍÎĎĐŃŇÓÔŐÖ×ŘŮÚŰÜÝŢßŕáâăäĺćçčéęëěíîďđńňóôőö÷řůúűüýţ˙";
/// MacRoman high half.
const MAC_ROMAN: &str = "ÄÅÇÉÑÖÜáàâäãåçéèêëíìîïñóòôöõúùûü†°¢£§•¶ß®©™´¨≠ÆØ∞±≤≥¥µ∂∑∏π∫ªºΩæø¿¡¬√ƒ≈∆«»…\u{a0}ÀÃÕŒœ–—“”‘’÷◊ÿŸ⁄€‹›ﬁﬂ‡·‚„‰ÂÊÁËÈÍÎÏÌÓÔ\u{f8ff}ÒÚÛÙıˆ˜¯˘˙˚¸˝˛ˇ";
/// Code page 437 high half.
const CP437: &str = "ÇüéâäàåçêëèïîìÄÅÉæÆôöòûùÿÖÜ¢£¥₧ƒáíóúñÑªº¿⌐¬½¼¡«»░▒▓│┤╡╢╖╕╣║╗╝╜╛┐└┴┬├─┼╞╟╚╔╩╦╠═╬╧╨╤╥╙╘╒╓╫╪┘┌█▄▌▐▀αßΓπΣσµτΦΘΩδ∞φε∩≡±≥≤⌠⌡÷≈°∙·√ⁿ²■\u{a0}";

/// ftfy's `CHARMAP_ENCODINGS`, in the order they are tried.
const CHARMAPS: [Charmap; 10] = [
    plain(LATIN_1),
    sloppy(WINDOWS_1252),
    sloppy(WINDOWS_1251),
    sloppy(WINDOWS_1250),
    sloppy(WINDOWS_1253),
    sloppy(WINDOWS_1254),
    sloppy(WINDOWS_1257),
    plain(ISO_8859_2),
    Charmap { high: MAC_ROMAN, sloppy: false, restore_byte_a0: false },
    plain(CP437),
];

/// A standard codec from its high half.
const fn plain(high: &'static str) -> Charmap {
    Charmap { high, sloppy: false, restore_byte_a0: true }
}

/// An ftfy "sloppy" codec from its high half.
const fn sloppy(high: &'static str) -> Charmap {
    Charmap { high, sloppy: true, restore_byte_a0: true }
}

/// The sloppy Windows-1252 character of a byte >= 0x80.
fn windows_1252_char(byte: u8) -> char {
    WINDOWS_1252.chars().nth(usize::from(byte) - 0x80).unwrap_or(char::REPLACEMENT_CHARACTER)
}

/// `ftfy.fix_encoding`: repeat one repair step until the text stops changing.
fn fix_encoding(text: &str) -> String {
    let mut text = text.to_owned();
    loop {
        let fixed = fix_encoding_step(&text);
        if fixed == text {
            return text;
        }
        text = fixed;
    }
}

/// ftfy's `_fix_encoding_one_step_and_explain`.
fn fix_encoding_step(text: &str) -> String {
    if text.is_ascii() || !is_bad(text) {
        return text.to_owned();
    }
    if let Some(fixed) = CHARMAPS.iter().find_map(|map| reencode_as_utf8(text, map)) {
        return fixed;
    }
    let fixed = decode_inconsistent_utf8(text);
    if fixed != text {
        return fixed;
    }
    if let Some(fixed) = latin_1_as_windows_1252(text) {
        if fixed != text {
            return fixed;
        }
    }
    fix_c1_controls(text)
}

/// Encodes `text` with a single-byte charmap and decodes the bytes as (variant) UTF-8, with
/// `restore_byte_a0` and `replace_lossy_sequences` as ftfy applies them.
fn reencode_as_utf8(text: &str, map: &Charmap) -> Option<String> {
    let mut bytes = map.encode(text)?;
    if map.restore_byte_a0 && ALTERED_UTF8.is_match(&bytes) {
        bytes = restore_byte_a0(&bytes);
    }
    if map.sloppy {
        bytes = LOSSY_UTF8.replace_all(&bytes, "\u{fffd}".as_bytes()).into_owned();
    }
    decode_utf8_variants(&bytes)
}

/// `text.encode("latin-1").decode("windows-1252")` (strict: five bytes are undefined).
fn latin_1_as_windows_1252(text: &str) -> Option<String> {
    text.chars()
        .map(|c| match u32::from(c) {
            0x81 | 0x8D | 0x8F | 0x90 | 0x9D => None,
            code @ 0x80..=0xFF => u8::try_from(code).ok().map(windows_1252_char),
            0..=0x7F => Some(c),
            _ => None,
        })
        .collect()
}

/// UTF-8 sequences that are valid once a space is turned back into byte 0xA0 (ftfy's
/// `ALTERED_UTF8_RE`).
static ALTERED_UTF8: LazyLock<ByteRegex> = LazyLock::new(|| {
    compile_bytes(concat!(
        r"(?-u)[\xc2\xc3\xc5\xce\xd0\xd9] ",
        r"|[\xe2\xe3] [\x80-\x84\x86-\x9f\xa1-\xbf]",
        r"|[\xe0-\xe3][\x80-\x84\x86-\x9f\xa1-\xbf] ",
        r"|\xf0 [\x80-\xbf][\x80-\xbf]",
        r"|\xf0[\x80-\xbf] [\x80-\xbf]",
        r"|\xf0[\x80-\xbf][\x80-\xbf] ",
    ))
});

/// UTF-8 sequences with continuation bytes lost to byte 0x1A or `?` (ftfy's `LOSSY_UTF8_RE`).
static LOSSY_UTF8: LazyLock<ByteRegex> = LazyLock::new(|| {
    compile_bytes(concat!(
        r"(?-u)[\xc2-\xdf][\x1a]",
        r"|[\xc2-\xc3][?]",
        r"|\xed[\xa0-\xaf][\x1a?]\xed[\xb0-\xbf][\x1a?\x80-\xbf]",
        r"|\xed[\xa0-\xaf][\x1a?\x80-\xbf]\xed[\xb0-\xbf][\x1a?]",
        r"|[\xe0-\xef][\x1a?][\x1a\x80-\xbf]",
        r"|[\xe0-\xef][\x1a\x80-\xbf][\x1a?]",
        r"|[\xf0-\xf4][\x1a?][\x1a\x80-\xbf][\x1a\x80-\xbf]",
        r"|[\xf0-\xf4][\x1a\x80-\xbf][\x1a?][\x1a\x80-\xbf]",
        r"|[\xf0-\xf4][\x1a\x80-\xbf][\x1a\x80-\xbf][\x1a?]",
        r"|\x1a",
    ))
});

/// ftfy's `restore_byte_a0`: put back 0xA0 bytes that became spaces inside UTF-8 sequences.
fn restore_byte_a0(bytes: &[u8]) -> Vec<u8> {
    let spaced = restore_a_grave_words(bytes);
    ALTERED_UTF8
        .replace_all(&spaced, |caps: &ByteCaptures| {
            caps[0].iter().map(|&b| if b == b' ' { 0xA0 } else { b }).collect::<Vec<u8>>()
        })
        .into_owned()
}

/// ftfy's `A_GRAVE_WORD_RE`: `\xc3 ` not followed by ` `, `quele`, `quela`, `quilo` or `s `
/// becomes `\xc3\xa0 ` ("Ã la" -> "à la").
fn restore_a_grave_words(bytes: &[u8]) -> Vec<u8> {
    const EXCEPTIONS: [&[u8]; 5] = [b" ", b"quele", b"quela", b"quilo", b"s "];
    let mut out = Vec::with_capacity(bytes.len() + 8);
    let mut i = 0;
    while i < bytes.len() {
        let rest = &bytes[i..];
        if rest.starts_with(b"\xc3 ") && !EXCEPTIONS.iter().any(|e| rest[2..].starts_with(e)) {
            out.extend_from_slice(b"\xc3\xa0 ");
            i += 2;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    out
}

/// ftfy's `utf-8-variants` decoder: strict UTF-8 that also accepts CESU-8 surrogate pairs and
/// Java's `C0 80` encoding of U+0000. `None` where Python raises `UnicodeDecodeError`.
fn decode_utf8_variants(bytes: &[u8]) -> Option<String> {
    let mut out = String::with_capacity(bytes.len());
    let mut run_start = 0;
    let mut i = 0;
    while i < bytes.len() {
        let special = match bytes[i] {
            0xC0 if bytes.get(i + 1) == Some(&0x80) => Some(('\0', 2)),
            0xED => cesu8_pair(&bytes[i..]).map(|c| (c, 6)),
            _ => None,
        };
        match special {
            Some((c, len)) => {
                out.push_str(std::str::from_utf8(&bytes[run_start..i]).ok()?);
                out.push(c);
                i += len;
                run_start = i;
            }
            None => i += 1,
        }
    }
    out.push_str(std::str::from_utf8(&bytes[run_start..]).ok()?);
    Some(out)
}

/// The character of a six-byte CESU-8 surrogate pair at the start of `bytes`.
fn cesu8_pair(bytes: &[u8]) -> Option<char> {
    let [0xED, b1 @ 0xA0..=0xAF, b2 @ 0x80..=0xBF, 0xED, b4 @ 0xB0..=0xBF, b5 @ 0x80..=0xBF, ..] = *bytes else {
        return None;
    };
    let [b1, b2, b4, b5] = [b1, b2, b4, b5].map(u32::from);
    char::from_u32(((b1 & 0x0F) << 16) + ((b2 & 0x3F) << 10) + ((b4 & 0x0F) << 6) + (b5 & 0x3F) + 0x10000)
}

/// ftfy's `decode_inconsistent_utf8`: fix UTF-8 mojibake embedded in otherwise fine text.
fn decode_inconsistent_utf8(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut last = 0;
    for range in utf8_detector_matches(text) {
        out.push_str(&text[last..range.start]);
        let piece = &text[range.clone()];
        if piece.len() < text.len() && is_bad(piece) {
            out.push_str(&fix_encoding(piece));
        } else {
            out.push_str(piece);
        }
        last = range.end;
    }
    out.push_str(&text[last..]);
    out
}

/// Matches of ftfy's `UTF8_DETECTOR_RE`, whose negative look-behind (no strict continuation
/// character just before the match) is checked here since `regex` has no look-around.
fn utf8_detector_matches(text: &str) -> Vec<Range<usize>> {
    static DETECTOR: LazyLock<Regex> = LazyLock::new(|| {
        compile(&format!(
            "(?:[{UTF8_FIRST_OF_2}][{UTF8_CONTINUATION}]\
             |[{UTF8_FIRST_OF_3}][{UTF8_CONTINUATION}]{{2}}\
             |[{UTF8_FIRST_OF_4}][{UTF8_CONTINUATION}]{{3}})+"
        ))
    });
    static STRICT: LazyLock<Regex> = LazyLock::new(|| compile(&format!("^[{UTF8_CONTINUATION_STRICT}]$")));
    let mut matches = Vec::new();
    let mut from = 0;
    while let Some(m) = DETECTOR.find_at(text, from) {
        let previous = text[..m.start()].chars().next_back();
        if previous.is_some_and(|c| STRICT.is_match(c.encode_utf8(&mut [0; 4]))) {
            from = m.start() + text[m.start()..].chars().next().map_or(1, char::len_utf8);
        } else {
            matches.push(m.range());
            from = m.end();
        }
    }
    matches
}

/// Characters that decode to UTF-8 lead bytes 0xC2..=0xDF in the charmaps.
const UTF8_FIRST_OF_2: &str = "ĂÂÄĀÅÃÆĆČÇĎĐÉĚÊËĖÈĒĘÐĞĢÍÎÏİÌĪĶĹĻŁŃŇŅÑÓÔÖŐÒŌØÕŘŚŠŞŢÞÚÛÜŰÙŪŲŮÝŹŽŻß×ΒΓΔΕΖΗΘΙΚΛΜΝΞΟΠΡΣΤΥΦΧΨΩΪΫάέήίВГДЕЖЗИЙКЛМНОПРСТУФХЦЧШЩЪЫЬЭЮЯ";
/// Characters that decode to UTF-8 lead bytes 0xE0..=0xEF in the charmaps.
const UTF8_FIRST_OF_3: &str = "áăâäàāąåãæćčçďéěêëėèēęęģíîïìīįķĺļŕźΰαβγδεζηθικλμνξοабвгдежзийклмноп";
/// Characters that decode to UTF-8 lead bytes 0xF0 / 0xF3 in the charmaps.
const UTF8_FIRST_OF_4: &str = "đðğóšπσру";
/// Characters that decode to continuation bytes 0x80..=0xBF, plus a space standing for 0xA0.
const UTF8_CONTINUATION: &str =
    "\u{80}-¿ ĄÆĽŁØŖŚŠŞŤŸŹŽŻŒąæƒľłøŗśšşťźžżœˆˇ˘˛˜˝΄΅ΆΈΉΊΌΎΏЁЂЃЄЅІЇЈЉЊЋЌЎЏёђѓєѕіїјљњћќўџҐґ–—―‘’‚“”„†‡•…‰‹›€№™";
/// Continuation characters that rarely stand for themselves next to mojibake.
const UTF8_CONTINUATION_STRICT: &str =
    "\u{80}-¿ĄÆĽŁØŖŚŠŞŤŸŹŽŻŒąæƒľłøŗśšşťźžżœˆˇ˘˛˜˝΄΅ΆΈΉΊΌΎΏЁЂЃЄЅІЇЈЉЊЋЌЎЏёђѓєѕіїјљњћќўџҐґ†‡‰‹›€№™";

// ftfy's `MOJIBAKE_CATEGORIES` (regex character-class contents).
const COMMON: &str = "\u{a0}\u{ad}·´–—―…’";
const C1: &str = "\u{80}-\u{9f}";
const BAD: &str = "¦¤¨¬¯¸ƒˆˇ˘˛˜†‡‰⌐◊\u{fffd}ªº";
const LAW: &str = "¶§";
const CURRENCY: &str = "¢£¥₧€";
const START_PUNCTUATION: &str = "¡«¿©΄΅‘‚“„•‹\u{f8ff}";
const END_PUNCTUATION: &str = "®»˝”›™";
const NUMERIC: &str = "²³¹±¼½¾×µ÷⁄∂∆∏∑√∞∩∫≈≠≡≤≥№";
const KAOMOJI: &str = "Ò-ÖÙ-Üò-öø-üŐŌŪŲ°";
const UPPER_ACCENTED: &str = "À-ÑØÜÝĂĀĄĆČĎĐĘĚĒĖĞĢİĪĶĹĽŁĻŃŇŅŒŘŚŞŠŢŤŮŰŸŹŻŽҐ";
const LOWER_ACCENTED: &str = "ßà-ñăąāćčďđęěēėğģįīķĺľłļœŕśşšťüźżžґﬁﬂ";
const UPPER_COMMON: &str = "ÞΑ-ΩΆΈΉΊΌΎΏΪΫЁ-Я";
const LOWER_COMMON: &str = "α-ωάέήίΰа-џ";
const BOX: &str = "│┌┐┘├┤┬┼═-╬▀▄█▌▐░▒▓";

/// Python `re`'s `\s` (`str.isspace`) as class contents.
const PY_SPACE: &str = r"\t-\r\x1c-\x20\x85\xa0\x{1680}\x{2000}-\x{200a}\x{2028}\x{2029}\x{202f}\x{205f}\x{3000}";

/// ftfy's `is_bad`: whether the text contains a sequence typical of mojibake (`BADNESS_RE`).
fn is_bad(text: &str) -> bool {
    static BADNESS: LazyLock<Regex> = LazyLock::new(|| compile(&badness_pattern()));
    BADNESS.is_match(text)
}

/// ftfy's `BADNESS_RE`, alternative by alternative (Python's `\s` and `\w` spelled out).
fn badness_pattern() -> String {
    let accented = format!("{LOWER_ACCENTED}{UPPER_ACCENTED}");
    let symbols = format!("{START_PUNCTUATION}{END_PUNCTUATION}{CURRENCY}{NUMERIC}{LAW}");
    let arabic = format!("{COMMON}{CURRENCY}{BAD}{NUMERIC}{START_PUNCTUATION}ŸŠ®°µ»");
    [
        format!("[{C1}]"),
        format!("[{BAD}{accented}{BOX}{symbols}][{BAD}]"),
        format!("[a-zA-Z][{LOWER_COMMON}{UPPER_COMMON}][{BAD}]"),
        format!("[{BAD}][{accented}{BOX}{symbols}]"),
        format!("[{LOWER_ACCENTED}{LOWER_COMMON}{BOX}{END_PUNCTUATION}{CURRENCY}{NUMERIC}][{UPPER_ACCENTED}]"),
        format!("[{BOX}{END_PUNCTUATION}{CURRENCY}{NUMERIC}][{LOWER_ACCENTED}]"),
        format!("[{LOWER_ACCENTED}{BOX}{END_PUNCTUATION}][{CURRENCY}]"),
        format!("[{PY_SPACE}][{UPPER_ACCENTED}][{CURRENCY}]"),
        format!("[{UPPER_ACCENTED}{BOX}][{NUMERIC}{LAW}]"),
        format!("[{accented}{BOX}{CURRENCY}{END_PUNCTUATION}][{START_PUNCTUATION}][{NUMERIC}]"),
        format!("[{accented}{CURRENCY}{NUMERIC}{BOX}{LAW}][{END_PUNCTUATION}][{START_PUNCTUATION}]"),
        format!("[{CURRENCY}{NUMERIC}{BOX}][{START_PUNCTUATION}]"),
        format!("[a-z][{UPPER_ACCENTED}][{START_PUNCTUATION}{CURRENCY}]"),
        format!("[{BOX}][{KAOMOJI}]"),
        format!("[{accented}{CURRENCY}{NUMERIC}{START_PUNCTUATION}{END_PUNCTUATION}{LAW}][{BOX}]"),
        format!("[{BOX}][{END_PUNCTUATION}]"),
        format!(r"[{accented}][{START_PUNCTUATION}{END_PUNCTUATION}][\p{{L}}\p{{N}}_]"),
        "[Œœ][^A-Za-z]".to_owned(),
        format!("[{UPPER_ACCENTED}]°"),
        format!(r"[ÂÃÎÐ][€œŠš¢£Ÿž\xa0\xad®©°·»{START_PUNCTUATION}{END_PUNCTUATION}–—´]"),
        "×[²³]".to_owned(),
        format!("[ØÙ][{arabic}][ØÙ][{arabic}]"),
        "à[²µ¹¼½¾]".to_owned(),
        "√[±∂†≠®™´≤≥¥µø]".to_owned(),
        "≈[°¢]".to_owned(),
        "‚Ä[ìîïòôúùû†°¢π]".to_owned(),
        "‚[âó][àä°ê]".to_owned(),
        "вЂ".to_owned(),
        format!("[ВГРС][{C1}{BAD}{START_PUNCTUATION}{END_PUNCTUATION}{CURRENCY}°µ][ВГРС]"),
        "ГўВЂВ.[A-Za-z ]".to_owned(),
        r"Ã[\xa0¡]".to_owned(),
        format!("[a-z][{PY_SPACE}]?[ÃÂ][ ]"),
        "^[ÃÂ][ ]".to_owned(),
        format!("[a-z.,?!{END_PUNCTUATION}]Â[ {START_PUNCTUATION}{END_PUNCTUATION}]"),
        r"β€[™\xa0Ά\xad®°]".to_owned(),
        format!("[ΒΓΞΟ][{C1}{BAD}{START_PUNCTUATION}{END_PUNCTUATION}{CURRENCY}°][ΒΓΞΟ]"),
        "ā€".to_owned(),
    ]
    .join("|")
}

/// Compiles one of this module's constant patterns.
fn compile(pattern: &str) -> Regex {
    Regex::new(pattern).unwrap_or_else(|e| panic!("invalid built-in pattern {pattern:?}: {e}"))
}

/// Compiles one of this module's constant byte patterns.
fn compile_bytes(pattern: &str) -> ByteRegex {
    ByteRegex::new(pattern).unwrap_or_else(|e| panic!("invalid built-in pattern {pattern:?}: {e}"))
}
