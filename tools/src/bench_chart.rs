//! Charts of `shoal bench matrix`: bandwidth per class and I/O size, for
//! writes and reads side by side, as SVG and PNG (plotters).

use std::path::Path;
use std::sync::OnceLock;

use anyhow::{anyhow, Context};
use plotters::coord::Shift;
use plotters::prelude::*;

use crate::bench_matrix::Row;

/// Fonts tried for the chart's text; `SHOAL_FONT` names another.
const FONTS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/freefont/FreeSans.ttf",
];

const SIZE: (u32, u32) = (1200, 560);

/// Writes `matrix.svg` and `matrix.png` into `dir`.
pub fn charts(dir: &Path, rows: &[Row], title: &str) -> anyhow::Result<()> {
    register_font()?;
    let svg = dir.join("matrix.svg");
    draw(SVGBackend::new(&svg, SIZE).into_drawing_area(), rows, title)?;
    let png = dir.join("matrix.png");
    draw(BitMapBackend::new(&png, SIZE).into_drawing_area(), rows, title)?;
    Ok(())
}

fn register_font() -> anyhow::Result<()> {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| {
        let mut paths: Vec<String> = std::env::var("SHOAL_FONT").ok().into_iter().collect();
        paths.extend(FONTS.iter().map(|s| s.to_string()));
        let Some(bytes) = paths.iter().find_map(|p| std::fs::read(p).ok()) else {
            return Err(format!(
                "no TrueType font for the chart's text (looked at {}); install fonts-dejavu-core or set SHOAL_FONT",
                paths.join(", ")
            ));
        };
        // The font lives as long as the process: plotters keeps a reference.
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).map_err(|_| "bad font file".to_string())
    })
    .clone()
    .map_err(|e| anyhow!(e))
}

fn chart_err<E: std::error::Error + Send + Sync>(e: DrawingAreaErrorKind<E>) -> anyhow::Error {
    anyhow!("chart: {e}")
}

/// The rows charted: those with the first row's value on every axis but
/// class and size.
fn charted(rows: &[Row]) -> Vec<&Row> {
    let Some(f) = rows.first() else { return Vec::new() };
    rows.iter()
        .filter(|r| {
            r.workload == f.workload
                && r.api == f.api
                && r.offsets == f.offsets
                && r.gather == f.gather
                && r.pattern == f.pattern
                && r.sharing == f.sharing
                && r.procs == f.procs
        })
        .collect()
}

fn draw<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, rows: &[Row], title: &str) -> anyhow::Result<()> {
    let picked = charted(rows);
    let mut sizes: Vec<u64> = picked.iter().map(|r| r.io_size).collect();
    sizes.sort_unstable();
    sizes.dedup();
    let mut classes: Vec<&str> = Vec::new();
    for r in &picked {
        if !classes.contains(&r.class.as_str()) {
            classes.push(&r.class);
        }
    }
    let what = picked
        .first()
        .map(|f| {
            let gather = if f.gather == "on" { " gathered" } else { "" };
            format!(
                "{} {}{gather}, {} {} {}, {}x{} writers",
                f.workload, f.api, f.offsets, f.pattern, f.sharing, f.procs, f.qd
            )
        })
        .unwrap_or_default();
    root.fill(&WHITE).map_err(chart_err)?;
    let root = root.titled(&format!("shoal bench matrix: {title}; {what}"), ("sans-serif", 18)).map_err(chart_err)?;
    let panels = root.split_evenly((1, 2));
    for (panel, op) in panels.iter().zip(["write", "read"]) {
        let ymax = picked.iter().filter(|r| r.op == op).map(|r| r.mib_s).fold(1.0, f64::max);
        let n = sizes.len().max(1);
        let mut chart = ChartBuilder::on(panel)
            .caption(format!("{op} bandwidth"), ("sans-serif", 16))
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(-0.5f64..(n as f64 - 0.5), 0f64..ymax * 1.15)
            .map_err(chart_err)?;
        let label = |x: &f64| {
            let i = x.round();
            match sizes.get(i as usize) {
                Some(s) if (x - i).abs() < 0.01 && i >= 0.0 => crate::out::size(*s),
                _ => String::new(),
            }
        };
        chart
            .configure_mesh()
            .x_labels(n * 2 + 1)
            .x_label_formatter(&label)
            .x_desc("I/O size")
            .y_desc("MiB/s")
            .draw()
            .map_err(chart_err)?;
        for (ci, class) in classes.iter().enumerate() {
            let color = Palette99::pick(ci).to_rgba();
            let pts: Vec<(f64, f64)> = sizes
                .iter()
                .enumerate()
                .filter_map(|(i, s)| {
                    picked
                        .iter()
                        .find(|r| r.class == *class && r.io_size == *s && r.op == op)
                        .map(|r| (i as f64, r.mib_s))
                })
                .collect();
            chart
                .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
                .map_err(chart_err)?
                .label(*class)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
            chart.draw_series(pts.iter().map(|&p| Circle::new(p, 4, color.filled()))).map_err(chart_err)?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperLeft)
            .draw()
            .map_err(chart_err)?;
    }
    root.present().map_err(chart_err).context("write the chart")?;
    Ok(())
}
