//! SVG charts of latency by percentile, drawn like HdrHistogram's plots: the x axis is
//! 1/(1-p) on a log scale (labelled as percentiles), one line per phase.

use std::path::Path;

use anyhow::anyhow;
use hdrhistogram::Histogram;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::hist::{max_ms, pct_ms, OUTPUT_SCALE, TICKS_PER_HALF_DISTANCE};

/// One line on a chart.
pub struct Series<'a> {
    pub name: String,
    pub hist: &'a Histogram<u64>,
    pub color: RGBColor,
}

/// One panel: a title and its lines.
pub struct Panel<'a> {
    pub title: String,
    pub series: Vec<Series<'a>>,
    /// Lines written in the panel's lower right (errors, verdict).
    pub notes: Vec<String>,
}

/// Line colours for baseline, contention, recovery.
pub const PHASE_COLORS: [RGBColor; 3] = [RGBColor(31, 119, 180), RGBColor(214, 39, 40), RGBColor(44, 160, 44)];

/// Points (1/(1-p), latency ms) of a histogram, up to but not including 100%.
pub fn percentile_points(h: &Histogram<u64>) -> Vec<(f64, f64)> {
    if h.is_empty() {
        return Vec::new();
    }
    let mut pts: Vec<(f64, f64)> = h
        .iter_quantiles(TICKS_PER_HALF_DISTANCE)
        .filter(|v| v.quantile_iterated_to() < 1.0)
        .map(|v| {
            (
                1.0 / (1.0 - v.quantile_iterated_to()),
                h.highest_equivalent(v.value_iterated_to()) as f64 / OUTPUT_SCALE,
            )
        })
        .collect();
    // The maximum, placed one step past the last percentile the data can resolve.
    let last_x = (h.len() as f64).max(pts.last().map_or(1.0, |p| p.0));
    pts.push((last_x, max_ms(h)));
    pts
}

/// "99.9%" for x = 1000.
fn percentile_label(x: &f64) -> String {
    let p = 100.0 * (1.0 - 1.0 / x.max(1.0));
    let mut s = format!("{p:.4}");
    while s.ends_with('0') {
        s.pop();
    }
    if s.ends_with('.') {
        s.pop();
    }
    format!("{s}%")
}

fn ms_label(y: &f64) -> String {
    if *y >= 100.0 {
        format!("{y:.0}")
    } else if *y >= 1.0 {
        format!("{y:.1}")
    } else if *y >= 0.1 {
        format!("{y:.2}")
    } else {
        format!("{y:.3}")
    }
}

/// 0%, 50%, 90%, 99%, ... up to `x_max`.
fn x_keys(x_max: f64) -> Vec<f64> {
    let mut keys = vec![1.0, 2.0];
    let mut x = 10.0;
    while x <= x_max * 1.0001 {
        keys.push(x);
        x *= 10.0;
    }
    keys
}

/// 1-2-5 steps within the range.
fn y_keys((lo, hi): (f64, f64)) -> Vec<f64> {
    let mut keys = Vec::new();
    let mut decade = 10f64.powf(lo.log10().floor());
    while decade <= hi {
        for m in [1.0, 2.0, 5.0] {
            let v = decade * m;
            if v >= lo && v <= hi {
                keys.push(v);
            }
        }
        decade *= 10.0;
    }
    keys
}

/// Common axis ranges so panels compare at a glance.
fn ranges(panels: &[Panel]) -> (f64, (f64, f64)) {
    let mut x_max: f64 = 100.0;
    let mut y_min = f64::MAX;
    let mut y_max: f64 = 0.0;
    for s in panels.iter().flat_map(|p| &p.series) {
        for (x, y) in percentile_points(s.hist) {
            x_max = x_max.max(x);
            y_min = y_min.min(y);
            y_max = y_max.max(y);
        }
    }
    if y_max <= 0.0 {
        (y_min, y_max) = (0.01, 1.0);
    }
    let x_max = 10f64.powf(x_max.log10().ceil());
    let y_min = (y_min.max(0.001) / 1.5).max(0.001);
    let y_max = (y_max * 1.5).max(y_min * 10.0);
    (x_max, (y_min, y_max))
}

fn draw_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    panel: &Panel,
    x_max: f64,
    y: (f64, f64),
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow!("drawing chart: {e:?}");
    let mut chart = ChartBuilder::on(area)
        .caption(&panel.title, ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(50)
        .y_label_area_size(70)
        .build_cartesian_2d(
            (1f64..x_max).log_scale().with_key_points(x_keys(x_max)),
            (y.0..y.1).log_scale().with_key_points(y_keys(y)),
        )
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("percentile (log scale of 1/(1-p))")
        .y_desc("latency from intended start, ms (log scale)")
        .x_label_formatter(&percentile_label)
        .y_label_formatter(&ms_label)
        .axis_desc_style(("sans-serif", 16))
        .label_style(("sans-serif", 13))
        .light_line_style(RGBColor(235, 235, 235))
        .draw()
        .map_err(err)?;
    for s in &panel.series {
        let pts = percentile_points(s.hist);
        let color = s.color;
        let label = if s.hist.is_empty() {
            format!("{}: no data", s.name)
        } else {
            format!(
                "{}: p50 {} / p99 {} / p99.9 {} / max {} ms",
                s.name,
                ms_label(&pct_ms(s.hist, 50.0)),
                ms_label(&pct_ms(s.hist, 99.0)),
                ms_label(&pct_ms(s.hist, 99.9)),
                ms_label(&max_ms(s.hist))
            )
        };
        chart
            .draw_series(LineSeries::new(pts, color.stroke_width(2)))
            .map_err(err)?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(3)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()
        .map_err(err)?;
    // Inside the plot's lower right corner (margin 15, x label area 50).
    let (w, h) = area.dim_in_pixel();
    let right = w as i32 - 15 - 12;
    let bottom = h as i32 - 15 - 50 - 12;
    let n = panel.notes.len() as i32;
    for (i, note) in panel.notes.iter().enumerate() {
        let style = ("sans-serif", 15)
            .into_font()
            .color(&BLACK)
            .pos(Pos::new(HPos::Right, VPos::Bottom));
        area.draw_text(note, &style, (right, bottom - (n - 1 - i as i32) * 20))
            .map_err(err)?;
    }
    Ok(())
}

/// Write an SVG with the panels side by side, sharing axis ranges.
pub fn write_svg(path: &Path, panels: &[Panel], footnote: &str) -> anyhow::Result<()> {
    let width = 900 * panels.len().max(1) as u32;
    let height = 620;
    let root = SVGBackend::new(path, (width, height)).into_drawing_area();
    let err = |e: DrawingAreaErrorKind<_>| anyhow!("drawing chart: {e:?}");
    root.fill(&WHITE).map_err(err)?;
    let (body, foot) = root.split_vertically(height - 30);
    let (x_max, y) = ranges(panels);
    let areas = body.split_evenly((1, panels.len().max(1)));
    for (area, panel) in areas.iter().zip(panels) {
        draw_panel(area, panel, x_max, y)?;
    }
    foot.draw_text(
        footnote,
        &("sans-serif", 13).into_font().color(&RGBColor(90, 90, 90)),
        (15, 8),
    )
    .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hist::new_hist;

    #[test]
    fn labels_and_points() {
        assert_eq!(percentile_label(&1.0), "0%");
        assert_eq!(percentile_label(&10.0), "90%");
        assert_eq!(percentile_label(&1000.0), "99.9%");
        assert_eq!(x_keys(1000.0), vec![1.0, 2.0, 10.0, 100.0, 1000.0]);
        let y = y_keys((0.15, 30.0));
        assert_eq!(y, vec![0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0]);

        let mut h = new_hist();
        for v in 1..=1000u64 {
            h.record(v * 10).unwrap();
        }
        let pts = percentile_points(&h);
        assert!(pts.windows(2).all(|w| w[1].0 >= w[0].0 && w[1].1 >= w[0].1));
        assert_eq!(pts.last().unwrap().1, max_ms(&h));
        assert!(percentile_points(&new_hist()).is_empty());
    }

    #[test]
    fn writes_a_readable_svg() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.svg");
        let mut a = new_hist();
        let mut b = new_hist();
        for v in 1..=1000u64 {
            a.record(200 + v).unwrap();
            b.record(200 + v * 3).unwrap();
        }
        let empty = new_hist();
        let panels = [
            Panel {
                title: "dedicated".into(),
                series: vec![
                    Series {
                        name: "baseline".into(),
                        hist: &a,
                        color: PHASE_COLORS[0],
                    },
                    Series {
                        name: "contention".into(),
                        hist: &b,
                        color: PHASE_COLORS[1],
                    },
                ],
                notes: vec!["PASS: 0 victim errors".into()],
            },
            Panel {
                title: "shared".into(),
                series: vec![Series {
                    name: "recovery".into(),
                    hist: &empty,
                    color: PHASE_COLORS[2],
                }],
                notes: vec![],
            },
        ];
        write_svg(&path, &panels, "footnote").unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg"));
        for text in [
            "dedicated",
            "shared",
            "baseline: p50",
            "99.9%",
            "percentile",
            "footnote",
            "PASS: 0 victim errors",
        ] {
            assert!(svg.contains(text), "chart lacks {text:?}");
        }
    }
}
