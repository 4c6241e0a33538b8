//! `rulehook channel SPACE`: a WebSocket channel client for integrators and
//! operators. It connects to a running server's channel for one shared
//! space (with `Authorization: Bearer CLIENT_ID:CLIENT_SECRET`), prints
//! every delivery it receives, and reconnects when the connection drops,
//! so it can be left running across server restarts.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use futures_util::StreamExt;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

/// How long to wait before connecting again.
const RETRY_EVERY: Duration = Duration::from_secs(2);

pub struct Options {
    /// The server's base URL, `http://HOST:PORT`.
    pub server: String,
    pub space: String,
    pub client_id: String,
    pub client_secret: String,
}

/// The channel's `ws://` URL on a server given as `http://HOST:PORT`.
pub fn channel_url(server: &str, space: &str) -> Result<String, String> {
    let url = url::Url::parse(server).map_err(|e| {
        format!("--server `{server}` is not a URL ({e}); write e.g. http://127.0.0.1:7700")
    })?;
    if url.scheme() != "http" {
        return Err(format!(
            "--server `{server}`: the channel client speaks plain ws://, so give the server's http:// address"
        ));
    }
    let host = url.host_str().unwrap_or("127.0.0.1");
    let port = url.port_or_known_default().unwrap_or(80);
    Ok(format!(
        "ws://{host}:{port}{}",
        crate::deliver::channel::path(space)
    ))
}

/// Connects, prints frames, and reconnects until interrupted. Returns
/// only when the server refuses the credentials (exit 2).
pub async fn run(opts: Options, out: &mut (dyn Write + Send)) -> anyhow::Result<ExitCode> {
    let url = channel_url(&opts.server, &opts.space).map_err(anyhow::Error::msg)?;
    let mut reported_down = false;
    loop {
        let mut request = url.as_str().into_client_request()?;
        let bearer = format!("Bearer {}:{}", opts.client_id, opts.client_secret);
        request
            .headers_mut()
            .insert(http::header::AUTHORIZATION, bearer.parse()?);
        let ws = match tokio_tungstenite::connect_async(request).await {
            Ok((ws, _)) => ws,
            Err(WsError::Http(resp)) if resp.status() == http::StatusCode::UNAUTHORIZED => {
                writeln!(
                    out,
                    "rulehook channel: {url} refused client `{}` (401): check --client-id and the secret, and that the key's role is websocket or admin",
                    opts.client_id
                )?;
                return Ok(ExitCode::from(2));
            }
            Err(e) => {
                if !reported_down {
                    writeln!(
                        out,
                        "rulehook channel: cannot connect to {url} ({e}); retrying every {} s",
                        RETRY_EVERY.as_secs()
                    )?;
                    reported_down = true;
                }
                tokio::time::sleep(RETRY_EVERY).await;
                continue;
            }
        };
        reported_down = false;
        writeln!(
            out,
            "rulehook channel: connected to {url} as {}",
            opts.client_id
        )?;
        out.flush()?;
        let (_, mut frames) = ws.split();
        while let Some(msg) = frames.next().await {
            match msg {
                Ok(Message::Text(text)) => {
                    let shown = serde_json::from_str::<serde_json::Value>(text.as_str())
                        .and_then(|v| serde_json::to_string_pretty(&v))
                        .unwrap_or_else(|_| text.to_string());
                    writeln!(
                        out,
                        "--- delivery at {}\n{shown}",
                        httpdate::fmt_http_date(std::time::SystemTime::now())
                    )?;
                    out.flush()?;
                }
                Ok(Message::Close(frame)) => {
                    let why = frame.map(|f| f.reason.to_string()).unwrap_or_default();
                    writeln!(
                        out,
                        "rulehook channel: the server closed the channel ({why}); reconnecting"
                    )?;
                    break;
                }
                Ok(_) => {}
                Err(e) => {
                    writeln!(out, "rulehook channel: connection lost ({e}); reconnecting")?;
                    break;
                }
            }
        }
        out.flush()?;
        tokio::time::sleep(RETRY_EVERY).await;
    }
}

#[cfg(test)]
mod tests {
    use super::channel_url;

    #[test]
    fn the_channel_url_comes_from_the_server_address() {
        assert_eq!(
            channel_url("http://127.0.0.1:7700", "1001").unwrap(),
            "ws://127.0.0.1:7700/messaging/shared_spaces/1001/webhooks"
        );
        assert_eq!(
            channel_url("http://rulehook.internal/", "7").unwrap(),
            "ws://rulehook.internal:80/messaging/shared_spaces/7/webhooks"
        );
        assert!(
            channel_url("https://x", "1")
                .unwrap_err()
                .contains("http://")
        );
        assert!(channel_url("127.0.0.1:7700", "1").is_err());
    }
}
