//! `--plot FILE.svg`: latency by percentile and throughput over time, side by side.
//!
//! plotters with only its SVG backend: no font or bitmap crates (text is left to the SVG viewer).

use std::path::Path;

use anyhow::{anyhow, Result};
use plotters::prelude::*;

use super::report::Report;

/// Largest number of nines on the percentile axis (99.999 %).
const MAX_NINES: f64 = 5.0;

/// Draws `report` into `path`.
///
/// # Errors
/// When the file cannot be written.
pub fn draw(report: &Report, path: &Path) -> Result<()> {
    let root = SVGBackend::new(path, (1100, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let (left, right) = root.split_horizontally(550);
    let title = format!("{:?} via {}", report.scenario, report.via).to_lowercase();
    latency(report, &left, &title).map_err(|e| anyhow!("drawing latency: {e}"))?;
    throughput(report, &right, &title).map_err(|e| anyhow!("drawing throughput: {e}"))?;
    root.present()
        .map_err(|e| anyhow!("writing {}: {e}", path.display()))
}

/// Percentile p as "nines": 90 % -> 1, 99 % -> 2 (the usual HdrHistogram x axis).
fn nines(percentile: f64) -> f64 {
    (-(1.0 - percentile / 100.0).max(1e-12).log10()).min(MAX_NINES)
}

type Area<'a> = DrawingArea<SVGBackend<'a>, plotters::coord::Shift>;

fn latency(report: &Report, area: &Area, title: &str) -> Result<(), Box<dyn std::error::Error>> {
    let points: Vec<(f64, f64)> = report
        .percentiles
        .iter()
        .map(|&(p, us)| (nines(p), us.max(0.1)))
        .collect();
    let top = points.iter().map(|p| p.1).fold(1.0, f64::max) * 1.5;
    let bottom = points.iter().map(|p| p.1).fold(top, f64::min) / 1.5;
    let mut chart = ChartBuilder::on(area)
        .caption(
            format!("latency by percentile, {title}"),
            ("sans-serif", 16),
        )
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..MAX_NINES, (bottom..top).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("latency (us)")
        .x_labels(6)
        .x_label_formatter(&|n| format!("{}", 100.0 - 100.0 * 10f64.powf(-n)))
        .draw()?;
    chart.draw_series(LineSeries::new(points, &BLUE))?;
    Ok(())
}

fn throughput(report: &Report, area: &Area, title: &str) -> Result<(), Box<dyn std::error::Error>> {
    let points: Vec<(f64, f64)> = report
        .timeline
        .iter()
        .enumerate()
        .map(|(i, &r)| (i as f64 / 10.0, r))
        .collect();
    let right = points.last().map_or(1.0, |p| p.0.max(0.1));
    let top = points.iter().map(|p| p.1).fold(1.0, f64::max) * 1.1;
    let mut chart = ChartBuilder::on(area)
        .caption(format!("throughput, {title}"), ("sans-serif", 16))
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..right, 0.0..top)?;
    chart
        .configure_mesh()
        .x_desc("seconds")
        .y_desc("auth/s (100 ms buckets)")
        .draw()?;
    chart.draw_series(LineSeries::new(points, &RED))?;
    Ok(())
}
