//! Typed plugin configuration.
//!
//! A rule's `config:` reaches the plugin as JSON. [`parse`] turns it into the plugin's own
//! `#[derive(Deserialize)]` struct and, when that fails, names the offending entry
//! (`labels.Rework Counter: invalid type: integer `5`, expected a string`), so `rulehook check`
//! can point the rule author at the line to fix. A rule that gives no config reads as `{}`.
//!
//! ```
//! use rulehook_plugin_sdk::{config, json};
//!
//! #[derive(serde::Deserialize)]
//! #[serde(deny_unknown_fields)]
//! struct Config {
//!     #[serde(default)]
//!     server_url: String,
//! }
//!
//! let err = config::parse::<Config>(&json!({"server_ur1": "x"})).err().unwrap();
//! assert!(err.to_string().contains("unknown field `server_ur1`, expected `server_url`"));
//! let empty: Config = config::parse(&json!(null)).unwrap();
//! assert_eq!(empty.server_url, "");
//! ```

use serde::de::DeserializeOwned;
use serde_json::Value;
use std::fmt;

/// A configuration mistake and where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Where in the config: `fields[2]`, `labels.Rework Counter`; empty for the config as a whole.
    pub at: String,
    /// What is wrong, and how to fix it.
    pub message: String,
}

impl ConfigError {
    /// A mistake at `at` (see [`ConfigError::at`]).
    pub fn new(at: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            at: at.into(),
            message: message.into(),
        }
    }
}

/// `fields[2]: message`, or only the message when it concerns the whole config.
impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.at.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.at, self.message)
        }
    }
}

impl std::error::Error for ConfigError {}

/// So a plugin can `?` a config error inside [`crate::Plugin`] functions.
impl From<ConfigError> for String {
    fn from(error: ConfigError) -> Self {
        error.to_string()
    }
}

/// Deserializes `config` into `T`, treating `null` (no config given) as `{}`.
///
/// Anything but an object is refused up front: serde would otherwise read an array as the
/// struct's fields in order, which is never what a rule author meant.
pub fn parse<T: DeserializeOwned>(config: &Value) -> Result<T, ConfigError> {
    let value = match config {
        Value::Null => Value::Object(serde_json::Map::new()),
        Value::Object(_) => config.clone(),
        other => {
            return Err(ConfigError::new(
                "",
                format!(
                    "the config must be an object such as {{\"key\": \"value\"}}; found {}",
                    crate::path::kind(other)
                ),
            ));
        }
    };
    serde_path_to_error::deserialize(value).map_err(|e| {
        let at = e.path().to_string();
        // serde_path_to_error renders the root as "."; an empty `at` reads better.
        let at = if at == "." { String::new() } else { at };
        ConfigError {
            at,
            message: e.into_inner().to_string(),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::udf::LabelMap;
    use serde_json::json;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)] // Fields exist to be deserialized.
    struct Sample {
        #[serde(default)]
        labels: LabelMap,
        #[serde(default)]
        paths: Vec<String>,
    }

    #[test]
    fn errors_name_the_entry() {
        let cases = [
            (
                json!({"paths": ["a", 3]}),
                "paths[1]: invalid type: integer `3`, expected a string",
            ),
            (
                json!({"labels": {"A": 5}}),
                "labels: label \"A\" must map to a field name string such as \"rework_counter_udf\"; found 5",
            ),
            (
                json!({"nope": 1}),
                "nope: unknown field `nope`, expected `labels` or `paths`",
            ),
            (
                json!([1]),
                "the config must be an object such as {\"key\": \"value\"}; found an array",
            ),
        ];
        for (config, expected) in cases {
            let err = parse::<Sample>(&config).unwrap_err();
            assert_eq!(err.to_string(), expected, "{config}");
        }
    }

    #[test]
    fn null_reads_as_an_empty_object() {
        let sample: Sample = parse(&Value::Null).unwrap();
        assert!(sample.labels.is_empty() && sample.paths.is_empty());
    }
}
