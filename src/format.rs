//! Number formatting for human-readable reports.

/// `1234567` → `1,234,567`.
pub fn grouped(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A rate or count rounded to a whole number, grouped: `41653.8` → `41,654`.
pub fn grouped_rounded(x: f64) -> String {
    match x.is_finite() && x >= 0.0 {
        true => grouped(x.round() as u64),
        false => format!("{x}"),
    }
}

/// A count with an SI prefix: `2.39e12` → `2.39 T`.
pub fn si(x: f64) -> String {
    let prefixes = [(1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")];
    for (scale, prefix) in prefixes {
        if x >= scale {
            return format!("{:.3} {prefix}", x / scale);
        }
    }
    format!("{x:.0} ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_thousands() {
        assert_eq!(grouped(0), "0");
        assert_eq!(grouped(999), "999");
        assert_eq!(grouped(1000), "1,000");
        assert_eq!(grouped(661338), "661,338");
        assert_eq!(grouped(14724042), "14,724,042");
    }

    #[test]
    fn rounds_then_groups() {
        assert_eq!(grouped_rounded(41653.8), "41,654");
        assert_eq!(grouped_rounded(0.4), "0");
        assert_eq!(grouped_rounded(f64::INFINITY), "inf");
    }

    #[test]
    fn picks_the_largest_prefix() {
        assert_eq!(si(2.39e12), "2.390 T");
        assert_eq!(si(1500.0), "1.500 k");
        assert_eq!(si(12.0), "12 ");
    }
}
