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

/// The longest duration any `ONSITE_*` setting or `ONSITE_AUTO` rule takes (a year), and the
/// "now plus a duration" that never overflows, both shared with the backends.
pub(crate) use onsite_core::{LONGEST_DURATION as LONGEST, instant_after};

/// A duration as a person types it: `90s`, `10m`, `1h`, `250ms`, or a combination like `1m30s`.
/// A bare number is refused: its unit would be a guess. Longer than [`LONGEST`] is refused too.
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
        let too_long =
            || format!("is longer than {}h (a year), the longest duration onsite takes", LONGEST.as_secs() / 3600);
        // Checked before converting, so a number too big for a `Duration` gets the same answer.
        let seconds = number * seconds_per_unit;
        if seconds > LONGEST.as_secs_f64() {
            return Err(too_long());
        }
        let part = Duration::try_from_secs_f64(seconds).map_err(|e| e.to_string())?;
        total = total.checked_add(part).filter(|t| *t <= LONGEST).ok_or_else(too_long)?;
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
#[cfg_attr(not(any(feature = "cpu", feature = "memory", feature = "mutex", feature = "block")), allow(dead_code))]
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

/// The classic signals onsite can take for an operator's job. Every other one either ends or
/// stops the process, reports a fault, or belongs to someone (SIGPROF: the CPU profile;
/// SIGINT/SIGTERM: termination, handled on their own; SIGCHLD, SIGPIPE, SIGALRM: the service's
/// and libc's).
const NAMED_SIGNALS: [(&str, libc::c_int); 4] =
    [("USR1", libc::SIGUSR1), ("USR2", libc::SIGUSR2), ("HUP", libc::SIGHUP), ("WINCH", libc::SIGWINCH)];

/// A signal as a person writes it: `SIGUSR2` or `USR2` (also `HUP`, `WINCH`), a real-time
/// signal `SIGRTMIN+N` / `SIGRTMAX-N` (with or without `SIG`), or its number. Case-insensitive.
pub(crate) fn parse_signal(text: &str) -> Result<libc::c_int, String> {
    let upper = text.trim().to_ascii_uppercase();
    let name = upper.strip_prefix("SIG").unwrap_or(&upper);
    let (min, max) = (libc::SIGRTMIN(), libc::SIGRTMAX());
    let offset = |rest: &str, sign: char| -> Result<libc::c_int, String> {
        if rest.is_empty() {
            return Ok(0);
        }
        rest.strip_prefix(sign)
            .and_then(|n| n.trim().parse::<libc::c_int>().ok())
            .ok_or_else(|| format!("expected RTMIN+N or RTMAX-N, with N a whole number, not {text:?}"))
    };
    // An offset too large for a signal number is no signal; `i32::MAX` is outside the range below.
    let number = if let Some(rest) = name.strip_prefix("RTMIN") {
        min.checked_add(offset(rest, '+')?).unwrap_or(libc::c_int::MAX)
    } else if let Some(rest) = name.strip_prefix("RTMAX") {
        max.checked_sub(offset(rest, '-')?).unwrap_or(libc::c_int::MAX)
    } else if let Some(&(_, sig)) = NAMED_SIGNALS.iter().find(|(n, _)| *n == name) {
        sig
    } else if let Ok(number) = name.parse::<libc::c_int>() {
        number
    } else {
        return Err(format!(
            "is not a signal onsite can use; use USR1, USR2, HUP, WINCH, a real-time signal SIGRTMIN+N ({min} to {max}), or `off`"
        ));
    };
    if (min..=max).contains(&number) || NAMED_SIGNALS.iter().any(|&(_, sig)| sig == number) {
        Ok(number)
    } else {
        Err(format!(
            "signal {number} is not one onsite can use; use USR1, USR2, HUP, WINCH, or a real-time signal {min} (SIGRTMIN) to {max} (SIGRTMAX)"
        ))
    }
}

/// [`parse_signal`], or `off` (also `none`) for no signal.
pub(crate) fn parse_signal_or_off(text: &str) -> Result<Option<libc::c_int>, String> {
    match text.trim().to_ascii_lowercase().as_str() {
        "off" | "none" => Ok(None),
        _ => parse_signal(text).map(Some),
    }
}

/// A signal's name as [`parse_signal`] reads it: `SIGUSR2`, `SIGRTMIN+5`; else its number.
pub(crate) fn signal_name(sig: libc::c_int) -> String {
    if let Some((name, _)) = NAMED_SIGNALS.iter().find(|&&(_, s)| s == sig) {
        return format!("SIG{name}");
    }
    let (min, max) = (libc::SIGRTMIN(), libc::SIGRTMAX());
    if (min..=max).contains(&sig) {
        return if sig == min { "SIGRTMIN".to_owned() } else { format!("SIGRTMIN+{}", sig - min) };
    }
    match sig {
        libc::SIGINT => "SIGINT".to_owned(),
        libc::SIGTERM => "SIGTERM".to_owned(),
        _ => format!("signal {sig}"),
    }
}

/// A signal as `kill -NAME` takes it: `USR2`, `RTMIN+5`.
pub(crate) fn kill_name(sig: libc::c_int) -> String {
    let name = signal_name(sig);
    name.strip_prefix("SIG").map_or(name.clone(), str::to_owned)
}

/// A signal setting as logged: its name, or `off`.
pub(crate) fn signal_or_off(sig: Option<libc::c_int>) -> String {
    sig.map_or_else(|| "off".to_owned(), signal_name)
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
    fn durations_stop_at_a_year() {
        assert_eq!(parse_duration("8760h"), Ok(LONGEST));
        assert_eq!(parse_duration("8759h60m"), Ok(LONGEST));
        assert_eq!(parse_duration("8760h0s"), Ok(LONGEST));
        let too_long = |text: &str| parse_duration(text).unwrap_err().contains("longer than 8760h");
        assert!(too_long("8760h1ms"));
        assert!(too_long("8761h"));
        assert!(too_long("8760h8760h"));
        // Each part alone, and the sum, are beyond what a `Duration` holds.
        assert!(too_long("10000000000000000000s"));
        assert!(too_long("10000000000000000000s10000000000000000000s"));
        assert!(too_long(&format!("{}s", u64::MAX)));
        // Too big for an f64: infinity, which is no more a duration than the rest.
        assert!(too_long(&format!("{}h", "9".repeat(400))));
        assert!(parse_duration("1.2.3s").is_err());
    }

    #[test]
    fn numbers_and_bools() {
        assert_eq!(parse_in_range(1..=1000)("99"), Ok(99));
        assert!(parse_in_range(1..=1000)("0").is_err());
        assert!(parse_in_range(1..=1000)("lots").is_err());
        assert_eq!(parse_bool("Off"), Ok(false));
        assert!(parse_bool("maybe").is_err());
    }

    #[test]
    fn signals_as_people_write_them() {
        let min = libc::SIGRTMIN();
        assert_eq!(parse_signal("SIGUSR2"), Ok(libc::SIGUSR2));
        assert_eq!(parse_signal("usr1"), Ok(libc::SIGUSR1));
        assert_eq!(parse_signal("SIGHUP"), Ok(libc::SIGHUP));
        assert_eq!(parse_signal("SIGRTMIN+5"), Ok(min + 5));
        assert_eq!(parse_signal("rtmin"), Ok(min));
        assert_eq!(parse_signal("SIGRTMAX-1"), Ok(libc::SIGRTMAX() - 1));
        assert_eq!(parse_signal(&(min + 2).to_string()), Ok(min + 2));
        assert_eq!(parse_signal("12"), Ok(libc::SIGUSR2));
        assert!(parse_signal("SIGTERM").unwrap_err().contains("not a signal onsite can use"));
        assert!(parse_signal("SIGSEGV").is_err());
        // Offsets past what a signal number holds are refused, not an overflow.
        assert!(parse_signal("SIGRTMIN+2147483647").unwrap_err().contains("not one onsite can use"));
        assert!(parse_signal("SIGRTMAX-2147483647").is_err());
        assert!(parse_signal("SIGRTMIN+-2147483648").is_err());
        assert!(parse_signal("9").unwrap_err().contains("signal 9"));
        assert!(parse_signal("SIGRTMIN+x").is_err());
        assert!(parse_signal("SIGRTMIN+99").is_err());
        assert!(parse_signal("banana").is_err());
        assert_eq!(parse_signal_or_off("off"), Ok(None));
        assert_eq!(parse_signal_or_off("SIGUSR2"), Ok(Some(libc::SIGUSR2)));
        assert_eq!(signal_name(min + 5), "SIGRTMIN+5");
        assert_eq!(signal_name(libc::SIGUSR1), "SIGUSR1");
        assert_eq!(parse_signal(&signal_name(min + 7)), Ok(min + 7));
    }
}
