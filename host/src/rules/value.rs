//! Comparing JSON values the way admins expect.
//!
//! YAML and JSON disagree on small things (`3` versus `3.0`, `1002` versus
//! `"1002"` in a scope), and a rule should not silently miss because of them.

use std::cmp::Ordering;
use std::fmt::Write as _;

use serde_json::Value;

/// JSON equality where numbers compare by value (`3 == 3.0`).
pub fn json_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            x == y || matches!((x.as_f64(), y.as_f64()), (Some(p), Some(q)) if p == q)
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(p, q)| json_eq(p, q))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| json_eq(v, w)))
        }
        _ => a == b,
    }
}

/// The text form of a scalar used for scope equality and the scope index:
/// senders write `1002` or `"1002"` for the same workspace.
pub fn scalar_key(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(match (n.as_i64(), n.as_u64(), n.as_f64()) {
            (Some(i), _, _) => i.to_string(),
            (_, Some(u), _) => u.to_string(),
            (_, _, Some(f)) if f.fract() == 0.0 && f.abs() < 1e15 => {
                let mut s = String::new();
                let _ = write!(s, "{f:.0}");
                s
            }
            _ => n.to_string(),
        }),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// Scope values are equal when their text forms are.
pub fn scope_eq(rule: &Value, event: &Value) -> bool {
    match (scalar_key(rule), scalar_key(event)) {
        (Some(a), Some(b)) => a == b,
        _ => false,
    }
}

/// Order for gt/gte/lt/lte: numbers by value, strings by text (which orders
/// RFC 3339 times correctly). Anything else does not compare.
pub fn compare(actual: &Value, bound: &Value) -> Option<Ordering> {
    match (actual, bound) {
        (Value::Number(a), Value::Number(b)) => a.as_f64()?.partial_cmp(&b.as_f64()?),
        (Value::String(a), Value::String(b)) => Some(a.as_str().cmp(b.as_str())),
        _ => None,
    }
}

/// `missing`, `null`, `""`, `[]` and `{}` are empty.
pub fn is_empty(v: Option<&Value>) -> bool {
    match v {
        None | Some(Value::Null) => true,
        Some(Value::String(s)) => s.is_empty(),
        Some(Value::Array(a)) => a.is_empty(),
        Some(Value::Object(o)) => o.is_empty(),
        Some(_) => false,
    }
}

/// Substring for strings, element for arrays, key for objects.
pub fn contains(haystack: &Value, needle: &Value) -> bool {
    match (haystack, needle) {
        (Value::String(h), Value::String(n)) => h.contains(n.as_str()),
        (Value::Array(items), n) => items.iter().any(|i| json_eq(i, n)),
        (Value::Object(map), Value::String(key)) => map.contains_key(key),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn numbers_compare_by_value() {
        assert!(json_eq(&json!(3), &json!(3.0)));
        assert!(json_eq(&json!({"a": [1, 2.0]}), &json!({"a": [1.0, 2]})));
        assert!(!json_eq(&json!(3), &json!("3")));
    }

    #[test]
    fn scope_values_compare_as_text() {
        assert!(scope_eq(&json!(1002), &json!("1002")));
        assert!(scope_eq(&json!(1002.0), &json!(1002)));
        assert!(!scope_eq(&json!(1002), &json!(1003)));
        assert!(!scope_eq(&json!(1002), &json!(null)));
    }

    #[test]
    fn ordering_and_emptiness() {
        assert_eq!(compare(&json!(5), &json!(3)), Some(Ordering::Greater));
        assert_eq!(
            compare(
                &json!("2026-11-22T10:00:00Z"),
                &json!("2026-11-23T00:00:00Z")
            ),
            Some(Ordering::Less)
        );
        assert_eq!(compare(&json!("5"), &json!(3)), None);
        for v in [json!(null), json!(""), json!([]), json!({})] {
            assert!(is_empty(Some(&v)), "{v}");
        }
        assert!(is_empty(None));
        assert!(!is_empty(Some(&json!(0))));
    }

    #[test]
    fn contains_by_kind() {
        assert!(contains(&json!("Login fails"), &json!("fail")));
        assert!(contains(&json!(["a", "b"]), &json!("b")));
        assert!(contains(&json!({"k": 1}), &json!("k")));
        assert!(!contains(&json!(12), &json!(1)));
    }
}
