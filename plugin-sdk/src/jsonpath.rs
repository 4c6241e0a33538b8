//! JSONPath (RFC 9535) queries that find values and also say *where* they are, so a plugin can
//! remove or replace what a query matches.
//!
//! Parsing and evaluation are done by `jsonpath-rust`; it reports each match's normalized path
//! (`$['comments'][0]`), which is turned into a [`Location`] of keys and indexes. Removing and
//! replacing then work on those locations, keeping object key order.
//!
//! ```
//! use rulehook_plugin_sdk::{json, jsonpath::JsonPath};
//!
//! let mut entity = json!({"comments": [{"author": "bot"}, {"author": "ann"}, {"author": "bot"}]});
//! let bots = JsonPath::parse("$.comments[?@.author=='bot']").unwrap();
//! assert_eq!(bots.find(&entity).unwrap().len(), 2);
//! assert_eq!(bots.remove(&mut entity).unwrap(), 2);
//! assert_eq!(entity, json!({"comments": [{"author": "ann"}]}));
//! ```

use jsonpath_rust::parser::model::{JpQuery, Segment, Selector};
use jsonpath_rust::parser::parse_json_path;
use jsonpath_rust::query::js_path_process;
use serde_json::Value;
use std::fmt;

/// Why a JSONPath could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JsonPathError {
    /// The text is not an RFC 9535 JSONPath.
    #[error(
        "JSONPath \"{path}\" is invalid: {reason} (write it like \"$.comments[?@.author=='bot']\")"
    )]
    Invalid {
        /// The path as given.
        path: String,
        /// What the parser objected to, on one line.
        reason: String,
    },
    /// The query could not be evaluated on this document.
    #[error("JSONPath \"{path}\" could not be evaluated: {reason}")]
    Evaluation {
        /// The path as given.
        path: String,
        /// What went wrong.
        reason: String,
    },
}

/// One step of a [`Location`]: an object key or an array index.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Step {
    /// An array element.
    Index(usize),
    /// An object member.
    Key(String),
}

/// Where a match is: the steps from the queried document's root to it. Empty means the root.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Location(pub Vec<Step>);

impl Location {
    /// The steps from the root.
    pub fn steps(&self) -> &[Step] {
        &self.0
    }

    /// The value at this location in `root`, if it is still there.
    pub fn get<'a>(&self, root: &'a Value) -> Option<&'a Value> {
        self.0
            .iter()
            .try_fold(root, |value, step| match (value, step) {
                (Value::Object(map), Step::Key(key)) => map.get(key),
                (Value::Array(items), Step::Index(index)) => items.get(*index),
                _ => None,
            })
    }

    /// The value at this location in `root`, mutably, if it is still there.
    pub fn get_mut<'a>(&self, root: &'a mut Value) -> Option<&'a mut Value> {
        self.0
            .iter()
            .try_fold(root, |value, step| match (value, step) {
                (Value::Object(map), Step::Key(key)) => map.get_mut(key),
                (Value::Array(items), Step::Index(index)) => items.get_mut(*index),
                _ => None,
            })
    }

    /// Removes the value at this location (shifting later array elements down); `None` if it is
    /// not there or this is the root.
    pub fn remove(&self, root: &mut Value) -> Option<Value> {
        let (last, parents) = self.0.split_last()?;
        let parent = Location(parents.to_vec()).get_mut(root)?;
        match (parent, last) {
            (Value::Object(map), Step::Key(key)) => map.shift_remove(key),
            (Value::Array(items), Step::Index(index)) if *index < items.len() => {
                Some(items.remove(*index))
            }
            _ => None,
        }
    }
}

/// Prints the RFC 9535 normalized path, e.g. `$['comments'][0]`.
impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("$")?;
        for step in &self.0 {
            match step {
                Step::Index(index) => write!(f, "[{index}]")?,
                Step::Key(key) => {
                    f.write_str("['")?;
                    for c in key.chars() {
                        match c {
                            '\'' => f.write_str("\\'")?,
                            '\\' => f.write_str("\\\\")?,
                            c if (c as u32) < 0x20 => write!(f, "\\u{:04x}", c as u32)?,
                            c => write!(f, "{c}")?,
                        }
                    }
                    f.write_str("']")?;
                }
            }
        }
        Ok(())
    }
}

/// A parsed JSONPath, ready to run on many documents.
#[derive(Debug, Clone)]
pub struct JsonPath {
    source: String,
    query: JpQuery,
}

impl JsonPath {
    /// Parses `path`, which must start with `$`.
    pub fn parse(path: &str) -> Result<Self, JsonPathError> {
        let query = parse_json_path(path).map_err(|e| JsonPathError::Invalid {
            path: path.to_owned(),
            reason: one_line(&e.to_string()),
        })?;
        Ok(Self {
            source: path.to_owned(),
            query,
        })
    }

    /// The path as written.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// The values the path matches in `root`, in document order.
    pub fn find<'a>(&self, root: &'a Value) -> Result<Vec<&'a Value>, JsonPathError> {
        Ok(self.matches(root)?.into_iter().map(|(v, _)| v).collect())
    }

    /// Where the path matches in `root`, in document order.
    pub fn locate(&self, root: &Value) -> Result<Vec<Location>, JsonPathError> {
        self.matches(root)?
            .into_iter()
            .map(|(_, path)| self.location(&path))
            .collect()
    }

    /// Removes every match from `root` and returns how many were removed. A match of the whole
    /// document (`$`) cannot be removed and is left alone.
    pub fn remove(&self, root: &mut Value) -> Result<usize, JsonPathError> {
        let mut locations = self.locate(root)?;
        // Descendants before ancestors and later array elements before earlier ones, so that no
        // removal shifts a location that is still to be removed.
        locations.sort_unstable_by(|a, b| b.cmp(a));
        locations.dedup();
        Ok(locations
            .iter()
            .filter(|location| location.remove(root).is_some())
            .count())
    }

    /// Replaces every match in `root` with `replacement(location, old value)` and returns how many
    /// were replaced.
    pub fn replace_with(
        &self,
        root: &mut Value,
        mut replacement: impl FnMut(&Location, &Value) -> Value,
    ) -> Result<usize, JsonPathError> {
        let mut locations = self.locate(root)?;
        locations.sort_unstable_by(|a, b| b.cmp(a));
        locations.dedup();
        let mut replaced = 0;
        for location in &locations {
            if let Some(slot) = location.get_mut(root) {
                *slot = replacement(location, slot);
                replaced += 1;
            }
        }
        Ok(replaced)
    }

    /// Replaces every match in `root` with a copy of `new` and returns how many were replaced.
    pub fn replace(&self, root: &mut Value, new: &Value) -> Result<usize, JsonPathError> {
        self.replace_with(root, |_, _| new.clone())
    }

    fn matches<'a>(&self, root: &'a Value) -> Result<Vec<(&'a Value, String)>, JsonPathError> {
        js_path_process(&self.query, root)
            .map(|refs| refs.into_iter().map(|r| (r.val, r.path)).collect())
            .map_err(|e| JsonPathError::Evaluation {
                path: self.source.clone(),
                reason: one_line(&e.to_string()),
            })
    }

    /// Turns a normalized path reported by `jsonpath-rust` into a [`Location`].
    fn location(&self, normalized: &str) -> Result<Location, JsonPathError> {
        let unexpected = |what: String| JsonPathError::Evaluation {
            path: self.source.clone(),
            reason: format!("match location {normalized:?} {what}"),
        };
        if normalized.is_empty() || normalized == "$" {
            return Ok(Location::default());
        }
        let parsed = parse_json_path(normalized).map_err(|e| {
            unexpected(format!(
                "could not be read back: {}",
                one_line(&e.to_string())
            ))
        })?;
        parsed
            .segments
            .into_iter()
            .map(|segment| match segment {
                Segment::Selector(Selector::Name(name)) => Ok(Step::Key(name)),
                Segment::Selector(Selector::Index(index)) => usize::try_from(index)
                    .map(Step::Index)
                    .map_err(|_| unexpected(format!("has a negative index {index}"))),
                other => Err(unexpected(format!("is not normalized at {other:?}"))),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Location)
    }
}

/// Finds the values `path` matches in `root`.
pub fn query<'a>(root: &'a Value, path: &str) -> Result<Vec<&'a Value>, JsonPathError> {
    JsonPath::parse(path)?.find(root)
}

/// Removes what `path` matches in `root`; returns how many values were removed.
pub fn remove_matches(root: &mut Value, path: &str) -> Result<usize, JsonPathError> {
    JsonPath::parse(path)?.remove(root)
}

/// Replaces what `path` matches in `root` with copies of `new`; returns how many were replaced.
pub fn replace_matches(root: &mut Value, path: &str, new: &Value) -> Result<usize, JsonPathError> {
    JsonPath::parse(path)?.replace(root, new)
}

/// Parser errors from pest span several lines with ASCII art; configs errors are read in one line
/// of `rulehook check` output.
fn one_line(text: &str) -> String {
    text.lines()
        .map(|line| line.trim().trim_start_matches(['|', '=']).trim())
        .filter(|line| !line.is_empty() && !line.chars().all(|c| "^-".contains(c)))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn entity() -> Value {
        json!({
            "id": "2013",
            "name": "Crash",
            "comments": [
                {"author": "bot", "text": "a"},
                {"author": "ann", "text": "b"},
                {"author": "bot", "text": "c"},
            ],
            "odd key's": {"x": 1},
        })
    }

    #[test]
    fn find_returns_matches_in_document_order() {
        let e = entity();
        let cases: [(&str, Value); 5] = [
            ("$.name", json!(["Crash"])),
            ("$.comments[?@.author=='bot'].text", json!(["a", "c"])),
            (
                "$.comments[1:]",
                json!([{"author": "ann", "text": "b"}, {"author": "bot", "text": "c"}]),
            ),
            ("$.missing", json!([])),
            ("$['odd key\\'s'].x", json!([1])),
        ];
        for (path, expected) in cases {
            let found: Vec<Value> = query(&e, path).unwrap().into_iter().cloned().collect();
            assert_eq!(Value::Array(found), expected, "path {path}");
        }
    }

    #[test]
    fn locate_gives_normalized_paths() {
        let e = entity();
        let path = JsonPath::parse("$..x").unwrap();
        let shown: Vec<String> = path
            .locate(&e)
            .unwrap()
            .iter()
            .map(|l| l.to_string())
            .collect();
        assert_eq!(shown, ["$['odd key\\'s']['x']"]);
        let root = JsonPath::parse("$").unwrap().locate(&e).unwrap();
        assert_eq!(root, [Location::default()]);
    }

    #[test]
    fn remove_deletes_every_match_without_shifting_errors() {
        let mut e = entity();
        assert_eq!(
            remove_matches(&mut e, "$.comments[?@.author=='bot']").unwrap(),
            2
        );
        assert_eq!(e["comments"], json!([{"author": "ann", "text": "b"}]));

        // Overlapping matches (an element and its field) count once per value still present.
        let mut e = entity();
        assert_eq!(remove_matches(&mut e, "$.comments[0,0,2]").unwrap(), 2);
        assert_eq!(e["comments"].as_array().unwrap().len(), 1);

        let mut e = entity();
        assert_eq!(remove_matches(&mut e, "$.name").unwrap(), 1);
        let keys: Vec<&str> = e.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(keys, ["id", "comments", "odd key's"]);

        let mut e = entity();
        assert_eq!(remove_matches(&mut e, "$").unwrap(), 0);
        assert_eq!(e, entity());
    }

    #[test]
    fn replace_overwrites_matches_in_place() {
        let mut e = entity();
        assert_eq!(
            replace_matches(&mut e, "$.comments[*].author", &json!("***")).unwrap(),
            3
        );
        assert_eq!(e["comments"][1], json!({"author": "***", "text": "b"}));
        let n = JsonPath::parse("$.id")
            .unwrap()
            .replace_with(&mut e, |location, old| json!(format!("{location}={old}")))
            .unwrap();
        assert_eq!(n, 1);
        assert_eq!(e["id"], json!("$['id']=\"2013\""));
    }

    #[test]
    fn invalid_paths_are_reported_on_one_line() {
        let err = JsonPath::parse("$.[").unwrap_err();
        let text = err.to_string();
        assert!(text.starts_with("JSONPath \"$.[\" is invalid: "), "{text}");
        assert!(!text.contains('\n'), "{text}");
        assert!(JsonPath::parse("name").is_err());
    }
}
