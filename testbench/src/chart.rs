//! The bench's SVG chart: per path, a bar for each throughput measure's
//! median with a line over the runs' spread (lowest to highest sample), and the
//! value written on it. The raw underlay is tens of times faster than any
//! tunnel, so the scale fits the tunnels and bars past it are cut, marked by a
//! zigzag, their value still written.

use crate::bench::{PathResult, Sample};

const BAR: f64 = 26.0;
const GAP: f64 = 44.0;
const PLOT_HEIGHT: f64 = 300.0;
const LEFT: f64 = 60.0;
const TOP: f64 = 60.0;
const COLOURS: [&str; 4] = ["#1f77b4", "#ff7f0e", "#6baed6", "#fdae6b"];

/// The chart of `results` (the first row being the raw underlay) as SVG.
pub fn svg(title: &str, results: &[PathResult]) -> String {
    let measured: Vec<&PathResult> = results.iter().filter(|r| r.not_measured.is_none()).collect();
    let highest = |r: &PathResult| {
        r.samples
            .iter()
            .flat_map(|s| Sample::MEASURES.map(|(_, f)| f(s)))
            .fold(0.0f64, f64::max)
    };
    // Fit the tunnels (every row but the first); the raw path alone sets it
    // when there is nothing else.
    let tunnels = measured.iter().skip(1).map(|r| highest(r)).fold(0.0f64, f64::max);
    let top_value = if tunnels > 0.0 {
        tunnels * 1.15
    } else {
        measured.first().map_or(1.0, |r| highest(r)).max(0.001)
    };
    let y = |v: f64| TOP + PLOT_HEIGHT - (v.min(top_value) / top_value) * PLOT_HEIGHT;
    let group = BAR * 4.0 + GAP;
    let width = LEFT + group * measured.len() as f64 + 20.0;
    let height = TOP + PLOT_HEIGHT + 60.0;
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width:.0}\" height=\"{height:.0}\" \
         font-family=\"sans-serif\" font-size=\"11\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{LEFT}\" y=\"18\" font-size=\"14\">{}</text>\n",
        escape(title)
    );
    for (i, (name, _)) in Sample::MEASURES.iter().enumerate() {
        let x = LEFT + i as f64 * 75.0;
        out += &format!(
            "<rect x=\"{x}\" y=\"30\" width=\"10\" height=\"10\" fill=\"{}\"/><text x=\"{}\" y=\"39\">{name}</text>\n",
            COLOURS[i],
            x + 14.0
        );
    }
    // Gridlines at five steps of the scale.
    for step in 0..=5 {
        let v = top_value * step as f64 / 5.0;
        out += &format!(
            "<line x1=\"{LEFT}\" x2=\"{:.1}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"#ddd\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{v:.1}</text>\n",
            width - 20.0,
            LEFT - 6.0,
            y(v) + 4.0,
            y = y(v)
        );
    }
    out += &format!(
        "<text x=\"14\" y=\"{:.1}\" transform=\"rotate(-90 14 {:.1})\" text-anchor=\"middle\">Gbit/s</text>\n",
        TOP + PLOT_HEIGHT / 2.0,
        TOP + PLOT_HEIGHT / 2.0
    );
    for (g, r) in measured.iter().enumerate() {
        let x0 = LEFT + 10.0 + g as f64 * group;
        for (i, (_, f)) in Sample::MEASURES.iter().enumerate() {
            let x = x0 + i as f64 * BAR;
            let v = f(&r.median);
            out += &format!(
                "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{}\"/>\n",
                y(v),
                BAR - 2.0,
                TOP + PLOT_HEIGHT - y(v),
                COLOURS[i]
            );
            if v > top_value {
                out += &format!(
                    "<polyline points=\"{:.1},{:.1} {:.1},{:.1} {:.1},{:.1}\" fill=\"none\" stroke=\"white\" stroke-width=\"2\"/>\n",
                    x,
                    TOP + 12.0,
                    x + BAR / 2.0 - 1.0,
                    TOP + 6.0,
                    x + BAR - 2.0,
                    TOP + 12.0
                );
            }
            let (low, high) = r
                .samples
                .iter()
                .map(f)
                .fold((f64::INFINITY, 0.0f64), |(lo, hi), s| (lo.min(s), hi.max(s)));
            if low.is_finite() {
                let mid = x + BAR / 2.0 - 1.0;
                out += &format!(
                    "<line x1=\"{mid:.1}\" x2=\"{mid:.1}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"black\"/>\n",
                    y(low),
                    y(high)
                );
            }
            // On a cut bar, the value goes inside it, under the zigzag.
            let (label_y, colour) = if v > top_value {
                (TOP + 26.0, "white")
            } else {
                (y(v) - 3.0, "black")
            };
            out += &format!(
                "<text x=\"{:.1}\" y=\"{label_y:.1}\" font-size=\"9\" fill=\"{colour}\" text-anchor=\"middle\">{v:.2}</text>\n",
                x + BAR / 2.0 - 1.0,
            );
        }
        out += &format!(
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>\n",
            x0 + BAR * 2.0,
            TOP + PLOT_HEIGHT + 16.0,
            escape(&r.path)
        );
        let cpu = r
            .cpu_seconds_per_gb
            .map_or(String::new(), |cpu| format!("{cpu:.2} CPU s/GB"));
        for (line, text) in [format!("RTT {:.3} ms", r.rtt_ms), cpu].iter().enumerate() {
            out += &format!(
                "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"9\">{}</text>\n",
                x0 + BAR * 2.0,
                TOP + PLOT_HEIGHT + 30.0 + line as f64 * 11.0,
                escape(text)
            );
        }
    }
    out + "</svg>\n"
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(name: &str, up: f64) -> PathResult {
        let sample = Sample {
            up,
            down: up,
            up_parallel: up,
            down_parallel: up,
            rtt_ms: 0.5,
        };
        PathResult {
            path: name.into(),
            median: sample,
            samples: vec![sample],
            ..Default::default()
        }
    }

    #[test]
    fn the_chart_names_every_measured_path_and_cuts_the_raw_bars() {
        let mut missing = path("openvpn", 0.0);
        missing.not_measured = Some("not installed".into());
        let chart = svg("bench <test>", &[path("raw", 30.0), path("teletun & co", 2.0), missing]);
        assert!(chart.starts_with("<svg") && chart.ends_with("</svg>\n"));
        assert!(chart.contains("bench &lt;test&gt;") && chart.contains("teletun &amp; co"));
        assert!(!chart.contains(">openvpn<"), "an unmeasured path has no bars");
        // Four cut bars (the raw path's), each with its value.
        assert_eq!(chart.matches("<polyline").count(), 4);
        assert_eq!(chart.matches(">30.00<").count(), 4);
        assert!(!chart.contains("NaN") && !chart.contains("inf"));
    }
}
