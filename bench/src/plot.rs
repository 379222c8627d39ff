//! SVG plots of the report (plotters, SVG backend: no font or image library needed).

use std::path::Path;

use anyhow::Context;
use plotters::prelude::*;

/// One line of a chart: label, points (x, y).
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
}

const COLORS: [RGBColor; 9] = [
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0x17, 0xbe, 0xcf),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0x98, 0xdf, 0x8a),
    RGBColor(0x7f, 0x7f, 0x7f),
    RGBColor(0xc7, 0xc7, 0xc7),
    RGBColor(0x94, 0x67, 0xbd),
];

/// ns/packet against policy entries, both axes logarithmic.
pub fn lines(path: &Path, title: &str, y_label: &str, series: &[Series]) -> anyhow::Result<()> {
    let (mut x_max, mut y_min, mut y_max) = (10.0f64, f64::MAX, 1.0f64);
    for s in series {
        for &(x, y) in &s.points {
            x_max = x_max.max(x);
            y_min = y_min.min(y);
            y_max = y_max.max(y);
        }
    }
    let y_min = (y_min * 0.7).max(1.0);
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(
            (5.0..x_max * 2.0).log_scale(),
            (y_min..y_max * 1.5).log_scale(),
        )?;
    chart
        .configure_mesh()
        .x_desc("policy entries (rules)")
        .y_desc(y_label)
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y:.0}"))
        .draw()?;
    for (i, s) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(
                s.points.iter().copied(),
                color.stroke_width(2),
            ))?
            .label(s.label.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart.draw_series(s.points.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    root.present()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Horizontal bars: label and value, with the value's unit on the axis.
pub fn bars(path: &Path, title: &str, x_label: &str, bars: &[(String, f64)]) -> anyhow::Result<()> {
    let max = bars.iter().map(|b| b.1).fold(0.0f64, f64::max).max(1e-9);
    let n = bars.len().max(1);
    let root = SVGBackend::new(path, (900, 120 + 36 * n as u32)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(230)
        .build_cartesian_2d(0.0..max * 1.1, (0..n).into_segmented())?;
    let labels: Vec<String> = bars.iter().map(|b| b.0.clone()).collect();
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_labels(n)
        .y_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => labels.get(*i).cloned().unwrap_or_default(),
            _ => String::new(),
        })
        .draw()?;
    chart.draw_series(bars.iter().enumerate().map(|(i, b)| {
        let color = COLORS[i % COLORS.len()];
        Rectangle::new(
            [
                (0.0, SegmentValue::Exact(i)),
                (b.1, SegmentValue::Exact(i + 1)),
            ],
            color.mix(0.8).filled(),
        )
    }))?;
    root.present()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charts_are_svg_with_their_labels_and_one_shape_per_point() {
        let dir = std::env::temp_dir().join(format!("vpcgate-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let s = vec![
            Series {
                label: "alpha".into(),
                points: vec![(10.0, 100.0), (1000.0, 150.0), (1e6, 400.0)],
            },
            Series {
                label: "beta".into(),
                points: vec![(10.0, 50.0), (1e6, 60.0)],
            },
        ];
        let p = dir.join("l.svg");
        lines(&p, "title one", "ns", &s).unwrap();
        let svg = std::fs::read_to_string(&p).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..40]);
        for text in ["title one", "alpha", "beta", "policy entries (rules)"] {
            assert!(svg.contains(text), "{text} missing");
        }
        assert_eq!(svg.matches("<circle").count(), 5);
        let b = dir.join("b.svg");
        bars(
            &b,
            "bars",
            "Gbit/s",
            &[("no filter".into(), 10.0), ("vpcgate".into(), 9.0)],
        )
        .unwrap();
        let svg = std::fs::read_to_string(&b).unwrap();
        assert!(svg.contains("no filter") && svg.contains("vpcgate") && svg.contains("Gbit/s"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
