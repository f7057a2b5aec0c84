//! The one syntax of every duration flag of podmesh's binaries: a whole number
//! with a unit, `500ms`, `10s`, `2m`, `1h`, or several of them, `1m30s`.
//!
//! Flags that took a bare number before units existed keep taking it, in the
//! unit they always meant ([`Bare`]); their `--help` says which. A flag that
//! never took a bare number refuses one, so that `10` is not silently read as
//! ten of a unit the operator did not mean.
use std::time::Duration;

/// What a bare number (no unit) means for one flag.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bare {
    /// Refused: the flag always needed a unit.
    Refused,
    /// Seconds (`--lease-ttl 15`).
    Seconds,
    /// Milliseconds (`--secret-poll-ms 1000`).
    Millis,
}

/// Why a text is not a duration.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    /// Empty, a sign, a fraction, an unknown unit, or an overflow.
    #[error("{0:?} is not a duration like 500ms, 10s, 2m, 1h or 1m30s")]
    Syntax(String),
    /// A bare number where the flag needs a unit.
    #[error("{0:?} has no unit: write it as 500ms, 10s, 2m or 1h")]
    NoUnit(String),
}

/// Parses `text`; a bare number is read as `bare` says.
pub fn parse(text: &str, bare: Bare) -> Result<Duration, DurationError> {
    let s = text.trim();
    let syntax = || DurationError::Syntax(text.to_owned());
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        let n: u64 = s.parse().map_err(|_| syntax())?;
        return match bare {
            Bare::Refused => Err(DurationError::NoUnit(text.to_owned())),
            Bare::Seconds => Ok(Duration::from_secs(n)),
            Bare::Millis => Ok(Duration::from_millis(n)),
        };
    }
    let mut rest = s;
    let mut total = Duration::ZERO;
    if rest.is_empty() {
        return Err(syntax());
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(syntax());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| syntax())?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let one = match &rest[..unit_len] {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n.checked_mul(60).ok_or_else(syntax)?),
            "h" => Duration::from_secs(n.checked_mul(3600).ok_or_else(syntax)?),
            "" => return Err(DurationError::NoUnit(text.to_owned())),
            _ => return Err(syntax()),
        };
        rest = &rest[unit_len..];
        total = total.checked_add(one).ok_or_else(syntax)?;
    }
    Ok(total)
}

/// clap value parser of a duration flag that needs a unit.
pub fn with_unit(text: &str) -> Result<Duration, String> {
    parse(text, Bare::Refused).map_err(|e| e.to_string())
}

/// clap value parser of a duration flag whose bare numbers are seconds.
pub fn bare_seconds(text: &str) -> Result<Duration, String> {
    parse(text, Bare::Seconds).map_err(|e| e.to_string())
}

/// clap value parser of a duration flag whose bare numbers are milliseconds.
pub fn bare_millis(text: &str) -> Result<Duration, String> {
    parse(text, Bare::Millis).map_err(|e| e.to_string())
}

/// `d` in the syntax [`parse`] reads back (`1m30s`, `500ms`, `0s`), for
/// defaults and messages.
pub fn format(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        return "0s".into();
    }
    let (h, m, s, ms) = (ms / 3_600_000, ms / 60_000 % 60, ms / 1000 % 60, ms % 1000);
    let mut out = String::new();
    for (n, unit) in [(h, "h"), (m, "m"), (s, "s"), (ms, "ms")] {
        if n > 0 {
            out.push_str(&format!("{n}{unit}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_and_compounds() {
        assert_eq!(
            parse("500ms", Bare::Refused),
            Ok(Duration::from_millis(500))
        );
        assert_eq!(parse("10s", Bare::Refused), Ok(Duration::from_secs(10)));
        assert_eq!(parse("2m", Bare::Refused), Ok(Duration::from_secs(120)));
        assert_eq!(parse("1h", Bare::Refused), Ok(Duration::from_secs(3600)));
        assert_eq!(parse("1m30s", Bare::Refused), Ok(Duration::from_secs(90)));
        assert_eq!(
            parse(" 1s500ms ", Bare::Refused),
            Ok(Duration::from_millis(1500))
        );
        assert_eq!(parse("0s", Bare::Refused), Ok(Duration::ZERO));
    }

    #[test]
    fn bare_numbers_keep_the_unit_their_flag_always_had() {
        assert_eq!(parse("15", Bare::Seconds), Ok(Duration::from_secs(15)));
        assert_eq!(parse("1000", Bare::Millis), Ok(Duration::from_secs(1)));
        assert_eq!(
            parse("10", Bare::Refused),
            Err(DurationError::NoUnit("10".into()))
        );
        // With a unit, every flag reads the same.
        assert_eq!(parse("2s", Bare::Millis), Ok(Duration::from_secs(2)));
    }

    #[test]
    fn refusals_say_what_a_duration_looks_like() {
        for bad in [
            "",
            "x",
            "-1s",
            "1.5s",
            "10 s",
            "5d",
            "s",
            "1s2",
            "99999999999999999999s",
        ] {
            let e = parse(bad, Bare::Seconds).unwrap_err().to_string();
            assert!(e.contains("10s") || e.contains("no unit"), "{bad:?}: {e}");
        }
        assert!(with_unit("10").unwrap_err().contains("no unit"));
    }

    #[test]
    fn format_reads_back() {
        for d in [
            Duration::ZERO,
            Duration::from_millis(1500),
            Duration::from_secs(90),
            Duration::from_secs(3600 + 1),
        ] {
            assert_eq!(parse(&format(d), Bare::Refused), Ok(d), "{}", format(d));
        }
        assert_eq!(format(Duration::from_secs(600)), "10m");
    }
}
