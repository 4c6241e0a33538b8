//! Dotted field paths: `name`, `phase.id`, `comments.0.author`.
//!
//! A path is a `.`-separated list of segments. Inside an object a segment is a key; inside an
//! array it must be a decimal index. Keys that themselves contain a `.` cannot be named this way:
//! use a [JSONPath](crate::jsonpath) such as `$['a.b']` for those.
//!
//! Objects keep their key order on every change (the SDK's `serde_json` has `preserve_order`, and
//! removal shifts rather than swaps), because receivers and humans read payloads in order.

use serde_json::{Map, Value};

/// Why a dotted path could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// The path is the empty string.
    #[error("field path is empty; name a field such as \"name\" or \"phase.id\"")]
    Empty,
    /// Two dots in a row, or a dot at either end.
    #[error(
        "field path \"{path}\" has an empty segment (a leading, trailing or doubled \".\"); \
         write it like \"phase.id\""
    )]
    EmptySegment {
        /// The path as given.
        path: String,
    },
    /// [`set_path`] met a value it cannot descend into.
    #[error("cannot set \"{path}\": \"{at}\" is {found}, so it has no field \"{segment}\"")]
    NotAContainer {
        /// The path as given.
        path: String,
        /// The prefix of the path that names the blocking value.
        at: String,
        /// The segment that could not be followed.
        segment: String,
        /// What the blocking value is ("a string", "an array", ...).
        found: &'static str,
    },
    /// [`set_path`] met an array index that is not a number or is past the end.
    #[error(
        "cannot set \"{path}\": \"{at}\" is an array of {len} elements and \"{segment}\" is not \
         an index into it (set only replaces existing elements)"
    )]
    BadIndex {
        /// The path as given.
        path: String,
        /// The prefix of the path that names the array.
        at: String,
        /// The segment that is not a valid index.
        segment: String,
        /// The array's length.
        len: usize,
    },
}

/// Splits `path` into its segments, rejecting empty paths and empty segments.
pub fn segments(path: &str) -> Result<Vec<&str>, PathError> {
    if path.is_empty() {
        return Err(PathError::Empty);
    }
    let segments: Vec<&str> = path.split('.').collect();
    if segments.iter().any(|s| s.is_empty()) {
        return Err(PathError::EmptySegment {
            path: path.to_owned(),
        });
    }
    Ok(segments)
}

/// Checks that `path` is a well-formed dotted path (for validating configs).
pub fn validate_path(path: &str) -> Result<(), PathError> {
    segments(path).map(|_| ())
}

/// The value at `path`, if there is one. A malformed path finds nothing.
pub fn get_path<'a>(value: &'a Value, path: &str) -> Option<&'a Value> {
    segments(path)
        .ok()?
        .into_iter()
        .try_fold(value, |current, segment| child(current, segment))
}

/// The value at `path`, mutably, if there is one.
pub fn get_path_mut<'a>(value: &'a mut Value, path: &str) -> Option<&'a mut Value> {
    segments(path)
        .ok()?
        .into_iter()
        .try_fold(value, |current, segment| child_mut(current, segment))
}

/// Sets the value at `path`, returning the value it replaced.
///
/// Missing objects along the way are created, and so is the last key; a `null` along the way
/// becomes an object. Array elements can be replaced but not appended, since a path cannot say
/// where a new element should go.
pub fn set_path(value: &mut Value, path: &str, new: Value) -> Result<Option<Value>, PathError> {
    let segments = segments(path)?;
    let mut current = value;
    for (i, segment) in segments.iter().enumerate() {
        let is_last = i + 1 == segments.len();
        if current.is_null() {
            *current = Value::Object(Map::new());
        }
        current = match current {
            Value::Object(map) => {
                if is_last {
                    return Ok(map.insert((*segment).to_owned(), new));
                }
                map.entry((*segment).to_owned()).or_insert(Value::Null)
            }
            Value::Array(items) => {
                let len = items.len();
                let slot = segment
                    .parse::<usize>()
                    .ok()
                    .and_then(|index| items.get_mut(index));
                let Some(slot) = slot else {
                    return Err(PathError::BadIndex {
                        path: path.to_owned(),
                        at: prefix(&segments, i),
                        segment: (*segment).to_owned(),
                        len,
                    });
                };
                if is_last {
                    return Ok(Some(std::mem::replace(slot, new)));
                }
                slot
            }
            other => {
                return Err(PathError::NotAContainer {
                    path: path.to_owned(),
                    at: prefix(&segments, i),
                    segment: (*segment).to_owned(),
                    found: kind(other),
                });
            }
        };
    }
    // `segments` is never empty, so the loop always returns; this keeps the function total.
    Ok(None)
}

/// Removes the value at `path` and returns it; `None` when there was nothing there.
///
/// Removing an array element shifts the later elements down, like [`Vec::remove`].
pub fn remove_path(value: &mut Value, path: &str) -> Option<Value> {
    let segments = segments(path).ok()?;
    let (last, parents) = segments.split_last()?;
    let parent = parents
        .iter()
        .try_fold(value, |current, segment| child_mut(current, segment))?;
    match parent {
        Value::Object(map) => map.shift_remove(*last),
        Value::Array(items) => {
            let index = last.parse::<usize>().ok()?;
            (index < items.len()).then(|| items.remove(index))
        }
        _ => None,
    }
}

/// What kind of JSON value `value` is, for error messages: "a string", "an object", ...
pub fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn child<'a>(value: &'a Value, segment: &str) -> Option<&'a Value> {
    match value {
        Value::Object(map) => map.get(segment),
        Value::Array(items) => items.get(segment.parse::<usize>().ok()?),
        _ => None,
    }
}

fn child_mut<'a>(value: &'a mut Value, segment: &str) -> Option<&'a mut Value> {
    match value {
        Value::Object(map) => map.get_mut(segment),
        Value::Array(items) => items.get_mut(segment.parse::<usize>().ok()?),
        _ => None,
    }
}

fn prefix(segments: &[&str], end: usize) -> String {
    if end == 0 {
        return "(the root)".to_owned();
    }
    segments[..end].join(".")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn doc() -> Value {
        json!({
            "name": "Crash on save",
            "phase": {"id": "phase.defect.opened", "name": "Opened"},
            "comments": [{"author": "bot"}, {"author": "ann"}],
            "empty": null,
        })
    }

    #[test]
    fn get_follows_keys_and_indexes() {
        let doc = doc();
        let cases = [
            ("name", Some(json!("Crash on save"))),
            ("phase.id", Some(json!("phase.defect.opened"))),
            ("comments.1.author", Some(json!("ann"))),
            ("comments.2.author", None),
            ("comments.x", None),
            ("name.length", None),
            ("empty", Some(Value::Null)),
            ("missing", None),
            ("", None),
            ("phase..id", None),
        ];
        for (path, expected) in cases {
            assert_eq!(get_path(&doc, path).cloned(), expected, "path {path:?}");
        }
    }

    #[test]
    fn set_creates_objects_and_keeps_key_order() {
        let mut doc = doc();
        assert_eq!(
            set_path(&mut doc, "phase.id", json!("x")).unwrap(),
            Some(json!("phase.defect.opened"))
        );
        assert_eq!(set_path(&mut doc, "a.b.c", json!(1)).unwrap(), None);
        assert_eq!(set_path(&mut doc, "empty.x", json!(2)).unwrap(), None);
        set_path(&mut doc, "comments.0.author", json!("me")).unwrap();
        assert_eq!(keys(&doc), ["name", "phase", "comments", "empty", "a"]);
        assert_eq!(doc["phase"], json!({"id": "x", "name": "Opened"}));
        assert_eq!(doc["a"], json!({"b": {"c": 1}}));
        assert_eq!(doc["empty"], json!({"x": 2}));
        assert_eq!(doc["comments"][0]["author"], json!("me"));
    }

    fn keys(doc: &Value) -> Vec<&str> {
        doc.as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect()
    }

    #[test]
    fn set_refuses_what_it_cannot_do_and_says_where() {
        let mut doc = doc();
        let err = set_path(&mut doc, "name.first", json!(1)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "cannot set \"name.first\": \"name\" is a string, so it has no field \"first\""
        );
        let err = set_path(&mut doc, "comments.5", json!(1)).unwrap_err();
        assert!(matches!(err, PathError::BadIndex { len: 2, .. }), "{err}");
        assert_eq!(set_path(&mut doc, "", json!(1)), Err(PathError::Empty));
        assert!(matches!(
            set_path(&mut doc, ".x", json!(1)),
            Err(PathError::EmptySegment { .. })
        ));
    }

    #[test]
    fn remove_shifts_and_keeps_order() {
        let mut doc = doc();
        assert_eq!(remove_path(&mut doc, "name"), Some(json!("Crash on save")));
        assert_eq!(remove_path(&mut doc, "name"), None);
        assert_eq!(
            remove_path(&mut doc, "comments.0"),
            Some(json!({"author": "bot"}))
        );
        assert_eq!(doc["comments"], json!([{"author": "ann"}]));
        assert_eq!(remove_path(&mut doc, "phase.nope"), None);
        assert_eq!(keys(&doc), ["phase", "comments", "empty"]);
    }
}
