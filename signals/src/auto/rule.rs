//! Automatic capture rules and their grammar (documented in the crate README):
//!
//! ```text
//! ONSITE_AUTO = RULE ( ";" RULE )*
//! RULE        = CONDITION OPTION*
//! CONDITION   = METRIC ">" LEVEL                 absolute: the first sample above LEVEL fires
//!             | METRIC ">" LEVEL "for" DURATION  sustained: above LEVEL in every sample for DURATION
//!             | METRIC "+" PERCENT               jump: at least PERCENT above the moving average
//! METRIC      = cpu | mem | memory | threads
//! LEVEL       = PERCENT (cpu, mem) | SIZE (mem: 300MB, 1.5GiB) | COUNT (threads)
//! OPTION      = kinds=KIND,KIND.. | capture=DURATION | cooldown=DURATION
//!             | window=DURATION | min=LEVEL                      (jump rules only)
//! ```
//!
//! Spaces inside a condition are optional (`mem>80%for3m` = `mem > 80% for 3m`); options are
//! separated by spaces. Words are case-insensitive.

use std::fmt;
use std::time::Duration;

use onsite_core::ProfileKind;

use crate::env::parse_duration;

/// How long an automatic capture runs unless the rule says `capture=`.
pub const DEFAULT_CAPTURE: Duration = Duration::from_secs(30);
/// How long a rule stays quiet after its capture ends unless it says `cooldown=`.
pub const DEFAULT_COOLDOWN: Duration = Duration::from_secs(600);
/// A jump rule's moving average covers this many samples unless it says `window=`.
pub const DEFAULT_JUMP_WINDOW_SAMPLES: usize = 10;

/// What a rule watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    /// Process CPU time as a percentage of the CPU the process may use (cgroup quota, else the
    /// CPUs in its affinity mask).
    Cpu,
    /// Resident set size, in bytes or as a percentage of the memory limit (cgroup, else
    /// physical memory).
    Memory,
    /// Live threads of the process.
    Threads,
}

impl Metric {
    /// The word used in rules and manifests.
    pub const fn as_str(self) -> &'static str {
        match self {
            Metric::Cpu => "cpu",
            Metric::Memory => "mem",
            Metric::Threads => "threads",
        }
    }
}

/// A threshold in one of the units a metric can be read in.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Level {
    /// Percent of what the process may use (cpu, mem).
    Percent(f64),
    /// Bytes (mem).
    Bytes(u64),
    /// A count (threads).
    Count(u64),
}

impl Level {
    pub(crate) fn unit(self) -> Unit {
        match self {
            Level::Percent(_) => Unit::Percent,
            Level::Bytes(_) => Unit::Bytes,
            Level::Count(_) => Unit::Count,
        }
    }

    pub(crate) fn value(self) -> f64 {
        match self {
            Level::Percent(p) => p,
            Level::Bytes(b) => b as f64,
            Level::Count(n) => n as f64,
        }
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Level::Percent(p) => write!(f, "{p}%"),
            Level::Bytes(b) => f.write_str(&exact_size(b)),
            Level::Count(n) => write!(f, "{n}"),
        }
    }
}

/// The unit a metric is read in for one rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unit {
    Percent,
    Bytes,
    Count,
}

impl Unit {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Unit::Percent => "percent",
            Unit::Bytes => "bytes",
            Unit::Count => "count",
        }
    }
}

/// When a rule's condition holds.
#[derive(Debug, Clone, PartialEq)]
pub enum Condition {
    /// The first sample above the level.
    Absolute(Level),
    /// Every sample above the level for at least this long; one sample at or below it starts
    /// the count again.
    Sustained(Level, Duration),
    /// The current sample at least `percent` above the average of the samples before it (once
    /// `window` of them exist), and above `min` if given.
    Jump { percent: f64, window: Option<Duration>, min: Option<Level> },
}

/// One automatic capture rule: a condition on one metric, and the capture it starts.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    /// The metric watched.
    pub metric: Metric,
    /// When it fires.
    pub condition: Condition,
    /// The kinds its capture contains; `None` for the kinds a manual capture contains.
    pub kinds: Option<Vec<ProfileKind>>,
    /// How long its capture runs (still bounded by the maximum capture duration).
    pub capture: Duration,
    /// How long after its capture ends it cannot fire again.
    pub cooldown: Duration,
    /// The rule as written, for logs and manifests.
    pub text: String,
}

impl Rule {
    /// The unit this rule reads its metric in.
    pub(crate) fn unit(&self) -> Unit {
        match (&self.condition, self.metric) {
            (Condition::Absolute(level) | Condition::Sustained(level, _), _) => level.unit(),
            (Condition::Jump { .. }, Metric::Cpu) => Unit::Percent,
            (Condition::Jump { .. }, Metric::Memory) => Unit::Bytes,
            (Condition::Jump { .. }, Metric::Threads) => Unit::Count,
        }
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// Parses a whole `ONSITE_AUTO` value: rules separated by `;` (empty parts are skipped).
/// The error quotes the rule at fault and the part of it that is wrong.
pub fn parse_rules(text: &str) -> Result<Vec<Rule>, String> {
    let mut rules = Vec::new();
    for (n, part) in text.split(';').enumerate() {
        let part = part.trim();
        if part.is_empty() {
            continue;
        }
        let rule = parse_rule(part).map_err(|e| format!("rule {} {part:?}: {e}", n + 1))?;
        rules.push(rule);
    }
    if rules.is_empty() {
        return Err("names no rule; write one such as `mem>80%for3m`, or `off`".into());
    }
    Ok(rules)
}

/// Parses one rule, e.g. `mem>80%for3m kinds=memory capture=20s`.
pub fn parse_rule(text: &str) -> Result<Rule, String> {
    let lower = text.trim().to_ascii_lowercase();
    let is_option =
        |w: &&str| w.split_once('=').is_some_and(|(k, _)| !k.is_empty() && k.bytes().all(|b| b.is_ascii_alphabetic()));
    let (options, condition_words): (Vec<&str>, Vec<&str>) = lower.split_whitespace().partition(is_option);
    // Spaces inside the condition carry no meaning: `mem > 80% for 3m` is `mem>80%for3m`.
    let condition_text: String = condition_words.concat();
    let metric_len = condition_text.find(|c: char| !c.is_ascii_alphabetic()).unwrap_or(condition_text.len());
    let metric = match &condition_text[..metric_len] {
        "cpu" => Metric::Cpu,
        "mem" | "memory" | "rss" => Metric::Memory,
        "threads" => Metric::Threads,
        "" => return Err("starts with no metric; begin with cpu, mem or threads".into()),
        other => return Err(format!("unknown metric {other:?}; use cpu, mem or threads")),
    };
    let rest = &condition_text[metric_len..];
    let mut condition = if let Some(rest) = rest.strip_prefix('>') {
        if rest.starts_with('=') {
            return Err("`>=` is not supported; write `>` (the level itself never fires)".into());
        }
        match rest.split_once("for") {
            Some((level, duration)) => {
                let level = parse_level(metric, level)?;
                let d = parse_duration(duration).map_err(|e| format!("`for {duration}`: {e}"))?;
                if d.is_zero() {
                    return Err(format!("`for {duration}` is zero; leave `for` out for a rule that fires at once"));
                }
                Condition::Sustained(level, d)
            }
            None => Condition::Absolute(parse_level(metric, rest)?),
        }
    } else if let Some(rest) = rest.strip_prefix('+') {
        if rest.contains("for") {
            return Err("a jump rule (`+P%`) cannot have `for`; the average it compares to moves".into());
        }
        let percent = parse_percent(rest).map_err(|e| format!("jump {rest:?}: {e}; write e.g. `threads+50%`"))?;
        if percent <= 0.0 {
            return Err(format!("jump {rest:?} must be above 0%"));
        }
        Condition::Jump { percent, window: None, min: None }
    } else if rest.is_empty() {
        return Err(format!("{} has no condition; add e.g. `>80%`, `>80%for3m` or `+50%`", metric.as_str()));
    } else {
        return Err(format!("expected `>` or `+` after {}, found {rest:?}", metric.as_str()));
    };

    let mut rule = Rule {
        metric,
        condition: Condition::Absolute(Level::Count(0)),
        kinds: None,
        capture: DEFAULT_CAPTURE,
        cooldown: DEFAULT_COOLDOWN,
        text: text.split_whitespace().collect::<Vec<_>>().join(" "),
    };
    for option in options {
        let (key, value) = option.split_once('=').unwrap_or((option, ""));
        let bad = |e: String| format!("option `{option}`: {e}");
        match key {
            "kinds" | "kind" => rule.kinds = Some(crate::parse_kinds(value).map_err(bad)?),
            "capture" => {
                rule.capture = parse_duration(value).map_err(bad)?;
                if rule.capture.is_zero() {
                    return Err(bad("a capture must be allowed to run".into()));
                }
            }
            "cooldown" => rule.cooldown = parse_duration(value).map_err(bad)?,
            "window" | "min" => {
                let Condition::Jump { window, min, .. } = &mut condition else {
                    return Err(bad("only jump rules (`METRIC+P%`) take this option".into()));
                };
                if key == "window" {
                    *window = Some(parse_duration(value).map_err(bad)?);
                } else {
                    *min = Some(parse_level(metric, value).map_err(bad)?);
                }
            }
            _ => return Err(format!("unknown option {option:?}; use kinds=, capture=, cooldown=, window= or min=")),
        }
    }
    rule.condition = condition;
    Ok(rule)
}

/// A level in the units `metric` allows.
fn parse_level(metric: Metric, text: &str) -> Result<Level, String> {
    if text.is_empty() {
        return Err(format!("{} has no level after `>`", metric.as_str()));
    }
    match metric {
        Metric::Cpu | Metric::Memory if text.ends_with('%') => {
            let p = parse_percent(text).map_err(|e| format!("level {text:?}: {e}"))?;
            if !(0.0..=100.0).contains(&p) {
                return Err(format!("level {text:?} must be from 0% to 100% (of what the process may use)"));
            }
            Ok(Level::Percent(p))
        }
        Metric::Cpu => Err(format!("cpu level {text:?} must be a percentage, e.g. 90%")),
        Metric::Memory => parse_size(text).map(Level::Bytes).map_err(|e| format!("mem level {text:?}: {e}")),
        Metric::Threads => text
            .parse::<u64>()
            .map(Level::Count)
            .map_err(|_| format!("threads level {text:?} must be a whole number, e.g. 500")),
    }
}

fn parse_percent(text: &str) -> Result<f64, String> {
    let number = text.strip_suffix('%').ok_or("needs a % sign")?;
    match number.parse::<f64>() {
        Ok(p) if p.is_finite() => Ok(p),
        _ => Err(format!("{number:?} is not a number")),
    }
}

/// `300MB`, `1.5GiB`, `512MiB`, `2g`: K/M/G/T are powers of 1000, Ki/Mi/Gi/Ti powers of 1024,
/// a trailing `B` is optional. A bare number is refused: its unit would be a guess.
pub(crate) fn parse_size(text: &str) -> Result<u64, String> {
    let split = text.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = match number.parse() {
        Ok(n) if f64::is_finite(n) => n,
        _ => return Err(format!("{number:?} is not a number; sizes look like 300MB or 1.5GiB")),
    };
    let lower = unit.to_ascii_lowercase();
    let multiplier: f64 = match lower.strip_suffix('b').unwrap_or(&lower) {
        "" if !lower.is_empty() => 1.0,
        "" => return Err("has no unit; add B, KB, MB, GB (powers of 1000) or KiB, MiB, GiB (of 1024)".into()),
        "k" => 1e3,
        "m" => 1e6,
        "g" => 1e9,
        "t" => 1e12,
        "ki" => 1024.0,
        "mi" => 1024.0 * 1024.0,
        "gi" => 1024.0 * 1024.0 * 1024.0,
        "ti" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => return Err(format!("unknown unit {unit:?}; use B, KB, MB, GB, TB or KiB, MiB, GiB, TiB")),
    };
    Ok((number * multiplier).round() as u64)
}

/// A size the way a person wrote it when it is a whole number of some unit (`300MB`,
/// `512MiB`), else approximately.
fn exact_size(bytes: u64) -> String {
    const UNITS: [(&str, u64); 8] = [
        ("TiB", 1 << 40),
        ("TB", 1_000_000_000_000),
        ("GiB", 1 << 30),
        ("GB", 1_000_000_000),
        ("MiB", 1 << 20),
        ("MB", 1_000_000),
        ("KiB", 1 << 10),
        ("KB", 1_000),
    ];
    match UNITS.iter().find(|(_, size)| bytes >= *size && bytes.is_multiple_of(*size)) {
        Some((unit, size)) => format!("{}{unit}", bytes / size),
        None => human_bytes(bytes as f64),
    }
}

/// `312.5MiB`, the way the logs and manifests show sizes.
pub(crate) fn human_bytes(bytes: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{value:.0}B") } else { format!("{value:.1}{}", UNITS[unit]) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_examples_parse() {
        let rules = parse_rules("mem>80%for3m; cpu>90%for1m; threads>500").unwrap();
        assert_eq!(rules.len(), 3);
        assert_eq!(rules[0].metric, Metric::Memory);
        assert_eq!(rules[0].condition, Condition::Sustained(Level::Percent(80.0), Duration::from_secs(180)));
        assert_eq!(rules[1].condition, Condition::Sustained(Level::Percent(90.0), Duration::from_secs(60)));
        assert_eq!(rules[2].condition, Condition::Absolute(Level::Count(500)));
        assert_eq!(rules[2].capture, DEFAULT_CAPTURE);
        assert_eq!(rules[2].cooldown, DEFAULT_COOLDOWN);

        let rule = parse_rule("mem > 300MB for 10s kinds=memory,cpu capture=20s cooldown=5m").unwrap();
        assert_eq!(rule.condition, Condition::Sustained(Level::Bytes(300_000_000), Duration::from_secs(10)));
        assert_eq!(rule.kinds, Some(vec![ProfileKind::Memory, ProfileKind::Cpu]));
        assert_eq!(rule.capture, Duration::from_secs(20));
        assert_eq!(rule.cooldown, Duration::from_secs(300));
        assert_eq!(rule.text, "mem > 300MB for 10s kinds=memory,cpu capture=20s cooldown=5m");

        let rule = parse_rule("threads+50% window=1m min=200").unwrap();
        assert_eq!(
            rule.condition,
            Condition::Jump { percent: 50.0, window: Some(Duration::from_secs(60)), min: Some(Level::Count(200)) }
        );
        assert_eq!(parse_rule("MEM>1.5GiB").unwrap().condition, Condition::Absolute(Level::Bytes(1_610_612_736)));
    }

    #[test]
    fn errors_quote_the_rule_and_the_bad_part() {
        let err = parse_rules("mem>80%for3m; cpu>90%for1mm; threads>500").unwrap_err();
        assert!(err.contains("rule 2 \"cpu>90%for1mm\""), "{err}");
        assert!(err.contains("\"mm\""), "{err}");
        let cases = [
            ("disk>80%", "unknown metric \"disk\""),
            ("cpu>300MB", "must be a percentage"),
            ("cpu>150%", "from 0% to 100%"),
            ("threads>50%", "whole number"),
            ("mem>300", "has no unit"),
            ("mem>300XB", "unknown unit \"xb\""),
            ("mem>=80%", "`>=` is not supported"),
            ("mem", "has no condition"),
            ("mem<80%", "expected `>` or `+`"),
            ("mem>80%for0s", "is zero"),
            ("threads+50%for1m", "cannot have `for`"),
            ("threads+lots", "jump \"lots\""),
            ("mem>80% window=1m", "only jump rules"),
            ("mem>80% kinds=heap", "option `kinds=heap`"),
            ("mem>80% capture=0s", "must be allowed to run"),
            ("mem>80% colour=red", "unknown option \"colour=red\""),
            (">80%", "starts with no metric"),
        ];
        for (text, expected) in cases {
            let err = parse_rule(text).unwrap_err();
            assert!(err.contains(expected), "{text}: {err}");
        }
        assert!(parse_rules(" ; ").unwrap_err().contains("names no rule"));
    }

    #[test]
    fn durations_past_a_year_are_refused_in_every_place() {
        const HUGE: &str = "10000000000000000000s10000000000000000000s";
        for rule in [
            format!("mem>80%for{HUGE}"),
            format!("mem>80% capture={HUGE}"),
            format!("mem>80% cooldown={HUGE}"),
            format!("threads+50% window={HUGE}"),
            "mem>80% cooldown=8761h".to_owned(),
        ] {
            let e = parse_rule(&rule).unwrap_err();
            assert!(e.contains("longer than 8760h"), "{rule}: {e}");
        }
        assert_eq!(parse_rule("mem>80% cooldown=8760h").unwrap().cooldown, crate::env::LONGEST);
    }

    #[test]
    fn the_readme_examples_parse() {
        let readme = include_str!("../../README.md");
        let examples: Vec<&str> =
            readme.lines().filter_map(|l| l.split_once("ONSITE_AUTO=\"")?.1.strip_suffix('"')).collect();
        assert_eq!(examples.len(), 3, "the README shows three examples");
        for example in examples {
            let rules = parse_rules(example).unwrap_or_else(|e| panic!("{example}: {e}"));
            for rule in rules {
                if let Some(kinds) = rule.kinds {
                    assert!(kinds.iter().all(|k| ProfileKind::CAPTURED.contains(k)), "{example}");
                }
            }
        }
        let err = parse_rules("mem>80%for3m; cpu>90%for1mm").unwrap_err();
        assert!(readme.contains(&err[..err.find("; use").unwrap()]), "the README quotes the real error: {err}");
    }

    #[test]
    fn sizes_follow_si_and_iec() {
        assert_eq!(parse_size("300MB"), Ok(300_000_000));
        assert_eq!(parse_size("300M"), Ok(300_000_000));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("2gi"), Ok(2 << 30));
        assert_eq!(parse_size("100B"), Ok(100));
        assert!(parse_size("12").is_err());
        assert!(parse_size("MB").is_err());
        assert_eq!(human_bytes(1536.0 * 1024.0), "1.5MiB");
        assert_eq!(Level::Bytes(300_000_000).to_string(), "300MB");
        assert_eq!(Level::Bytes(512 << 20).to_string(), "512MiB");
        assert_eq!(Level::Bytes(1_610_612_736).to_string(), "1536MiB");
        assert_eq!(Level::Bytes(100).to_string(), "100B");
    }
}
