//! What a sweep shows: the live table, the ranking, `results.csv`, and `curves.svg` (every
//! trial's metric against steps, stopped trials marked), drawn here without a plotting library.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use super::study::{show, Ended, Study};

/// Finished and stopped trials, best first: those that got further first (as TPE ranks
/// them: a metric at step 50 is not comparable with one at step 150), then by their last metric.
pub(crate) fn ranking(study: &Study, minimize: bool) -> Vec<(usize, f64)> {
    let mut ranked: Vec<(usize, u64, f64)> = study
        .trials
        .iter()
        .enumerate()
        .filter(|(_, t)| matches!(t.ended, Some(Ended::Finished | Ended::Stopped)))
        .filter_map(|(i, t)| t.last().filter(|l| l.1.is_finite()).map(|l| (i, l.0, l.1)))
        .collect();
    ranked.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| if minimize { a.2.total_cmp(&b.2) } else { b.2.total_cmp(&a.2) }));
    ranked.into_iter().map(|(i, _, m)| (i, m)).collect()
}

/// The table of every trial: parameters, furthest step, its metric there, state.
pub(crate) fn table(study: &Study, keys: &[&String], running: &BTreeSet<usize>) -> String {
    let mut rows = vec![{
        let mut head = vec!["trial".to_string()];
        head.extend(keys.iter().map(|k| k.to_string()));
        head.extend(["step".into(), study.metric.clone(), "state".into()]);
        head
    }];
    for (i, t) in study.trials.iter().enumerate() {
        let mut row = vec![i.to_string()];
        row.extend(keys.iter().map(|k| t.params.as_ref().and_then(|p| p.get(*k)).map_or("-".into(), show)));
        let (step, metric) = t.last().map_or(("-".into(), "-".into()), |(s, m)| (s.to_string(), format!("{m:.4}")));
        row.extend([step, metric, t.state(running.contains(&i)).to_string()]);
        rows.push(row);
    }
    let widths: Vec<usize> = (0..rows[0].len()).map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for row in rows {
        let cells: Vec<String> = row.iter().zip(&widths).map(|(cell, w)| format!("{cell:>w$}")).collect();
        let _ = writeln!(out, "  {}", cells.join("  "));
    }
    out
}

/// `results.csv`: one line per trial.
pub(crate) fn csv(study: &Study, keys: &[&String]) -> String {
    let quote = |s: String| if s.contains([',', '"', '\n']) { format!("\"{}\"", s.replace('"', "\"\"")) } else { s };
    let mut out =
        format!("trial,{},state,step,{}\n", keys.iter().map(|k| quote(k.to_string())).collect::<Vec<_>>().join(","), study.metric);
    for (i, t) in study.trials.iter().enumerate() {
        let values: Vec<String> =
            keys.iter().map(|k| quote(t.params.as_ref().and_then(|p| p.get(*k)).map_or(String::new(), |v| v.to_string()))).collect();
        let (step, metric) = t.last().map_or((String::new(), String::new()), |(s, m)| (s.to_string(), m.to_string()));
        let _ = writeln!(out, "{i},{},{},{step},{metric}", values.join(","), t.ended.map_or("interrupted", Ended::name));
    }
    out
}

/// `curves.svg`: the metric of every trial against steps; a stopped trial's curve ends in a
/// cross, the best trial's is drawn thick.
pub(crate) fn svg(study: &Study, best: Option<usize>) -> String {
    const W: f64 = 720.0;
    const H: f64 = 440.0;
    const LEFT: f64 = 70.0;
    const RIGHT: f64 = 150.0;
    const TOP: f64 = 30.0;
    const BOTTOM: f64 = 50.0;
    let points: Vec<(u64, f64)> =
        study.trials.iter().flat_map(|t| t.reports.iter().map(|(s, m)| (*s, *m))).filter(|p| p.1.is_finite()).collect();
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    );
    let _ =
        writeln!(out, "<text x=\"{LEFT}\" y=\"18\" font-size=\"14\">{} of every trial (x: stopped early)</text>", escape(&study.metric));
    if points.is_empty() {
        out.push_str("<text x=\"70\" y=\"60\">no trial reported yet</text>\n</svg>\n");
        return out;
    }
    let max_step = points.iter().map(|p| p.0).max().unwrap_or(1).max(1) as f64;
    let (mut lo, mut hi) = points.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), p| (lo.min(p.1), hi.max(p.1)));
    if hi - lo < 1e-9 {
        (lo, hi) = (lo - 0.5, hi + 0.5);
    }
    let pad = (hi - lo) * 0.05;
    (lo, hi) = (lo - pad, hi + pad);
    let x = |s: u64| LEFT + s as f64 / max_step * (W - LEFT - RIGHT);
    let y = |m: f64| TOP + (hi - m) / (hi - lo) * (H - TOP - BOTTOM);
    // Axes with five ticks each.
    let _ = writeln!(out, "<path d=\"M{LEFT} {TOP} V{} H{}\" stroke=\"black\" fill=\"none\"/>", H - BOTTOM, W - RIGHT);
    for i in 0..=4 {
        let f = i as f64 / 4.0;
        let (step, metric) = ((f * max_step).round() as u64, lo + f * (hi - lo));
        let _ = writeln!(out, "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{step}</text>", x(step), H - BOTTOM + 18.0);
        let _ = writeln!(out, "<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{metric:.3}</text>", LEFT - 6.0, y(metric) + 4.0);
    }
    let _ = writeln!(out, "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">step</text>", (LEFT + W - RIGHT) / 2.0, H - 12.0);
    for (i, t) in study.trials.iter().enumerate() {
        let curve: Vec<(u64, f64)> = t.reports.iter().map(|(s, m)| (*s, *m)).filter(|p| p.1.is_finite()).collect();
        let Some(&(last_step, last)) = curve.last() else { continue };
        // Hues spread by the golden angle, so neighbours differ.
        let colour = format!("hsl({:.0},70%,42%)", (i as f64 * 137.5) % 360.0);
        let width = if best == Some(i) { 3.5 } else { 1.5 };
        let path: Vec<String> =
            curve.iter().enumerate().map(|(k, (s, m))| format!("{}{:.1} {:.1}", if k == 0 { "M" } else { "L" }, x(*s), y(*m))).collect();
        let _ = writeln!(out, "<path d=\"{}\" stroke=\"{colour}\" stroke-width=\"{width}\" fill=\"none\"/>", path.join(" "));
        let (cx, cy) = (x(last_step), y(last));
        if t.ended == Some(Ended::Stopped) {
            let _ = writeln!(out, "<path d=\"M{:.1} {:.1} l8 8 m0 -8 l-8 8\" stroke=\"{colour}\" stroke-width=\"2\"/>", cx - 4.0, cy - 4.0);
        } else {
            let _ = writeln!(out, "<circle cx=\"{cx:.1}\" cy=\"{cy:.1}\" r=\"3\" fill=\"{colour}\"/>");
        }
        let label = if best == Some(i) { format!("trial {i} (best)") } else { format!("trial {i}") };
        let _ =
            writeln!(out, "<text x=\"{:.1}\" y=\"{:.1}\" fill=\"{colour}\">{label}</text>", W - RIGHT + 8.0, TOP + 14.0 * i as f64 + 10.0);
    }
    out.push_str("</svg>\n");
    out
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}
