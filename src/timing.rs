//! Step times as the reports give them: their median, and a duration in a unit that reads.

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
    fn durations_read_in_milliseconds_seconds_or_minutes() {
        assert_eq!(duration(0.0123), "12.300 ms");
        assert_eq!(duration(4.2), "4.20 s");
        assert_eq!(duration(250.0), "4 min 10 s");
    }
}
