//! `memory.svg`: memory over time with phases shaded and the budget drawn, from a [`Report`].

use std::fmt::Write as _;
use std::path::Path;

use crate::report::Report;
use crate::{fmt_bytes, MemError};

const WIDTH: f64 = 960.0;
const HEIGHT: f64 = 400.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 44.0;
const BOTTOM: f64 = 50.0;
const PHASE_FILLS: [&str; 2] = ["#eef3fb", "#f8f1e6"];

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Draws the report's samples: compute-tier use and its high-water mark, host RssAnon,
/// phases as shaded bands, the budget as a dashed line. Everything plotted is measured.
pub fn render_svg(report: &Report) -> String {
    let samples = &report.samples;
    let t_end = samples.iter().map(|s| s.t_ms).fold(1e-3, f64::max);
    let base = report.baseline.compute_used();
    let budget_line = report.budget.compute.map(|b| b + base);
    let y_max = samples
        .iter()
        .flat_map(|s| [s.compute_used, s.compute_peak, s.rss_anon])
        .chain(budget_line)
        .max()
        .unwrap_or(1)
        .max(1) as f64
        * 1.08;
    let x = |t: f64| LEFT + (t / t_end) * (WIDTH - LEFT - RIGHT);
    let y = |b: u64| HEIGHT - BOTTOM - (b as f64 / y_max) * (HEIGHT - TOP - BOTTOM);

    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    for (i, phase) in report.phases.iter().enumerate() {
        let (x0, x1) = (x(phase.entry.t_ms), x(phase.exit.t_ms));
        let _ = writeln!(
            svg,
            r#"<rect x="{x0:.1}" y="{TOP}" width="{:.1}" height="{:.1}" fill="{}"><title>{}: peak {} above baseline</title></rect>"#,
            (x1 - x0).max(1.0),
            HEIGHT - TOP - BOTTOM,
            PHASE_FILLS[i % 2],
            escape(&phase.name),
            fmt_bytes(phase.peak_above_baseline)
        );
        // Narrow bands get their labels staggered so neighbours do not overlap.
        let narrow = (x1 - x0) < phase.name.len() as f64 * 6.5;
        let label_y = TOP - 6.0 - if narrow && i % 2 == 1 { 14.0 } else { 0.0 };
        let _ = writeln!(
            svg,
            r##"<text x="{:.1}" y="{label_y:.1}" text-anchor="middle" fill="#445">{}</text>"##,
            (x0 + x1) / 2.0,
            escape(&phase.name)
        );
    }
    // Axes and gridlines.
    for k in 0..=4 {
        let bytes = (y_max / 1.08 * k as f64 / 4.0) as u64;
        let yy = y(bytes);
        let _ = writeln!(
            svg,
            r##"<line x1="{LEFT}" y1="{yy:.1}" x2="{:.1}" y2="{yy:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            WIDTH - RIGHT,
            LEFT - 6.0,
            yy + 4.0,
            fmt_bytes(bytes)
        );
    }
    let _ = writeln!(
        svg,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">time (s), {:.2} s in all</text>"#,
        (LEFT + WIDTH - RIGHT) / 2.0,
        HEIGHT - 12.0,
        t_end / 1e3
    );
    if let Some(line) = budget_line {
        let yy = y(line);
        let _ = writeln!(
            svg,
            r##"<line x1="{LEFT}" y1="{yy:.1}" x2="{:.1}" y2="{yy:.1}" stroke="#c00" stroke-dasharray="6 4"/><text x="{:.1}" y="{:.1}" text-anchor="end" fill="#c00">budget + baseline {}</text>"##,
            WIDTH - RIGHT,
            WIDTH - RIGHT,
            yy - 4.0,
            fmt_bytes(line)
        );
    }
    type Series = (
        &'static str,
        &'static str,
        fn(&crate::report::Sample) -> u64,
    );
    let series: [Series; 3] = [
        ("compute high-water", "#e69500", |s| s.compute_peak),
        ("compute in use", "#1f5fbf", |s| s.compute_used),
        ("host RssAnon", "#2a9d55", |s| s.rss_anon),
    ];
    for (i, (label, colour, value)) in series.iter().enumerate() {
        let points: Vec<String> = samples
            .iter()
            .map(|s| format!("{:.1},{:.1}", x(s.t_ms), y(value(s))))
            .collect();
        let _ = writeln!(
            svg,
            r#"<polyline fill="none" stroke="{colour}" stroke-width="2" points="{}"/>"#,
            points.join(" ")
        );
        let lx = LEFT + 10.0 + 190.0 * i as f64;
        let _ = writeln!(
            svg,
            r#"<line x1="{lx:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="{colour}" stroke-width="3"/><text x="{:.1}" y="{:.1}">{label} ({})</text>"#,
            HEIGHT - 30.0,
            lx + 18.0,
            HEIGHT - 30.0,
            lx + 22.0,
            HEIGHT - 26.0,
            if i < 2 {
                report.compute_meter.as_str()
            } else {
                "measured"
            }
        );
    }
    svg.push_str("</svg>\n");
    svg
}

/// Writes [`render_svg`] to `path` (temporary file, then rename).
pub fn write_svg(report: &Report, path: &Path) -> Result<(), MemError> {
    crate::write_atomically(path, render_svg(report).as_bytes())
}
