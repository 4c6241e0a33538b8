//! What an accepted delivery is bound to: the part of a rule that decides
//! where and how its deliveries go (URL, method, headers, credentials,
//! signing, timeouts, retry policy, TLS, transport), written down with its
//! secrets as the references the rule file gave (`env:NAME`,
//! `file:PATH`), never their values.
//!
//! The hash of that description is the rule's *version*. Ingest stores it
//! with every delivery, and every attempt sends with the version it names,
//! so a reload that renames, changes or removes the rule never re-targets
//! or fails work it had already accepted. Pure: hashing and decoding only;
//! secrets are resolved through the [`SecretResolver`] the caller hands in.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::SecretResolver;
use super::model::{
    Credentials, HeaderValue, Method, RetryPolicy, Secret, SecretRef, SignatureStyle, Transport,
    Webhook, breaks_header,
};

/// A rule version: 16 hex digits of the SHA-256 of its [`TargetSpec`].
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RuleVersion(pub String);

impl std::fmt::Display for RuleVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A rule's sending part as stored (JSON), so a version stays resolvable
/// after the rule is gone from the files, across restarts too.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TargetSpec {
    /// The rule's name when the version was made (records and the
    /// `X-Rulehook-Rule` header keep saying it).
    pub rule: String,
    pub transport: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    pub method: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<(String, HeaderSpec)>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials: Option<CredentialsSpec>,
    /// Secret references: `env:NAME`, `file:PATH` or `inline`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub signature: Vec<String>,
    pub signature_header: String,
    pub connect_timeout_ms: u64,
    pub reply_timeout_ms: u64,
    pub retry: RetrySpec,
    pub tls_verify: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub space: Option<String>,
}

/// A header value as stored: text as a plain JSON string (so versions
/// written before header values could be secrets read the same and keep
/// their hash), a secret as `{"secret": "env:NAME"}`, a reference as in
/// `secrets`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum HeaderSpec {
    Text(String),
    Secret { secret: String },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CredentialsSpec {
    pub username: String,
    /// A secret reference, as in `secrets`.
    pub password: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "policy", rename_all = "snake_case")]
pub enum RetrySpec {
    Fixed { interval_ms: u64, retries: u32 },
    Exponential { intervals_ms: Vec<u64>, jitter: f64 },
    None,
}

/// The reference an inline secret is stored as: its value is not kept, so
/// a retired version that needs it cannot be rebuilt after a restart.
const INLINE: &str = "inline";

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

impl TargetSpec {
    pub fn of(rule: &str, w: &Webhook) -> TargetSpec {
        TargetSpec {
            rule: rule.to_string(),
            transport: match w.transport {
                Transport::Http => "http",
                Transport::WebSocket => "websocket",
            }
            .into(),
            url: w.url.as_ref().map(|u| u.to_string()),
            method: w.method.as_str().into(),
            headers: w
                .headers
                .iter()
                .map(|(name, value)| {
                    let spec = match value {
                        HeaderValue::Text(t) => HeaderSpec::Text(t.clone()),
                        HeaderValue::Secret(s) => HeaderSpec::Secret {
                            secret: s.source.clone(),
                        },
                    };
                    (name.clone(), spec)
                })
                .collect(),
            credentials: w.credentials.as_ref().map(|c| CredentialsSpec {
                username: c.username.clone(),
                password: c.password.source.clone(),
            }),
            secrets: w.secrets.iter().map(|s| s.source.clone()).collect(),
            signature: w
                .signature
                .iter()
                .map(|s| match s {
                    SignatureStyle::HmacSha256 => "hmac-sha256",
                    SignatureStyle::StandardWebhooks => "standard-webhooks",
                })
                .map(str::to_string)
                .collect(),
            signature_header: w.signature_header.clone(),
            connect_timeout_ms: ms(w.connect_timeout),
            reply_timeout_ms: ms(w.reply_timeout),
            retry: match &w.retry {
                RetryPolicy::Fixed { interval, retries } => RetrySpec::Fixed {
                    interval_ms: ms(*interval),
                    retries: *retries,
                },
                RetryPolicy::Exponential { intervals, jitter } => RetrySpec::Exponential {
                    intervals_ms: intervals.iter().map(|d| ms(*d)).collect(),
                    jitter: *jitter,
                },
                RetryPolicy::None => RetrySpec::None,
            },
            tls_verify: w.tls_verify,
            space: w.space.clone(),
        }
    }

    /// The stored form.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a TargetSpec always serializes")
    }

    pub fn from_json(bytes: &[u8]) -> Result<TargetSpec, String> {
        serde_json::from_slice(bytes).map_err(|e| format!("unreadable rule version: {e}"))
    }

    /// The version: equal specs, equal versions. Secret values are not in
    /// it, so rotating a secret behind the same reference keeps the version
    /// (and the deliveries use the new value, as the reference says).
    pub fn version(&self) -> RuleVersion {
        let digest = Sha256::digest(self.to_json());
        RuleVersion(digest[..8].iter().map(|b| format!("{b:02x}")).collect())
    }

    /// The webhook again, with its secrets resolved now. `Err` says why it
    /// cannot be sent with (a secret that is gone, or was inline).
    pub fn to_webhook(&self, secrets: &dyn SecretResolver) -> Result<Webhook, String> {
        let secret = |source: &str| -> Result<Secret, String> {
            let reference = if let Some(name) = source.strip_prefix("env:") {
                SecretRef::Env(name.to_string())
            } else if let Some(path) = source.strip_prefix("file:") {
                SecretRef::File(PathBuf::from(path))
            } else if source == INLINE {
                return Err(format!(
                    "rule `{}` had an inline secret in this version, which rulehook does not store; redeliver with the current rule",
                    self.rule
                ));
            } else {
                return Err(format!("unknown secret reference `{source}`"));
            };
            let value = secrets.resolve(&reference)?;
            Ok(Secret {
                source: source.to_string(),
                value,
            })
        };
        let bad = |what: &str| format!("rule version of `{}`: bad {what}", self.rule);
        Ok(Webhook {
            url: match &self.url {
                Some(u) => Some(url::Url::parse(u).map_err(|_| bad("url"))?),
                None => None,
            },
            method: match self.method.as_str() {
                "POST" => Method::Post,
                "PUT" => Method::Put,
                "PATCH" => Method::Patch,
                _ => return Err(bad("method")),
            },
            headers: self
                .headers
                .iter()
                .map(|(name, spec)| {
                    let value = match spec {
                        HeaderSpec::Text(t) => HeaderValue::Text(t.clone()),
                        HeaderSpec::Secret { secret: source } => {
                            let s = secret(source)?;
                            // The secret may have changed since the rule was parsed.
                            if breaks_header(&s.value) {
                                return Err(format!(
                                    "rule `{}`: header `{name}` value from {source} contains a line break",
                                    self.rule
                                ));
                            }
                            HeaderValue::Secret(s)
                        }
                    };
                    Ok((name.clone(), value))
                })
                .collect::<Result<_, String>>()?,
            credentials: match &self.credentials {
                Some(c) => Some(Credentials {
                    username: c.username.clone(),
                    password: secret(&c.password)?,
                }),
                None => None,
            },
            secrets: self
                .secrets
                .iter()
                .map(|s| secret(s))
                .collect::<Result<_, _>>()?,
            signature: self
                .signature
                .iter()
                .map(|s| match s.as_str() {
                    "hmac-sha256" => Ok(SignatureStyle::HmacSha256),
                    "standard-webhooks" => Ok(SignatureStyle::StandardWebhooks),
                    _ => Err(bad("signature")),
                })
                .collect::<Result<_, _>>()?,
            signature_header: self.signature_header.clone(),
            connect_timeout: Duration::from_millis(self.connect_timeout_ms),
            reply_timeout: Duration::from_millis(self.reply_timeout_ms),
            retry: match &self.retry {
                RetrySpec::Fixed {
                    interval_ms,
                    retries,
                } => RetryPolicy::Fixed {
                    interval: Duration::from_millis(*interval_ms),
                    retries: *retries,
                },
                RetrySpec::Exponential {
                    intervals_ms,
                    jitter,
                } => RetryPolicy::Exponential {
                    intervals: intervals_ms
                        .iter()
                        .map(|m| Duration::from_millis(*m))
                        .collect(),
                    jitter: *jitter,
                },
                RetrySpec::None => RetryPolicy::None,
            },
            tls_verify: self.tls_verify,
            transport: match self.transport.as_str() {
                "http" => Transport::Http,
                "websocket" => Transport::WebSocket,
                _ => return Err(bad("transport")),
            },
            space: self.space.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::{RuleSet, Source};

    fn rules(text: &str) -> RuleSet {
        let env = |r: &SecretRef| match r {
            SecretRef::Env(n) => Ok(format!("value-of-{n}")),
            SecretRef::File(p) => Ok(format!("file-{}", p.display())),
            SecretRef::Inline(v) => Ok(v.clone()),
        };
        let (set, diags) = RuleSet::compile(
            &[Source {
                path: "r.yaml".into(),
                text: text.into(),
            }],
            &env,
        );
        assert!(diags.iter().all(|d| !d.is_error()), "{diags:?}");
        set
    }

    const FULL: &str = "rules:\n  - name: full\n    events: [update]\n    webhook:\n      url: https://ci.example.com/hook\n      method: PUT\n      headers: {X-Team: qa, X-Api-Key: {env: API_KEY}}\n      credentials: {username: bot, password: {env: PW}}\n      secret: {file: secrets/qa}\n      signature: [hmac-sha256]\n      signature_header: X-Hub-Signature-256\n      timeouts: {connect: 5s, reply: 7s}\n      retry: {policy: exponential, intervals: [5s, 1m], jitter: 0.1}\n      tls: {verify: false}\n";

    #[test]
    fn a_spec_round_trips_to_the_same_webhook_and_stores_no_secret_value() {
        let set = rules(FULL);
        let rule = set.get("full").unwrap();
        let spec = TargetSpec::of(&rule.name, &rule.webhook);
        let stored = String::from_utf8(spec.to_json()).unwrap();
        assert!(!stored.contains("value-of-PW"), "{stored}");
        assert!(stored.contains("env:PW"), "{stored}");
        assert!(!stored.contains("value-of-API_KEY"), "{stored}");
        assert!(
            stored.contains(r#"["X-Api-Key",{"secret":"env:API_KEY"}]"#),
            "{stored}"
        );
        assert!(stored.contains(r#"["X-Team","qa"]"#), "{stored}");
        let back = TargetSpec::from_json(stored.as_bytes()).unwrap();
        assert_eq!(back, spec);
        let resolve = |r: &SecretRef| match r {
            SecretRef::Env(n) => Ok(format!("value-of-{n}")),
            SecretRef::File(p) => Ok(format!("file-{}", p.display())),
            SecretRef::Inline(v) => Ok(v.clone()),
        };
        assert_eq!(back.to_webhook(&resolve).unwrap(), rule.webhook);
    }

    #[test]
    fn versions_change_with_what_decides_the_sending_and_only_with_that() {
        let base = "rules:\n  - name: r\n    events: [create]\n    webhook: {url: \"https://a.example/x\"}\n";
        let version = |text: &str, name: &str| {
            let set = rules(text);
            let r = set.get(name).unwrap();
            TargetSpec::of(&r.name, &r.webhook).version()
        };
        let v = version(base, "r");
        assert_eq!(v.0.len(), 16);
        assert_eq!(v, version(base, "r"), "stable");
        let cases = [
            // (changed rule file, name, same version?)
            (base.replace("[create]", "[create, update]"), "r", true),
            (base.replace("x\"}", "y\"}"), "r", false),
            (base.replace("name: r", "name: s"), "s", false),
            (
                base.replace("}\n", ", timeouts: {reply: 3s}}\n"),
                "r",
                false,
            ),
        ];
        for (text, name, same) in cases {
            assert_eq!(version(&text, name) == v, same, "{text}");
        }
    }

    /// A version stored before header values could be secrets (each a
    /// plain string) still decodes, and the same rule parsed now gives the
    /// very same bytes, so its hash, and the deliveries bound to it, stay.
    #[test]
    fn a_version_stored_before_secret_headers_decodes_and_keeps_its_hash() {
        let old = r#"{"rule":"r","transport":"http","url":"https://a.example/x","method":"POST","headers":[["X-Team","qa"]],"signature_header":"X-Rulehook-Signature","connect_timeout_ms":60000,"reply_timeout_ms":20000,"retry":{"policy":"fixed","interval_ms":60000,"retries":3},"tls_verify":true}"#;
        let spec = TargetSpec::from_json(old.as_bytes()).unwrap();
        assert_eq!(
            spec.headers,
            vec![("X-Team".to_string(), HeaderSpec::Text("qa".into()))]
        );
        let none = |_: &SecretRef| Err::<String, _>("no secrets here".to_string());
        let webhook = spec.to_webhook(&none).unwrap();
        assert_eq!(
            webhook.headers,
            vec![("X-Team".to_string(), HeaderValue::Text("qa".into()))]
        );
        let set = rules(
            "rules:\n  - name: r\n    events: [create]\n    webhook: {url: \"https://a.example/x\", headers: {X-Team: qa}}\n",
        );
        let r = set.get("r").unwrap();
        let now = TargetSpec::of(&r.name, &r.webhook);
        assert_eq!(String::from_utf8(now.to_json()).unwrap(), old);
        assert_eq!(now.version(), spec.version());
    }

    #[test]
    fn a_secret_header_is_resolved_again_and_refused_with_a_line_break() {
        let set = rules(
            "rules:\n  - name: h\n    events: [create]\n    webhook: {url: \"https://a.example/\", headers: {X-Api-Key: {file: secrets/key}}}\n",
        );
        let r = set.get("h").unwrap();
        let spec = TargetSpec::of(&r.name, &r.webhook);
        // Rotated behind the same reference: the new value is sent.
        let rotated = |_: &SecretRef| Ok::<_, String>("new-key".to_string());
        let w = spec.to_webhook(&rotated).unwrap();
        assert_eq!(w.headers[0].1.value(), "new-key");
        assert_eq!(w.headers[0].1.recorded(), "***");
        let broken = |_: &SecretRef| Ok::<_, String>("new\r\nX-Evil: 1".to_string());
        let err = spec.to_webhook(&broken).unwrap_err();
        assert!(err.contains("header `X-Api-Key`"), "{err}");
        assert!(err.contains("file:secrets/key"), "{err}");
        assert!(!err.contains("Evil"), "the value is never quoted: {err}");
        let gone = |_: &SecretRef| Err::<String, _>("environment variable K is not set".into());
        assert!(spec.to_webhook(&gone).is_err());
    }

    #[test]
    fn an_inline_secret_or_a_missing_one_cannot_be_rebuilt() {
        let set = rules(
            "rules:\n  - name: i\n    events: [create]\n    webhook: {url: \"https://a.example/\", secret: abc}\n",
        );
        let r = set.get("i").unwrap();
        let spec = TargetSpec::of(&r.name, &r.webhook);
        assert!(!String::from_utf8(spec.to_json()).unwrap().contains("abc"));
        let any = |_: &SecretRef| Ok::<_, String>("x".to_string());
        let err = spec.to_webhook(&any).unwrap_err();
        assert!(err.contains("inline secret"), "{err}");
        let spec = TargetSpec::of(&set.get("i").unwrap().name, &{
            let mut w = r.webhook.clone();
            w.secrets[0].source = "env:GONE".into();
            w
        });
        let missing =
            |_: &SecretRef| Err::<String, _>("environment variable GONE is not set".into());
        assert!(spec.to_webhook(&missing).unwrap_err().contains("GONE"));
    }
}
