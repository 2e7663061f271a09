//! Drawing the dirty-page heatmap of `hvctl dirty heatmap` with plotters: guest-physical
//! address left to right (round labels such as 0, 64 MiB, 128 MiB chosen from the
//! domain's size), one row per round of the stream top to bottom, a colour legend of
//! dirty pages per cell and a title naming the domain, as SVG or PNG.
//!
//! Only the picture lives here: reading the stream file is `dirty_cmd::read_stream`, and
//! the caller decides where the bytes go. The PNG's text is laid out with the DejaVu Sans
//! committed in `assets/fonts` (plotters' `ab_glyph` text), so it looks the same on a
//! machine with no fonts installed; the SVG names the `sans-serif` family and leaves the
//! glyphs to the viewer.

use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::prelude::*;
use wire::dirty::DirtyBitmap;

use crate::{CliError, err};

/// The family every label uses; registered from the committed font.
const FAMILY: &str = "sans-serif";
/// DejaVu Sans 2.37 from Debian's fonts-dejavu-core (license beside it).
static FONT: &[u8] = include_bytes!("../assets/fonts/DejaVuSans.ttf");
/// Bytes per guest page (the streams are of 4 KiB pages).
const PAGE: u64 = 4096;
/// The pixels right of the heatmap taken by the colour legend.
const LEGEND_WIDTH: u32 = 150;
/// The narrowest picture drawn (`--width` below it is raised to it).
pub const MIN_WIDTH: u32 = LEGEND_WIDTH + 250;
/// At most this many address labels, so they do not run into each other.
const MAX_ADDRESS_LABELS: u64 = 8;
/// At most this many round labels.
const MAX_ROUND_LABELS: usize = 10;

/// What to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// A PNG (RGB, text drawn with the committed font).
    Png,
    /// An SVG (text left as text: searchable, scalable).
    Svg,
}

/// A recorded stream to draw: the domain it came from and its rounds in order.
#[derive(Debug)]
pub struct Heatmap<'a> {
    /// The domain the stream was recorded from (None: the stream did not say).
    pub domain: Option<u32>,
    /// One bitmap per round, round 0 first.
    pub rounds: &'a [DirtyBitmap],
}

/// A rendered picture.
#[derive(Debug)]
pub struct Picture {
    /// The encoded file (PNG bytes or SVG text).
    pub bytes: Vec<u8>,
    /// Its size in pixels.
    pub width: u32,
    /// Its size in pixels.
    pub height: u32,
}

impl Heatmap<'_> {
    /// The domain's pages: the largest bitmap of the stream.
    pub fn pages(&self) -> u64 {
        self.rounds.iter().map(DirtyBitmap::pages).max().unwrap_or(0)
    }

    /// The title: whose pages, and what the picture shows.
    pub fn title(&self) -> String {
        let who = self.domain.map_or_else(|| "unknown domain".to_string(), |d| format!("domain {d}"));
        format!(
            "{who}: dirty pages by guest-physical address, {} round{} of {}",
            self.rounds.len(),
            if self.rounds.len() == 1 { "" } else { "s" },
            size_label(self.pages() * PAGE)
        )
    }

    /// Draw it `width` pixels wide (height from the number of rounds).
    pub fn render(&self, format: Format, width: u32) -> Result<Picture, CliError> {
        let pages = self.pages();
        if self.rounds.is_empty() || pages == 0 {
            return Err(err("the stream holds no rounds to draw"));
        }
        // Narrower than this and the labels and legend leave no room for the cells.
        let width = width.max(MIN_WIDTH);
        // Rows of 2..40 px in a band of 200..480 px, so that 4 rounds and 400 rounds
        // both read well and the legend has room.
        let rows = u32::try_from(self.rounds.len()).unwrap_or(u32::MAX);
        let height = 130 + rows.saturating_mul((480 / rows).clamp(2, 40)).clamp(200, 480);
        register_font()?;
        let bytes = match format {
            Format::Svg => {
                let mut svg = String::new();
                let root = SVGBackend::with_string(&mut svg, (width, height)).into_drawing_area();
                self.draw(&root)?;
                root.present().map_err(|e| err(format!("drawing the heatmap: {e}")))?;
                drop(root);
                svg.into_bytes()
            }
            Format::Png => {
                let mut rgb = vec![0u8; width as usize * height as usize * 3];
                let root = BitMapBackend::with_buffer(&mut rgb, (width, height)).into_drawing_area();
                self.draw(&root)?;
                root.present().map_err(|e| err(format!("drawing the heatmap: {e}")))?;
                drop(root);
                encode_png(&rgb, width, height)?
            }
        };
        Ok(Picture { bytes, width, height })
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<(), CliError> {
        let failed = |e: DrawingAreaErrorKind<DB::ErrorType>| err(format!("drawing the heatmap: {e}"));
        root.fill(&WHITE).map_err(failed)?;
        let (plot, legend) = root.split_horizontally(root.dim_in_pixel().0 - LEGEND_WIDTH);
        let pages = self.pages();
        let bytes = pages * PAGE;
        let rounds = self.rounds.len() as u64;
        // Rounds top to bottom in half-row units (plotters formats only its integer
        // axes for us): round r is the row from 2(n-r-1) to 2(n-r), labelled at its
        // middle.
        let top = 2 * rounds;
        let row_middle = |r: u64| top - 2 * r - 1;
        let mut chart = ChartBuilder::on(&plot)
            .caption(self.title(), (FAMILY, 17))
            .margin(12)
            .margin_right(28)
            .x_label_area_size(44)
            .y_label_area_size(56)
            .build_cartesian_2d(
                (0u64..bytes).with_key_points(address_ticks(bytes)),
                (0u64..top)
                    .with_key_points(round_ticks(self.rounds.len()).iter().map(|&r| row_middle(r as u64)).collect()),
            )
            .map_err(failed)?;
        chart
            .configure_mesh()
            .disable_mesh()
            .x_desc("guest-physical address")
            .y_desc("round")
            .x_label_formatter(&|v| size_label(*v))
            .y_label_formatter(&|y| format!("{}", (top - 1).saturating_sub(*y) / 2))
            .label_style((FAMILY, 13))
            .axis_desc_style((FAMILY, 14))
            .draw()
            .map_err(failed)?;
        // One cell per pixel column at most, so no page is lost between two pixels.
        let columns = u64::from(chart.plotting_area().dim_in_pixel().0.max(1)).min(pages);
        // Cells hold `pages / columns` pages, rounded up or down; each is shaded by its
        // own share, so that the rounding draws no stripes.
        let cell_pages = |b: u64| ((b + 1) * pages).div_ceil(columns) - (b * pages).div_ceil(columns);
        let (fewest, most) = (pages / columns, pages.div_ceil(columns));
        for (r, bitmap) in self.rounds.iter().enumerate() {
            let (y0, y1) = (top - 2 * r as u64 - 2, top - 2 * r as u64);
            let shades: Vec<u8> =
                bin(bitmap, pages, columns).iter().enumerate().map(|(b, &n)| shade(n, cell_pages(b as u64))).collect();
            // Neighbouring cells of one colour become one rectangle: an SVG of a
            // mostly clean guest stays small.
            let mut start = 0;
            while start < shades.len() {
                let level = shades[start];
                let end = (start..shades.len()).find(|&i| shades[i] != level).unwrap_or(shades.len());
                let x0 = start as u64 * bytes / columns;
                let x1 = end as u64 * bytes / columns;
                let fill = colour(f64::from(level) / 255.0).filled();
                chart.draw_series([Rectangle::new([(x0, y0), (x1, y1)], fill)]).map_err(failed)?;
                start = end;
            }
        }
        draw_legend(&legend, fewest, most).map_err(failed)
    }
}

/// The colour bar: the share of a cell's pages that were dirty, 0 at the bottom; its
/// caption says how many pages a cell holds.
fn draw_legend<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    fewest: u64,
    most: u64,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    let cell = match (fewest, most) {
        (_, 1) => "cells of 1 page".to_string(),
        (a, b) if a == b => format!("cells of {a} pages"),
        (a, b) => format!("cells of {a}-{b} pages"),
    };
    let mut bar = ChartBuilder::on(area)
        .caption("dirty pages", (FAMILY, 14))
        .margin_top(44)
        .margin_bottom(56)
        .margin_right(30)
        .y_label_area_size(60)
        .build_cartesian_2d(0u32..1u32, (0u32..100u32).with_key_points(vec![0, 25, 50, 75, 100]))?;
    bar.configure_mesh()
        .disable_mesh()
        .disable_x_axis()
        .y_desc(cell)
        .y_label_formatter(&|v| format!("{v} %"))
        .label_style((FAMILY, 13))
        .axis_desc_style((FAMILY, 13))
        .draw()?;
    bar.draw_series((0..100u32).map(|i| Rectangle::new([(0, i), (1, i + 1)], colour(f64::from(i) / 99.0).filled())))?;
    Ok(())
}

/// Dirty pages of `bitmap` in each of `columns` equal slices of `pages`.
fn bin(bitmap: &DirtyBitmap, pages: u64, columns: u64) -> Vec<u64> {
    let mut bins = vec![0u64; columns as usize];
    for pfn in bitmap.ones() {
        bins[(pfn * columns / pages) as usize] += 1;
    }
    bins
}

/// A cell's share of dirty pages in 1/255 steps (what a colour can show anyway).
fn shade(dirty: u64, cell_pages: u64) -> u8 {
    ((dirty * 255) / cell_pages.max(1)).min(255) as u8
}

/// Viridis (matplotlib's default map: ordered in lightness, readable in grey and by
/// most colour-blind readers), interpolated between five of its stops.
fn colour(t: f64) -> RGBColor {
    const STOPS: [(u8, u8, u8); 5] = [(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)];
    let t = t.clamp(0.0, 1.0) * (STOPS.len() - 1) as f64;
    let i = (t.floor() as usize).min(STOPS.len() - 2);
    let f = t - i as f64;
    let mix = |a: u8, b: u8| (f64::from(a) + (f64::from(b) - f64::from(a)) * f).round() as u8;
    let (a, b) = (STOPS[i], STOPS[i + 1]);
    RGBColor(mix(a.0, b.0), mix(a.1, b.1), mix(a.2, b.2))
}

/// Address labels: 0 and every multiple of the smallest power-of-two step that gives at
/// most [`MAX_ADDRESS_LABELS`] of them (the sizes people give guests are powers of two
/// or sums of a few, so the labels land on round numbers like 64 MiB).
fn address_ticks(bytes: u64) -> Vec<u64> {
    let mut step = PAGE;
    while bytes / step > MAX_ADDRESS_LABELS {
        step *= 2;
    }
    (0..=bytes / step).map(|i| i * step).collect()
}

/// The rounds that get a label: every one, or every n-th so at most [`MAX_ROUND_LABELS`].
fn round_ticks(rounds: usize) -> Vec<usize> {
    let every = rounds.div_ceil(MAX_ROUND_LABELS).max(1);
    (0..rounds).step_by(every).collect()
}

/// "0", "512 KiB", "64 MiB", "1.5 GiB": in the largest binary unit the size reaches.
pub fn size_label(bytes: u64) -> String {
    const UNITS: [(u64, &str); 4] = [(1 << 40, "TiB"), (1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")];
    if bytes == 0 {
        return "0".to_string();
    }
    for (unit, name) in UNITS {
        if bytes >= unit {
            let v = bytes as f64 / unit as f64;
            // Two decimals at most, without trailing zeros: 1.25 GiB, 1.5 GiB, 2 GiB.
            let text = format!("{v:.2}");
            let text = text.trim_end_matches('0').trim_end_matches('.');
            return format!("{text} {name}");
        }
    }
    format!("{bytes} B")
}

/// Register the compiled-in font once; a font that does not parse fails every render
/// with this message rather than drawing a picture without labels.
fn register_font() -> Result<(), CliError> {
    static REGISTERED: OnceLock<Result<(), String>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            plotters::style::register_font(FAMILY, FontStyle::Normal, FONT)
                .map_err(|_| "the compiled-in DejaVu Sans does not parse as a font".to_string())
        })
        .clone()
        .map_err(err)
}

fn encode_png(rgb: &[u8], width: u32, height: u32) -> Result<Vec<u8>, CliError> {
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, width, height);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().map_err(|e| err(format!("encoding the PNG: {e}")))?;
    writer.write_image_data(rgb).map_err(|e| err(format!("encoding the PNG: {e}")))?;
    writer.finish().map_err(|e| err(format!("encoding the PNG: {e}")))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_labels_are_round_and_few() {
        let mib = 1u64 << 20;
        assert_eq!(
            address_ticks(512 * mib).iter().map(|&b| size_label(b)).collect::<Vec<_>>(),
            ["0", "64 MiB", "128 MiB", "192 MiB", "256 MiB", "320 MiB", "384 MiB", "448 MiB", "512 MiB"]
        );
        let t = address_ticks(24 * mib);
        assert_eq!(t.len(), 7, "{t:?}");
        assert_eq!(size_label(t[1]), "4 MiB");
        assert_eq!(size_label(3 << 29), "1.5 GiB");
        assert_eq!(size_label(4096), "4 KiB");
        // A few pages: still never more than the limit.
        assert!(address_ticks(3 * PAGE).len() <= MAX_ADDRESS_LABELS as usize + 1);
    }

    #[test]
    fn rounds_are_labelled_sparsely() {
        assert_eq!(round_ticks(4), [0, 1, 2, 3]);
        assert_eq!(round_ticks(100).len(), 10);
        assert_eq!(round_ticks(101), (0..101).step_by(11).collect::<Vec<_>>());
    }

    #[test]
    fn colour_map_runs_from_dark_to_light() {
        assert_eq!(colour(0.0), RGBColor(68, 1, 84));
        assert_eq!(colour(1.0), RGBColor(253, 231, 37));
        let lum = |c: RGBColor| u32::from(c.0) * 3 + u32::from(c.1) * 6 + u32::from(c.2);
        assert!((0..10).all(|i| lum(colour(f64::from(i) / 10.0)) < lum(colour(f64::from(i + 1) / 10.0))));
    }

    #[test]
    fn binning_keeps_every_dirty_page() {
        let mut bitmap = DirtyBitmap::new(1000).unwrap();
        for pfn in [0, 1, 142, 143, 500, 999] {
            bitmap.set(pfn).unwrap();
        }
        let bins = bin(&bitmap, 1000, 7);
        assert_eq!(bins.iter().sum::<u64>(), 6);
        assert_eq!((bins[0], bins[1], bins[3], bins[6]), (3, 1, 1, 1), "{bins:?}");
        assert_eq!((shade(5, 10), shade(11, 11), shade(0, 3)), (127, 255, 0));
    }
}
