//! The `[[alert]]` tables of the config file. A bad rule is reported with its line and
//! left out; it never keeps the daemon from starting or sampling.

use serde::{Deserialize, Deserializer};
use serde_json::Value;

use super::rules::RuleSpec;

/// The rules of the config file that passed their checks, and a message for each one
/// that did not.
#[derive(Debug, Clone, Default)]
pub struct ConfiguredRules {
    pub rules: Vec<RuleSpec>,
    /// What is wrong, by position of the `[[alert]]` table: the field and the message.
    found: Vec<(usize, String, String)>,
    /// `found`, each with its line once [`ConfiguredRules::locate`] saw the text.
    problems: Vec<String>,
}

impl<'de> Deserialize<'de> for ConfiguredRules {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // Each table alone, as JSON, so that one bad rule neither hides the others nor
        // fails the whole file, and every bad field is named.
        let tables = Vec::<Value>::deserialize(deserializer)?;
        let mut configured = ConfiguredRules::default();
        let mut names = std::collections::HashSet::new();
        for (index, table) in tables.into_iter().enumerate() {
            match RuleSpec::from_json(table) {
                Ok(rule) if !names.insert(rule.name.clone()) => {
                    configured
                        .found
                        .push((index, "name".into(), "is used twice".into()));
                }
                Ok(rule) => configured.rules.push(rule),
                Err(errors) => configured
                    .found
                    .extend(errors.into_iter().map(|e| (index, e.field, e.message))),
            }
        }
        Ok(configured)
    }
}

impl ConfiguredRules {
    /// Finds the line of each problem: `line_of(index, field)` is the line, counted from
    /// 0, that sets `field` in the `index`th `[[alert]]` table of the file, or else its
    /// header.
    pub fn locate(&mut self, line_of: impl Fn(usize, &str) -> Option<usize>) {
        self.problems = self
            .found
            .iter()
            .map(|(index, field, message)| {
                let what = format!("alert {}: {field} {message}", index + 1);
                match line_of(*index, field) {
                    Some(n) => format!("line {}: {what}", n + 1),
                    None => what,
                }
            })
            .collect();
    }

    /// Every problem, with its line when it could be found.
    pub fn problems(&self) -> &[String] {
        &self.problems
    }
}
