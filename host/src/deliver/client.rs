//! The outbound HTTP client, with the guard against server-side request
//! forgery at the connector: names are resolved once, every address is
//! vetted, and the connection goes to a vetted address (no second lookup an
//! attacker could answer differently). Redirects are never followed.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::connect::dns::Name;
use hyper_util::rt::TokioExecutor;
use ipnet::IpNet;

use super::proxy::{Connector, Proxy};
use crate::config::Outbound;

/// Why an address may not be used, or `None` when it may.
pub fn refuse_address(ip: IpAddr, allow: &[IpNet]) -> Option<String> {
    let ip = match ip {
        IpAddr::V6(v6) => embedded_ipv4(v6).map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    // Link-local covers the cloud metadata address 169.254.169.254; these
    // are refused even when a CIDR allows them.
    let always = match ip {
        IpAddr::V4(v4) => {
            v4.is_link_local() || v4.is_unspecified() || v4.is_broadcast() || v4.is_multicast()
        }
        IpAddr::V6(v6) => {
            (v6.segments()[0] & 0xffc0) == 0xfe80
                || v6.is_unspecified()
                || v6.is_multicast()
                || v6
                    == "fd00:ec2::254"
                        .parse::<std::net::Ipv6Addr>()
                        .expect("literal")
        }
    };
    if always {
        return Some(format!(
            "{ip} is a link-local, metadata or unroutable address, which is never allowed"
        ));
    }
    let non_global = match ip {
        IpAddr::V4(v4) => {
            v4.is_private()
                || v4.is_loopback()
                || v4.octets()[0] == 0
                || (v4.octets()[0] == 100 && (v4.octets()[1] & 0xc0) == 64) // shared 100.64/10
                || (v4.octets()[0] == 198 && (v4.octets()[1] & 0xfe) == 18) // benchmarking
                || v4.octets()[0] >= 240
        }
        IpAddr::V6(v6) => {
            v6.is_loopback()
                || (v6.segments()[0] & 0xfe00) == 0xfc00
                || v6.segments()[0] == 0x2001 && v6.segments()[1] == 0xdb8
        }
    };
    if non_global && !allow.iter().any(|net| net.contains(&ip)) {
        return Some(format!(
            "{ip} is a private or loopback address; allow it with `allow_cidrs` in the config if this endpoint is trusted"
        ));
    }
    None
}

/// The IPv4 address an IPv6 one carries, where the network would deliver
/// to it: IPv4-mapped (`::ffff:a.b.c.d`), IPv4-compatible (`::a.b.c.d`,
/// deprecated but still routed by some stacks), NAT64 (`64:ff9b::/96`) and
/// 6to4 (`2002:AABB:CCDD::/48`). Vetting the IPv4 address inside keeps a
/// private or metadata address from passing in IPv6 dress.
fn embedded_ipv4(v6: std::net::Ipv6Addr) -> Option<std::net::Ipv4Addr> {
    use std::net::Ipv4Addr;
    if let Some(v4) = v6.to_ipv4_mapped() {
        return Some(v4);
    }
    let s = v6.segments();
    let low =
        |hi: u16, lo: u16| Ipv4Addr::new((hi >> 8) as u8, hi as u8, (lo >> 8) as u8, lo as u8);
    // `::` and `::1` are IPv6's own unspecified and loopback addresses.
    if s[..6] == [0; 6] && !(s[6] == 0 && s[7] <= 1) {
        return Some(low(s[6], s[7]));
    }
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return Some(low(s[6], s[7]));
    }
    if s[0] == 0x2002 {
        return Some(low(s[1], s[2]));
    }
    None
}

/// Resolves names for the connector, keeping only vetted addresses.
#[derive(Clone)]
pub struct GuardedResolver {
    allow: Arc<Vec<IpNet>>,
}

impl tower_service::Service<Name> for GuardedResolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = std::io::Error;
    type Future =
        std::pin::Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let allow = self.allow.clone();
        Box::pin(async move {
            let host = name.as_str().to_string();
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let mut refused = None;
            let vetted: Vec<SocketAddr> = addrs
                .into_iter()
                .filter(|a| match refuse_address(a.ip(), &allow) {
                    None => true,
                    Some(why) => {
                        refused = Some(why);
                        false
                    }
                })
                .collect();
            if vetted.is_empty() {
                let why = refused.unwrap_or_else(|| "the name has no addresses".into());
                return Err(std::io::Error::new(
                    std::io::ErrorKind::PermissionDenied,
                    format!("{host}: {why}"),
                ));
            }
            Ok(vetted.into_iter())
        })
    }
}

type Inner = Client<HttpsConnector<Connector>, Watched>;

/// A request body that says when hyper starts writing it. That happens only
/// once a connection is there, fresh or reused from the pool, so it is the
/// moment the reply timeout starts: DESIGN counts it "from when the request
/// is written", and on a reused connection there is no connect to add.
struct Watched {
    inner: Full<Bytes>,
    written: Option<tokio::sync::oneshot::Sender<()>>,
}

impl hyper::body::Body for Watched {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        if let Some(tx) = self.written.take() {
            let _ = tx.send(());
        }
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        hyper::body::Body::is_end_stream(&self.inner)
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        hyper::body::Body::size_hint(&self.inner)
    }
}

/// The response as kept in attempt records.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub reason: Option<String>,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
    pub truncated: bool,
}

/// Why a request got no HTTP answer.
#[derive(Debug)]
pub enum SendError {
    /// Refused by rulehook's outbound policy; nothing was sent.
    Refused(String),
    NoReply(String),
    Timeout(String),
    InvalidHttp(String),
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SendError::Refused(e) => write!(f, "refused by the outbound policy: {e}"),
            SendError::NoReply(e) => write!(f, "no reply: {e}"),
            SendError::Timeout(e) => write!(f, "timed out: {e}"),
            SendError::InvalidHttp(e) => write!(f, "invalid HTTP: {e}"),
        }
    }
}

/// Pooled HTTP(S) clients, one per (verify TLS, connect timeout) pair since
/// those are fixed per connection.
pub struct Sender {
    outbound: Outbound,
    proxy: Option<Arc<Proxy>>,
    roots: Arc<rustls::RootCertStore>,
    clients: Mutex<Vec<((bool, Duration), Inner)>>,
}

impl Sender {
    pub fn new(outbound: Outbound) -> Result<Sender, String> {
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        if let Some(path) = &outbound.ca_file {
            let pem = std::fs::read(path)
                .map_err(|e| format!("cannot read ca_file {}: {e}", path.display()))?;
            let mut n = 0;
            for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
                let cert = cert.map_err(|e| format!("ca_file {}: {e}", path.display()))?;
                roots
                    .add(cert)
                    .map_err(|e| format!("ca_file {}: {e}", path.display()))?;
                n += 1;
            }
            if n == 0 {
                return Err(format!(
                    "ca_file {} holds no PEM certificate",
                    path.display()
                ));
            }
        }
        let proxy = match &outbound.proxy {
            Some(url) => Some(Arc::new(Proxy::parse(&url.0, &outbound.no_proxy)?)),
            None => None,
        };
        Ok(Sender {
            proxy,
            outbound,
            roots: Arc::new(roots),
            clients: Mutex::new(Vec::new()),
        })
    }

    fn client(&self, verify: bool, connect_timeout: Duration) -> Inner {
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, c)) = clients
            .iter()
            .find(|(k, _)| *k == (verify, connect_timeout))
        {
            return c.clone();
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions");
        let tls = if verify {
            builder
                .with_root_certificates(self.roots.clone())
                .with_no_client_auth()
        } else {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NoVerify(provider)))
                .with_no_client_auth()
        };
        let resolver = GuardedResolver {
            allow: Arc::new(self.outbound.allow_cidrs.clone()),
        };
        let mut http = HttpConnector::new_with_resolver(resolver.clone());
        http.enforce_http(false);
        http.set_connect_timeout(Some(connect_timeout));
        http.set_nodelay(true);
        let connector = Connector::new(http, resolver, self.proxy.clone(), connect_timeout);
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(connector);
        let client: Inner = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(256)
            .build(https);
        clients.push(((verify, connect_timeout), client.clone()));
        client
    }

    /// Checks scheme, port and literal addresses against the policy.
    pub fn check_url(&self, url: &url::Url) -> Result<(), String> {
        match url.scheme() {
            "https" => {}
            "http" if !self.outbound.allow_http => {
                return Err(format!(
                    "plain HTTP to {url} is not allowed; use https, or set `allow_http: true` in the config"
                ));
            }
            "http" => {
                let port = url.port_or_known_default().unwrap_or(80);
                if !self.outbound.http_ports.contains(&port) {
                    return Err(format!(
                        "plain HTTP to port {port} is not allowed; add it to `http_ports` in the config"
                    ));
                }
            }
            other => return Err(format!("scheme {other} is not supported")),
        }
        // Literal addresses skip the resolver, so they are vetted here.
        let literal = match url.host() {
            Some(url::Host::Ipv4(v4)) => Some(IpAddr::V4(v4)),
            Some(url::Host::Ipv6(v6)) => Some(IpAddr::V6(v6)),
            _ => None,
        };
        if let Some(ip) = literal
            && let Some(why) = refuse_address(ip, &self.outbound.allow_cidrs)
        {
            return Err(why);
        }
        Ok(())
    }

    /// Sends one request to `url` and reads the answer, keeping at most
    /// `body_cap` bytes of its body. The request's URI is set here from the
    /// URL that passed the policy check, so what is vetted is what is
    /// requested. The connector bounds the connect by `connect_timeout`;
    /// `reply_timeout` starts when the request is written and covers the
    /// answer, headers and body.
    pub async fn send(
        &self,
        url: &url::Url,
        mut request: http::Request<Full<Bytes>>,
        verify: bool,
        connect_timeout: Duration,
        reply_timeout: Duration,
        body_cap: usize,
    ) -> Result<Response, SendError> {
        self.check_url(url).map_err(SendError::Refused)?;
        *request.uri_mut() = url
            .as_str()
            .parse()
            .map_err(|e| SendError::Refused(format!("bad URL {url}: {e}")))?;
        let client = self.client(verify, connect_timeout);
        let (written, written_rx) = tokio::sync::oneshot::channel();
        let request = request.map(|inner| Watched {
            inner,
            written: Some(written),
        });
        let exchange = async {
            let response = client.request(request).await.map_err(classify)?;
            let status = response.status();
            let headers = response
                .headers()
                .iter()
                .map(|(k, v)| {
                    (
                        k.as_str().to_string(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect();
            let mut body = response.into_body();
            let mut kept = Vec::new();
            let mut truncated = false;
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|e| {
                    SendError::InvalidHttp(format!("reading the response body: {e}"))
                })?;
                if let Ok(data) = frame.into_data() {
                    let room = body_cap.saturating_sub(kept.len());
                    kept.extend_from_slice(&data[..data.len().min(room)]);
                    if data.len() > room {
                        // Stop reading: the rest is not kept, and a huge
                        // body must not hold the connection.
                        truncated = true;
                        break;
                    }
                }
            }
            Ok(Response {
                status: status.as_u16(),
                reason: status.canonical_reason().map(str::to_string),
                headers,
                body: Bytes::from(kept),
                truncated,
            })
        };
        let reply_clock = async {
            match written_rx.await {
                Ok(()) => tokio::time::sleep(reply_timeout).await,
                // Never written: the exchange ends with its own error.
                Err(_) => std::future::pending().await,
            }
        };
        let timed_out = |what: String| Err(SendError::Timeout(what));
        tokio::select! {
            r = exchange => r,
            _ = reply_clock => timed_out(format!(
                "no complete reply within {} s",
                reply_timeout.as_secs_f64()
            )),
            // A backstop: the connector bounds the connect, and the body is
            // written right after it, so this fires only if hyper never
            // writes the request.
            _ = tokio::time::sleep(connect_timeout + reply_timeout) => timed_out(format!(
                "the request was not written and answered within {} s (connect and reply timeouts)",
                (connect_timeout + reply_timeout).as_secs_f64()
            )),
        }
    }
}

fn classify(e: hyper_util::client::legacy::Error) -> SendError {
    use std::error::Error as _;
    let mut chain = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        chain.push_str(": ");
        chain.push_str(&s.to_string());
        source = s.source();
    }
    if chain.contains("PermissionDenied")
        || chain.contains("never allowed")
        || chain.contains("allow_cidrs")
    {
        SendError::Refused(chain)
    } else if chain.contains("timed out") || chain.contains("timeout") {
        SendError::Timeout(chain)
    } else if e.is_connect() {
        SendError::NoReply(chain)
    } else if chain.contains("invalid") || chain.contains("parse") {
        SendError::InvalidHttp(chain)
    } else {
        SendError::NoReply(chain)
    }
}

/// Accepts any certificate: only for rules with `tls: {verify: false}`,
/// which `check` warns about. Signatures are still checked properly so the
/// handshake stays well-formed.
#[derive(Debug)]
struct NoVerify(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::refuse_address;

    #[test]
    fn address_policy() {
        let none: Vec<ipnet::IpNet> = Vec::new();
        let lo: Vec<ipnet::IpNet> = vec!["127.0.0.0/8".parse().unwrap()];
        let cases: &[(&str, &[ipnet::IpNet], bool)] = &[
            ("93.184.216.34", &none, true),
            ("127.0.0.1", &none, false),
            ("127.0.0.1", &lo, true),
            ("10.1.2.3", &none, false),
            ("192.168.1.1", &none, false),
            ("169.254.169.254", &none, false),
            ("169.254.169.254", &[], false),
            ("::1", &none, false),
            ("fe80::1", &none, false),
            ("::ffff:127.0.0.1", &lo, true),
            ("::ffff:169.254.169.254", &lo, false),
            ("fd00:ec2::254", &none, false),
            ("2606:4700::1111", &none, true),
            // IPv4 inside IPv6: compatible, NAT64 and 6to4 forms are vetted
            // as the IPv4 address they deliver to.
            ("::127.0.0.1", &none, false),
            ("::127.0.0.1", &lo, true),
            ("::169.254.169.254", &lo, false),
            ("64:ff9b::7f00:1", &none, false),
            ("64:ff9b::a9fe:a9fe", &lo, false),
            ("64:ff9b::a00:1", &none, false),
            ("64:ff9b::5db8:d822", &none, true),
            ("2002:7f00:1::1", &none, false),
            ("2002:a9fe:a9fe::1", &lo, false),
            ("2002:c0a8:101::", &none, false),
            ("2002:5db8:d822::1", &none, true),
            // IPv6's own loopback and unspecified are not IPv4 in disguise.
            ("::1", &lo, false),
            ("::", &none, false),
        ];
        for (ip, allow, ok) in cases {
            let got = refuse_address(ip.parse().unwrap(), allow);
            assert_eq!(got.is_none(), *ok, "{ip}: {got:?}");
        }
        let all: Vec<ipnet::IpNet> = vec!["0.0.0.0/0".parse().unwrap()];
        assert!(
            refuse_address("169.254.169.254".parse().unwrap(), &all).is_some(),
            "metadata is refused even when allowed"
        );
    }
}
