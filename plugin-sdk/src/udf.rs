//! User-defined fields (UDFs) and their labels.
//!
//! ALM suites such as Octane name the fields an administrator adds `something_udf` and show them
//! under a label such as "Rework Counter". Rules are written by people who know the label, while
//! payloads carry the name; a [`LabelMap`] translates between the two. When no map entry exists,
//! [`conventional_name`] gives the name the suite generates by default for a label.
//!
//! [`glob_match`] matches field names against patterns such as `*_udf`.

use serde_json::Value;
use std::collections::BTreeMap;

/// The suffix every UDF name carries.
pub const UDF_SUFFIX: &str = "_udf";

/// Whether `name` is a UDF's name (it ends with `_udf`).
pub fn is_udf(name: &str) -> bool {
    name.len() > UDF_SUFFIX.len() && name.ends_with(UDF_SUFFIX)
}

/// The name the suite generates by default for a UDF labelled `label`: lower case, runs of
/// anything but letters and digits turned into one `_`, then `_udf`.
/// "Rework Counter" becomes `rework_counter_udf`.
pub fn conventional_name(label: &str) -> String {
    let mut name = String::with_capacity(label.len() + UDF_SUFFIX.len());
    for c in label.trim().chars() {
        if c.is_alphanumeric() {
            name.extend(c.to_lowercase());
        } else if !name.is_empty() && !name.ends_with('_') {
            name.push('_');
        }
    }
    while name.ends_with('_') {
        name.pop();
    }
    name.push_str(UDF_SUFFIX);
    name
}

/// Why a label map could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LabelMapError {
    /// The map is not a JSON object.
    #[error(
        "labels must be an object from label to field name, like {{\"Rework Counter\": \"rework_counter_udf\"}}; found {found}"
    )]
    NotAnObject {
        /// What was found instead.
        found: &'static str,
    },
    /// A label maps to something other than a non-empty string.
    #[error(
        "label \"{label}\" must map to a field name string such as \"rework_counter_udf\"; found {found}"
    )]
    NotAName {
        /// The label.
        label: String,
        /// What it maps to.
        found: String,
    },
    /// A label is the empty string.
    #[error("a label is empty; use the label as the suite shows it, such as \"Rework Counter\"")]
    EmptyLabel,
    /// Two labels map to the same name, so the name cannot be turned back into one label.
    #[error(
        "labels \"{first}\" and \"{second}\" both map to \"{name}\"; each field name may have one label"
    )]
    DuplicateName {
        /// The shared field name.
        name: String,
        /// The first label.
        first: String,
        /// The second label.
        second: String,
    },
}

/// A two-way map between UDF labels and field names.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelMap {
    by_label: BTreeMap<String, String>,
    by_name: BTreeMap<String, String>,
}

impl LabelMap {
    /// An empty map.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `label` ↔ `name`. A label given twice keeps the last name; a name given for two
    /// labels is an error, because [`LabelMap::label_for`] could not choose.
    pub fn insert(
        &mut self,
        label: impl Into<String>,
        name: impl Into<String>,
    ) -> Result<(), LabelMapError> {
        let (label, name) = (label.into(), name.into());
        if label.is_empty() {
            return Err(LabelMapError::EmptyLabel);
        }
        if name.is_empty() {
            return Err(LabelMapError::NotAName {
                label,
                found: "an empty string".to_owned(),
            });
        }
        if let Some(first) = self.by_name.get(&name).filter(|first| **first != label) {
            return Err(LabelMapError::DuplicateName {
                name,
                first: first.clone(),
                second: label,
            });
        }
        if let Some(old_name) = self.by_label.insert(label.clone(), name.clone()) {
            self.by_name.remove(&old_name);
        }
        self.by_name.insert(name, label);
        Ok(())
    }

    /// Builds the map from a JSON object of label → name, as written in a rule's config.
    pub fn from_json(value: &Value) -> Result<Self, LabelMapError> {
        let Value::Object(entries) = value else {
            return Err(LabelMapError::NotAnObject {
                found: crate::path::kind(value),
            });
        };
        let mut map = Self::new();
        for (label, name) in entries {
            let Value::String(name) = name else {
                return Err(LabelMapError::NotAName {
                    label: label.clone(),
                    found: name.to_string(),
                });
            };
            map.insert(label.clone(), name.clone())?;
        }
        Ok(map)
    }

    /// The field name for `label`, if the map has one.
    pub fn name_for(&self, label: &str) -> Option<&str> {
        self.by_label.get(label).map(String::as_str)
    }

    /// The label for field `name`, if the map has one.
    pub fn label_for(&self, name: &str) -> Option<&str> {
        self.by_name.get(name).map(String::as_str)
    }

    /// How many labels the map has.
    pub fn len(&self) -> usize {
        self.by_label.len()
    }

    /// Whether the map is empty.
    pub fn is_empty(&self) -> bool {
        self.by_label.is_empty()
    }

    /// The (label, name) pairs, ordered by label.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.by_label.iter().map(|(l, n)| (l.as_str(), n.as_str()))
    }
}

/// Accepts the JSON object form, `{"Rework Counter": "rework_counter_udf"}`.
impl<'de> serde::Deserialize<'de> for LabelMap {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = Value::deserialize(deserializer)?;
        Self::from_json(&value).map_err(serde::de::Error::custom)
    }
}

/// The field name for `label` in `labels`.
pub fn udf_label_to_name<'a>(labels: &'a LabelMap, label: &str) -> Option<&'a str> {
    labels.name_for(label)
}

/// The label for field `name` in `labels`.
pub fn name_to_label<'a>(labels: &'a LabelMap, name: &str) -> Option<&'a str> {
    labels.label_for(name)
}

/// Whether `pattern` has glob wildcards (`*` or `?`) rather than naming one field.
pub fn is_glob(pattern: &str) -> bool {
    pattern.contains(['*', '?'])
}

/// Whether `text` matches `pattern`, where `*` matches any run of characters (also none) and `?`
/// exactly one; everything else matches itself. `*_udf` matches every UDF name.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    // The shapes nearly every rule uses (`*_udf`, `custom_*`, a plain name) need no scan state;
    // plugins match every field of an entity against them, so they skip the general case's
    // allocations.
    if !is_glob(pattern) {
        return pattern == text;
    }
    if let Some(suffix) = pattern.strip_prefix('*').filter(|s| !is_glob(s)) {
        return text.ends_with(suffix);
    }
    if let Some(prefix) = pattern.strip_suffix('*').filter(|s| !is_glob(s)) {
        return text.starts_with(prefix);
    }
    let pattern: Vec<char> = pattern.chars().collect();
    let text: Vec<char> = text.chars().collect();
    let (mut p, mut t) = (0, 0);
    // Where the last `*` was and how much text it has swallowed so far: on a mismatch the star
    // swallows one more character, which keeps this linear in practice with no recursion.
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match pattern.get(p) {
            Some('*') => {
                star = Some((p, t));
                p += 1;
            }
            Some(&c) if c == '?' || c == text[t] => {
                p += 1;
                t += 1;
            }
            _ => match star {
                Some((star_p, star_t)) => {
                    p = star_p + 1;
                    t = star_t + 1;
                    star = Some((star_p, star_t + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn udf_names_end_with_the_suffix() {
        for (name, udf) in [
            ("rework_counter_udf", true),
            ("x_udf", true),
            ("_udf", false),
            ("udf", false),
            ("name", false),
            ("rework_udf_count", false),
        ] {
            assert_eq!(is_udf(name), udf, "{name}");
        }
    }

    #[test]
    fn conventional_names_follow_the_suite() {
        for (label, name) in [
            ("Rework Counter", "rework_counter_udf"),
            ("  Root-cause  (RCA) ", "root_cause_rca_udf"),
            ("Größe", "größe_udf"),
            ("x", "x_udf"),
        ] {
            assert_eq!(conventional_name(label), name, "{label}");
        }
    }

    #[test]
    fn globs_match_star_and_question_mark() {
        let cases = [
            ("*_udf", "rework_counter_udf", true),
            ("*_udf", "name", false),
            ("*_udf", "_udf", true),
            ("re?ork*", "rework_counter_udf", true),
            ("?", "", false),
            ("*", "", true),
            ("a*b*c", "aXXbYYc", true),
            ("a*b*c", "aXXbYY", false),
            ("**x", "yyx", true),
            ("name", "name", true),
            ("name", "names", false),
            ("rework*", "rework_counter_udf", true),
            ("rework*", "name", false),
            ("r?ot_*_udf", "root_cause_udf", true),
            ("r?ot_*_udf", "rework_counter_udf", false),
        ];
        for (pattern, text, expected) in cases {
            assert_eq!(glob_match(pattern, text), expected, "{pattern} vs {text}");
        }
        assert!(is_glob("*_udf") && is_glob("a?") && !is_glob("phase.id"));
    }

    #[test]
    fn label_map_translates_both_ways() {
        let map = LabelMap::from_json(&json!({
            "Rework Counter": "rework_counter_udf",
            "Root Cause": "rca_udf",
        }))
        .unwrap();
        assert_eq!(udf_label_to_name(&map, "Root Cause"), Some("rca_udf"));
        assert_eq!(
            name_to_label(&map, "rework_counter_udf"),
            Some("Rework Counter")
        );
        assert_eq!(map.name_for("Nope"), None);
        assert_eq!(map.len(), 2);
        let parsed: LabelMap = serde_json::from_value(json!({"A": "a_udf"})).unwrap();
        assert_eq!(parsed.label_for("a_udf"), Some("A"));
    }

    #[test]
    fn label_map_rejects_what_it_cannot_invert() {
        let cases = [
            (json!([]), "labels must be an object"),
            (
                json!({"A": 1}),
                "label \"A\" must map to a field name string",
            ),
            (
                json!({"A": ""}),
                "label \"A\" must map to a field name string",
            ),
            (json!({"": "a_udf"}), "a label is empty"),
            (
                json!({"A": "a_udf", "B": "a_udf"}),
                "labels \"A\" and \"B\" both map to \"a_udf\"",
            ),
        ];
        for (value, message) in cases {
            let err = LabelMap::from_json(&value).unwrap_err().to_string();
            assert!(err.starts_with(message), "{value}: {err}");
        }
    }

    #[test]
    fn relabelling_a_label_frees_its_old_name() {
        let mut map = LabelMap::new();
        map.insert("A", "a_udf").unwrap();
        map.insert("A", "b_udf").unwrap();
        assert_eq!(map.label_for("a_udf"), None);
        map.insert("B", "a_udf").unwrap();
        assert_eq!(map.label_for("a_udf"), Some("B"));
    }
}
