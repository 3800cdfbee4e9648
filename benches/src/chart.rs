//! The SVG chart of a run: GFLOP/s against sequence length, one line per variant.

use std::collections::BTreeMap;
use std::path::Path;

use plotters::prelude::*;

use crate::Record;

/// What a series is: the record's name without its sequence length, and its implementation.
/// Records that share it differ only in N.
fn series_label(record: &Record) -> String {
    let name: Vec<&str> = record
        .name
        .split('_')
        .filter(|part| {
            !(part.len() > 1
                && part.starts_with('n')
                && part[1..].bytes().all(|b| b.is_ascii_digit()))
        })
        .collect();
    format!("{} ({})", name.join("_"), record.implementation)
}

/// Width of the plot; the legend gets a column of its own to its right, so it never hides data.
const PLOT_WIDTH: u32 = 820;
const LEGEND_WIDTH: u32 = 420;
const LEGEND_LINE: i32 = 18;

/// Writes the chart of `records` (GPU attention records only: not the probes, not the CPU
/// reference) to `path`. The FMA peak is in the caption, and a dashed line where it is within
/// 1.5× of the fastest record (on a CPU device the kernels reach a fraction of it, and a line
/// far above would squash the data).
pub fn write_chart(
    path: &Path,
    records: &[Record],
    peak_gflops: Option<f64>,
) -> Result<(), String> {
    let mut series: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for r in records
        .iter()
        .filter(|r| r.implementation == "fused" || r.implementation == "naive-gpu")
    {
        series
            .entry(series_label(r))
            .or_default()
            .push((r.q_len as f64, r.gflops));
    }
    if series.is_empty() {
        return Err("no GPU attention records to chart".into());
    }
    for points in series.values_mut() {
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    let lengths = || series.values().flatten().map(|&(n, _)| n);
    let min_len = lengths().fold(f64::INFINITY, f64::min);
    let max_len = lengths().fold(0.0, f64::max);
    let max_gflops = series
        .values()
        .flatten()
        .map(|&(_, g)| g)
        .fold(0.0, f64::max);
    let peak_line = peak_gflops.filter(|&peak| peak <= 1.5 * max_gflops);
    let y_max = peak_line.unwrap_or(0.0).max(max_gflops) * 1.1;

    let legend_lines = series.len() as i32 + i32::from(peak_line.is_some());
    let height = 700.max(60 + legend_lines * LEGEND_LINE) as u32;
    let root = SVGBackend::new(path, (PLOT_WIDTH + LEGEND_WIDTH, height)).into_drawing_area();
    let draw_error = |e: DrawingAreaErrorKind<_>| format!("drawing {}: {e}", path.display());
    root.fill(&WHITE).map_err(draw_error)?;
    let (plot_area, legend_area) = root.split_horizontally(PLOT_WIDTH);
    let caption = match peak_gflops {
        Some(peak) => format!("wflash attention, GFLOP/s (FMA peak probe: {peak:.1} GFLOP/s)"),
        None => "wflash attention, GFLOP/s".into(),
    };
    // Half an octave of margin either side, so the first and last lengths are not on the frame.
    let x_range = (min_len / 1.5)..(max_len * 1.5);
    // One label per power of two in range: more would add unlabelled ticks between them.
    let octaves = (x_range.end / x_range.start).log2().floor().max(1.0) as usize;
    let mut chart = ChartBuilder::on(&plot_area)
        .caption(caption, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(65)
        .build_cartesian_2d(x_range.clone().log_scale().base(2.0), 0.0..y_max)
        .map_err(draw_error)?;
    chart
        .configure_mesh()
        .x_desc("sequence length N (log scale)")
        .y_desc("GFLOP/s")
        .x_labels(octaves)
        .x_max_light_lines(0)
        .x_label_formatter(&|n| format!("{}", n.round()))
        .draw()
        .map_err(draw_error)?;

    let legend_font = ("sans-serif", 13).into_font();
    let mut legend_y = 50;
    if let Some(peak) = peak_line {
        chart
            .draw_series(DashedLineSeries::new(
                [(x_range.start, peak), (x_range.end, peak)],
                8,
                5,
                BLACK.stroke_width(1),
            ))
            .map_err(draw_error)?;
        legend_area
            .draw(&PathElement::new(
                [(4, legend_y), (16, legend_y)],
                BLACK.stroke_width(1),
            ))
            .map_err(draw_error)?;
        legend_area
            .draw(&Text::new(
                format!("FMA peak probe, {peak:.1} GFLOP/s"),
                (22, legend_y - 7),
                legend_font.clone(),
            ))
            .map_err(draw_error)?;
        legend_y += LEGEND_LINE;
    }
    for (i, (label, points)) in series.iter().enumerate() {
        let colour = Palette99::pick(i).to_rgba();
        // A variant measured at one length is a point only; at two or more, a line too.
        if points.len() >= 2 {
            chart
                .draw_series(LineSeries::new(
                    points.iter().copied(),
                    colour.stroke_width(2),
                ))
                .map_err(draw_error)?;
        }
        chart
            .draw_series(
                points
                    .iter()
                    .map(|&point| Circle::new(point, 4, colour.filled())),
            )
            .map_err(draw_error)?;
        legend_area
            .draw(&Circle::new((10, legend_y), 4, colour.filled()))
            .map_err(draw_error)?;
        legend_area
            .draw(&Text::new(
                label.as_str(),
                (22, legend_y - 7),
                legend_font.clone(),
            ))
            .map_err(draw_error)?;
        legend_y += LEGEND_LINE;
    }
    root.present().map_err(draw_error)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    /// An old results file (a bare array of records, wall clock) loads and charts: one series
    /// per variant over N, and the peak line.
    #[test]
    fn charts_an_old_results_file() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let records = crate::load_records(&root.join("docs/results/lavapipe-2026-11-23-full.json"))
            .expect("the old file loads");
        let peak = records
            .iter()
            .find(|r| r.implementation == "probe")
            .map(|r| r.gflops);
        let path = std::env::temp_dir().join(format!("wflash-chart-{}.svg", std::process::id()));
        super::write_chart(&path, &records, peak).expect("the chart is drawn");
        let svg = std::fs::read_to_string(&path).expect("the chart is written");
        let _ = std::fs::remove_file(&path);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("softmax_fwd_f32_b1_h8_d64_causal (fused)"));
        assert!(svg.contains("FMA peak probe"));
    }
}
