//! `memory.svg`: memory over time from a [`Report`], drawn with plotters' SVG backend.
//!
//! Two panels share one time axis (seconds):
//! - the compute tier: what is in use (the pool's live bytes on CUDA, the heap on a CPU run),
//!   what the pool reserved on CUDA, each phase's high-water mark and the budget;
//! - the host: RssAnon, RssShmem (pinned host copies land there on CUDA) and RssFile, and the
//!   host budget.
//!
//! Every line is a meter reading. A reading's value is drawn as holding until the next reading
//! (horizontal, then vertical steps), since nothing was measured in between. The report keeps
//! every reading's compute use, RssAnon and RssFile in its samples, but RssShmem and the pool's
//! reserved bytes only in the full readings at the baseline and at each phase's entry and exit,
//! so those two lines step at phase edges only (and the legend says so).
//!
//! Phase names are placed above the panels in as many rows as it takes for no two labels to
//! overlap (see [`place_labels`]). Text is written as SVG `<text>`: no font is read, and the
//! output depends on the report alone.

use std::path::Path;

use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint};
use plotters::coord::types::RangedCoordf64;
use plotters::element::DashedPathElement;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::meter::Reading;
use crate::report::Report;
use crate::{fmt_bytes, MemError};

const WIDTH: u32 = 1040;
/// Left of the panels: the axis description and the tick labels.
const Y_LABELS_W: u32 = 82;
const MARGIN_LEFT: u32 = 6;
/// Right of the panels: each panel's legend.
const LEGEND_W: u32 = 290;
const TITLE_H: u32 = 24;
/// Height of one row of phase labels.
const ROW_H: u32 = 15;
const PANEL_H: u32 = 250;
/// Above each panel.
const PANEL_GAP: u32 = 14;
const X_LABELS_H: u32 = 44;

/// Font size of labels, in SVG pixels.
const LABEL_PX: f64 = 11.0;
/// Width allowed per character of a label at [`LABEL_PX`]: a little more than the average
/// glyph of a sans-serif face, so that the estimate errs on the wide side.
const CHAR_W: f64 = 0.62 * LABEL_PX;
/// Smallest gap between two labels in one row.
const LABEL_GAP: f64 = 8.0;

const INK: RGBColor = RGBColor(0x33, 0x33, 0x44);
const GRID: RGBColor = RGBColor(0xe2, 0xe2, 0xe6);
const AXIS: RGBColor = RGBColor(0x88, 0x88, 0x90);
const SEPARATOR: RGBColor = RGBColor(0xb4, 0xb8, 0xc4);
const BANDS: [RGBColor; 2] = [RGBColor(0xf3, 0xf6, 0xfc), RGBColor(0xfb, 0xf7, 0xef)];
const USED: RGBColor = RGBColor(0x1f, 0x5f, 0xbf);
const RESERVED: RGBColor = RGBColor(0x8a, 0x5c, 0xc2);
const HIGH_WATER: RGBColor = RGBColor(0xe6, 0x95, 0x00);
const BUDGET: RGBColor = RGBColor(0xcc, 0x00, 0x00);
const ANON: RGBColor = RGBColor(0x2a, 0x9d, 0x55);
const SHMEM: RGBColor = RGBColor(0xd4, 0x51, 0x8c);
const FILE: RGBColor = RGBColor(0x9a, 0x7b, 0x4f);

/// Draws the report: the compute tier and the host in two panels over time, phases named
/// along the top, budgets dashed. Everything plotted is measured.
pub fn render_svg(report: &Report) -> String {
    let mut svg = String::new();
    if let Err(e) = draw(report, &mut svg) {
        // Drawing into a string has no failure of its own; should plotters report one, the
        // file says so rather than the run failing over its chart.
        svg = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"40\">\
             <text x=\"10\" y=\"24\">memory chart not drawn: {}</text></svg>\n",
            escape(&e.to_string())
        );
    }
    svg
}

/// Writes [`render_svg`] to `path` (temporary file, then rename).
pub fn write_svg(report: &Report, path: &Path) -> Result<(), MemError> {
    crate::write_atomically(path, render_svg(report).as_bytes())
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The pool's reserved bytes of a CUDA reading.
fn reserved(reading: &Reading) -> Option<u64> {
    #[cfg(feature = "cuda")]
    {
        reading.cuda.map(|c| c.pool_reserved)
    }
    #[cfg(not(feature = "cuda"))]
    {
        reading.cuda.map(|never| match never {})
    }
}

/// A round step near `raw`: 1, 2 or 5 times a power of ten.
fn nice_step(raw: f64) -> f64 {
    let magnitude = 10f64.powf(raw.log10().floor());
    let fraction = raw / magnitude;
    let nice = if fraction <= 1.0 {
        1.0
    } else if fraction <= 2.0 {
        2.0
    } else if fraction <= 5.0 {
        5.0
    } else {
        10.0
    };
    nice * magnitude
}

/// An axis from 0 with round ticks, in some unit.
#[derive(Debug, Clone, PartialEq)]
struct Axis {
    /// Bytes (or seconds) per unit.
    unit: f64,
    /// `GiB`, `MiB`, `KiB`, `B` or `s`.
    unit_name: &'static str,
    /// Between ticks, in units.
    step: f64,
    /// Ticks from 0 to `step * ticks` (the axis's end).
    ticks: u32,
}

impl Axis {
    /// `max` is the largest value to show, in units; ticks are 1, 2 or 5 times a power of ten
    /// apart, about `target` of them.
    fn new(unit: f64, unit_name: &'static str, max: f64, target: f64, headroom: f64) -> Self {
        let max = if max.is_finite() && max > 0.0 {
            max
        } else {
            1.0
        };
        let mut step = nice_step(max / target);
        if unit_name == "B" {
            step = step.max(1.0);
        }
        let ticks = ((max * headroom / step).ceil() as u32).max(1);
        Self {
            unit,
            unit_name,
            step,
            ticks,
        }
    }

    /// Bytes: the unit is the largest binary unit with at least 2 of it in `max_bytes`, so
    /// that ticks are whole (0, 2, 4, 6 GiB) or at worst halves, never 3.7.
    fn bytes(max_bytes: u64) -> Self {
        const UNITS: [(&str, u64); 4] = [
            ("GiB", 1 << 30),
            ("MiB", 1 << 20),
            ("KiB", 1 << 10),
            ("B", 1),
        ];
        let max_bytes = max_bytes.max(1);
        let (name, unit) = UNITS
            .into_iter()
            .find(|&(_, unit)| max_bytes >= 2 * unit)
            .unwrap_or(("B", 1));
        Self::new(unit as f64, name, max_bytes as f64 / unit as f64, 5.0, 1.04)
    }

    /// Seconds.
    fn seconds(max_s: f64) -> Self {
        Self::new(1.0, "s", max_s.max(1e-3), 8.0, 1.0)
    }

    fn top(&self) -> f64 {
        self.step * self.ticks as f64
    }

    fn tick_values(&self) -> Vec<f64> {
        (0..=self.ticks).map(|k| k as f64 * self.step).collect()
    }

    /// `value` (a tick) with as many decimals as the step needs.
    fn format(&self, value: f64) -> String {
        let decimals = if self.step >= 1.0 {
            0
        } else {
            (-self.step.log10().floor()) as usize
        };
        format!("{value:.decimals$}")
    }

    fn to_units(&self, bytes: u64) -> f64 {
        bytes as f64 / self.unit
    }
}

/// An axis of the chart with the ticks of an [`Axis`] (plotters' own choice for an `f64`
/// range can land between round values).
struct Ticked {
    inner: RangedCoordf64,
    ticks: Vec<f64>,
}

impl Ticked {
    fn new(axis: &Axis) -> Self {
        Self {
            inner: (0.0..axis.top()).into(),
            ticks: axis.tick_values(),
        }
    }
}

impl Ranged for Ticked {
    // Labels are formatted by the mesh's formatters (`Axis::format`).
    type FormatOption = DefaultFormatting;
    type ValueType = f64;

    fn map(&self, value: &f64, limit: (i32, i32)) -> i32 {
        self.inner.map(value, limit)
    }

    fn key_points<Hint: KeyPointHint>(&self, _hint: Hint) -> Vec<f64> {
        self.ticks.clone()
    }

    fn range(&self) -> std::ops::Range<f64> {
        self.inner.range()
    }
}

/// Points of a step line through `(t, value)` readings in time order: each value holds until
/// the next reading (a horizontal segment, then a vertical one), the last until `t_end`.
fn step_points(readings: &[(f64, f64)], t_end: f64) -> Vec<(f64, f64)> {
    let mut points: Vec<(f64, f64)> = Vec::with_capacity(readings.len() * 2 + 1);
    for &(t, value) in readings {
        if let Some(&(_, held)) = points.last() {
            points.push((t, held));
        }
        points.push((t, value));
    }
    if let Some(&(t, value)) = points.last() {
        if t < t_end {
            points.push((t_end, value));
        }
    }
    points
}

/// A phase label placed in the header: centre x, row (0 next to the panels, counting up).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Placed {
    x: f64,
    row: usize,
}

/// The estimated width of `text` at [`LABEL_PX`].
fn label_width(text: &str) -> f64 {
    text.chars().count() as f64 * CHAR_W
}

/// Places one label per span (`x0`, `x1`, name, in pixels), each centred over its span (and
/// kept within `left..right`), in the lowest row where it clears every label already there by
/// [`LABEL_GAP`]; a label that fits in no row starts a new one. No two labels can overlap,
/// however short and close the phases are: at worst every label gets a row of its own.
fn place_labels(spans: &[(f64, f64, &str)], left: f64, right: f64) -> Vec<Placed> {
    let mut row_ends: Vec<f64> = Vec::new();
    spans
        .iter()
        .map(|&(x0, x1, name)| {
            let half = label_width(name) / 2.0;
            let x = ((x0 + x1) / 2.0).min(right - half).max(left + half);
            let row = match row_ends.iter().position(|&end| end + LABEL_GAP <= x - half) {
                Some(row) => row,
                None => {
                    row_ends.push(f64::NEG_INFINITY);
                    row_ends.len() - 1
                }
            };
            row_ends[row] = row_ends[row].max(x + half);
            Placed { x, row }
        })
        .collect()
}

fn font(px: f64) -> FontDesc<'static> {
    // plotters writes `font-size` as the size given divided by 1.24.
    ("sans-serif", px * 1.24).into_font()
}

type BoxError = Box<dyn std::error::Error>;

/// One step line of a panel.
struct Line {
    label: String,
    colour: RGBColor,
    readings: Vec<(f64, u64)>,
}

/// A phase's high-water mark: start and end (seconds) and bytes.
type Mark = (f64, f64, u64);

/// One panel: its lines, budget line and phase marks, all in bytes against seconds.
struct Panel {
    desc: String,
    lines: Vec<Line>,
    /// Label and height of the dashed budget line.
    budget: Option<(String, u64)>,
    /// Label and (start, end, bytes) of each phase's high-water mark.
    marks: Option<(String, Vec<Mark>)>,
}

impl Panel {
    fn max_bytes(&self) -> u64 {
        let lines = self
            .lines
            .iter()
            .flat_map(|l| l.readings.iter().map(|r| r.1));
        let marks = self.marks.iter().flat_map(|(_, m)| m.iter().map(|m| m.2));
        lines
            .chain(marks)
            .chain(self.budget.as_ref().map(|b| b.1))
            .max()
            .unwrap_or(0)
    }
}

/// The readings the report keeps whole (baseline, phase entries and exits), in time order:
/// the only ones with RssShmem and the pool's reserved bytes.
fn full_readings(report: &Report) -> Vec<&Reading> {
    let mut readings: Vec<&Reading> = std::iter::once(&report.baseline)
        .chain(report.phases.iter().flat_map(|p| [&p.entry, &p.exit]))
        .collect();
    readings.sort_by(|a, b| a.t_ms.total_cmp(&b.t_ms));
    readings.dedup_by(|a, b| a.t_ms == b.t_ms);
    readings
}

fn panels(report: &Report) -> (Panel, Panel) {
    let secs = |t_ms: f64| t_ms / 1e3;
    let full = full_readings(report);
    let on_cuda = report.baseline.cuda.is_some();
    let meter = report.compute_meter.as_str();
    let base = report.baseline.compute_used();

    let mut compute_lines = vec![Line {
        label: if on_cuda {
            format!("pool used ({meter})")
        } else {
            format!("in use ({meter})")
        },
        colour: USED,
        readings: report
            .samples
            .iter()
            .map(|s| (secs(s.t_ms), s.compute_used))
            .collect(),
    }];
    if on_cuda {
        compute_lines.push(Line {
            label: "pool reserved (at phase edges)".into(),
            colour: RESERVED,
            readings: full
                .iter()
                .filter_map(|r| Some((secs(r.t_ms), reserved(r)?)))
                .collect(),
        });
    }
    let marks: Vec<Mark> = report
        .phases
        .iter()
        .map(|p| {
            // The whole phase's mark (the ledger keeps a higher one read before a reset
            // inside the phase), or the exit reading's where that is all there is.
            let exit_mark = p.exit.compute_peak();
            let whole = if p.peak_above_baseline > 0 {
                p.peak_above_baseline + base
            } else {
                exit_mark
            };
            (secs(p.entry.t_ms), secs(p.exit.t_ms), exit_mark.max(whole))
        })
        .collect();
    let compute = Panel {
        desc: if on_cuda {
            "device".into()
        } else {
            format!("compute tier ({meter})")
        },
        lines: compute_lines,
        budget: report.budget.compute.map(|b| {
            let line = b + base;
            (format!("budget + baseline {}", fmt_bytes(line)), line)
        }),
        marks: (!marks.is_empty()).then(|| {
            let name = if on_cuda { "pool_used_high" } else { "peak" };
            (format!("phase high-water ({name})"), marks)
        }),
    };

    let host_base = report.baseline.host_used();
    let host = Panel {
        desc: "host RSS".into(),
        lines: vec![
            Line {
                label: "RssAnon".into(),
                colour: ANON,
                readings: report
                    .samples
                    .iter()
                    .map(|s| (secs(s.t_ms), s.rss_anon))
                    .collect(),
            },
            Line {
                label: "RssShmem, pinned (at phase edges)".into(),
                colour: SHMEM,
                readings: full.iter().map(|r| (secs(r.t_ms), r.host.shmem)).collect(),
            },
            Line {
                label: "RssFile, file-backed".into(),
                colour: FILE,
                readings: report
                    .samples
                    .iter()
                    .map(|s| (secs(s.t_ms), s.rss_file))
                    .collect(),
            },
        ],
        budget: report.budget.host.map(|b| {
            let line = b + host_base;
            (format!("host budget + baseline {}", fmt_bytes(line)), line)
        }),
        marks: None,
    };
    (compute, host)
}

fn title(report: &Report) -> String {
    let host = "host: RssAnon / RssShmem / RssFile (measured)";
    if report.baseline.cuda.is_some() {
        format!("memory · device: pool used / reserved (measured); {host}")
    } else {
        format!(
            "memory · compute tier on the host: {} in use (measured); {host}",
            report.compute_meter
        )
    }
}

fn draw(report: &Report, svg: &mut String) -> Result<(), BoxError> {
    let t_end = report
        .samples
        .iter()
        .map(|s| s.t_ms)
        .chain(report.phases.iter().map(|p| p.exit.t_ms))
        .fold(0.0, f64::max)
        / 1e3;
    let time = Axis::seconds(t_end);
    let (compute, host) = panels(report);

    // The panels' horizontal extent, the same for both, to place the phase labels.
    let plot_left = (MARGIN_LEFT + Y_LABELS_W) as f64;
    let plot_right = (WIDTH - LEGEND_W) as f64;
    let px = |t: f64| plot_left + t / time.top() * (plot_right - plot_left);
    let spans: Vec<(f64, f64, &str)> = report
        .phases
        .iter()
        .map(|p| {
            (
                px(p.entry.t_ms / 1e3),
                px(p.exit.t_ms / 1e3),
                p.name.as_str(),
            )
        })
        .collect();
    let placed = place_labels(&spans, MARGIN_LEFT as f64, plot_right + 40.0);
    let rows = placed.iter().map(|p| p.row + 1).max().unwrap_or(0) as u32;
    let header_h = TITLE_H + rows * ROW_H + 6;
    let height = header_h + PANEL_H + PANEL_H + X_LABELS_H + 8;

    let root = SVGBackend::with_string(svg, (WIDTH, height)).into_drawing_area();
    root.fill(&WHITE)?;
    root.draw(&Text::new(
        title(report),
        (MARGIN_LEFT as i32 + 4, 6),
        font(12.0).color(&INK).pos(Pos::new(HPos::Left, VPos::Top)),
    ))?;
    for (placed, (_, _, name)) in placed.iter().zip(&spans) {
        let y = (header_h - 4 - placed.row as u32 * ROW_H) as i32;
        root.draw(&Text::new(
            name.to_string(),
            (placed.x.round() as i32, y),
            font(LABEL_PX)
                .color(&INK)
                .pos(Pos::new(HPos::Center, VPos::Bottom)),
        ))?;
    }

    let (_, panels_area) = root.split_vertically(header_h);
    let (top, bottom) = panels_area.split_vertically(PANEL_H);
    let phases: Vec<(f64, f64)> = report
        .phases
        .iter()
        .map(|p| (p.entry.t_ms / 1e3, p.exit.t_ms / 1e3))
        .collect();
    // The run's length, to one more decimal than the time ticks have.
    let decimals = if time.step >= 1.0 {
        1
    } else {
        (-time.step.log10().floor()) as usize + 1
    };
    let t_desc = format!("time (s), {t_end:.decimals$} s in all");
    draw_panel(&top, &compute, &time, t_end, &phases, None)?;
    draw_panel(&bottom, &host, &time, t_end, &phases, Some(&t_desc))?;
    root.present()?;
    Ok(())
}

/// How a legend entry shows its line.
enum Swatch {
    Solid(RGBColor, u32),
    Dashed(RGBColor),
}

fn draw_panel(
    area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
    panel: &Panel,
    time: &Axis,
    t_end: f64,
    phases: &[(f64, f64)],
    time_desc: Option<&str>,
) -> Result<(), BoxError> {
    let bytes = Axis::bytes(panel.max_bytes());
    let (t_top, y_top) = (time.top(), bytes.top());
    let mut chart = ChartBuilder::on(area)
        .margin_left(MARGIN_LEFT)
        .margin_right(LEGEND_W)
        .margin_top(PANEL_GAP)
        .margin_bottom(4)
        .y_label_area_size(Y_LABELS_W)
        .x_label_area_size(if time_desc.is_some() { X_LABELS_H } else { 0 })
        .build_cartesian_2d(Ticked::new(time), Ticked::new(&bytes))?;

    // Phases: alternate shading, thin lines at their edges.
    chart.draw_series(
        phases
            .iter()
            .enumerate()
            .map(|(i, &(t0, t1))| Rectangle::new([(t0, 0.0), (t1, y_top)], BANDS[i % 2].filled())),
    )?;
    let y_label = |v: &f64| format!("{} {}", bytes.format(*v), bytes.unit_name);
    let t_label = |v: &f64| time.format(*v);
    let mut mesh = chart.configure_mesh();
    mesh.bold_line_style(GRID)
        .light_line_style(TRANSPARENT)
        .axis_style(AXIS)
        .label_style(font(LABEL_PX).color(&INK))
        .axis_desc_style(font(LABEL_PX).color(&INK))
        .y_label_formatter(&y_label)
        .x_label_formatter(&t_label)
        .y_desc(panel.desc.as_str());
    if let Some(desc) = time_desc {
        mesh.x_desc(desc);
    }
    mesh.draw()?;
    // One line per pixel column: a phase's exit and the next one's entry are usually a
    // fraction of a pixel apart.
    let mut edges: Vec<f64> = phases.iter().flat_map(|&(t0, t1)| [t0, t1]).collect();
    edges.dedup_by_key(|t| chart.backend_coord(&(*t, 0.0)).0);
    chart.draw_series(
        edges
            .into_iter()
            .map(|t| PathElement::new(vec![(t, 0.0), (t, y_top)], SEPARATOR.stroke_width(1))),
    )?;

    let mut legend: Vec<(&str, Swatch)> = Vec::new();
    if let Some((label, line)) = &panel.budget {
        let y = bytes.to_units(*line);
        chart.draw_series(DashedLineSeries::new(
            [(0.0, y), (t_top, y)],
            6,
            4,
            BUDGET.stroke_width(1),
        ))?;
        legend.push((label, Swatch::Dashed(BUDGET)));
    }
    for line in &panel.lines {
        let readings: Vec<(f64, f64)> = line
            .readings
            .iter()
            .map(|&(t, b)| (t, bytes.to_units(b)))
            .collect();
        chart.draw_series(LineSeries::new(
            step_points(&readings, t_end),
            line.colour.stroke_width(2),
        ))?;
        legend.push((&line.label, Swatch::Solid(line.colour, 2)));
    }
    if let Some((label, marks)) = &panel.marks {
        chart.draw_series(marks.iter().map(|&(t0, t1, b)| {
            let y = bytes.to_units(b);
            PathElement::new([(t0, y), (t1, y)], HIGH_WATER.stroke_width(3))
        }))?;
        legend.push((label, Swatch::Solid(HIGH_WATER, 3)));
    }

    // The legend, right of the plot (plotters' own is drawn inside the plotting area).
    let x = (WIDTH - LEGEND_W) as i32 + 14;
    let top = PANEL_GAP as i32;
    let row = 18;
    area.draw(&Rectangle::new(
        [
            (x, top),
            (
                x + LEGEND_W as i32 - 22,
                top + 8 + row * legend.len() as i32,
            ),
        ],
        GRID.stroke_width(1),
    ))?;
    for (i, (label, swatch)) in legend.into_iter().enumerate() {
        let y = top + 4 + row / 2 + row * i as i32;
        let points = [(x + 8, y), (x + 32, y)];
        match swatch {
            Swatch::Solid(colour, width) => {
                area.draw(&PathElement::new(points, colour.stroke_width(width)))?
            }
            Swatch::Dashed(colour) => area.draw(&DashedPathElement::new(
                points,
                5,
                3,
                colour.stroke_width(1),
            ))?,
        }
        area.draw(&Text::new(
            label.to_owned(),
            (x + 40, y),
            font(LABEL_PX)
                .color(&INK)
                .pos(Pos::new(HPos::Left, VPos::Center)),
        ))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Budget, Event, HeapStats, HostRss, Ledger};

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    /// A CPU reading: heap in use and its mark, and host RSS by kind.
    fn reading(t_ms: f64, heap: u64, peak: u64, anon: u64, file: u64, shmem: u64) -> Reading {
        Reading {
            t_ms,
            host: HostRss { anon, file, shmem },
            heap: Some(HeapStats {
                current: heap,
                peak,
            }),
            cuda: None,
        }
    }

    /// A run of `phases` (name, start ms, end ms, heap held during it), a sample inside each.
    fn report_of(phases: &[(&str, f64, f64, u64)], budget: Budget) -> Report {
        let mut ledger = Ledger::default();
        let base = 200 * MIB;
        ledger.record(
            None,
            Event::Baseline {
                reading: reading(3.0, base, base, 300 * MIB, 40 * MIB, 0),
                compute_workspace: Default::default(),
            },
        );
        let mut held = base;
        for &(name, t0, t1, heap) in phases {
            let at = |t, heap: u64, peak| {
                reading(
                    t,
                    heap,
                    peak,
                    heap + 100 * MIB,
                    40 * MIB + heap / 4,
                    heap / 8,
                )
            };
            ledger.record(
                Some(name),
                Event::PhaseEnter {
                    phase: name.into(),
                    reading: at(t0, held, held),
                },
            );
            let top = base + heap;
            ledger.record(
                Some(name),
                Event::Sample {
                    reading: at((t0 + t1) / 2.0, top, top),
                },
            );
            held = base + heap / 2;
            ledger.record(
                Some(name),
                Event::PhaseExit {
                    phase: name.into(),
                    reading: at(t1, held, top + heap / 10),
                    resident_compute_bytes: 0,
                    compute_peak: top + heap / 10,
                },
            );
        }
        Report::from_ledger(&ledger, budget).unwrap()
    }

    /// Phases as vpipe runs them, with two very short ones side by side.
    fn example() -> Report {
        report_of(
            &[
                ("encode prompt", 10.0, 2_400.0, 2 * GIB),
                ("t5", 2_400.5, 2_402.0, 300 * MIB),
                ("clip <1>", 2_402.5, 2_404.0, 200 * MIB),
                ("sample 4 steps", 2_405.0, 9_000.0, 5 * GIB),
                ("vae decode", 9_000.5, 11_700.0, 3 * GIB),
            ],
            Budget {
                compute: Some(6 * GIB),
                host: Some(8 * GIB),
            },
        )
    }

    /// A `<text>`: x, y, text-anchor and its text (unescaped).
    #[derive(Debug)]
    struct TextEl {
        x: f64,
        y: f64,
        anchor: String,
        text: String,
    }

    fn attr<'a>(tag: &'a str, name: &str) -> Option<&'a str> {
        let start = tag.find(&format!(" {name}=\""))? + name.len() + 3;
        let len = tag[start..].find('"')?;
        Some(&tag[start..start + len])
    }

    fn texts(svg: &str) -> Vec<TextEl> {
        svg.split("<text ")
            .skip(1)
            .map(|rest| {
                let (tag, rest) = rest.split_once('>').unwrap();
                let tag = format!(" {tag}");
                let tag = tag.as_str();
                let (text, _) = rest.split_once("</text>").unwrap();
                TextEl {
                    x: attr(tag, "x").unwrap().parse().unwrap(),
                    y: attr(tag, "y").unwrap().parse().unwrap(),
                    anchor: attr(tag, "text-anchor").unwrap_or("start").to_owned(),
                    text: text
                        .trim()
                        .replace("&lt;", "<")
                        .replace("&gt;", ">")
                        .replace("&quot;", "\"")
                        .replace("&apos;", "'")
                        .replace("&amp;", "&"),
                }
            })
            .collect()
    }

    /// Every `<polyline>` drawn in `colour`, as its points.
    fn polylines(svg: &str, colour: RGBColor) -> Vec<Vec<(i32, i32)>> {
        let stroke = format!("#{:02X}{:02X}{:02X}", colour.0, colour.1, colour.2);
        svg.split("<polyline ")
            .skip(1)
            .map(|rest| format!(" {}", rest.split_once("/>").unwrap().0))
            .filter(|tag| attr(tag, "stroke").is_some_and(|s| s.eq_ignore_ascii_case(&stroke)))
            .map(|tag| {
                attr(&tag, "points")
                    .unwrap()
                    .split_whitespace()
                    .map(|p| {
                        let (x, y) = p.split_once(',').unwrap();
                        (x.parse().unwrap(), y.parse().unwrap())
                    })
                    .collect()
            })
            .collect()
    }

    /// True for 0, s, 2s, … with s 1, 2 or 5 times a power of ten.
    fn round_sequence(values: &[f64]) -> bool {
        if values.len() < 2 || values[0] != 0.0 {
            return false;
        }
        let step = values[1];
        let mantissa = step / 10f64.powf(step.log10().floor());
        let nice = [1.0, 2.0, 5.0].iter().any(|m| (mantissa - m).abs() < 1e-9);
        nice && values
            .iter()
            .enumerate()
            .all(|(k, v)| (v - k as f64 * step).abs() < 1e-9 * step.max(1.0))
    }

    #[test]
    fn the_chart_names_each_phase_once_and_has_a_legend_and_a_title() {
        let report = example();
        let svg = render_svg(&report);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<svg").count(), 1);
        assert_eq!(svg.matches("<text").count(), svg.matches("</text>").count());
        let texts = texts(&svg);
        for phase in &report.phases {
            let labels = texts.iter().filter(|t| t.text == phase.name).count();
            assert_eq!(labels, 1, "{}", phase.name);
        }
        assert!(svg.contains("clip &lt;1&gt;"));
        for legend in [
            "in use (heap)",
            "phase high-water (peak)",
            "RssAnon",
            "RssShmem, pinned (at phase edges)",
            "RssFile, file-backed",
        ] {
            assert!(texts.iter().any(|t| t.text == legend), "no legend {legend}");
        }
        // Budgets are drawn above the baseline (200 MiB of heap, 300 MiB RssAnon).
        assert!(texts.iter().any(|t| t.text == "budget + baseline 6.20 GiB"));
        assert!(texts
            .iter()
            .any(|t| t.text == "host budget + baseline 8.20 GiB"));
        assert!(texts.iter().any(|t| t.text.starts_with(
            "memory · compute tier on the host: heap in use (measured); host: RssAnon / RssShmem / RssFile (measured)"
        )));
        assert!(texts.iter().any(|t| t.text == "time (s), 11.7 s in all"));
        // The same report, the same bytes.
        assert_eq!(svg, render_svg(&report));
    }

    #[test]
    fn measured_lines_step_and_never_slope() {
        let svg = render_svg(&example());
        for colour in [USED, ANON, SHMEM, FILE, HIGH_WATER] {
            let lines = polylines(&svg, colour);
            assert!(!lines.is_empty());
            for points in lines {
                for pair in points.windows(2) {
                    let ((x0, y0), (x1, y1)) = (pair[0], pair[1]);
                    assert!(x0 == x1 || y0 == y1, "sloped {pair:?} in {colour:?}");
                }
            }
        }
        // The line of use goes through every sample, two points a reading (one for the
        // first), and ends at the last; its legend's swatch is a line of its own.
        let used = polylines(&svg, USED);
        assert_eq!(used.len(), 2);
        let samples = example().samples.len();
        assert_eq!(used[0].len(), 2 * samples - 1);
        // A value holds until the next reading: horizontal, then vertical, to the end.
        let points = step_points(&[(0.0, 1.0), (1.0, 3.0), (1.5, 2.0)], 4.0);
        assert_eq!(
            points,
            [
                (0.0, 1.0),
                (1.0, 1.0),
                (1.0, 3.0),
                (1.5, 3.0),
                (1.5, 2.0),
                (4.0, 2.0)
            ]
        );
    }

    #[test]
    fn tick_labels_are_round() {
        let svg = render_svg(&example());
        let texts = texts(&svg);
        let number = |t: &TextEl, unit: &str| -> Option<f64> {
            t.text.strip_suffix(unit)?.trim().parse().ok()
        };
        // Byte ticks, bottom to top: the host panel's, then the compute panel's.
        let mut ticks: Vec<&TextEl> = texts
            .iter()
            .filter(|t| t.anchor == "end" && number(t, "GiB").is_some())
            .collect();
        ticks.sort_by(|a, b| b.y.total_cmp(&a.y));
        let values: Vec<f64> = ticks.iter().map(|t| number(t, "GiB").unwrap()).collect();
        let split = values.iter().skip(1).position(|&v| v == 0.0).unwrap() + 1;
        let (host, compute) = values.split_at(split);
        // Compute: 5.4 GiB at most and a 6.2 GiB budget line: 0, 2, 4, 6, 8 GiB.
        assert_eq!(compute, [0.0, 2.0, 4.0, 6.0, 8.0]);
        assert!(round_sequence(host), "{host:?}");
        // Time ticks in seconds, under the lower panel only.
        let mut seconds: Vec<&TextEl> = texts
            .iter()
            .filter(|t| t.anchor == "middle" && t.text.parse::<f64>().is_ok())
            .collect();
        seconds.sort_by(|a, b| a.x.total_cmp(&b.x));
        let values: Vec<f64> = seconds.iter().map(|t| t.text.parse().unwrap()).collect();
        assert_eq!(values, [0.0, 2.0, 4.0, 6.0, 8.0, 10.0, 12.0]);
        assert!(seconds.iter().all(|t| t.y == seconds[0].y));
    }

    #[test]
    fn axes_pick_a_unit_and_round_ticks() {
        for (max, unit, ticks) in [
            ((37 * GIB) / 10, "GiB", vec![0.0, 1.0, 2.0, 3.0, 4.0]),
            (6 * GIB, "GiB", vec![0.0, 2.0, 4.0, 6.0, 8.0]),
            (
                GIB + GIB / 2,
                "MiB",
                vec![0.0, 500.0, 1000.0, 1500.0, 2000.0],
            ),
            (3 * MIB, "MiB", vec![0.0, 1.0, 2.0, 3.0, 4.0]),
            (0, "B", vec![0.0, 1.0, 2.0]),
        ] {
            let axis = Axis::bytes(max);
            assert_eq!((axis.unit_name, axis.tick_values()), (unit, ticks), "{max}");
        }
        // Whatever the maximum, the ticks are round and cover it.
        for k in 1..2000u64 {
            let max = k * k * 7919 * 1021;
            let axis = Axis::bytes(max);
            assert!(round_sequence(&axis.tick_values()), "{max}: {axis:?}");
            assert!(axis.top() * axis.unit >= max as f64);
            let labels: Vec<String> = axis.tick_values().iter().map(|&v| axis.format(v)).collect();
            assert!(
                labels.iter().all(|l| l.parse::<f64>().unwrap() * 2.0
                    == (l.parse::<f64>().unwrap() * 2.0).round()),
                "{labels:?}"
            );
        }
        let time = Axis::seconds(0.37);
        assert_eq!(time.format(time.step * 3.0), "0.15");
    }

    /// Left, top, right, bottom.
    type LabelBox = (f64, f64, f64, f64);

    /// The box a phase label covers: from its centre x, its bottom y up one row.
    fn label_box(t: &TextEl) -> LabelBox {
        let half = label_width(&t.text) / 2.0;
        (t.x - half, t.y - ROW_H as f64, t.x + half, t.y)
    }

    fn assert_labels_apart(report: &Report) {
        let svg = render_svg(report);
        let texts = texts(&svg);
        let boxes: Vec<(&str, LabelBox)> = report
            .phases
            .iter()
            .map(|p| {
                let text = texts.iter().find(|t| t.text == p.name).unwrap();
                assert_eq!(text.anchor, "middle");
                (p.name.as_str(), label_box(text))
            })
            .collect();
        for (i, (a, ba)) in boxes.iter().enumerate() {
            for (b, bb) in &boxes[i + 1..] {
                let apart = ba.2 <= bb.0 || bb.2 <= ba.0 || ba.3 <= bb.1 || bb.3 <= ba.1;
                assert!(apart, "labels {a} {ba:?} and {b} {bb:?} overlap");
            }
        }
    }

    #[test]
    fn labels_of_short_adjacent_phases_do_not_overlap() {
        let report = example();
        assert_labels_apart(&report);
        let svg = render_svg(&report);
        let texts = texts(&svg);
        let find = |name: &str| texts.iter().find(|t| t.text == name).unwrap();
        // The two short phases sit side by side at 2.4 s: one goes up a row.
        assert_ne!(find("t5").y, find("clip <1>").y);
        assert_eq!(find("encode prompt").y, find("sample 4 steps").y);

        // A dozen phases of a millisecond each, in a row, and long names at the end.
        let many: Vec<(String, f64)> = (0..12)
            .map(|i| (format!("tile {i}"), 1_000.0 + i as f64))
            .collect();
        let mut phases: Vec<(&str, f64, f64, u64)> = many
            .iter()
            .map(|(name, t)| (name.as_str(), *t, t + 0.9, 10 * MIB))
            .collect();
        phases.push((
            "a phase with a rather long name",
            1_013.0,
            60_000.0,
            20 * MIB,
        ));
        phases.push((
            "another long name at the very end",
            60_000.5,
            60_001.0,
            20 * MIB,
        ));
        assert_labels_apart(&report_of(&phases, Budget::default()));
    }

    #[test]
    fn a_report_without_phases_or_budget_still_draws() {
        let svg = render_svg(&report_of(&[], Budget::default()));
        assert!(svg.starts_with("<svg") && svg.contains("RssAnon"));
        assert!(!svg.contains("budget"));
        assert!(!svg.contains("high-water"));
    }

    #[test]
    fn written_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("memory.svg");
        write_svg(&example(), &path).unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            render_svg(&example())
        );
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
