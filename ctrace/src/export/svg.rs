//! An SVG a person reads at a glance: drops per second over time for the top
//! sources (one line each, with a legend), and a bar per source for its
//! drops over the whole recording.
use plotters::{
    coord::Shift,
    prelude::*,
    style::full_palette::{BLUE_700, GREEN_700, GREY_600, ORANGE_700, PURPLE_600, RED_700, TEAL_600},
};

use crate::export::json::{RecordFile, Source};

pub const WIDTH: u32 = 1000;
pub const HEIGHT: u32 = 720;

const COLOURS: [RGBColor; 7] = [RED_700, BLUE_700, GREEN_700, ORANGE_700, PURPLE_600, TEAL_600, GREY_600];

fn label(s: &Source) -> String {
    format!("{} → :{} {} {}", s.src, s.dport, s.proto, s.reason)
}

pub fn render(record: &RecordFile, top: usize) -> anyhow::Result<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        draw(&root, record, top.clamp(1, COLOURS.len())).map_err(|e| anyhow::anyhow!("drawing the plot: {e}"))?;
        root.present().map_err(|e| anyhow::anyhow!("drawing the plot: {e}"))?;
    }
    Ok(svg)
}

type DrawResult = Result<(), DrawingAreaErrorKind<<SVGBackend<'static> as DrawingBackend>::ErrorType>>;

fn draw(root: &DrawingArea<SVGBackend<'_>, Shift>, record: &RecordFile, top: usize) -> DrawResult {
    root.fill(&WHITE)?;
    let title = format!(
        "conntrack drops per source · {} · kernel {} · {} + {:.0} s",
        record.hostname, record.kernel, record.started_at, record.duration_s
    );
    let root = root.titled(&title, ("sans-serif", 20))?;
    let (upper, lower) = root.split_vertically(HEIGHT / 2 + 20);
    let sources: Vec<&Source> = record.sources.iter().take(top).collect();
    let buckets = sources.iter().map(|s| s.histogram.counts.len()).max().unwrap_or(1).max(1);
    let bucket_s = sources.first().map_or(1.0, |s| s.histogram.bucket_ms as f64 / 1000.0);
    let peak = sources.iter().flat_map(|s| s.histogram.counts.iter().copied()).max().unwrap_or(0).max(1);

    let mut chart = ChartBuilder::on(&upper)
        .caption(format!("drops per second, top {} sources", sources.len()), ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..(buckets as f64 * bucket_s), 0f64..(peak as f64 * 1.15 / bucket_s))?;
    chart.configure_mesh().x_desc("seconds since start").y_desc("drops / s").light_line_style(WHITE.mix(0.0)).draw()?;
    for (i, s) in sources.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        // Each bucket's rate, drawn at its middle.
        let points =
            s.histogram.counts.iter().enumerate().map(|(t, n)| ((t as f64 + 0.5) * bucket_s, *n as f64 / bucket_s));
        chart
            .draw_series(LineSeries::new(points, colour.stroke_width(2)))?
            .label(label(s))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], colour.stroke_width(3)));
    }
    if sources.is_empty() {
        chart.draw_series(std::iter::once(Text::new(
            "no drops recorded",
            (0.0, peak as f64 / 2.0),
            ("sans-serif", 16),
        )))?;
    } else {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.4))
            .label_font(("sans-serif", 13))
            .draw()?;
    }

    let most = sources.iter().map(|s| s.drops).max().unwrap_or(0).max(1);
    let rows = sources.len().max(1);
    let names: Vec<String> = sources.iter().map(|s| label(s)).collect();
    let mut bars = ChartBuilder::on(&lower)
        .caption("drops per source, whole recording", ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(250)
        .build_cartesian_2d(0f64..(most as f64 * 1.15), (0..rows).into_segmented())?;
    bars.configure_mesh()
        .x_desc("drops")
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_labels(rows)
        .y_label_formatter(&|v| match v {
            // Heaviest at the top: row 0 is drawn last.
            SegmentValue::CenterOf(i) if *i < rows => names.get(rows - 1 - *i).cloned().unwrap_or_default(),
            _ => String::new(),
        })
        .light_line_style(WHITE.mix(0.0))
        .draw()?;
    let row = |i: usize| rows - 1 - i;
    bars.draw_series(sources.iter().enumerate().map(|(i, s)| {
        let colour = COLOURS[i % COLOURS.len()];
        let (from, to) = (SegmentValue::Exact(row(i)), SegmentValue::Exact(row(i) + 1));
        let mut bar = Rectangle::new([(0.0, from), (s.drops as f64, to)], colour.filled());
        bar.set_margin(6, 6, 0, 0);
        bar
    }))?;
    bars.draw_series(sources.iter().enumerate().map(|(i, s)| {
        Text::new(format!(" {}", s.drops), (s.drops as f64, SegmentValue::CenterOf(row(i))), ("sans-serif", 13))
    }))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Renders the SVG to pixels, as a viewer would, and checks the picture
    /// is the promised size and has ink where the plot and bars are.
    #[test]
    fn renders_to_a_picture() {
        let svg = render(&crate::export::tests::fixture(), 5).unwrap();
        let mut options = resvg::usvg::Options::default();
        options.fontdb_mut().load_system_fonts();
        // Debian's fonts: "sans-serif" maps to Arial by default, absent here.
        options.fontdb_mut().set_sans_serif_family("DejaVu Sans");
        let tree = resvg::usvg::Tree::from_str(&svg, &options).expect("valid SVG");
        let size = tree.size().to_int_size();
        assert_eq!((size.width(), size.height()), (WIDTH, HEIGHT));
        let mut pixmap = resvg::tiny_skia::Pixmap::new(WIDTH, HEIGHT).unwrap();
        resvg::render(&tree, resvg::tiny_skia::Transform::default(), &mut pixmap.as_mut());
        let px = |x: u32, y: u32| pixmap.pixel(x, y).unwrap();
        let non_white = (0..HEIGHT)
            .step_by(4)
            .flat_map(|y| (0..WIDTH).step_by(4).map(move |x| (x, y)))
            .filter(|&(x, y)| {
                let p = px(x, y);
                p.alpha() > 0 && (p.red() < 240 || p.green() < 240 || p.blue() < 240)
            })
            .count();
        assert!(non_white > 2_000, "the picture is nearly empty ({non_white} inked samples)");
        // The first source's colour (red) appears: its line and its bar.
        let red = (0..HEIGHT)
            .flat_map(|y| (0..WIDTH).map(move |x| (x, y)))
            .filter(|&(x, y)| {
                let p = px(x, y);
                p.red() > 150 && p.green() < 80 && p.blue() < 80
            })
            .count();
        assert!(red > 500, "the top source is not drawn ({red} red pixels)");
        if let Some(out) = std::env::var_os("CTRACE_SVG_PNG") {
            pixmap.save_png(out).unwrap();
        }
    }
}
