//! The WebSocket channel, for endpoints rulehook cannot reach: they connect
//! to rulehook instead, at `/messaging/shared_spaces/{space}/webhooks`, and
//! receive each delivery of a `transport: websocket` rule for their shared
//! space as one text frame holding the same JSON payload an HTTP endpoint
//! would get.
//!
//! Who may connect: a client signs in with `POST /authentication/sign_in`
//! `{"client_id": NAME, "client_secret": KEY}` (an API key of role
//! `websocket` or `admin`) and gets the session cookie `LWSSO_COOKIE_KEY`,
//! or it sends `Authorization: Bearer NAME:KEY` with the upgrade.
//!
//! A delivery counts as sent once its frame is written to at least one
//! client of its space. With no client connected it is parked in the store
//! under [`endpoint`] and resumed when one connects, so it waits on disk,
//! not in memory, and survives restarts.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Map, Value};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

/// The session cookie `sign_in` sets, as the ALM clients expect it.
pub const SESSION_COOKIE: &str = "LWSSO_COOKIE_KEY";

/// How long a session may be used to open connections. An open connection
/// is not cut when its session expires.
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);

/// Sessions kept at most; past this, signing in ends the session closest
/// to expiry, so repeated sign-ins cannot grow memory without bound.
const MAX_SESSIONS: usize = 10_000;

/// Frames waiting for one client's socket. A client this far behind is
/// passed over for new frames (the attempt goes to the others, or is
/// retried) instead of holding memory for it.
const CLIENT_QUEUE: usize = 1024;

/// Pings keep idle connections open through proxies and NATs, and find
/// peers that vanished without closing.
const PING_EVERY: Duration = Duration::from_secs(30);

/// The channel is one-way: what a client sends is read only to answer
/// pings and closes, so a client may not make rulehook buffer much of it.
pub fn server_config() -> tokio_tungstenite::tungstenite::protocol::WebSocketConfig {
    tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .max_message_size(Some(64 << 10))
        .max_frame_size(Some(64 << 10))
}

/// The key a space's parked deliveries are stored under (the place an HTTP
/// delivery's endpoint `scheme://host:port` has).
pub fn endpoint(space: &str) -> String {
    format!("{ENDPOINT_PREFIX}{space}")
}

/// What every space's key starts with.
pub const ENDPOINT_PREFIX: &str = "websocket:shared_spaces/";

/// The space whose parked deliveries are stored under `endpoint`.
pub fn space_of(endpoint: &str) -> Option<&str> {
    endpoint.strip_prefix(ENDPOINT_PREFIX)
}

/// The route clients of `space` connect to.
pub fn path(space: &str) -> String {
    format!("/messaging/shared_spaces/{space}/webhooks")
}

/// The shared space a WebSocket rule's delivery goes to: the rule's
/// `space`, or else the event's `scope.sharedspace_id`.
pub fn space_for(rule_space: Option<&str>, scope: &Map<String, Value>) -> Result<String, String> {
    if let Some(space) = rule_space {
        return Ok(space.to_string());
    }
    match scope.get("sharedspace_id") {
        Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
        Some(Value::Number(n)) => Ok(n.to_string()),
        _ => Err("the event has no scope.sharedspace_id and the rule's webhook names no `space`, so no WebSocket client could get it; add `space: ID` to the webhook".into()),
    }
}

/// Why a frame reached no client.
#[derive(Debug, PartialEq)]
pub enum SendError {
    /// Nobody is connected to the space: wait for a client.
    NoClient,
    /// Clients are connected, but none took the frame in time.
    NotTaken(String),
}

struct Frame {
    text: Utf8Bytes,
    written: oneshot::Sender<()>,
}

struct Client {
    id: u64,
    name: String,
    tx: mpsc::Sender<Frame>,
}

struct Session {
    client: String,
    expires: Instant,
}

/// The connected clients by space, and the sign-in sessions.
pub struct Hub {
    spaces: Mutex<HashMap<String, Vec<Client>>>,
    sessions: Mutex<HashMap<String, Session>>,
    next_id: AtomicU64,
    /// Turns true when the server shuts down: every client is closed.
    closing: tokio::sync::watch::Sender<bool>,
}

impl Default for Hub {
    fn default() -> Self {
        Hub {
            spaces: Mutex::default(),
            sessions: Mutex::default(),
            next_id: AtomicU64::new(0),
            closing: tokio::sync::watch::Sender::new(false),
        }
    }
}

/// A client's place in the hub; leaving it (on drop) removes the client.
pub struct Registration<'a> {
    hub: &'a Hub,
    space: String,
    id: u64,
    rx: mpsc::Receiver<Frame>,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        let mut spaces = self.hub.spaces.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(clients) = spaces.get_mut(&self.space) {
            clients.retain(|c| c.id != self.id);
            if clients.is_empty() {
                spaces.remove(&self.space);
            }
        }
    }
}

impl Hub {
    /// Starts a session for an authenticated client; returns its token.
    pub fn sign_in(&self, client: &str) -> String {
        let token: String = rand::random::<[u8; 32]>()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let now = Instant::now();
        let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        // Expired sessions go here, so the map stays as small as the set of
        // live ones without a sweeper task.
        sessions.retain(|_, s| s.expires > now);
        if sessions.len() >= MAX_SESSIONS {
            let oldest = sessions
                .iter()
                .min_by_key(|(_, s)| s.expires)
                .map(|(token, _)| token.clone());
            if let Some(token) = oldest {
                sessions.remove(&token);
            }
        }
        sessions.insert(
            token.clone(),
            Session {
                client: client.to_string(),
                expires: now + SESSION_TTL,
            },
        );
        token
    }

    /// The client a session token belongs to, while it is valid.
    pub fn session(&self, token: &str) -> Option<String> {
        let sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        sessions
            .get(token)
            .filter(|s| s.expires > Instant::now())
            .map(|s| s.client.clone())
    }

    /// Closes every client's connection (with "going away") and refuses to
    /// serve new ones: the server is shutting down. Their deliveries stay
    /// in the store.
    pub fn close_all(&self) {
        self.closing.send_replace(true);
    }

    /// Clients connected to `space`.
    pub fn clients(&self, space: &str) -> usize {
        let spaces = self.spaces.lock().unwrap_or_else(|e| e.into_inner());
        spaces.get(space).map_or(0, Vec::len)
    }

    /// Each space with clients, and how many.
    pub fn spaces(&self) -> Vec<(String, usize)> {
        let spaces = self.spaces.lock().unwrap_or_else(|e| e.into_inner());
        spaces.iter().map(|(s, c)| (s.clone(), c.len())).collect()
    }

    /// Adds a client to `space`; frames for it arrive on the registration.
    pub fn register(&self, space: &str, name: &str) -> Registration<'_> {
        let (tx, rx) = mpsc::channel(CLIENT_QUEUE);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut spaces = self.spaces.lock().unwrap_or_else(|e| e.into_inner());
        spaces.entry(space.to_string()).or_default().push(Client {
            id,
            name: name.to_string(),
            tx,
        });
        Registration {
            hub: self,
            space: space.to_string(),
            id,
            rx,
        }
    }

    /// Sends `body` as a text frame to every client of `space`; returns the
    /// names of the clients whose socket took it within `timeout`.
    pub async fn send(
        &self,
        space: &str,
        body: &Bytes,
        timeout: Duration,
    ) -> Result<Vec<String>, SendError> {
        let text = Utf8Bytes::try_from(body.clone())
            .map_err(|_| SendError::NotTaken("the payload is not UTF-8 text".into()))?;
        let mut pending = Vec::new();
        let mut full = 0;
        {
            let spaces = self.spaces.lock().unwrap_or_else(|e| e.into_inner());
            let Some(clients) = spaces.get(space).filter(|c| !c.is_empty()) else {
                return Err(SendError::NoClient);
            };
            for c in clients {
                let (written, done) = oneshot::channel();
                let frame = Frame {
                    text: text.clone(),
                    written,
                };
                match c.tx.try_send(frame) {
                    Ok(()) => pending.push((c.name.clone(), done)),
                    Err(_) => full += 1,
                }
            }
        }
        let deadline = tokio::time::Instant::now() + timeout;
        let mut took = Vec::new();
        for (name, done) in pending {
            if let Ok(Ok(())) = tokio::time::timeout_at(deadline, done).await {
                took.push(name);
            }
        }
        if took.is_empty() {
            return Err(SendError::NotTaken(format!(
                "no client of shared space {space} took the frame within {} ms ({full} of them too far behind)",
                timeout.as_millis()
            )));
        }
        Ok(took)
    }
}

impl Registration<'_> {
    /// Writes this client's frames to its socket until either side closes.
    /// Text the client sends is ignored: the channel is one-way.
    pub async fn serve<S>(mut self, ws: WebSocketStream<S>)
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let (mut sink, mut stream) = ws.split();
        let mut ping = tokio::time::interval(PING_EVERY);
        ping.tick().await;
        let mut closing = self.hub.closing.subscribe();
        let going_away = loop {
            if *closing.borrow_and_update() {
                break true;
            }
            tokio::select! {
                _ = closing.changed() => {}
                frame = self.rx.recv() => {
                    let Some(frame) = frame else { break false };
                    // `send` flushes: "written" means handed to the socket.
                    if sink.send(Message::Text(frame.text)).await.is_err() {
                        break false;
                    }
                    let _ = frame.written.send(());
                }
                msg = stream.next() => match msg {
                    Some(Ok(Message::Close(_)) | Err(_)) | None => break false,
                    // Pings are answered by the protocol layer.
                    Some(Ok(_)) => {}
                },
                _ = ping.tick() => {
                    if sink.send(Message::Ping(Bytes::new())).await.is_err() {
                        break false;
                    }
                }
            }
        };
        if going_away {
            let close = CloseFrame {
                code: CloseCode::Away,
                reason: "rulehook is shutting down".into(),
            };
            let _ = tokio::time::timeout(
                Duration::from_secs(1),
                sink.send(Message::Close(Some(close))),
            )
            .await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), sink.close()).await;
        // Frames still queued are dropped with their `written` senders,
        // so their attempts see that this client did not take them.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scope(json: &str) -> Map<String, Value> {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn the_space_comes_from_the_rule_or_the_event() {
        let cases = [
            (Some("9"), r#"{"sharedspace_id": 1001}"#, Ok("9")),
            (None, r#"{"sharedspace_id": 1001}"#, Ok("1001")),
            (None, r#"{"sharedspace_id": "alpha"}"#, Ok("alpha")),
            (None, r#"{"workspace_id": 1002}"#, Err(())),
            (None, r#"{"sharedspace_id": ""}"#, Err(())),
            (None, r#"{"sharedspace_id": [1]}"#, Err(())),
        ];
        for (rule, event_scope, want) in cases {
            let got = space_for(rule, &scope(event_scope));
            match want {
                Ok(space) => assert_eq!(got.as_deref(), Ok(space), "{rule:?} {event_scope}"),
                Err(()) => assert!(
                    got.as_ref().is_err_and(|e| e.contains("sharedspace_id")),
                    "{rule:?} {event_scope}: {got:?}"
                ),
            }
        }
    }

    #[test]
    fn sessions_are_random_and_resolve_to_their_client() {
        let hub = Hub::default();
        let a = hub.sign_in("ci");
        let b = hub.sign_in("ci");
        assert_ne!(a, b);
        assert_eq!(a.len(), 64);
        assert_eq!(hub.session(&a).as_deref(), Some("ci"));
        assert_eq!(hub.session("not-a-session"), None);
        // Repeated sign-ins keep at most MAX_SESSIONS; the oldest go first.
        for _ in 0..MAX_SESSIONS {
            hub.sign_in("busy");
        }
        let kept = hub.sessions.lock().unwrap().len();
        assert_eq!(kept, MAX_SESSIONS);
        assert_eq!(hub.session(&a), None, "the oldest session was ended");
        let newest = hub.sign_in("ci");
        assert_eq!(hub.session(&newest).as_deref(), Some("ci"));
    }

    #[tokio::test]
    async fn frames_go_to_every_client_of_the_space_only() {
        let hub = Hub::default();
        let body = Bytes::from_static(br#"{"event_id":"e1"}"#);
        assert_eq!(
            hub.send("1001", &body, Duration::from_millis(50)).await,
            Err(SendError::NoClient)
        );
        let mut one = hub.register("1001", "one");
        let mut two = hub.register("1001", "two");
        let mut other = hub.register("2002", "other");
        let mut spaces = hub.spaces();
        spaces.sort();
        assert_eq!(spaces, [("1001".to_string(), 2), ("2002".to_string(), 1)]);
        // Stand in for the sockets: take the frames and confirm them.
        let take = |reg: &mut Registration<'_>| {
            let frame = reg.rx.try_recv().expect("a frame");
            let _ = frame.written.send(());
            frame.text.to_string()
        };
        let sending = hub.send("1001", &body, Duration::from_secs(5));
        let confirm = async {
            tokio::task::yield_now().await;
            (take(&mut one), take(&mut two))
        };
        let (sent, (a, b)) = tokio::join!(sending, confirm);
        let mut sent = sent.expect("sent");
        sent.sort();
        assert_eq!(sent, ["one", "two"]);
        assert_eq!(
            (a.as_str(), b.as_str()),
            (r#"{"event_id":"e1"}"#, r#"{"event_id":"e1"}"#)
        );
        assert!(other.rx.try_recv().is_err(), "another space got the frame");
        drop(one);
        drop(two);
        assert_eq!(hub.clients("1001"), 0);
        assert_eq!(
            hub.send("1001", &body, Duration::from_millis(50)).await,
            Err(SendError::NoClient)
        );
    }

    #[tokio::test]
    async fn a_client_that_never_writes_does_not_take_the_frame() {
        let hub = Hub::default();
        let _stuck = hub.register("1001", "stuck");
        let got = hub
            .send(
                "1001",
                &Bytes::from_static(b"{}"),
                Duration::from_millis(20),
            )
            .await;
        assert!(
            matches!(&got, Err(SendError::NotTaken(why)) if why.contains("shared space 1001")),
            "{got:?}"
        );
    }
}
