//! `rulehook listen`: a webhook receiver for integrators. It prints every
//! request, checks its signature (HMAC or Standard Webhooks) and basic
//! authentication, answers 401 when they are wrong, and otherwise answers
//! the status it was told to.

use std::io::Write;
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Verify signatures with this secret (`whsec_…` means Standard Webhooks).
    pub secret: Option<String>,
    /// The HMAC header to read (X-Hub-Signature-256 is also accepted).
    pub signature_header: String,
    pub user: Option<String>,
    pub password: Option<String>,
    pub status: u16,
}

/// Standard Webhooks receivers reject timestamps further off than this.
const TOLERANCE_SECS: u64 = 300;

/// Checks a request's signature; `Ok(description)` or `Err(reason)`.
pub fn verify(
    opts: &Options,
    headers: &http::HeaderMap,
    body: &[u8],
    now_secs: u64,
) -> Result<String, String> {
    let Some(secret) = &opts.secret else {
        return Ok("not checked (no --secret)".into());
    };
    let get = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if secret.starts_with("whsec_") {
        let (Some(id), Some(ts), Some(sigs)) = (
            get(crate::sign::WEBHOOK_ID),
            get(crate::sign::WEBHOOK_TIMESTAMP),
            get(crate::sign::WEBHOOK_SIGNATURE),
        ) else {
            return Err("missing webhook-id, webhook-timestamp or webhook-signature".into());
        };
        let ts: u64 = ts
            .parse()
            .map_err(|_| format!("webhook-timestamp `{ts}` is not a number"))?;
        if ts.abs_diff(now_secs) > TOLERANCE_SECS {
            return Err(format!(
                "webhook-timestamp {ts} is more than {TOLERANCE_SECS} s away from now"
            ));
        }
        let expected = crate::sign::standard_signature(secret, id, ts, body)?;
        if sigs
            .split(' ')
            .any(|s| crate::sign::constant_time_eq(s.as_bytes(), expected.as_bytes()))
        {
            return Ok("ok (standard-webhooks)".into());
        }
        return Err("webhook-signature does not match the body".into());
    }
    let header = [opts.signature_header.as_str(), "X-Hub-Signature-256"]
        .into_iter()
        .find_map(|h| get(h).map(|v| (h, v)));
    match header {
        None => Err(format!("missing {} header", opts.signature_header)),
        Some((name, value)) if crate::sign::verify_hmac_sha256(secret, body, value) => {
            Ok(format!("ok ({name})"))
        }
        Some((name, _)) => Err(format!("{name} does not match the body")),
    }
}

fn check_auth(opts: &Options, headers: &http::HeaderMap) -> Result<(), String> {
    let Some(user) = &opts.user else {
        return Ok(());
    };
    let want = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD
            .encode(format!("{user}:{}", opts.password.as_deref().unwrap_or("")))
    );
    match headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        Some(got) if crate::sign::constant_time_eq(got.as_bytes(), want.as_bytes()) => Ok(()),
        Some(_) => Err("wrong basic authentication".into()),
        None => Err("missing basic authentication".into()),
    }
}

/// Serves until the process ends, writing a report of every request to `out`.
pub async fn run(
    listener: TcpListener,
    opts: Options,
    out: Arc<Mutex<dyn Write + Send>>,
) -> std::io::Result<()> {
    let opts = Arc::new(opts);
    loop {
        let (stream, _) = listener.accept().await?;
        let opts = opts.clone();
        let out = out.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let opts = opts.clone();
                let out = out.clone();
                async move {
                    let (parts, body) = req.into_parts();
                    let body = body
                        .collect()
                        .await
                        .map(|b| b.to_bytes())
                        .unwrap_or_default();
                    let now = crate::store::now_ms() / 1000;
                    let signature = verify(&opts, &parts.headers, &body, now);
                    let auth = check_auth(&opts, &parts.headers);
                    let status = match (&signature, &auth) {
                        (Ok(_), Ok(())) => {
                            StatusCode::from_u16(opts.status).unwrap_or(StatusCode::OK)
                        }
                        _ => StatusCode::UNAUTHORIZED,
                    };
                    let mut report = format!("--- {} {}\n", parts.method, parts.uri);
                    for (k, v) in &parts.headers {
                        let shown = if k == http::header::AUTHORIZATION {
                            "***".into()
                        } else {
                            String::from_utf8_lossy(v.as_bytes()).into_owned()
                        };
                        report.push_str(&format!("{k}: {shown}\n"));
                    }
                    report.push_str(&format!(
                        "signature: {}\n",
                        signature
                            .as_ref()
                            .map_or_else(|e| format!("WRONG: {e}"), |s| s.clone())
                    ));
                    if opts.user.is_some() {
                        report.push_str(&format!(
                            "auth: {}\n",
                            auth.as_ref()
                                .map_or_else(|e| format!("WRONG: {e}"), |_| "ok".into())
                        ));
                    }
                    let pretty = serde_json::from_slice::<serde_json::Value>(&body)
                        .ok()
                        .and_then(|v| serde_json::to_string_pretty(&v).ok())
                        .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
                    report.push_str(&pretty);
                    report.push_str(&format!("\n=> {}\n", status.as_u16()));
                    if let Ok(mut o) = out.lock() {
                        let _ = o.write_all(report.as_bytes());
                        let _ = o.flush();
                    }
                    let mut resp = Response::new(Full::new(Bytes::from(match status {
                        StatusCode::UNAUTHORIZED => {
                            format!("{}\n", signature.err().or(auth.err()).unwrap_or_default())
                        }
                        _ => "ok\n".to_string(),
                    })));
                    *resp.status_mut() = status;
                    if status == StatusCode::UNAUTHORIZED && opts.user.is_some() {
                        resp.headers_mut().insert(
                            http::header::WWW_AUTHENTICATE,
                            http::HeaderValue::from_static("Basic realm=\"rulehook listen\""),
                        );
                    }
                    Ok::<_, std::convert::Infallible>(resp)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verifies_both_signature_styles() {
        let body = br#"{"a":1}"#;
        let hmac_opts = Options {
            secret: Some("s3cret".into()),
            signature_header: "X-Rulehook-Signature".into(),
            status: 200,
            ..Default::default()
        };
        let mut h = http::HeaderMap::new();
        assert!(
            verify(&hmac_opts, &h, body, 0)
                .unwrap_err()
                .contains("missing X-Rulehook-Signature")
        );
        h.insert(
            "X-Rulehook-Signature",
            crate::sign::hmac_sha256_header("s3cret", body)
                .parse()
                .unwrap(),
        );
        assert!(verify(&hmac_opts, &h, body, 0).is_ok());
        assert!(verify(&hmac_opts, &h, b"other", 0).is_err());

        let whsec = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let sw = Options {
            secret: Some(whsec.into()),
            ..hmac_opts
        };
        let mut h = http::HeaderMap::new();
        h.insert("webhook-id", "dlv_1".parse().unwrap());
        h.insert("webhook-timestamp", "1000".parse().unwrap());
        let sig = crate::sign::standard_signature(whsec, "dlv_1", 1000, body).unwrap();
        h.insert(
            "webhook-signature",
            format!("v1,bm90LXRoaXM= {sig}").parse().unwrap(),
        );
        assert_eq!(
            verify(&sw, &h, body, 1100).unwrap(),
            "ok (standard-webhooks)"
        );
        assert!(
            verify(&sw, &h, body, 2000)
                .unwrap_err()
                .contains("more than 300 s")
        );
    }
}
