//! A small client for the admin API, used by `rulehook deliveries …` and
//! `rulehook endpoints …` (the database belongs to the running server, so
//! the CLI asks the server rather than opening it).

use std::path::Path;

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

pub struct AdminClient {
    base: String,
    key: String,
}

impl AdminClient {
    /// `server` like `http://127.0.0.1:7700`; the key from the argument,
    /// else `RULEHOOK_API_KEY`, else the generated keys file in `data_dir`.
    pub fn new(
        server: String,
        key: Option<String>,
        data_dir: &Path,
    ) -> anyhow::Result<AdminClient> {
        let key = match key.or_else(|| std::env::var("RULEHOOK_API_KEY").ok()) {
            Some(k) => k,
            None => {
                let path = crate::serve::keys_file(data_dir);
                let doc: Value = serde_json::from_slice(&std::fs::read(&path).with_context(|| {
                    format!("no API key: pass --api-key, set RULEHOOK_API_KEY, or run from the directory whose {} the server wrote", path.display())
                })?)?;
                doc["admin"]
                    .as_str()
                    .context("the keys file has no admin key")?
                    .to_string()
            }
        };
        Ok(AdminClient {
            base: server.trim_end_matches('/').to_string(),
            key,
        })
    }

    /// Sends a request; returns the status and the JSON (or text) answer.
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<(u16, Value)> {
        let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
        let url = format!("{}{path}", self.base);
        let req = http::Request::builder()
            .method(method)
            .uri(&url)
            .header("Authorization", format!("Bearer {}", self.key))
            .header("Content-Type", "application/json")
            .body(Full::new(Bytes::from(
                body.map(|b| b.to_string()).unwrap_or_default(),
            )))?;
        let resp = client.request(req).await.with_context(|| {
            format!(
                "cannot reach rulehook at {}; is `rulehook serve` running?",
                self.base
            )
        })?;
        let status = resp.status().as_u16();
        let bytes = resp.into_body().collect().await?.to_bytes();
        let value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        Ok((status, value))
    }
}
