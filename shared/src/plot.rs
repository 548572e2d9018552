//! Line charts written as SVG by hand (no plotting dependency): training curves
//! (`verdict-train`) and serving benchmarks (`verdict-bench`).

use std::path::Path;

/// One line: a name (for the legend) and its `(x, y)` points.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// One chart: a title, the x axis's name and its lines.
#[derive(Debug, Clone, PartialEq)]
pub struct Panel {
    pub title: String,
    pub x_label: String,
    pub series: Vec<Series>,
}

/// Line colours, in series order (matplotlib's default cycle).
const COLOURS: [&str; 8] = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"];

/// Draws the panels one under the other into an SVG file (written through a temporary file).
/// Panels without points are left out; a panel with several series gets a legend.
pub fn write_svg(path: &Path, title: &str, panels: &[Panel]) -> std::io::Result<()> {
    let (w, panel_h, margin) = (720.0, 220.0, 50.0);
    let panels: Vec<&Panel> = panels.iter().filter(|p| p.series.iter().any(|s| !s.points.is_empty())).collect();
    let h = 40.0 + panels.len() as f64 * (panel_h + 30.0);
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{}\" y=\"24\" font-size=\"15\">{}</text>\n",
        margin,
        escape(title)
    );
    for (i, panel) in panels.iter().enumerate() {
        let top = 40.0 + i as f64 * (panel_h + 30.0);
        let all: Vec<(f64, f64)> = panel.series.iter().flat_map(|s| s.points.iter().copied()).collect();
        let (x0, x1) =
            (all.iter().map(|p| p.0).fold(f64::MAX, f64::min), all.iter().map(|p| p.0).fold(f64::MIN, f64::max));
        let (y0, y1) =
            (all.iter().map(|p| p.1).fold(f64::MAX, f64::min), all.iter().map(|p| p.1).fold(f64::MIN, f64::max));
        let (xs, ys) = ((x1 - x0).max(1e-12), (y1 - y0).max(1e-12));
        let px = |x: f64| margin + (x - x0) / xs * (w - 2.0 * margin);
        let py = |y: f64| top + 10.0 + (1.0 - (y - y0) / ys) * (panel_h - 30.0);
        svg.push_str(&format!(
            "<rect x=\"{margin}\" y=\"{}\" width=\"{}\" height=\"{}\" fill=\"none\" stroke=\"#999\"/>\n<text x=\"{margin}\" y=\"{}\">{}</text>\n",
            top + 10.0,
            w - 2.0 * margin,
            panel_h - 30.0,
            top + 5.0,
            escape(&panel.title)
        ));
        let xl = escape(&panel.x_label);
        svg.push_str(&format!(
            "<text x=\"4\" y=\"{:.1}\">{:.4}</text><text x=\"4\" y=\"{:.1}\">{:.4}</text><text x=\"{margin}\" y=\"{:.1}\">{xl} {x0}</text><text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{xl} {x1}</text>\n",
            py(y1) + 4.0, y1, py(y0), y0, top + panel_h, w - margin, top + panel_h
        ));
        let legend = panel.series.len() > 1;
        for (k, s) in panel.series.iter().filter(|s| !s.points.is_empty()).enumerate() {
            let colour = COLOURS[k % COLOURS.len()];
            let path: Vec<String> = s.points.iter().map(|(x, y)| format!("{:.1},{:.1}", px(*x), py(*y))).collect();
            svg.push_str(&format!(
                "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"1.5\" points=\"{}\"/>\n",
                path.join(" ")
            ));
            if s.points.len() <= 60 {
                for (x, y) in &s.points {
                    svg.push_str(&format!(
                        "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"2.5\" fill=\"{colour}\"/>\n",
                        px(*x),
                        py(*y)
                    ));
                }
            }
            if legend {
                let ly = top + 24.0 + 14.0 * k as f64;
                svg.push_str(&format!(
                    "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"10\" height=\"10\" fill=\"{colour}\"/><text x=\"{:.1}\" y=\"{:.1}\">{}</text>\n",
                    w - margin - 150.0,
                    ly - 9.0,
                    w - margin - 135.0,
                    ly,
                    escape(&s.name)
                ));
            }
        }
    }
    svg.push_str("</svg>\n");
    let tmp = path.with_extension("svg.partial");
    std::fs::write(&tmp, svg)?;
    std::fs::rename(&tmp, path)
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_every_series_with_a_legend_and_skips_empty_panels() {
        let dir = std::env::temp_dir().join(format!("verdict-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("p.svg");
        let series = |name: &str, pts: Vec<(f64, f64)>| Series { name: name.into(), points: pts };
        write_svg(
            &path,
            "a <b>",
            &[
                Panel {
                    title: "p50".into(),
                    x_label: "clients".into(),
                    series: vec![series("x", vec![(1.0, 2.0), (4.0, 3.0)]), series("y", vec![(1.0, 1.0)])],
                },
                Panel { title: "empty".into(), x_label: "step".into(), series: vec![series("z", vec![])] },
            ],
        )
        .unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains("a &lt;b&gt;") && svg.contains(">x</text>") && svg.contains("clients 4"));
        assert!(!svg.contains("empty"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
