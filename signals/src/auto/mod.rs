//! Automatic captures: onsite watches the process's own CPU, memory and threads and starts a
//! capture when a rule holds, e.g. `mem>80%for3m`. The rule grammar, with examples, is in the
//! crate README; [`parse_rules`] reads it.
//!
//! With no rule configured nothing here runs: no sampling, no periodic wake-up.

mod cgroup;
pub(crate) mod metrics;
mod rule;
pub(crate) mod watch;

use std::time::Duration;

use onsite_core::{ConfigError, ProfileKind};

pub use rule::{
    Condition, DEFAULT_CAPTURE, DEFAULT_COOLDOWN, DEFAULT_JUMP_WINDOW_SAMPLES, Level, Metric, Rule, parse_rule,
    parse_rules,
};

pub(crate) use rule::parse_size;

use crate::env;

/// How often metrics are sampled unless `ONSITE_AUTO_INTERVAL` or the builder says otherwise.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(5);

/// The shortest interval accepted (tests use sub-second ones; production has no reason to).
pub const MIN_INTERVAL: Duration = Duration::from_millis(10);

/// The automatic capture settings: the rules as written, and the sampling interval.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    /// The rules text and where it came from (a builder call or the environment).
    text: Option<(&'static str, String)>,
    interval: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings { text: None, interval: DEFAULT_INTERVAL }
    }
}

/// The setting name errors use for rules given to [`crate::Builder::auto`].
const BUILDER_SETTING: &str = "Builder::auto";

impl Settings {
    pub(crate) fn apply_env(&mut self, env: &mut env::Reader) {
        match env::var(crate::vars::AUTO) {
            Ok(None) => {}
            Ok(Some(text)) if !text.trim().is_empty() => self.text = Some((crate::vars::AUTO, text)),
            Ok(Some(text)) => env.reject(
                ConfigError::new(crate::vars::AUTO, text, "is empty; write rules such as `mem>80%for3m`, or `off`"),
                self.text_shown(),
            ),
            Err(e) => env.reject(e, self.text_shown()),
        }
        env.set(crate::vars::AUTO_INTERVAL, &mut self.interval, |text| {
            env::parse_duration(text).and_then(|interval| match interval < MIN_INTERVAL {
                true => Err(format!("must be at least {MIN_INTERVAL:?}")),
                false => Ok(interval),
            })
        });
        if self.interval < MIN_INTERVAL {
            env.reject(
                ConfigError::new(
                    "Builder::auto_interval",
                    format!("{:?}", self.interval),
                    format!("must be at least {MIN_INTERVAL:?}"),
                ),
                format!("{DEFAULT_INTERVAL:?}"),
            );
            self.interval = DEFAULT_INTERVAL;
        }
    }

    fn text_shown(&self) -> String {
        match &self.text {
            Some((setting, text)) => format!("{text:?} ({setting})"),
            None => "no rules".to_owned(),
        }
    }

    pub(crate) fn interval(&self) -> Duration {
        self.interval
    }

    /// The rules, checked against the kinds this build can capture. Empty when none are set,
    /// the text is `off`, or they cannot be used: then all are rejected (reported through
    /// `env`), and no automatic capture runs rather than some of them (manual captures work).
    pub(crate) fn rules(&self, compiled: &[ProfileKind], env: &mut env::Reader) -> Vec<Rule> {
        self.checked_rules(compiled).unwrap_or_else(|error| {
            env.reject(error, "no automatic rules");
            Vec::new()
        })
    }

    fn checked_rules(&self, compiled: &[ProfileKind]) -> Result<Vec<Rule>, ConfigError> {
        let Some((setting, text)) = &self.text else { return Ok(Vec::new()) };
        if matches!(text.trim().to_ascii_lowercase().as_str(), "off" | "none") {
            return Ok(Vec::new());
        }
        let rules = parse_rules(text).map_err(|reason| ConfigError::new(*setting, text.as_str(), reason))?;
        for (n, rule) in rules.iter().enumerate() {
            if let Some(missing) = rule.kinds.iter().flatten().find(|k| !compiled.contains(k)) {
                return Err(ConfigError::new(
                    *setting,
                    text.as_str(),
                    format!(
                        "rule {} {:?}: kind {missing} is not compiled into this build (its cargo feature is off)",
                        n + 1,
                        rule.text
                    ),
                ));
            }
        }
        Ok(rules)
    }
}

impl crate::Builder {
    /// Automatic capture rules, e.g. `"mem>80%for3m; cpu>90%for1m kinds=cpu"` (grammar in the
    /// crate README). Calling it again adds rules. `ONSITE_AUTO` replaces them (`off` turns
    /// them off). A wrong rule is logged, quoted, and turns automatic captures off (with
    /// [`crate::Builder::strict`], it makes [`crate::Builder::install`] fail).
    pub fn auto(mut self, rules: impl AsRef<str>) -> Self {
        let rules = rules.as_ref();
        self.auto.text = Some(match self.auto.text.take() {
            Some((setting, text)) => (setting, format!("{text}; {rules}")),
            None => (BUILDER_SETTING, rules.to_owned()),
        });
        self
    }

    /// How often the rules' metrics are sampled (default 5 s). `ONSITE_AUTO_INTERVAL`
    /// overrides it.
    pub fn auto_interval(mut self, interval: Duration) -> Self {
        self.auto.interval = interval;
        self
    }
}
