//! Contact sheets: a grid of image tiles, each with a caption rendered in the public-domain 8×8
//! bitmap font, for `vtp data inspect` and the README.
use font8x8::{UnicodeFonts, BASIC_FONTS};
use image::{imageops, Rgb, RgbImage};

/// Glyph cell size of the bitmap font (pixels).
const GLYPH: u32 = 8;
/// Padding around each tile (pixels).
const PAD: u32 = 4;
const BACKGROUND: Rgb<u8> = Rgb([255, 255, 255]);
const INK: Rgb<u8> = Rgb([20, 20, 20]);

/// One tile: an image and the text printed under it.
pub struct Tile {
    pub image: RgbImage,
    pub caption: String,
}

/// Lays `tiles` out in `columns` columns, each image scaled to `tile`×`tile` (nearest neighbour,
/// so pixels stay visible) with up to `caption_lines` wrapped lines of caption below.
pub fn contact_sheet(tiles: &[Tile], columns: u32, tile: u32, caption_lines: u32) -> RgbImage {
    let columns = columns.max(1);
    let rows = (tiles.len() as u32).div_ceil(columns).max(1);
    let cell_w = tile + 2 * PAD;
    let cell_h = tile + 2 * PAD + caption_lines * (GLYPH + 1);
    let mut sheet = RgbImage::from_pixel(columns * cell_w, rows * cell_h, BACKGROUND);
    for (i, t) in tiles.iter().enumerate() {
        let (x0, y0) = ((i as u32 % columns) * cell_w + PAD, (i as u32 / columns) * cell_h + PAD);
        let scaled = imageops::resize(&t.image, tile, tile, imageops::FilterType::Nearest);
        imageops::replace(&mut sheet, &scaled, i64::from(x0), i64::from(y0));
        let per_line = (tile / GLYPH).max(1) as usize;
        for (line_no, line) in wrap(&t.caption, per_line).iter().take(caption_lines as usize).enumerate() {
            draw_text(&mut sheet, line, x0, y0 + tile + 2 + line_no as u32 * (GLYPH + 1));
        }
    }
    sheet
}

/// Greedy word wrap to lines of at most `width` characters (long words are cut).
pub fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines: Vec<String> = Vec::new();
    let mut current = String::new();
    for word in text.split_whitespace() {
        let word: String = word.chars().take(width).collect();
        if !current.is_empty() && current.chars().count() + 1 + word.chars().count() > width {
            lines.push(std::mem::take(&mut current));
        }
        if !current.is_empty() {
            current.push(' ');
        }
        current.push_str(&word);
    }
    if !current.is_empty() {
        lines.push(current);
    }
    lines
}

/// Draws `text` with its top-left corner at (x, y); characters without a glyph print as `?`.
fn draw_text(img: &mut RgbImage, text: &str, x: u32, y: u32) {
    for (i, ch) in text.chars().enumerate() {
        let glyph = BASIC_FONTS.get(ch).or_else(|| BASIC_FONTS.get('?')).unwrap_or([0; 8]);
        for (row, bits) in glyph.iter().enumerate() {
            for col in 0..GLYPH {
                let (px, py) = (x + i as u32 * GLYPH + col, y + row as u32);
                if bits >> col & 1 == 1 && px < img.width() && py < img.height() {
                    img.put_pixel(px, py, INK);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wraps_words_to_the_width() {
        assert_eq!(
            wrap("a small red circle left of a blue square", 12),
            ["a small red", "circle left", "of a blue", "square"]
        );
        assert_eq!(wrap("", 5), Vec::<String>::new());
        assert_eq!(wrap("abcdefghij", 4), ["abcd"]);
    }

    #[test]
    fn sheet_has_the_grid_size_and_ink() {
        let tiles: Vec<Tile> = (0..5)
            .map(|i| Tile { image: RgbImage::from_pixel(10, 10, Rgb([i * 40, 0, 0])), caption: "hi there".into() })
            .collect();
        let sheet = contact_sheet(&tiles, 2, 32, 2);
        assert_eq!((sheet.width(), sheet.height()), (2 * 40, 3 * (40 + 18)));
        assert!(sheet.pixels().any(|p| *p == INK), "captions are drawn");
        assert_eq!(*sheet.get_pixel(PAD + 40, PAD), Rgb([40, 0, 0]), "second tile placed in column 2");
    }
}
