//! `hvctl dirty heatmap` on the built binary: a stream recorded with `hvctl dirty stream`
//! from a fake hypervisor (a 24 MiB domain whose writer moves through memory) renders as
//! an SVG with its axes, title and legend, and as a PNG of the size it reports.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use wire::dirty::DirtyBitmap;
use wire::{DirtyBitmapReport, Request, Response};

mod common;

use common::fake_hv::Fake;
use common::{hvctl, stderr, stdout};

const DOMAIN: u32 = 7;
/// 24 MiB of 4 KiB pages.
const PAGES: u64 = 6144;

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("hvctl-pictures-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// Record a stream of `rounds` rounds: round k finds a fixed 64-page buffer dirty and
/// 256 pages at k MiB.
fn record(name: &str, rounds: u32) -> PathBuf {
    let round = Mutex::new(0u64);
    let fake = Fake::start(name, move |r| match r {
        Request::DirtyPeek { domain: DOMAIN, clean: true } => {
            let mut k = round.lock().unwrap();
            let mut bitmap = DirtyBitmap::new(PAGES).unwrap();
            bitmap.set_range(0x1000..0x1040).unwrap();
            bitmap.set_range(*k * 256..*k * 256 + 256).unwrap();
            *k += 1;
            Response::DirtyBitmap(DirtyBitmapReport {
                domain: DOMAIN,
                pages: PAGES,
                dirty: bitmap.count_ones(),
                records: bitmap.to_records(),
            })
        }
        other => panic!("unexpected {other:?}"),
    });
    let stream = tmp(&format!("{name}.stream"));
    let o = hvctl(&[
        "--connect",
        &fake.target(),
        "dirty",
        "stream",
        &DOMAIN.to_string(),
        "--interval",
        "1",
        "--rounds",
        &rounds.to_string(),
        "--out",
        &stream.display().to_string(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    stream
}

/// The contents of the SVG's `<text>` elements, trimmed.
fn texts(svg: &str) -> Vec<String> {
    svg.split("<text")
        .skip(1)
        .filter_map(|t| Some(t.split_once('>')?.1.split_once("</text>")?.0.trim().to_string()))
        .collect()
}

fn heatmap(stream: &Path, out: &Path, extra: &[&str]) -> String {
    let mut args = vec!["dirty", "heatmap", "--stream", stream.to_str().unwrap(), "--out", out.to_str().unwrap()];
    args.extend_from_slice(extra);
    let o = hvctl(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    stdout(&o)
}

#[test]
fn svg_heatmap_has_axes_title_and_legend() {
    let stream = record("svg", 4);
    let svg_path = tmp("heat.svg");
    let said = heatmap(&stream, &svg_path, &[]);
    assert!(said.contains("4 rounds x 6144 pages"), "{said}");
    let svg = std::fs::read_to_string(&svg_path).unwrap();
    assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(200)]);
    let texts = texts(&svg);
    let has = |t: &str| texts.iter().any(|x| x == t);
    // The title names the domain and what is shown.
    assert!(has("domain 7: dirty pages by guest-physical address, 4 rounds of 24 MiB"), "no title in {texts:?}");
    // The address axis: its name and round labels every 4 MiB up to the domain's size.
    assert!(has("guest-physical address"), "{texts:?}");
    for label in ["0", "4 MiB", "8 MiB", "12 MiB", "16 MiB", "20 MiB", "24 MiB"] {
        assert!(has(label), "no address label {label} in {texts:?}");
    }
    // The round axis, labelled 0..3.
    assert!(has("round"), "{texts:?}");
    for r in 0..4 {
        assert!(has(&r.to_string()), "no round label {r} in {texts:?}");
    }
    // The legend: its caption, its scale and how many pages a cell holds (6144 pages
    // over some 800 pixel columns: 7 or 8).
    assert!(has("dirty pages"), "{texts:?}");
    for tick in ["0 %", "25 %", "50 %", "75 %", "100 %"] {
        assert!(has(tick), "no legend tick {tick} in {texts:?}");
    }
    let cell = texts.iter().find_map(|t| t.strip_prefix("cells of ")).expect("the legend names the cell size");
    let (a, b) = cell.trim_end_matches(" pages").split_once('-').expect(cell);
    let (a, b): (u64, u64) = (a.parse().unwrap(), b.parse().unwrap());
    assert!(b == a + 1 && (2..=16).contains(&a), "{cell}");
    // The cells: the fully dirty ones are the map's brightest colour.
    assert!(svg.contains("#FDE725"), "no fully dirty cell drawn");
}

#[test]
fn png_heatmap_decodes_at_the_size_it_reports() {
    let stream = record("png", 3);
    let png_path = tmp("heat.png");
    let said = heatmap(&stream, &png_path, &["--width", "800"]);
    let decoder = png::Decoder::new(std::fs::File::open(&png_path).unwrap());
    let mut reader = decoder.read_info().unwrap();
    let mut pixels = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut pixels).unwrap();
    assert_eq!(info.width, 800);
    assert!(said.contains(&format!("3 rounds x 6144 pages (800x{} px)", info.height)), "{said}");
    assert!(info.height > 130, "{}", info.height);
    // Text was drawn (dark pixels in the white title band), and so were the cells.
    let rgb = |x: usize, y: usize| {
        let i = (y * info.width as usize + x) * 3;
        (pixels[i], pixels[i + 1], pixels[i + 2])
    };
    let dark_in_title = (0..600).flat_map(|x| (0..30).map(move |y| (x, y))).filter(|&(x, y)| rgb(x, y).0 < 100).count();
    assert!(dark_in_title > 100, "no title text: {dark_in_title} dark pixels");
    let all: Vec<(u8, u8, u8)> =
        (0..info.height as usize).flat_map(|y| (0..800).map(move |x| (x, y))).map(|(x, y)| rgb(x, y)).collect();
    assert!(all.contains(&(253, 231, 37)), "no fully dirty cell");
}

#[test]
fn format_flag_overrides_the_extension_and_unknown_ones_are_refused() {
    let stream = record("fmt", 2);
    let out = tmp("heat.picture");
    let o = hvctl(&["dirty", "heatmap", "--stream", stream.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("name it .png or .svg, or pass --format"), "{}", stderr(&o));
    heatmap(&stream, &out, &["--format", "svg"]);
    assert!(std::fs::read_to_string(&out).unwrap().contains("domain 7"));
}
