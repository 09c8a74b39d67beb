//! `fisherc plot RUN_DIR...`: training loss, test loss and test accuracy of one or more runs
//! (their `metrics.jsonl`), overlaid, as SVG and PNG. Text needs a TrueType font, read at
//! run time (DejaVu Sans from `fonts-dejavu-core`, or `FISHERC_FONT`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use fisherc_runtime::train::metrics::{self, Record};
use fisherc_runtime::train::trainer::METRICS_FILE;
use plotters::coord::Shift;
use plotters::prelude::*;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Run directories written by `fisherc train` (several: their curves overlaid).
    #[arg(required = true)]
    pub runs: Vec<PathBuf>,

    /// Output path without extension: writes OUT.svg and OUT.png [default: RUN_DIR/curves for
    /// one run, runs/comparison for several].
    #[arg(long, short)]
    pub out: Option<PathBuf>,
}

/// Where a font may be, most likely first.
const FONT_PATHS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu-sans-fonts/DejaVuSans.ttf",
];

const SIZE: (u32, u32) = (1500, 460);

/// One run's curves: x in epochs (fractional for steps).
struct Curves {
    name: String,
    step_loss: Vec<(f64, f64)>,
    test_loss: Vec<(f64, f64)>,
    test_accuracy: Vec<(f64, f64)>,
}

pub fn run(args: &Args) -> Result<()> {
    let mut runs = args
        .runs
        .iter()
        .map(|dir| curves(dir))
        .collect::<Result<Vec<_>>>()?;
    // runs of one experiment are told apart by their directories
    let names: Vec<String> = runs.iter().map(|r| r.name.clone()).collect();
    for (run, dir) in runs.iter_mut().zip(&args.runs) {
        if names.iter().filter(|n| **n == run.name).count() > 1 {
            run.name = dir.display().to_string();
        }
    }
    let out = args.out.clone().unwrap_or_else(|| match &args.runs[..] {
        [one] => one.join("curves"),
        _ => PathBuf::from("runs/comparison"),
    });
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).with_context(|| parent.display().to_string())?;
    }
    register_font()?;
    let (svg, png) = (out.with_extension("svg"), out.with_extension("png"));
    draw(SVGBackend::new(&svg, SIZE).into_drawing_area(), &runs)
        .with_context(|| svg.display().to_string())?;
    draw(BitMapBackend::new(&png, SIZE).into_drawing_area(), &runs)
        .with_context(|| png.display().to_string())?;
    println!("wrote {} and {}", svg.display(), png.display());
    Ok(())
}

fn register_font() -> Result<()> {
    let from_env = std::env::var("FISHERC_FONT").ok();
    let candidates = from_env
        .iter()
        .map(String::as_str)
        .chain(FONT_PATHS.iter().copied());
    let found = candidates
        .filter_map(|path| std::fs::read(path).ok())
        .next()
        .ok_or_else(|| {
            anyhow!(
                "no font for the plot's text: looked for {} (install fonts-dejavu-core, or set FISHERC_FONT to a .ttf file)",
                FONT_PATHS.join(", ")
            )
        })?;
    // plotters keeps fonts for the life of the program
    let bytes: &'static [u8] = Box::leak(found.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| anyhow!("the font file is not a TrueType/OpenType font"))
}

/// A run's curves from its metrics; a resumed run's repeated records count once (the last).
fn curves(dir: &Path) -> Result<Curves> {
    let records = metrics::read(&dir.join(METRICS_FILE)).map_err(anyhow::Error::msg)?;
    let mut steps: BTreeMap<u64, (usize, f32)> = BTreeMap::new();
    let mut epochs: BTreeMap<usize, (f64, f64)> = BTreeMap::new();
    for record in records {
        match record {
            Record::Step {
                epoch, step, loss, ..
            } => {
                steps.insert(step, (epoch, loss));
            }
            Record::Epoch {
                epoch,
                test_loss,
                test_accuracy,
                ..
            } => {
                epochs.insert(epoch, (test_loss, test_accuracy));
            }
        }
    }
    if steps.is_empty() {
        bail!(
            "{}: no steps recorded yet",
            dir.join(METRICS_FILE).display()
        );
    }
    let mut per_epoch: BTreeMap<usize, usize> = BTreeMap::new();
    for (epoch, _) in steps.values() {
        *per_epoch.entry(*epoch).or_default() += 1;
    }
    let mut seen: BTreeMap<usize, usize> = BTreeMap::new();
    let step_loss = steps
        .values()
        .map(|&(epoch, loss)| {
            let k = seen.entry(epoch).or_default();
            *k += 1;
            (
                (epoch - 1) as f64 + *k as f64 / per_epoch[&epoch] as f64,
                loss as f64,
            )
        })
        .collect();
    let at_end =
        |f: fn(&(f64, f64)) -> f64| epochs.iter().map(|(&e, v)| (e as f64, f(v))).collect();
    Ok(Curves {
        name: run_name(dir),
        step_loss,
        test_loss: at_end(|v| v.0),
        test_accuracy: at_end(|v| 100.0 * v.1),
    })
}

/// The experiment's name as the run recorded it, else the directory's.
fn run_name(dir: &Path) -> String {
    let recorded = fisherc_ir::files::read_text(&dir.join("experiment.toml"))
        .ok()
        .and_then(|text| text.parse::<toml::Table>().ok())
        .and_then(|t| t.get("name").and_then(|n| n.as_str()).map(String::from));
    recorded.unwrap_or_else(|| {
        dir.file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned()
    })
}

fn draw<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, runs: &[Curves]) -> Result<()>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE)?;
    let panels = root.split_evenly((1, 3));
    let pick = |f: fn(&Curves) -> &Vec<(f64, f64)>| -> Vec<(&str, &[(f64, f64)])> {
        runs.iter()
            .map(|r| (r.name.as_str(), f(r).as_slice()))
            .collect()
    };
    panel(
        &panels[0],
        (
            "training loss (per step, and its moving average)",
            "cross-entropy",
        ),
        &pick(|r| &r.step_loss),
        false,
    )?;
    panel(
        &panels[1],
        ("test loss", "cross-entropy"),
        &pick(|r| &r.test_loss),
        true,
    )?;
    panel(
        &panels[2],
        ("test accuracy", "top-1 accuracy (%)"),
        &pick(|r| &r.test_accuracy),
        true,
    )?;
    root.present()?;
    Ok(())
}

/// One chart, titled and with its y axis named: a line per run (with points where `points`),
/// x in epochs.
fn panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    (title, y_axis): (&str, &str),
    series: &[(&str, &[(f64, f64)])],
    points: bool,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let finite = || {
        series
            .iter()
            .flat_map(|(_, s)| s.iter())
            .filter(|(_, y)| y.is_finite())
    };
    let x_max = finite().map(|p| p.0).fold(1.0, f64::max);
    let (y_min, y_max) = finite().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), p| {
        (lo.min(p.1), hi.max(p.1))
    });
    let (y_min, y_max) = if y_min <= y_max {
        let pad = ((y_max - y_min) * 0.05).max(1e-3);
        (y_min - pad, y_max + pad)
    } else {
        (0.0, 1.0)
    };
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(72)
        .build_cartesian_2d(0.0..x_max, y_min..y_max)?;
    chart
        .configure_mesh()
        .x_desc("epoch")
        .y_desc(y_axis)
        .label_style(("sans-serif", 14))
        .draw()?;
    for (i, (name, data)) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let finite: Vec<(f64, f64)> = data.iter().copied().filter(|p| p.1.is_finite()).collect();
        let line = if points {
            finite
        } else {
            // every step faintly, the trend boldly
            chart.draw_series(LineSeries::new(finite.clone(), color.mix(0.25)))?;
            moving_average(&finite, (finite.len() / 40).max(1))
        };
        chart
            .draw_series(LineSeries::new(line, color.stroke_width(2)))?
            .label(*name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
        if points {
            chart.draw_series(
                data.iter()
                    .filter(|p| p.1.is_finite())
                    .map(|&p| Circle::new(p, 3, color.filled())),
            )?;
        }
    }
    chart
        .configure_series_labels()
        // losses fall, accuracies rise: each legend goes where its curves are not
        .position(if title.contains("accuracy") {
            SeriesLabelPosition::LowerRight
        } else {
            SeriesLabelPosition::UpperRight
        })
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()?;
    Ok(())
}

/// Each point's y replaced by the mean of the `window` points ending at it.
fn moving_average(points: &[(f64, f64)], window: usize) -> Vec<(f64, f64)> {
    let mut sum = 0.0;
    points
        .iter()
        .enumerate()
        .map(|(i, &(x, y))| {
            sum += y;
            if i >= window {
                sum -= points[i - window].1;
            }
            (x, sum / (i + 1).min(window) as f64)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::moving_average;

    #[test]
    fn moving_average_averages_the_window_ending_at_each_point() {
        let points: Vec<(f64, f64)> = [1.0, 3.0, 5.0, 7.0]
            .iter()
            .enumerate()
            .map(|(i, &y)| (i as f64, y))
            .collect();
        let ys: Vec<f64> = moving_average(&points, 2).iter().map(|p| p.1).collect();
        assert_eq!(ys, vec![1.0, 2.0, 4.0, 6.0]);
    }
}
