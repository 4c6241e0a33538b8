//! A webhook receiver for tests: it records every request and answers from
//! a script (one status per request, the last one repeated), over plain
//! HTTP or HTTPS with a self-signed certificate.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

#[derive(Clone, Debug)]
pub struct Received {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// When the request (head and body) had arrived.
    pub at: Instant,
    /// Which connection it came on (1 for the first one accepted), so a
    /// test can tell a reused keep-alive connection from a fresh one.
    pub conn: usize,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("the webhook body is JSON")
    }
}

/// One scripted answer.
#[derive(Clone, Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub delay: Duration,
}

impl Answer {
    pub fn status(status: u16) -> Answer {
        Answer {
            status,
            headers: Vec::new(),
            delay: Duration::ZERO,
        }
    }

    pub fn with_header(mut self, k: &str, v: &str) -> Answer {
        self.headers.push((k.into(), v.into()));
        self
    }

    pub fn after(mut self, delay: Duration) -> Answer {
        self.delay = delay;
        self
    }
}

pub struct Receiver {
    pub addr: SocketAddr,
    pub got: Arc<Mutex<Vec<Received>>>,
    /// The self-signed certificate (PEM), for HTTPS receivers.
    pub cert_pem: Option<String>,
    _runtime: tokio::runtime::Runtime,
}

impl Receiver {
    pub fn start(script: Vec<Answer>) -> Receiver {
        Receiver::start_inner(script, false)
    }

    pub fn start_tls(script: Vec<Answer>) -> Receiver {
        Receiver::start_inner(script, true)
    }

    /// A plain HTTP receiver on a given port (to bring an endpoint back).
    pub fn start_on(port: u16, script: Vec<Answer>) -> Receiver {
        Receiver::start_at(port, script, false)
    }

    fn start_inner(script: Vec<Answer>, tls: bool) -> Receiver {
        Receiver::start_at(0, script, tls)
    }

    fn start_at(port: u16, script: Vec<Answer>, tls: bool) -> Receiver {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let listener = rt
            .block_on(tokio::net::TcpListener::bind(("127.0.0.1", port)))
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let got = Arc::new(Mutex::new(Vec::new()));
        let (acceptor, cert_pem) = if tls {
            let cert = rcgen::generate_simple_self_signed(vec![
                "localhost".to_string(),
                "127.0.0.1".to_string(),
            ])
            .expect("self-signed cert");
            let pem = cert.cert.pem();
            let key =
                rustls::pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into());
            let config = rustls::ServerConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .expect("tls versions")
            .with_no_client_auth()
            .with_single_cert(vec![cert.cert.der().clone()], key)
            .expect("server cert");
            (
                Some(tokio_rustls::TlsAcceptor::from(Arc::new(config))),
                Some(pem),
            )
        } else {
            (None, None)
        };
        let script = Arc::new(script);
        let got2 = got.clone();
        rt.spawn(async move {
            let mut conns = 0;
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                conns += 1;
                let conn = conns;
                let got = got2.clone();
                let script = script.clone();
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let got = got.clone();
                        let script = script.clone();
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = body
                                .collect()
                                .await
                                .map(|b| b.to_bytes().to_vec())
                                .unwrap_or_default();
                            let n = {
                                let mut g = got.lock().expect("lock");
                                g.push(Received {
                                    method: parts.method.to_string(),
                                    path: parts.uri.to_string(),
                                    headers: parts
                                        .headers
                                        .iter()
                                        .map(|(k, v)| {
                                            (
                                                k.to_string(),
                                                String::from_utf8_lossy(v.as_bytes()).into_owned(),
                                            )
                                        })
                                        .collect(),
                                    body,
                                    at: Instant::now(),
                                    conn,
                                });
                                g.len()
                            };
                            let answer = script
                                .get(n - 1)
                                .or(script.last())
                                .cloned()
                                .unwrap_or(Answer::status(200));
                            tokio::time::sleep(answer.delay).await;
                            let mut resp = http::Response::new(Full::new(Bytes::from_static(
                                b"{\"ok\":true}",
                            )));
                            *resp.status_mut() =
                                http::StatusCode::from_u16(answer.status).expect("status");
                            for (k, v) in &answer.headers {
                                resp.headers_mut().insert(
                                    http::HeaderName::from_bytes(k.as_bytes()).expect("name"),
                                    v.parse().expect("value"),
                                );
                            }
                            Ok::<_, std::convert::Infallible>(resp)
                        }
                    });
                    let builder = hyper::server::conn::http1::Builder::new();
                    match acceptor {
                        Some(acc) => {
                            if let Ok(tls) = acc.accept(stream).await {
                                let _ = builder.serve_connection(TokioIo::new(tls), service).await;
                            }
                        }
                        None => {
                            let _ = builder
                                .serve_connection(TokioIo::new(stream), service)
                                .await;
                        }
                    }
                });
            }
        });
        Receiver {
            addr,
            got,
            cert_pem,
            _runtime: rt,
        }
    }

    pub fn received(&self) -> Vec<Received> {
        self.got.lock().expect("lock").clone()
    }

    /// Waits until at least `n` requests arrived.
    pub fn wait_for(&self, n: usize, timeout: Duration) -> Vec<Received> {
        super::wait_for(
            timeout,
            &format!("{n} webhook requests at {}", self.addr),
            || {
                let got = self.received();
                (got.len() >= n).then_some(got)
            },
        )
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}
