//! PNG line charts of a run's `metrics.jsonl`: losses, evaluations and schedules against the step.
//! Drawn with plotters into a memory bitmap, text in the embedded DejaVu Sans font (so no system
//! fonts are needed), encoded with `image` and written atomically.
use super::metrics::{read_jsonl, METRICS_FILE};
use anyhow::{Context, Result};
use plotters::coord::ranged1d::ValueFormatter;
use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Once;

/// The whole bitmap a chart is drawn on.
type Area<'a> = DrawingArea<BitMapBackend<'a>, Shift>;

/// Chart size in pixels (width, height).
const SIZE: (u32, u32) = (900, 500);
/// The font family every text of a chart uses, registered from the embedded font.
const FONT: &str = "sans-serif";
/// Height of one panel of a stacked chart (pixels).
const PANEL_HEIGHT: u32 = 250;
/// Series with at most this many points also get a marker per point.
const MARKER_MAX_POINTS: usize = 40;
/// Line colours (matplotlib's tab10), cycled through in series order.
const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];
/// The metrics drawn in `lr.png`.
const SCHEDULE_KEYS: [&str; 4] = ["lr", "wd", "momentum", "teacher_temp"];

/// One named curve: (x, y) points in drawing order.
#[derive(Clone, Debug)]
pub struct Series {
    /// The legend label.
    pub name: String,
    /// The points; non-finite ones are skipped.
    pub points: Vec<(f64, f64)>,
}

/// Draws `series` as a 900×500 line chart PNG at `path` with axes, tick labels, a legend and
/// `title`; `log_y` puts y on a log scale (then non-positive points are skipped too).
pub fn plot_curves(path: &Path, title: &str, series: &[Series], log_y: bool) -> Result<()> {
    write_png(path, SIZE, |root| draw_panel(root, title, series, log_y))
}

/// Charts `run_dir/metrics.jsonl` into `run_dir/plots/`: `losses.png` (keys `loss/...`),
/// `eval.png` (keys `eval/...`), `ssl.png` (the DINO and iBOT losses next to their teacher targets'
/// entropy and `ln K`, keys `ssl/...`) and `lr.png` (one panel per schedule among `lr`, `wd`,
/// `momentum`, `teacher_temp`, whose scales differ), each only when it has a key to draw.
/// Returns the files written.
pub fn plot_metrics(run_dir: &Path) -> Result<Vec<PathBuf>> {
    let series = collect_series(&read_jsonl(&run_dir.join(METRICS_FILE))?);
    let pick =
        |wanted: &dyn Fn(&str) -> bool| -> Vec<Series> { series.iter().filter(|s| wanted(&s.name)).cloned().collect() };
    let losses = pick(&|k| k.starts_with("loss/"));
    let evals = pick(&|k| k.starts_with("eval/"));
    let has_ssl = series.iter().any(|s| s.name.starts_with("ssl/"));
    let ssl = pick(&|k| has_ssl && (k.starts_with("ssl/") || k == "loss/dino" || k == "loss/ibot"));
    let schedules = pick(&|k| SCHEDULE_KEYS.contains(&k));
    let dir = run_dir.join("plots");
    let mut written = Vec::new();
    let charts = [
        ("losses.png", "Losses", &losses, wants_log_scale(&losses)),
        ("eval.png", "Evaluation", &evals, wants_log_scale(&evals)),
        ("ssl.png", "Self-supervision: losses and teacher-target entropy (nats) vs ln K", &ssl, false),
    ];
    for (file, title, chosen, log_y) in charts {
        if !chosen.is_empty() {
            plot_curves(&dir.join(file), title, chosen, log_y)?;
            written.push(dir.join(file));
        }
    }
    if !schedules.is_empty() {
        plot_panels(&dir.join("lr.png"), &schedules)?;
        written.push(dir.join("lr.png"));
    }
    Ok(written)
}

/// A PNG of stacked charts, one per series (captioned with its name), 900 wide and
/// `PANEL_HEIGHT` per panel (at least 500 in all).
fn plot_panels(path: &Path, series: &[Series]) -> Result<()> {
    let height = (PANEL_HEIGHT * series.len() as u32).max(SIZE.1);
    write_png(path, (SIZE.0, height), |root| {
        for (area, s) in root.split_evenly((series.len(), 1)).iter().zip(series) {
            draw_panel(area, &s.name, std::slice::from_ref(s), wants_log_scale(std::slice::from_ref(s)))?;
        }
        Ok(())
    })
}

/// Renders `draw` into a white RGB bitmap of `size` and writes it to `path` as PNG, atomically.
fn write_png(path: &Path, size: (u32, u32), draw: impl FnOnce(&Area<'_>) -> Result<()>) -> Result<()> {
    register_font();
    let mut pixels = vec![0u8; (size.0 * size.1 * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut pixels, size).into_drawing_area();
        root.fill(&WHITE)?;
        draw(&root).with_context(|| format!("cannot draw '{}'", path.display()))?;
        root.present()?;
    }
    let image = image::RgbImage::from_raw(size.0, size.1, pixels).context("chart buffer has the wrong size")?;
    crate::data::image::write_png(path, &image)
}

/// One series per metric key (in first-appearance order), with a point at each step that logged it.
fn collect_series(rows: &[serde_json::Map<String, serde_json::Value>]) -> Vec<Series> {
    let mut series: Vec<Series> = Vec::new();
    for row in rows {
        let Some(step) = row.get("step").and_then(serde_json::Value::as_f64) else { continue };
        for (key, value) in row.iter().filter(|(k, _)| k.as_str() != "step") {
            let y = value.as_f64().unwrap_or(f64::NAN);
            match series.iter_mut().find(|s| &s.name == key) {
                Some(s) => s.points.push((step, y)),
                None => series.push(Series { name: key.clone(), points: vec![(step, y)] }),
            }
        }
    }
    series
}

/// Log scale when every finite value is positive and they span more than a factor of 100.
fn wants_log_scale(series: &[Series]) -> bool {
    let ys: Vec<f64> = series.iter().flat_map(|s| s.points.iter().map(|p| p.1)).filter(|y| y.is_finite()).collect();
    let (lo, hi) = ys.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &y| (lo.min(y), hi.max(y)));
    !ys.is_empty() && lo > 0.0 && hi > 100.0 * lo
}

/// The finite points of a series (and, on a log scale, only the positive ones).
fn drawable_points(points: &[(f64, f64)], log_y: bool) -> Vec<(f64, f64)> {
    points.iter().copied().filter(|&(x, y)| x.is_finite() && y.is_finite() && (!log_y || y > 0.0)).collect()
}

/// The axis range covering `values` with a margin (multiplicative on a log axis); a unit range
/// when there are none, widened when they are all equal.
fn padded_range(values: impl Iterator<Item = f64>, log: bool) -> Range<f64> {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)));
    match (lo.is_finite(), log) {
        (false, false) => 0.0..1.0,
        (false, true) => 0.1..1.0,
        (true, true) => lo / 1.5..hi * 1.5,
        (true, false) if lo == hi => lo - lo.abs().max(1.0) * 0.5..hi + hi.abs().max(1.0) * 0.5,
        (true, false) => lo - (hi - lo) * 0.05..hi + (hi - lo) * 0.05,
    }
}

/// One chart of `series` filling `area`: axes ranged to the drawable points, `title` above.
fn draw_panel(area: &Area<'_>, title: &str, series: &[Series], log_y: bool) -> Result<()> {
    let kept: Vec<Vec<(f64, f64)>> = series.iter().map(|s| drawable_points(&s.points, log_y)).collect();
    let all: Vec<(f64, f64)> = kept.iter().flatten().copied().collect();
    let x = padded_range(all.iter().map(|p| p.0), false);
    let y = padded_range(all.iter().map(|p| p.1), log_y);
    let (x_labels, y_labels) = (tick_labels(&x, false), tick_labels(&y, log_y));
    let style = ChartStyle { x_labels: &x_labels, y_labels: &y_labels, legend: legend_corner(&all, &x, &y, log_y) };
    let mut builder = ChartBuilder::on(area);
    builder.caption(title, (FONT, 22)).margin(14).x_label_area_size(44).y_label_area_size(76);
    if log_y {
        draw_chart(builder.build_cartesian_2d(x, y.log_scale())?, series, &kept, style)
    } else {
        draw_chart(builder.build_cartesian_2d(x, y)?, series, &kept, style)
    }
}

/// How a chart labels its ticks and where its legend goes.
struct ChartStyle<'a> {
    x_labels: &'a dyn Fn(&f64) -> String,
    y_labels: &'a dyn Fn(&f64) -> String,
    legend: SeriesLabelPosition,
}

/// Axes, grid, one line per series (with markers when sparse) and the legend.
fn draw_chart<'a, Y>(
    mut chart: ChartContext<'a, BitMapBackend<'a>, Cartesian2d<RangedCoordf64, Y>>,
    series: &[Series],
    kept: &[Vec<(f64, f64)>],
    style: ChartStyle<'_>,
) -> Result<()>
where
    Y: Ranged<ValueType = f64> + ValueFormatter<f64>,
{
    chart
        .configure_mesh()
        .x_desc("step")
        .label_style((FONT, 14))
        .axis_desc_style((FONT, 16))
        .light_line_style(RGBColor(235, 235, 235))
        .x_label_formatter(style.x_labels)
        .y_label_formatter(style.y_labels)
        .draw()?;
    for (i, (s, points)) in series.iter().zip(kept).enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        chart
            .draw_series(LineSeries::new(points.iter().copied(), color.stroke_width(2)))?
            .label(s.name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(3)));
        if points.len() <= MARKER_MAX_POINTS {
            chart.draw_series(points.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
        }
    }
    if series.is_empty() {
        return Ok(());
    }
    chart
        .configure_series_labels()
        .position(style.legend)
        .label_font((FONT, 14))
        .background_style(WHITE.mix(0.85))
        .border_style(RGBColor(160, 160, 160))
        .draw()?;
    Ok(())
}

/// The plot corner whose 40 % × 40 % box holds the fewest points, for the legend (upper right,
/// then upper left, on ties).
fn legend_corner(points: &[(f64, f64)], x: &Range<f64>, y: &Range<f64>, log_y: bool) -> SeriesLabelPosition {
    let unit = |v: f64, r: &Range<f64>, log: bool| match log {
        true => (v.ln() - r.start.ln()) / (r.end.ln() - r.start.ln()),
        false => (v - r.start) / (r.end - r.start),
    };
    let side = |u: f64, high: bool| if high { u > 0.6 } else { u < 0.4 };
    let crowd = |&(_, right, upper): &(SeriesLabelPosition, bool, bool)| {
        points.iter().filter(|&&(px, py)| side(unit(px, x, false), right) && side(unit(py, y, log_y), upper)).count()
    };
    let corners = [
        (SeriesLabelPosition::UpperRight, true, true),
        (SeriesLabelPosition::UpperLeft, false, true),
        (SeriesLabelPosition::LowerRight, true, false),
        (SeriesLabelPosition::LowerLeft, false, false),
    ];
    corners.into_iter().min_by_key(crowd).map_or(SeriesLabelPosition::UpperRight, |c| c.0)
}

/// Tick labels for an axis over `range`: scientific when its magnitudes are all tiny or huge,
/// else decimals just fine enough to tell the ticks apart (a tenth of the span, or the lowest
/// decade on a log axis), trailing zeros trimmed.
fn tick_labels(range: &Range<f64>, log: bool) -> impl Fn(&f64) -> String {
    let top = range.start.abs().max(range.end.abs());
    let scientific = !(1e-2..1e5).contains(&top);
    let resolution = if log { range.start } else { (range.end - range.start) / 10.0 };
    let decimals = (-resolution.log10()).ceil().clamp(0.0, 8.0) as usize + usize::from(!log);
    move |&v: &f64| match (v == 0.0, scientific) {
        (true, _) => "0".to_string(),
        (false, true) => scientific_label(v),
        (false, false) => trim_zeros(&format!("{v:.decimals$}")),
    }
}

/// `v` as `m.mme±x` with the mantissa's trailing zeros trimmed (`2.5e-4`).
fn scientific_label(v: f64) -> String {
    let text = format!("{v:.2e}");
    let (mantissa, exponent) = text.split_once('e').unwrap_or((&text, "0"));
    format!("{}e{exponent}", trim_zeros(mantissa))
}

/// A decimal number without trailing fractional zeros (`0.500` → `0.5`, `2.0` → `2`, `-0.0` → `0`).
fn trim_zeros(text: &str) -> String {
    let trimmed = if text.contains('.') { text.trim_end_matches('0').trim_end_matches('.') } else { text };
    if trimmed == "-0" {
        "0".into()
    } else {
        trimmed.into()
    }
}

/// Makes the embedded DejaVu Sans the chart font (once per process).
fn register_font() {
    static REGISTER: Once = Once::new();
    REGISTER.call_once(|| {
        let registered = plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular());
        assert!(registered.is_ok(), "the embedded DejaVu Sans font does not parse");
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tick_labels_are_compact() {
        let linear = tick_labels(&(-0.1..0.5), false);
        assert_eq!([0.0, 0.25, -0.05, 0.5].map(|v| linear(&v)), ["0", "0.25", "-0.05", "0.5"]);
        let steps = tick_labels(&(0.0..20000.0), false);
        assert_eq!(steps(&12500.0), "12500");
        let tiny = tick_labels(&(0.0..0.001), false);
        assert_eq!([0.0, 0.00025, 0.001].map(|v| tiny(&v)), ["0", "2.5e-4", "1e-3"]);
        let log = tick_labels(&(0.03..7.5), true);
        assert_eq!([0.1, 1.0].map(|v| log(&v)), ["0.1", "1"]);
    }

    #[test]
    fn legend_avoids_the_data() {
        let rising: Vec<(f64, f64)> = (0..10).map(|i| (f64::from(i), f64::from(i))).collect();
        let corner = legend_corner(&rising, &(0.0..9.0), &(0.0..9.0), false);
        assert!(matches!(corner, SeriesLabelPosition::UpperLeft));
    }
}
