//! `dormouse bench snapshot --plot FILE.svg`: the snapshot comparison as a chart. One column of
//! panels per guest load (idle, all touched, Linux), snapshot create time on top and restore
//! time (process start → vCPUs running) below, against guest size; one series per VMM measured
//! in the run. Times on a log axis (they span 0.5 ms to seconds), sizes as evenly spaced
//! categories.
//! A pure function of the figures, so it is tested without running a VM.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use plotters::prelude::*;

/// What the guest did with its memory before the snapshot: one column of panels each.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Load {
    Idle,
    AllTouched,
    Linux,
}

impl Load {
    fn title(self) -> &'static str {
        match self {
            Load::Idle => "tiny guest, idle",
            Load::AllTouched => "tiny guest, all memory touched",
            Load::Linux => "Linux guest",
        }
    }
}

/// One guest's medians, as the tables print them.
#[derive(Clone, Copy, Debug)]
pub struct Point {
    pub mem_mib: u64,
    pub load: Load,
    pub create: Duration,
    /// Process start → vCPUs running.
    pub restore: Duration,
}

/// One VMM's points ("dormouse", "firecracker", …).
#[derive(Clone, Debug)]
pub struct Series {
    pub vmm: String,
    pub points: Vec<Point>,
}

const WIDTH_PER_COLUMN: u32 = 480;
const HEIGHT: u32 = 720;
/// Log axes cannot show 0: faster figures are drawn at this floor.
const FLOOR_MS: f64 = 0.01;
const COLORS: [RGBColor; 8] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0x8c, 0x56, 0x4b),
    RGBColor(0xe3, 0x77, 0xc2),
    RGBColor(0x7f, 0x7f, 0x7f),
];

#[derive(Clone, Copy)]
enum Metric {
    Create,
    Restore,
}

impl Metric {
    fn title(self) -> &'static str {
        match self {
            Metric::Create => "snapshot create",
            Metric::Restore => "restore: process start → vCPUs running",
        }
    }

    fn ms(self, p: &Point) -> f64 {
        let d = match self {
            Metric::Create => p.create,
            Metric::Restore => p.restore,
        };
        (d.as_secs_f64() * 1e3).max(FLOOR_MS)
    }
}

/// Draws `series` into the SVG file `path`. Fails if there is nothing to draw.
pub fn write_svg(path: &Path, title: &str, series: &[Series]) -> anyhow::Result<()> {
    let mut loads: Vec<Load> = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.load))
        .collect();
    loads.sort();
    loads.dedup();
    anyhow::ensure!(!loads.is_empty(), "no figures to plot");
    let columns = loads.len() as u32;
    let root = SVGBackend::new(path, (WIDTH_PER_COLUMN * columns, HEIGHT)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_error)?;
    let root = root.titled(title, ("sans-serif", 20)).map_err(plot_error)?;
    let panels = root.split_evenly((2, loads.len()));
    for (row, metric) in [Metric::Create, Metric::Restore].into_iter().enumerate() {
        for (column, &load) in loads.iter().enumerate() {
            let Some(area) = panels.get(row * loads.len() + column) else {
                continue;
            };
            panel(area, metric, load, series)?;
        }
    }
    root.present()
        .map_err(plot_error)
        .with_context(|| format!("writing {}", path.display()))
}

fn panel(
    area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
    metric: Metric,
    load: Load,
    series: &[Series],
) -> anyhow::Result<()> {
    let points = || {
        series
            .iter()
            .flat_map(|s| s.points.iter())
            .filter(move |p| p.load == load)
    };
    // Guest sizes are a handful of values: evenly spaced categories read better than a log axis.
    let mut sizes: Vec<u64> = points().map(|p| p.mem_mib).collect();
    sizes.sort_unstable();
    sizes.dedup();
    let (y_lo, y_hi) = widened(points().map(|p| metric.ms(p)));
    let mut chart = ChartBuilder::on(area)
        .caption(
            format!("{} — {}", metric.title(), load.title()),
            ("sans-serif", 14),
        )
        .margin(8)
        .x_label_area_size(36)
        .y_label_area_size(56)
        // One empty slot each side (an integer range counts both ends): a single size still
        // gets a proper slot in the middle.
        .build_cartesian_2d(
            (-1..sizes.len() as i32).into_segmented(),
            (y_lo..y_hi).log_scale(),
        )
        .map_err(plot_error)?;
    let size_of_slot = |v: &SegmentValue<i32>| match v {
        SegmentValue::CenterOf(i) | SegmentValue::Exact(i) => usize::try_from(*i)
            .ok()
            .and_then(|i| sizes.get(i))
            .map(|&m| size_text(m))
            .unwrap_or_default(),
        SegmentValue::Last => String::new(),
    };
    chart
        .configure_mesh()
        .x_desc("guest memory")
        .y_desc("ms (log scale)")
        .x_labels(sizes.len() + 2)
        .y_labels(6)
        .light_line_style(WHITE)
        .x_label_formatter(&size_of_slot)
        .y_label_formatter(&|y| format!("{y}"))
        .draw()
        .map_err(plot_error)?;
    for (i, s) in series.iter().enumerate() {
        // `sizes` is sorted: slot order is size order.
        let mut slots: Vec<(i32, f64)> = s
            .points
            .iter()
            .filter(|p| p.load == load)
            .filter_map(|p| {
                let slot = sizes.iter().position(|&m| m == p.mem_mib)?;
                Some((i32::try_from(slot).ok()?, metric.ms(p)))
            })
            .collect();
        slots.sort_by_key(|&(slot, _)| slot);
        let xy: Vec<(SegmentValue<i32>, f64)> = slots
            .into_iter()
            .map(|(slot, y)| (SegmentValue::CenterOf(slot), y))
            .collect();
        if xy.is_empty() {
            continue;
        }
        let color = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(xy.clone(), color.stroke_width(2)))
            .map_err(plot_error)?
            .label(s.vmm.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2))
            });
        chart
            .draw_series(xy.into_iter().map(|p| Circle::new(p, 3, color.filled())))
            .map_err(plot_error)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 11))
        .draw()
        .map_err(plot_error)?;
    Ok(())
}

/// "256 MiB", "2 GiB".
fn size_text(mem_mib: u64) -> String {
    if mem_mib >= 1024 && mem_mib.is_multiple_of(1024) {
        format!("{} GiB", mem_mib / 1024)
    } else {
        format!("{mem_mib} MiB")
    }
}

/// A log axis range around `values`: a factor of 2 of air each side (so one value still spans
/// a range), the floor for an empty set.
fn widened(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values
        .filter(|v| v.is_finite() && *v > 0.0)
        .fold((f64::INFINITY, 0.0f64), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
    if hi <= 0.0 {
        return (FLOOR_MS, 1.0);
    }
    (lo / 2.0, hi * 2.0)
}

/// plotters' errors are generic over the backend: flattened to text for `anyhow`.
fn plot_error<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow::anyhow!("drawing the chart: {e}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(mem_mib: u64, load: Load, create_ms: u64, restore_ms: u64) -> Point {
        Point {
            mem_mib,
            load,
            create: Duration::from_millis(create_ms),
            restore: Duration::from_millis(restore_ms),
        }
    }

    fn series() -> Vec<Series> {
        let mut all = Vec::new();
        for (vmm, scale) in [
            ("dormouse", 1),
            ("dormouse (--mem-dir)", 2),
            ("firecracker", 3),
            ("cloud-hypervisor", 4),
        ] {
            all.push(Series {
                vmm: vmm.to_string(),
                points: vec![
                    point(256, Load::Idle, scale, 3 * scale),
                    point(2048, Load::Idle, 2 * scale, 4 * scale),
                    point(256, Load::AllTouched, 80 * scale, 3 * scale),
                    point(2048, Load::AllTouched, 800 * scale, 5 * scale),
                ],
            });
        }
        all
    }

    /// Every `<tag>` is closed by its `</tag>` in order, or closes itself (`<tag …/>`).
    fn tags_balance(svg: &str) -> Result<(), String> {
        let mut open: Vec<&str> = Vec::new();
        let mut rest = svg;
        while let Some(start) = rest.find('<') {
            let end = rest[start..].find('>').ok_or("a tag that does not end")? + start;
            let tag = &rest[start + 1..end];
            rest = &rest[end + 1..];
            if tag.starts_with('?') || tag.starts_with('!') || tag.ends_with('/') {
                continue;
            }
            let name = |t: &'_ str| t.split_whitespace().next().unwrap_or("").to_string();
            if let Some(closing) = tag.strip_prefix('/') {
                match open.pop() {
                    Some(o) if name(o) == name(closing) => {}
                    other => return Err(format!("</{closing}> closes {other:?}")),
                }
            } else {
                open.push(tag);
            }
        }
        if open.is_empty() {
            Ok(())
        } else {
            Err(format!("unclosed: {open:?}"))
        }
    }

    #[test]
    fn the_chart_names_every_series_and_is_well_formed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snapshot.svg");
        let all = series();
        write_svg(&path, "dormouse bench snapshot", &all).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.trim_start().starts_with("<svg"), "{}", &svg[..80]);
        assert!(svg.trim_end().ends_with("</svg>"));
        tags_balance(&svg).unwrap();
        for s in &all {
            assert!(svg.contains(&s.vmm), "no {:?} in the chart", s.vmm);
        }
        for text in ["snapshot create", "restore", "all memory touched", "idle"] {
            assert!(svg.contains(text), "no {text:?} in the chart");
        }
        // Two loads here: no Linux column.
        assert!(!svg.contains("Linux guest"));
    }

    #[test]
    fn the_balance_check_catches_a_broken_document() {
        assert!(tags_balance("<svg><g></svg>").is_err());
        assert!(tags_balance("<svg><g/><text>a</text></svg>").is_ok());
    }

    #[test]
    fn a_linux_column_appears_with_linux_points_and_zero_times_still_draw() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("linux.svg");
        let all = vec![Series {
            vmm: "firecracker".to_string(),
            points: vec![point(512, Load::Linux, 0, 40)],
        }];
        write_svg(&path, "t", &all).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.contains("Linux guest"));
        tags_balance(&svg).unwrap();
    }

    #[test]
    fn nothing_to_draw_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        assert!(write_svg(&dir.path().join("x.svg"), "t", &[]).is_err());
    }

    #[test]
    fn axis_ranges_leave_air_around_the_values() {
        assert_eq!(widened([4.0, 16.0].into_iter()), (2.0, 32.0));
        assert_eq!(widened([256.0].into_iter()), (128.0, 512.0));
        assert_eq!(widened(std::iter::empty()), (FLOOR_MS, 1.0));
        assert_eq!(size_text(2048), "2 GiB");
        assert_eq!(size_text(256), "256 MiB");
    }
}
