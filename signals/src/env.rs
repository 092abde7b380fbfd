//! Reading `ONSITE_*` settings: every parser names the variable and the value it rejects, and
//! [`Reader`] decides what a rejected value does to the installation.

use std::fmt;
use std::time::Duration;

use onsite_core::ConfigError;

/// Applies `ONSITE_*` variables over the builder's settings, one at a time.
///
/// A bad value (or a bad builder setting found while checking) never stops the service: it is
/// logged at error level, naming the variable, the value, why it is wrong and what is used
/// instead, and the setting keeps what it would have had without it. In strict mode
/// ([`crate::Builder::strict`], `ONSITE_STRICT=1`, for tests and CI) the first bad value is
/// `install`'s error instead, and nothing is installed.
#[derive(Debug)]
pub(crate) struct Reader {
    strict: bool,
    first_error: Option<ConfigError>,
}

impl Reader {
    pub(crate) fn new(strict: bool) -> Self {
        Reader { strict, first_error: None }
    }

    pub(crate) fn set_strict(&mut self, strict: bool) {
        self.strict = strict;
    }

    /// `name` parsed by `parse` into `slot`; a bad value leaves `slot` as it is, reported with
    /// `slot`'s value (`Debug`) as what is used instead.
    pub(crate) fn set<T: fmt::Debug>(&mut self, name: &str, slot: &mut T, parse: impl Fn(&str) -> Result<T, String>) {
        self.set_shown(name, slot, parse, |value| format!("{value:?}"));
    }

    /// As [`Reader::set`], with `shown` saying what is used instead.
    pub(crate) fn set_shown<T>(
        &mut self,
        name: &str,
        slot: &mut T,
        parse: impl Fn(&str) -> Result<T, String>,
        shown: impl Fn(&T) -> String,
    ) {
        match parsed(name, parse) {
            Ok(Some(value)) => *slot = value,
            Ok(None) => {}
            Err(e) => self.reject(e, shown(slot)),
        }
    }

    /// Reports a rejected value; `instead` is what onsite uses in its place.
    pub(crate) fn reject(&mut self, error: ConfigError, instead: impl fmt::Display) {
        if !self.strict {
            tracing::error!(
                variable = %error.setting,
                value = %error.value,
                "onsite: bad setting {error}; using {instead} instead, and the service runs on"
            );
        }
        self.first_error.get_or_insert(error);
    }

    /// In strict mode, the first rejected value.
    pub(crate) fn finish(self) -> Result<(), ConfigError> {
        match self.first_error {
            Some(error) if self.strict => Err(error),
            _ => Ok(()),
        }
    }
}

/// The value of `name`, `None` when unset. A value that is not UTF-8 is an error.
pub(crate) fn var(name: &str) -> Result<Option<String>, ConfigError> {
    match std::env::var(name) {
        Ok(v) => Ok(Some(v)),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(v)) => {
            Err(ConfigError::new(name, v.to_string_lossy(), "is not valid UTF-8"))
        }
    }
}

/// `ONSITE_X=value` parsed by `parse`, `None` when unset.
pub(crate) fn parsed<T>(name: &str, parse: impl Fn(&str) -> Result<T, String>) -> Result<Option<T>, ConfigError> {
    match var(name)? {
        None => Ok(None),
        Some(v) => parse(v.trim()).map(Some).map_err(|reason| ConfigError::new(name, v, reason)),
    }
}

/// A duration as a person types it: `90s`, `10m`, `1h`, `250ms`, or a combination like `1m30s`.
/// A bare number is refused: its unit would be a guess.
pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err("is empty; expected a duration such as 30s, 10m or 1h".into());
    }
    let mut total = Duration::ZERO;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(rest.len());
        if digits == 0 {
            return Err(format!("expected a number at {rest:?}; durations look like 30s, 10m, 1h30m"));
        }
        let number: f64 = rest[..digits].parse().map_err(|_| format!("{:?} is not a number", &rest[..digits]))?;
        rest = &rest[digits..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(rest.len());
        let seconds_per_unit = match &rest[..unit_len] {
            "ms" => 0.001,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            "" => return Err(format!("{number} has no unit; add ms, s, m or h")),
            unit => return Err(format!("unknown unit {unit:?}; use ms, s, m or h")),
        };
        rest = &rest[unit_len..];
        total += Duration::try_from_secs_f64(number * seconds_per_unit).map_err(|e| e.to_string())?;
    }
    Ok(total)
}

/// `true`/`false` and the usual spellings (`1`/`0`, `yes`/`no`, `on`/`off`).
pub(crate) fn parse_bool(text: &str) -> Result<bool, String> {
    match text.to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err("expected true or false".into()),
    }
}

/// A whole number within `range`.
pub(crate) fn parse_in_range<T>(range: std::ops::RangeInclusive<T>) -> impl Fn(&str) -> Result<T, String>
where
    T: std::str::FromStr + PartialOrd + std::fmt::Display + Copy,
{
    move |text| {
        let n: T =
            text.parse().map_err(|_| format!("expected a whole number from {} to {}", range.start(), range.end()))?;
        if range.contains(&n) { Ok(n) } else { Err(format!("must be from {} to {}", range.start(), range.end())) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_as_people_type_them() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("10").unwrap_err().contains("no unit"));
        assert!(parse_duration("10 minutes").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_duration("m").is_err());
    }

    #[test]
    fn numbers_and_bools() {
        assert_eq!(parse_in_range(1..=1000)("99"), Ok(99));
        assert!(parse_in_range(1..=1000)("0").is_err());
        assert!(parse_in_range(1..=1000)("lots").is_err());
        assert_eq!(parse_bool("Off"), Ok(false));
        assert!(parse_bool("maybe").is_err());
    }
}
