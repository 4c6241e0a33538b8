//! `slack`: turns the payload into a message for a Slack-compatible incoming webhook.
//!
//! Chat tools (Slack, Mattermost, Rocket.Chat) accept `{"text": "..."}` on an incoming webhook
//! and show it to people, so the rule writes the sentence and this plugin fills it in.
//!
//! Config:
//!
//! ```json
//! {
//!   "text": "Defect {{entity.id}} {{entity.name}} reopened by {{user.email}}",
//!   "username": "rulehook",
//!   "icon_emoji": ":bug:",
//!   "channel": "#qa"
//! }
//! ```
//!
//! - `text` (required): the message. Each `{{path}}` is replaced by the value at that dotted path
//!   in the payload (`entity.name`, `changes.phase.new.id`, `entity.comments.0.text`); spaces
//!   inside the braces are ignored. A string goes in as it is, any other value as compact JSON,
//!   and a path with no value as nothing (logged at debug level). Inserted values are escaped for
//!   Slack's markup (`&`, `<`, `>`), so a field cannot ping `<!channel>` or forge a link; the
//!   template's own text is not, so it can.
//! - `username`, `icon_emoji`, `channel` (optional strings): passed on as they are, to override
//!   the webhook's defaults where the chat tool allows it.
//!
//! The output is `{"text": ...}` plus whichever of `username`, `icon_emoji` and `channel` are
//! configured, in that order.

use rulehook_plugin_sdk::config::ConfigError;
use rulehook_plugin_sdk::path::{self, PathError, kind};
use rulehook_plugin_sdk::serde_json::Map;
use rulehook_plugin_sdk::{Context, Outcome, Plugin, Value, log};

/// The plugin: renders the message.
pub struct Slack;

impl Plugin for Slack {
    fn transform(ctx: &Context, payload: Value, config: &Value) -> Result<Outcome, String> {
        let message = Message::from_config(config)?;
        let mut out = Map::new();
        out.insert(
            "text".into(),
            Value::String(render(ctx, &message.template, &payload)),
        );
        for (key, value) in OPTIONAL.iter().zip(message.options) {
            if let Some(value) = value {
                out.insert((*key).into(), Value::String(value.to_owned()));
            }
        }
        Ok(Outcome::Send(Value::Object(out)))
    }

    fn validate_config(config: &Value) -> Result<(), String> {
        Message::from_config(config)?;
        Ok(())
    }
}

rulehook_plugin_sdk::export_plugin!(Slack);

/// The optional settings, in the order they appear in the output.
const OPTIONAL: [&str; 3] = ["username", "icon_emoji", "channel"];

/// Every setting, for the unknown-key message.
const SETTINGS: [&str; 4] = ["text", "username", "icon_emoji", "channel"];

/// The checked config. It borrows the config's strings.
#[derive(Debug)]
struct Message<'c> {
    /// `text`, split at its placeholders.
    template: Vec<Piece<'c>>,
    /// The [`OPTIONAL`] settings, each if configured.
    options: [Option<&'c str>; 3],
}

impl<'c> Message<'c> {
    fn from_config(config: &'c Value) -> Result<Self, ConfigError> {
        let settings = match config {
            Value::Object(settings) => settings,
            Value::Null => return Err(text_required()),
            other => {
                return Err(ConfigError::new(
                    "",
                    format!(
                        "the config must be an object such as {{\"text\": \"Defect {{{{entity.id}}}} \
                         reopened\"}}; found {}",
                        kind(other)
                    ),
                ));
            }
        };
        if let Some(unknown) = settings.keys().find(|k| !SETTINGS.contains(&k.as_str())) {
            return Err(unknown_setting(unknown));
        }
        let text = match settings.get("text") {
            None => return Err(text_required()),
            Some(Value::String(text)) if text.is_empty() => {
                return Err(ConfigError::new(
                    "text",
                    "is empty; write the message, such as \"Defect {{entity.id}} reopened\"",
                ));
            }
            Some(Value::String(text)) => text,
            Some(other) => {
                return Err(ConfigError::new(
                    "text",
                    format!(
                        "must be a string such as \"Defect {{{{entity.id}}}} reopened\"; found {}",
                        kind(other)
                    ),
                ));
            }
        };
        let template = parse_template(text).map_err(|e| ConfigError::new("text", e.to_string()))?;
        let mut options = [None; 3];
        for (key, slot) in OPTIONAL.iter().zip(&mut options) {
            *slot = match settings.get(*key) {
                None => None,
                Some(Value::String(value)) if !value.is_empty() => Some(value.as_str()),
                Some(other) => {
                    return Err(ConfigError::new(
                        *key,
                        format!(
                            "must be a non-empty string, such as {}; found {other}; leave it out \
                             to use the webhook's default",
                            example(key)
                        ),
                    ));
                }
            };
        }
        Ok(Self { template, options })
    }
}

fn text_required() -> ConfigError {
    ConfigError::new(
        "text",
        "`text` is required: the message, such as \"Defect {{entity.id}} reopened by {{user.email}}\"",
    )
}

fn example(key: &str) -> &'static str {
    match key {
        "username" => "\"rulehook\"",
        "icon_emoji" => "\":bug:\"",
        _ => "\"#qa\"",
    }
}

/// Names the nearest setting when it is a likely typo, and always lists them all.
fn unknown_setting(unknown: &str) -> ConfigError {
    let nearest = SETTINGS
        .iter()
        .min_by_key(|known| strsim::levenshtein(known, unknown))
        .filter(|known| strsim::levenshtein(known, unknown) <= 3);
    let hint = match nearest {
        Some(known) => format!("did you mean `{known}`? "),
        None => String::new(),
    };
    ConfigError::new(
        unknown,
        format!(
            "unknown setting; {hint}slack takes `text`, `username`, `icon_emoji` and `channel`"
        ),
    )
}

/// A piece of the message template.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Piece<'t> {
    /// Text that goes out as written.
    Text(&'t str),
    /// A `{{path}}` placeholder: the trimmed path, and the byte offset of its `{{` for messages.
    Value { path: &'t str, offset: usize },
}

/// Why a template cannot be used. Offsets are in bytes from the start of `text`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
enum TemplateError {
    /// A `{{` with no `}}` after it (before the next `{{`).
    #[error(
        "the `{{{{` at byte {offset} is never closed; end the placeholder with `}}}}`, as in \
         {{{{entity.id}}}}"
    )]
    Unclosed {
        /// Where the `{{` is.
        offset: usize,
    },
    /// `{{}}` or `{{  }}`.
    #[error(
        "the placeholder at byte {offset} is empty; put a dotted path inside, such as \
         {{{{entity.name}}}}"
    )]
    Empty {
        /// Where the `{{` is.
        offset: usize,
    },
    /// The path inside the braces is not a dotted path.
    #[error("the placeholder at byte {offset}: {source}")]
    BadPath {
        /// Where the `{{` is.
        offset: usize,
        /// What is wrong with the path.
        source: PathError,
    },
}

/// Splits `text` into literal text and `{{path}}` placeholders.
fn parse_template(text: &str) -> Result<Vec<Piece<'_>>, TemplateError> {
    let mut pieces = Vec::new();
    let mut rest = 0;
    while let Some(found) = text[rest..].find("{{") {
        let offset = rest + found;
        if offset > rest {
            pieces.push(Piece::Text(&text[rest..offset]));
        }
        let inner_start = offset + 2;
        let inner_len = text[inner_start..]
            .find("}}")
            .ok_or(TemplateError::Unclosed { offset })?;
        let inner = &text[inner_start..inner_start + inner_len];
        // `{{a {{b}}`: the first placeholder was left open.
        if inner.contains("{{") {
            return Err(TemplateError::Unclosed { offset });
        }
        let path = inner.trim();
        if path.is_empty() {
            return Err(TemplateError::Empty { offset });
        }
        path::validate_path(path).map_err(|source| TemplateError::BadPath { offset, source })?;
        pieces.push(Piece::Value { path, offset });
        rest = inner_start + inner_len + 2;
    }
    if rest < text.len() {
        pieces.push(Piece::Text(&text[rest..]));
    }
    Ok(pieces)
}

/// The message: the template with each placeholder replaced by its value in `payload`.
fn render(ctx: &Context, template: &[Piece<'_>], payload: &Value) -> String {
    let mut out = String::new();
    for piece in template {
        match *piece {
            Piece::Text(text) => out.push_str(text),
            Piece::Value { path, offset } => match path::get_path(payload, path) {
                Some(Value::String(value)) => escape_into(&mut out, value),
                Some(value) => escape_into(&mut out, &value.to_string()),
                None => log::debug(format!(
                    "rule {}: the placeholder {{{{{path}}}}} at byte {offset} has no value in \
                     the payload, so it is left empty",
                    ctx.rule
                )),
            },
        }
    }
    out
}

/// Appends `value` escaped for Slack's markup, where `<...>` is a link or a mention and `&`
/// starts an entity.
fn escape_into(out: &mut String, value: &str) {
    for c in value.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rulehook_plugin_sdk::json;
    use rulehook_plugin_sdk::log::Level;
    use rulehook_plugin_sdk::testing::{context_for, run, sample_delete, sample_update, validate};

    fn send(payload: &Value, config: &Value) -> Value {
        let (result, _) = run::<Slack>(&context_for(payload), payload, config);
        match result {
            Ok(Outcome::Send(out)) => out,
            other => panic!("{config}: expected Send, got {other:?}"),
        }
    }

    #[test]
    fn placeholders_are_filled_from_the_payload() {
        let mut payload = sample_update();
        payload["entity"]["title"] = json!("<b>A & B</b> <!channel>");
        payload["entity"]["closed"] = json!(null);
        payload["entity"]["blocked"] = json!(false);
        let cases = [
            (
                "Defect {{entity.id}} {{entity.name}} reopened by {{user.email}}",
                "Defect 2013 Crash on save reopened by admin@example.com",
            ),
            ("{{ entity.id }}|{{\tentity.id\n}}", "2013|2013"),
            ("counter {{entity.rework_counter_udf}}", "counter 2"),
            (
                "{{changes.phase.old.id}} -> {{changes.phase.new.id}}",
                "phase.defect.fixed -> phase.defect.opened",
            ),
            ("by {{entity.comments.1.author}}", "by ann"),
            (
                "{{entity.phase}}",
                r#"{"id":"phase.defect.opened","name":"Opened"}"#,
            ),
            ("{{entity.closed}} {{entity.blocked}}", "null false"),
            // Values are escaped; the template's own markup is not.
            (
                "<!here> {{entity.title}}",
                "<!here> &lt;b&gt;A &amp; B&lt;/b&gt; &lt;!channel&gt;",
            ),
            // Missing values are empty.
            ("[{{entity.nope}}][{{user.email.x}}]", "[][]"),
            // Lone braces are text.
            ("{x} }} {", "{x} }} {"),
            ("no placeholders", "no placeholders"),
        ];
        for (text, expected) in cases {
            let out = send(&payload, &json!({"text": text}));
            assert_eq!(out, json!({"text": expected}), "{text}");
        }
    }

    #[test]
    fn a_missing_value_is_logged_at_debug() {
        let payload = sample_delete();
        let (result, logs) = run::<Slack>(
            &context_for(&payload),
            &payload,
            &json!({"text": "Deleted {{entity.id}} by {{ user.email }}"}),
        );
        assert_eq!(
            result,
            Ok(Outcome::Send(json!({"text": "Deleted 2013 by "})))
        );
        assert_eq!(logs.len(), 1, "{logs:?}");
        assert_eq!(logs[0].level, Level::Debug);
        assert_eq!(
            logs[0].message,
            "rule defect-deleted: the placeholder {{user.email}} at byte 25 has no value in the \
             payload, so it is left empty"
        );
    }

    #[test]
    fn optional_settings_follow_text_in_order() {
        let config =
            json!({"channel": "#qa", "text": "hi", "username": "rulehook", "icon_emoji": ":bug:"});
        let out = send(&sample_update(), &config);
        assert_eq!(
            out.to_string(),
            r##"{"text":"hi","username":"rulehook","icon_emoji":":bug:","channel":"#qa"}"##
        );
        let out = send(&sample_update(), &json!({"text": "hi", "channel": "#qa"}));
        assert_eq!(out.to_string(), r##"{"text":"hi","channel":"#qa"}"##);
    }

    #[test]
    fn templates_split_at_placeholders() {
        assert_eq!(
            parse_template("a {{ x.y }}b{{z}}"),
            Ok(vec![
                Piece::Text("a "),
                Piece::Value {
                    path: "x.y",
                    offset: 2
                },
                Piece::Text("b"),
                Piece::Value {
                    path: "z",
                    offset: 12
                },
            ])
        );
        let cases = [
            ("abc {{entity.id", TemplateError::Unclosed { offset: 4 }),
            ("{{a {{b}}", TemplateError::Unclosed { offset: 0 }),
            ("ok {{a}} {{}}", TemplateError::Empty { offset: 9 }),
            ("é{{  }}", TemplateError::Empty { offset: 2 }),
            (
                "{{a..b}}",
                TemplateError::BadPath {
                    offset: 0,
                    source: PathError::EmptySegment {
                        path: "a..b".into(),
                    },
                },
            ),
        ];
        for (text, error) in cases {
            assert_eq!(parse_template(text), Err(error), "{text}");
        }
    }

    #[test]
    fn bad_configs_name_the_entry_and_the_fix() {
        let cases = [
            (
                Value::Null,
                "text: `text` is required: the message, such as \"Defect {{entity.id}} reopened by {{user.email}}\"",
            ),
            (json!({"channel": "#qa"}), "text: `text` is required"),
            (
                json!({"text": ""}),
                "text: is empty; write the message, such as \"Defect {{entity.id}} reopened\"",
            ),
            (
                json!({"text": ["a"]}),
                "text: must be a string such as \"Defect {{entity.id}} reopened\"; found an array",
            ),
            (
                json!({"text": "Defect {{entity.id} reopened"}),
                "text: the `{{` at byte 7 is never closed; end the placeholder with `}}`, as in {{entity.id}}",
            ),
            (
                json!({"text": "Defect {{ }} reopened"}),
                "text: the placeholder at byte 7 is empty; put a dotted path inside, such as {{entity.name}}",
            ),
            (
                json!({"text": "{{entity..id}}"}),
                "text: the placeholder at byte 0: field path \"entity..id\" has an empty segment",
            ),
            (
                json!({"text": "hi", "chanel": "#qa"}),
                "chanel: unknown setting; did you mean `channel`? slack takes `text`, `username`, `icon_emoji` and `channel`",
            ),
            (
                json!({"txt": "hi"}),
                "txt: unknown setting; did you mean `text`?",
            ),
            (
                json!({"text": "hi", "webhook_url": "https://x"}),
                "webhook_url: unknown setting; slack takes `text`, `username`, `icon_emoji` and `channel`",
            ),
            (
                json!({"text": "hi", "username": 7}),
                "username: must be a non-empty string, such as \"rulehook\"; found 7; leave it out to use the webhook's default",
            ),
            (
                json!({"text": "hi", "icon_emoji": null}),
                "icon_emoji: must be a non-empty string, such as \":bug:\"; found null",
            ),
            (
                json!({"text": "hi", "channel": ""}),
                "channel: must be a non-empty string, such as \"#qa\"; found \"\"",
            ),
            (
                json!("hi"),
                "the config must be an object such as {\"text\": \"Defect {{entity.id}} reopened\"}; found a string",
            ),
        ];
        for (config, message) in cases {
            let err = validate::<Slack>(&config).0.expect_err(&config.to_string());
            assert!(
                err.starts_with(message),
                "{config}:\n  got  {err}\n  want {message}"
            );
            let payload = sample_update();
            let (result, _) = run::<Slack>(&context_for(&payload), &payload, &config);
            assert_eq!(result, Err(err), "{config}");
        }
    }

    #[test]
    fn good_configs_validate() {
        for config in [
            json!({"text": "plain"}),
            json!({"text": "{{entity.id}}", "username": "u", "icon_emoji": ":x:", "channel": "#c"}),
        ] {
            assert_eq!(validate::<Slack>(&config).0, Ok(()), "{config}");
        }
    }

    #[test]
    fn odd_payloads_get_an_answer_not_a_panic() {
        for config in
            [json!({"text": "{{entity.id}} {{changes.a}} {{entity.a.b.1.c}} {{user.email}}"})]
        {
            for payload in rulehook_plugin_sdk::testing::odd_payloads() {
                let (result, _) = run::<Slack>(&Context::default(), &payload, &config);
                if let Err(err) = result {
                    assert!(err.contains("payload"), "{config} on {payload}: {err}");
                }
            }
        }
    }
}
