//! A YAML tree that remembers where every node came from.
//!
//! Admins need `file:line:column` for every mistake, and serde stops at the
//! first error without positions for most of them. So rule files are read in
//! two steps: this module turns text into a [`Node`] tree where each node keeps
//! its [`Span`], and `parse` walks that tree, collecting every mistake.
//!
//! Scalars are resolved with the YAML 1.2 core schema (`true`, `1002`, `1.5`,
//! `~`), except that quoted scalars are always strings.

use std::fmt;

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};

/// A 1-based line and column in a source text.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Span {
    pub line: usize,
    pub column: usize,
}

impl fmt::Display for Span {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.column)
    }
}

impl From<Marker> for Span {
    fn from(m: Marker) -> Self {
        // yaml-rust2 counts lines from 1 and columns from 0.
        Span {
            line: m.line(),
            column: m.col() + 1,
        }
    }
}

/// A resolved YAML scalar.
#[derive(Clone, Debug, PartialEq)]
pub enum Scalar {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
}

#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Scalar(Scalar),
    Seq(Vec<Node>),
    /// Keys keep their own spans so "unknown key" points at the key.
    Map(Vec<(Node, Node)>),
}

/// One node of the document, with the position where it starts.
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub span: Span,
    pub value: Value,
}

impl Node {
    /// A short name of the node's type, for "expected X, found Y" messages.
    pub fn kind(&self) -> &'static str {
        match &self.value {
            Value::Scalar(Scalar::Null) => "null",
            Value::Scalar(Scalar::Bool(_)) => "a boolean",
            Value::Scalar(Scalar::Int(_)) | Value::Scalar(Scalar::Float(_)) => "a number",
            Value::Scalar(Scalar::Str(_)) => "a string",
            Value::Seq(_) => "a list",
            Value::Map(_) => "a mapping",
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match &self.value {
            Value::Scalar(Scalar::Str(s)) => Some(s),
            _ => None,
        }
    }

    pub fn as_map(&self) -> Option<&[(Node, Node)]> {
        match &self.value {
            Value::Map(entries) => Some(entries),
            _ => None,
        }
    }

    pub fn as_seq(&self) -> Option<&[Node]> {
        match &self.value {
            Value::Seq(items) => Some(items),
            _ => None,
        }
    }

    pub fn is_null(&self) -> bool {
        matches!(self.value, Value::Scalar(Scalar::Null))
    }

    /// Converts to JSON, for values that rules compare against or pass on
    /// (condition operands, plugin configs). Map keys become strings.
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::Value as J;
        match &self.value {
            Value::Scalar(Scalar::Null) => J::Null,
            Value::Scalar(Scalar::Bool(b)) => J::Bool(*b),
            Value::Scalar(Scalar::Int(i)) => J::from(*i),
            Value::Scalar(Scalar::Float(f)) => {
                serde_json::Number::from_f64(*f).map_or(J::Null, J::Number)
            }
            Value::Scalar(Scalar::Str(s)) => J::String(s.clone()),
            Value::Seq(items) => J::Array(items.iter().map(Node::to_json).collect()),
            Value::Map(entries) => J::Object(
                entries
                    .iter()
                    .map(|(k, v)| (k.scalar_text(), v.to_json()))
                    .collect(),
            ),
        }
    }

    /// The text of a scalar as an admin wrote it (for map keys and messages).
    pub fn scalar_text(&self) -> String {
        match &self.value {
            Value::Scalar(Scalar::Null) => "null".into(),
            Value::Scalar(Scalar::Bool(b)) => b.to_string(),
            Value::Scalar(Scalar::Int(i)) => i.to_string(),
            Value::Scalar(Scalar::Float(f)) => f.to_string(),
            Value::Scalar(Scalar::Str(s)) => s.clone(),
            Value::Seq(_) => "[…]".into(),
            Value::Map(_) => "{…}".into(),
        }
    }
}

/// A YAML syntax error with its position.
#[derive(Clone, Debug, PartialEq)]
pub struct SyntaxError {
    pub span: Span,
    pub message: String,
}

/// Parses one YAML document. An empty document is `Ok(None)`.
pub fn parse(text: &str) -> Result<Option<Node>, SyntaxError> {
    let mut builder = Builder::default();
    let mut parser = Parser::new_from_str(text);
    parser.load(&mut builder, false).map_err(|e| SyntaxError {
        span: (*e.marker()).into(),
        message: e.info().to_string(),
    })?;
    if let Some(err) = builder.error {
        return Err(err);
    }
    Ok(builder.root)
}

/// Collects parser events into a tree. Anchors are resolved by copying, so
/// aliases behave like the value they point to.
#[derive(Default)]
struct Builder {
    stack: Vec<(Node, Option<Node>, usize)>, // (container, pending map key, anchor)
    anchors: std::collections::HashMap<usize, Node>,
    root: Option<Node>,
    error: Option<SyntaxError>,
}

impl Builder {
    fn push_value(&mut self, node: Node, anchor: usize) {
        if anchor > 0 {
            self.anchors.insert(anchor, node.clone());
        }
        let Some((container, pending_key, _)) = self.stack.last_mut() else {
            if self.root.is_none() {
                self.root = Some(node);
            }
            return;
        };
        match &mut container.value {
            Value::Seq(items) => items.push(node),
            Value::Map(entries) => match pending_key.take() {
                None if entries.is_empty() && node.span < container.span => {
                    container.span = node.span;
                    *pending_key = Some(node);
                }
                None => *pending_key = Some(node),
                Some(key) => {
                    // A block mapping's start event sits at its first `:`;
                    // admins expect the mapping to start at its first key.
                    if entries.is_empty() && key.span < container.span {
                        container.span = key.span;
                    }
                    let duplicate = entries
                        .iter()
                        .any(|(k, _)| k.value == key.value && k.as_str().is_some());
                    if duplicate && self.error.is_none() {
                        self.error = Some(SyntaxError {
                            span: key.span,
                            message: format!(
                                "duplicate key `{}` in the same mapping; keep only one",
                                key.scalar_text()
                            ),
                        });
                    }
                    entries.push((key, node));
                }
            },
            Value::Scalar(_) => {}
        }
    }
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        let span = Span::from(mark);
        match ev {
            Event::Scalar(text, style, anchor, _tag) => {
                let node = Node {
                    span,
                    value: Value::Scalar(resolve(text, style)),
                };
                self.push_value(node, anchor);
            }
            Event::SequenceStart(anchor, _) => self.stack.push((
                Node {
                    span,
                    value: Value::Seq(Vec::new()),
                },
                None,
                anchor,
            )),
            Event::MappingStart(anchor, _) => self.stack.push((
                Node {
                    span,
                    value: Value::Map(Vec::new()),
                },
                None,
                anchor,
            )),
            Event::SequenceEnd | Event::MappingEnd => {
                if let Some((node, _, anchor)) = self.stack.pop() {
                    self.push_value(node, anchor);
                }
            }
            Event::Alias(id) => {
                let node = match self.anchors.get(&id) {
                    Some(target) => Node {
                        span,
                        value: target.value.clone(),
                    },
                    None => Node {
                        span,
                        value: Value::Scalar(Scalar::Null),
                    },
                };
                self.push_value(node, 0);
            }
            Event::Nothing
            | Event::StreamStart
            | Event::StreamEnd
            | Event::DocumentStart
            | Event::DocumentEnd => {}
        }
    }
}

fn resolve(text: String, style: TScalarStyle) -> Scalar {
    if style != TScalarStyle::Plain {
        return Scalar::Str(text);
    }
    match text.as_str() {
        "" | "~" | "null" | "Null" | "NULL" => Scalar::Null,
        "true" | "True" | "TRUE" => Scalar::Bool(true),
        "false" | "False" | "FALSE" => Scalar::Bool(false),
        t => {
            if let Ok(i) = t.parse::<i64>() {
                Scalar::Int(i)
            } else if looks_like_float(t) {
                t.parse::<f64>().map_or(Scalar::Str(text), Scalar::Float)
            } else {
                Scalar::Str(text)
            }
        }
    }
}

/// Only decimal notation counts as a float: `inf` or `1e` stay strings.
fn looks_like_float(t: &str) -> bool {
    let body = t.strip_prefix(['-', '+']).unwrap_or(t);
    !body.is_empty()
        && body
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_digit() || b == b'.')
        && body
            .bytes()
            .all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'-' | b'+'))
        && body.bytes().any(|b| b.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_point_at_keys_and_values() {
        let doc = parse("rules:\n  - name: a\n    active: true\n")
            .unwrap()
            .unwrap();
        let (key, rules) = &doc.as_map().unwrap()[0];
        assert_eq!(key.span, Span { line: 1, column: 1 });
        let rule = &rules.as_seq().unwrap()[0];
        let (name_key, name) = &rule.as_map().unwrap()[0];
        assert_eq!(name_key.span, Span { line: 2, column: 5 });
        assert_eq!(
            name.span,
            Span {
                line: 2,
                column: 11
            }
        );
        let (_, active) = &rule.as_map().unwrap()[1];
        assert_eq!(active.value, Value::Scalar(Scalar::Bool(true)));
    }

    #[test]
    fn scalars_resolve_with_the_core_schema() {
        let cases = [
            ("a: 1002", serde_json::json!({"a": 1002})),
            ("a: '1002'", serde_json::json!({"a": "1002"})),
            ("a: 1.5", serde_json::json!({"a": 1.5})),
            ("a: ~", serde_json::json!({"a": null})),
            ("a: inf", serde_json::json!({"a": "inf"})),
            (
                "a: phase.defect.opened",
                serde_json::json!({"a": "phase.defect.opened"}),
            ),
            ("a: [x, 2]", serde_json::json!({"a": ["x", 2]})),
        ];
        for (text, want) in cases {
            assert_eq!(parse(text).unwrap().unwrap().to_json(), want, "{text}");
        }
    }

    #[test]
    fn syntax_errors_and_duplicate_keys_have_positions() {
        let err = parse("a: [1, 2\nb: 3\n").unwrap_err();
        assert!(err.span.line >= 1, "{err:?}");
        let err = parse("a: 1\nb: 2\na: 3\n").unwrap_err();
        assert_eq!(err.span, Span { line: 3, column: 1 });
        assert!(err.message.contains("duplicate key `a`"), "{}", err.message);
    }

    #[test]
    fn empty_document_is_none() {
        assert_eq!(parse("# only a comment\n").unwrap(), None);
    }
}
