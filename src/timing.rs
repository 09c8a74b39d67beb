//! Step times as `step` and `run` report them: a line per step, their median, and a duration
//! in a unit that reads.

use crate::format::grouped_rounded;

/// `step   3  loss 2.741742  132.621 ms`: a step's report (tests read the loss as printed).
pub fn step_line(step: usize, loss: f32, seconds: f64) -> String {
    format!("step {step:>3}  loss {loss:.6}  {}", duration(seconds))
}

/// `median of steps 2–5 (step 1 left out: warm-up): 97.820 ms a step, 654 images/s`: the
/// median of the steps after the first `warmup` (at least one is kept); `None` for no steps.
pub fn summary(times: &[f64], warmup: usize, batch: usize) -> Option<String> {
    let warmup = warmup.min(times.len().saturating_sub(1));
    let median = median(&times[warmup..])?;
    Some(format!(
        "{}: {} a step, {} images/s",
        which_steps(warmup, times.len()),
        duration(median),
        grouped_rounded(batch as f64 / median)
    ))
}

/// Which steps a median covers, and which it leaves out.
fn which_steps(warmup: usize, steps: usize) -> String {
    let range = match steps - warmup {
        1 => format!("step {steps}"),
        _ => format!("median of steps {}–{steps}", warmup + 1),
    };
    match warmup {
        0 => range,
        1 => format!("{range} (step 1 left out: warm-up)"),
        n => format!("{range} (steps 1–{n} left out: warm-up)"),
    }
}

/// The median (the mean of the middle two for an even count); `None` for no times.
pub fn median(times: &[f64]) -> Option<f64> {
    let mut sorted = times.to_vec();
    sorted.sort_by(f64::total_cmp);
    let middle = sorted.len() / 2;
    match sorted.len() {
        0 => None,
        n if n % 2 == 1 => Some(sorted[middle]),
        _ => Some((sorted[middle - 1] + sorted[middle]) / 2.0),
    }
}

/// `0.0123` → `12.300 ms`, `4.2` → `4.20 s`, `250` → `4 min 10 s`.
pub fn duration(seconds: f64) -> String {
    match seconds {
        s if s < 1.0 => format!("{:.3} ms", s * 1e3),
        s if s < 60.0 => format!("{s:.2} s"),
        s => format!("{} min {:.0} s", (s / 60.0).floor(), s % 60.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_median_of_an_even_count_is_the_mean_of_the_middle_two() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0]), Some(3.0));
        assert_eq!(median(&[4.0, 2.0]), Some(3.0));
        assert_eq!(median(&[5.0, 1.0, 3.0]), Some(3.0));
        assert_eq!(median(&[7.0, 1.0, 3.0, 5.0]), Some(4.0));
    }

    #[test]
    fn the_summary_says_which_steps_its_median_covers() {
        let times = [9.0, 0.5, 0.25, 0.75];
        assert_eq!(
            summary(&times, 1, 10).unwrap(),
            "median of steps 2–4 (step 1 left out: warm-up): 500.000 ms a step, 20 images/s"
        );
        assert_eq!(
            summary(&times, 9, 10).unwrap(),
            "step 4 (steps 1–3 left out: warm-up): 750.000 ms a step, 13 images/s"
        );
        assert_eq!(summary(&[], 1, 10), None);
    }

    #[test]
    fn durations_read_in_milliseconds_seconds_or_minutes() {
        assert_eq!(duration(0.0123), "12.300 ms");
        assert_eq!(duration(4.2), "4.20 s");
        assert_eq!(duration(250.0), "4 min 10 s");
    }
}
