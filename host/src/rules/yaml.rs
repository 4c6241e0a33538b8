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

use yaml_rust2::parser::{Event, Parser};
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

/// What went wrong while reading a YAML document.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// The parser's own complaint, at the parser's position.
    Syntax,
    /// A `[`, `{`, quote or `!<` that is never closed, at the opener.
    Unclosed,
    /// The same key twice in one mapping, at the second one.
    DuplicateKey,
    /// Nesting past [`Limits::max_depth`], at the node that crosses it.
    TooDeep,
    /// More aliases than [`Limits::max_aliases`], at the first one past it.
    TooManyAliases,
    /// The document (aliases expanded) past [`Limits::max_nodes`] or
    /// [`Limits::max_text_bytes`], at the node or alias that crosses it.
    TooLarge,
}

/// A YAML error with its position, what is wrong, and how to fix it.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{span}: {message}")]
pub struct SyntaxError {
    pub kind: ErrorKind,
    pub span: Span,
    pub message: String,
    pub fix: String,
}

impl SyntaxError {
    /// Whether the text is not valid YAML (as opposed to valid YAML that
    /// is past one of the [`Limits`]).
    pub fn is_syntax(&self) -> bool {
        matches!(
            self.kind,
            ErrorKind::Syntax | ErrorKind::Unclosed | ErrorKind::DuplicateKey
        )
    }
}

/// Nesting depth a document may reach (containers on the path from the
/// root, aliases expanded). Every recursive walk of the tree (decoding,
/// `to_json`, clone, drop) relies on it, and 64 levels is deeper than any
/// rule file needs (a rule's conditions start at level 4).
pub const MAX_DEPTH: usize = 64;
/// Alias uses (`*name`) a document may contain.
pub const MAX_ALIASES: usize = 10_000;
/// Nodes a document may expand to, aliases expanded: a billion-laughs file
/// of a few hundred bytes is refused here instead of growing to GiBs.
pub const MAX_NODES: usize = 1_000_000;
/// Bytes of scalar text a document may expand to, aliases expanded.
pub const MAX_TEXT_BYTES: usize = 16 << 20;

/// The bounds of [`parse_with`]; [`parse`] uses the defaults above.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub max_depth: usize,
    pub max_aliases: usize,
    pub max_nodes: usize,
    pub max_text_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_depth: MAX_DEPTH,
            max_aliases: MAX_ALIASES,
            max_nodes: MAX_NODES,
            max_text_bytes: MAX_TEXT_BYTES,
        }
    }
}

/// Parses one YAML document within the default [`Limits`]. An empty
/// document is `Ok(None)`.
pub fn parse(text: &str) -> Result<Option<Node>, SyntaxError> {
    parse_with(text, &Limits::default())
}

/// Parses one YAML document within `limits`.
///
/// The parser is driven event by event here rather than through
/// yaml-rust2's `load`, which recurses once per nesting level and so
/// overflows the stack on a few thousand `[`: this loop keeps its own
/// stack and stops at the first event past a limit, so nothing deeper or
/// larger than the limits is ever built.
pub fn parse_with(text: &str, limits: &Limits) -> Result<Option<Node>, SyntaxError> {
    let mut builder = Builder::new(*limits);
    let mut parser = Parser::new_from_str(text);
    loop {
        let (event, mark) = parser.next_token().map_err(|e| builder.explain(text, &e))?;
        match event {
            Event::StreamEnd => break,
            // Only the first document counts, as with `load(_, false)`.
            Event::DocumentEnd if builder.root.is_some() => break,
            event => builder.on_event(event, mark, text)?,
        }
    }
    Ok(builder.root)
}

/// Size of a finished subtree, so that an alias can be charged for what
/// it copies before it copies it.
#[derive(Clone, Copy, Debug, Default)]
struct Stats {
    nodes: usize,
    /// Containers on the longest path down: 0 for a scalar.
    height: usize,
    text: usize,
}

/// A container still being filled.
struct Open {
    node: Node,
    /// A mapping's key waiting for its value.
    pending_key: Option<Node>,
    anchor: usize,
    stats: Stats,
    /// Where the parser put its start event (before any `&anchor`/`!tag`),
    /// to find an unclosed `[` or `{` when the text ends.
    start: Marker,
}

/// Collects parser events into a tree. Anchors are resolved by copying, so
/// aliases behave like the value they point to; the copies are charged to
/// the node and text budgets before they are made.
struct Builder {
    limits: Limits,
    stack: Vec<Open>,
    anchors: std::collections::HashMap<usize, (Node, Stats)>,
    root: Option<Node>,
    aliases: usize,
    nodes: usize,
    text: usize,
}

impl Builder {
    fn new(limits: Limits) -> Self {
        Builder {
            limits,
            stack: Vec::new(),
            anchors: Default::default(),
            root: None,
            aliases: 0,
            nodes: 0,
            text: 0,
        }
    }

    fn on_event(&mut self, ev: Event, mark: Marker, text: &str) -> Result<(), SyntaxError> {
        let span = Span::from(mark);
        match ev {
            Event::Scalar(value, style, anchor, _tag) => {
                let stats = Stats {
                    nodes: 1,
                    height: 0,
                    text: value.len(),
                };
                self.charge_node(stats, span)?;
                let node = Node {
                    span,
                    value: Value::Scalar(resolve(value, style)),
                };
                self.push_value(node, stats, anchor)
            }
            Event::SequenceStart(anchor, _) => self.open(Value::Seq(Vec::new()), anchor, mark),
            Event::MappingStart(anchor, _) => self.open(Value::Map(Vec::new()), anchor, mark),
            Event::SequenceEnd | Event::MappingEnd => match self.stack.pop() {
                Some(open) => self.push_value(open.node, open.stats, open.anchor),
                None => Ok(()),
            },
            Event::Alias(id) => {
                self.aliases += 1;
                if self.aliases > self.limits.max_aliases {
                    return Err(SyntaxError {
                        kind: ErrorKind::TooManyAliases,
                        span,
                        message: format!(
                            "alias `*{}` is past the limit of {} aliases in one file",
                            alias_name(text, mark),
                            self.limits.max_aliases
                        ),
                        fix: "write the values out, or split the rules over several files".into(),
                    });
                }
                // An alias of an anchor that is still open (inside its own
                // value) has nothing to copy yet: it reads as null.
                let stats = self.anchors.get(&id).map_or(
                    Stats {
                        nodes: 1,
                        ..Stats::default()
                    },
                    |(_, stats)| *stats,
                );
                if self.stack.len() + stats.height > self.limits.max_depth {
                    return Err(self.too_deep(span, Some(&alias_name(text, mark))));
                }
                if let Some(limit) = self.charge(stats) {
                    return Err(SyntaxError {
                        kind: ErrorKind::TooLarge,
                        span,
                        message: format!(
                            "alias `*{}` expands the file past the limit of {limit} (an alias counts as a copy of what it names)",
                            alias_name(text, mark)
                        ),
                        fix: "use fewer aliases of large values; nested aliases multiply (a YAML alias bomb)".into(),
                    });
                }
                // The copy is made only once the budgets accepted it.
                let value = self
                    .anchors
                    .get(&id)
                    .map_or(Value::Scalar(Scalar::Null), |(target, _)| {
                        target.value.clone()
                    });
                self.push_value(Node { span, value }, stats, 0)
            }
            Event::Nothing
            | Event::StreamStart
            | Event::StreamEnd
            | Event::DocumentStart
            | Event::DocumentEnd => Ok(()),
        }
    }

    fn open(&mut self, value: Value, anchor: usize, start: Marker) -> Result<(), SyntaxError> {
        let span = Span::from(start);
        if self.stack.len() + 1 > self.limits.max_depth {
            return Err(self.too_deep(span, None));
        }
        let stats = Stats {
            nodes: 1,
            height: 1,
            text: 0,
        };
        self.charge_node(stats, span)?;
        self.stack.push(Open {
            node: Node { span, value },
            pending_key: None,
            anchor,
            stats,
            start,
        });
        Ok(())
    }

    fn too_deep(&self, span: Span, alias: Option<&str>) -> SyntaxError {
        let what = match alias {
            Some(name) => format!("alias `*{name}` nests"),
            None => "this value nests".to_string(),
        };
        SyntaxError {
            kind: ErrorKind::TooDeep,
            span,
            message: format!(
                "{what} the file deeper than {} levels",
                self.limits.max_depth
            ),
            fix: "flatten the structure: rule files never need this depth".into(),
        }
    }

    /// Counts `stats` against the document's budgets.
    /// Counts `stats` against the document's budgets; the limit crossed,
    /// if one is.
    fn charge(&mut self, stats: Stats) -> Option<String> {
        self.nodes += stats.nodes;
        self.text += stats.text;
        if self.nodes > self.limits.max_nodes {
            Some(format!("{} nodes", self.limits.max_nodes))
        } else if self.text > self.limits.max_text_bytes {
            Some(format!("{} bytes of text", self.limits.max_text_bytes))
        } else {
            None
        }
    }

    /// Charges a node written out in the text.
    fn charge_node(&mut self, stats: Stats, span: Span) -> Result<(), SyntaxError> {
        match self.charge(stats) {
            None => Ok(()),
            Some(limit) => Err(SyntaxError {
                kind: ErrorKind::TooLarge,
                span,
                message: format!("the file is past the limit of {limit}"),
                fix: "split the rules over several files".into(),
            }),
        }
    }

    fn push_value(&mut self, node: Node, stats: Stats, anchor: usize) -> Result<(), SyntaxError> {
        if anchor > 0 {
            // The anchor keeps a copy of its value for its aliases: that
            // copy is memory too (63 nested anchors around one large list
            // would otherwise hold 63 copies of it).
            if let Some(limit) = self.charge(stats) {
                return Err(SyntaxError {
                    kind: ErrorKind::TooLarge,
                    span: node.span,
                    message: format!(
                        "the anchor on this value copies the file past the limit of {limit} (an anchor keeps a copy of what it names)"
                    ),
                    fix: "anchor smaller values, or fewer of them".into(),
                });
            }
            self.anchors.insert(anchor, (node.clone(), stats));
        }
        let Some(open) = self.stack.last_mut() else {
            if self.root.is_none() {
                self.root = Some(node);
            }
            return Ok(());
        };
        open.stats.nodes += stats.nodes;
        open.stats.text += stats.text;
        open.stats.height = open.stats.height.max(stats.height + 1);
        let container = &mut open.node;
        match &mut container.value {
            Value::Seq(items) => items.push(node),
            Value::Map(entries) => match open.pending_key.take() {
                None if entries.is_empty() && node.span < container.span => {
                    container.span = node.span;
                    open.pending_key = Some(node);
                }
                None => open.pending_key = Some(node),
                Some(key) => {
                    // A block mapping's start event sits at its first `:`;
                    // admins expect the mapping to start at its first key.
                    if entries.is_empty() && key.span < container.span {
                        container.span = key.span;
                    }
                    let duplicate = entries
                        .iter()
                        .any(|(k, _)| k.value == key.value && k.as_str().is_some());
                    if duplicate {
                        return Err(SyntaxError {
                            kind: ErrorKind::DuplicateKey,
                            span: key.span,
                            message: format!(
                                "duplicate key `{}` in the same mapping; keep only one",
                                key.scalar_text()
                            ),
                            fix: "remove one of the two entries".into(),
                        });
                    }
                    entries.push((key, node));
                }
            },
            Value::Scalar(_) => {}
        }
        Ok(())
    }

    /// Turns the parser's error into one that points at the mistake.
    ///
    /// yaml-rust2 notices an unclosed `[` or `{` only where it gives up,
    /// often past the end of the file; the admin's mistake is the opener.
    /// So when the parser stops at the end of the text, or on a later line
    /// than the innermost flow collection still open, the error names that
    /// opener. Quoted scalars and verbatim tags are reported at their
    /// opener already; only the words change.
    fn explain(&self, text: &str, e: &yaml_rust2::ScanError) -> SyntaxError {
        let at = *e.marker();
        let info = e.info();
        let syntax = |kind, span, message: String, fix: String| SyntaxError {
            kind,
            span,
            message,
            fix,
        };
        if info.starts_with("while scanning a quoted scalar")
            || info == "invalid indentation in quoted scalar"
        {
            let quote = char_at(text, at.index()).unwrap_or('"');
            let message = if info.ends_with("unexpected end of stream") {
                format!("this `{quote}` is never closed: the file ends inside the quoted text")
            } else {
                format!(
                    "this `{quote}` is not closed on its line; the quoted text runs on into a line with less indentation"
                )
            };
            return syntax(
                ErrorKind::Unclosed,
                at.into(),
                message,
                format!("add the closing `{quote}`"),
            );
        }
        if info.starts_with("while scanning a verbatim tag") {
            return syntax(
                ErrorKind::Unclosed,
                at.into(),
                "this `!<` is never closed".into(),
                "add `>` where the tag ends".into(),
            );
        }
        let chars: Vec<char> = text.chars().collect();
        if info == "recursion limit exceeded" {
            // yaml-rust2 reads up to 255 open `[`/`{` ahead before it hands
            // out the first event, so our own depth check may not have
            // seen the level that crosses the limit: find it in the text.
            // Count on from the innermost container the builder has, past
            // its own `[` or `{` if it is a flow collection.
            let (from, levels) = self.stack.last().map_or((0, 0), |open| {
                let start = open.start.index();
                let after = flow_opener(&chars, start).map_or(start, |(i, _)| i + 1);
                (after, self.stack.len())
            });
            let wanted = (self.limits.max_depth + 1).saturating_sub(levels).max(1);
            let span = nth_flow_opener(&chars, from, wanted)
                .map_or_else(|| Span::from(at), |index| span_of(&chars, index));
            return self.too_deep(span, None);
        }
        let at_end = chars[at.index().min(chars.len())..]
            .iter()
            .all(|c| c.is_whitespace());
        let closer_at_error = chars.get(at.index()).copied();
        let opener = self
            .stack
            .iter()
            .rev()
            .find_map(|open| flow_opener(&chars, open.start.index()));
        if let Some((index, bracket)) = opener {
            let opener_span = span_of(&chars, index);
            let (closer, what) = if bracket == '[' {
                (']', "list")
            } else {
                ('}', "mapping")
            };
            let mismatched = matches!(closer_at_error, Some(c @ (']' | '}')) if c != closer);
            let fix = format!("add `{closer}` where the {what} ends");
            if at_end {
                return syntax(
                    ErrorKind::Unclosed,
                    opener_span,
                    format!(
                        "this `{bracket}` is never closed: the file ends while it is still open"
                    ),
                    fix,
                );
            }
            if at.line() > opener_span.line || mismatched {
                let found = info
                    .split_once(", ")
                    .filter(|(head, _)| head.starts_with("while parsing a flow"))
                    .map_or(info, |(_, rest)| rest);
                return syntax(
                    ErrorKind::Unclosed,
                    opener_span,
                    format!(
                        "this `{bracket}` is not closed before {}, where YAML found: {found}",
                        Span::from(at)
                    ),
                    fix,
                );
            }
        }
        syntax(
            ErrorKind::Syntax,
            at.into(),
            info.to_string(),
            "fix the YAML syntax at this position".into(),
        )
    }
}

/// The `[` or `{` that a collection's start event at `index` stands for,
/// skipping the `&anchor` and `!tag` written before it; `None` for block
/// collections.
fn flow_opener(chars: &[char], mut index: usize) -> Option<(usize, char)> {
    loop {
        match chars.get(index)? {
            c @ ('[' | '{') => return Some((index, *c)),
            '&' | '!' => {
                while chars.get(index).is_some_and(|c| !c.is_whitespace()) {
                    index += 1;
                }
            }
            c if c.is_whitespace() => index += 1,
            _ => return None,
        }
    }
}

/// The index of the flow opener that brings the nesting (counted from
/// `from`) to `level`, skipping quoted text and comments.
fn nth_flow_opener(chars: &[char], from: usize, level: usize) -> Option<usize> {
    let mut depth = 0;
    let mut quote: Option<char> = None;
    let mut comment = false;
    for (i, &c) in chars.iter().enumerate().skip(from) {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), _) => {}
            _ if comment => comment = c != '\n',
            (None, '\'' | '"') => quote = Some(c),
            (None, '#') => comment = true,
            (None, '[' | '{') => {
                depth += 1;
                if depth == level {
                    return Some(i);
                }
            }
            (None, ']' | '}') => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    None
}

/// The line and column of the character at `index`.
fn span_of(chars: &[char], index: usize) -> Span {
    let before = &chars[..index.min(chars.len())];
    let line = before.iter().filter(|&&c| c == '\n').count() + 1;
    let column = before.iter().rev().take_while(|&&c| c != '\n').count() + 1;
    Span { line, column }
}

fn char_at(text: &str, index: usize) -> Option<char> {
    text.chars().nth(index)
}

/// The name of the alias written at `mark` (`*name`), for messages.
fn alias_name(text: &str, mark: Marker) -> String {
    text.chars()
        .skip(mark.index())
        .skip_while(|&c| c == '*')
        .take_while(|c| !c.is_whitespace() && !matches!(c, ',' | ']' | '}' | '[' | '{'))
        .take(64)
        .collect()
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

    /// A billion-laughs document: `levels` anchors, each a list of
    /// `width` aliases of the one before.
    fn bomb(levels: usize, width: usize) -> String {
        let mut text = String::from("a0: &a0 [lol]\n");
        for level in 1..levels {
            let items = vec![format!("*a{}", level - 1); width].join(", ");
            text.push_str(&format!("a{level}: &a{level} [{items}]\n"));
        }
        text
    }

    #[test]
    fn an_alias_bomb_is_refused_at_the_alias_that_crosses_the_budget() {
        // 9 levels of 9: 9^8 = 43 million copies of `lol` if expanded.
        let text = bomb(9, 9);
        assert!(text.len() < 500, "{} bytes", text.len());
        let err = parse(&text).unwrap_err();
        assert_eq!(err.kind, ErrorKind::TooLarge, "{err}");
        assert!(
            err.message.starts_with("alias `*a")
                && err.message.contains("past the limit of 1000000 nodes"),
            "{err}"
        );
        // The position is an alias in the text.
        let line = text.lines().nth(err.span.line - 1).unwrap();
        assert_eq!(&line[err.span.column - 1..err.span.column], "*", "{err}");
    }

    #[test]
    fn alias_text_counts_against_the_text_budget() {
        // 400 bytes written, 400 kept by the anchor, 400 per alias.
        let limits = Limits {
            max_text_bytes: 1300,
            ..Limits::default()
        };
        let long = "x".repeat(400);
        let ok = format!("a: &a {long}\nb: *a\n");
        assert!(parse_with(&ok, &limits).is_ok());
        let err = parse_with(&format!("{ok}c: *a\n"), &limits).unwrap_err();
        assert_eq!(err.kind, ErrorKind::TooLarge);
        assert_eq!(err.span, Span { line: 3, column: 4 });
        assert!(err.message.contains("alias `*a`"), "{err}");
        assert!(err.message.contains("1300 bytes of text"), "{err}");
    }

    #[test]
    fn anchors_are_charged_for_the_copy_they_keep() {
        let limits = Limits {
            max_nodes: 1000,
            ..Limits::default()
        };
        // 300 scalars in a list: 301 nodes written, 602 with one anchor.
        let list = format!("[{}]", vec!["x"; 300].join(","));
        assert!(parse_with(&format!("a: &a {list}\n"), &limits).is_ok());
        // Each of three nested anchors keeps a copy: past 1000 nodes.
        let nested = format!("a: &a [&b [&c {list}]]\n");
        let err = parse_with(&nested, &limits).unwrap_err();
        assert_eq!(err.kind, ErrorKind::TooLarge, "{err}");
        assert!(err.message.starts_with("the anchor on this value"), "{err}");
        assert_eq!(err.span, Span { line: 1, column: 7 });
    }

    #[test]
    fn alias_uses_are_counted() {
        let limits = Limits {
            max_aliases: 3,
            ..Limits::default()
        };
        let text = "a: &x 1\nb: [*x, *x, *x]\nc: *x\n";
        let err = parse_with(text, &limits).unwrap_err();
        assert_eq!(err.kind, ErrorKind::TooManyAliases);
        assert_eq!(err.span, Span { line: 3, column: 4 });
        assert!(
            err.message.contains("`*x`") && err.message.contains("3 aliases"),
            "{err}"
        );
        assert!(parse_with("a: &x 1\nb: [*x, *x, *x]\n", &limits).is_ok());
    }

    #[test]
    fn depth_is_limited_where_it_is_crossed_written_or_through_an_alias() {
        let limits = Limits {
            max_depth: 4,
            ..Limits::default()
        };
        // Four levels: the mapping and three lists.
        assert!(parse_with("a: [[[1]]]\n", &limits).is_ok());
        let err = parse_with("a: [[[[1]]]]\n", &limits).unwrap_err();
        assert_eq!(err.kind, ErrorKind::TooDeep);
        assert_eq!(err.span, Span { line: 1, column: 7 });
        assert!(err.message.contains("deeper than 4 levels"), "{err}");
        // An alias of a two-level value at level three would be five deep.
        let text = "a: &x [[1]]\nb: [[*x]]\n";
        let err = parse_with(text, &limits).unwrap_err();
        assert_eq!(err.kind, ErrorKind::TooDeep);
        assert_eq!(err.span, Span { line: 2, column: 6 });
        assert!(err.message.contains("alias `*x`"), "{err}");
        assert!(parse_with("a: &x [[1]]\nb: [*x]\n", &limits).is_ok());
    }

    #[test]
    fn thousands_of_levels_are_refused_without_recursing() {
        // yaml-rust2's own `load` recurses per level; the builder must not,
        // and must stop at the limit instead of reading on.
        for open in ["[", "{a: ", "- "] {
            let text = if open == "- " {
                (0..5000)
                    .map(|i| format!("{}- \n", "  ".repeat(i)))
                    .collect()
            } else {
                open.repeat(100_000)
            };
            let err = parse(&text).unwrap_err();
            assert_eq!(err.kind, ErrorKind::TooDeep, "{open}: {err}");
            assert!(err.message.contains("deeper than 64 levels"), "{err}");
            // At the 65th level: the 65th `[`, or the 65th line of `- `.
            let want = match open {
                "[" => Span {
                    line: 1,
                    column: 65,
                },
                "{a: " => Span {
                    line: 1,
                    column: 64 * 4 + 1,
                },
                _ => Span {
                    line: 65,
                    column: 129,
                },
            };
            assert_eq!(err.span, want, "{open}: {err}");
        }
    }

    #[test]
    fn empty_document_is_none() {
        assert_eq!(parse("# only a comment\n").unwrap(), None);
    }
}
