//! Sending through an outbound HTTP proxy (`proxy` in the config), as
//! corporate networks require. Every connection the `no_proxy` list does
//! not exempt is a CONNECT tunnel through the proxy, for `https` and plain
//! `http` alike, and the tunnel goes to the address rulehook resolved and
//! vetted itself: the proxy never gets a name it could resolve to somewhere
//! the outbound policy forbids. TLS runs inside the tunnel, end to end with
//! the endpoint, checked against the endpoint's name.
//!
//! The proxy's own address is not vetted: the admin chose it, and it is
//! usually on a private network.

use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use http::Uri;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::connect::dns::Name;
use hyper_util::rt::TokioIo;
use ipnet::IpNet;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tower_service::Service;

use super::client::GuardedResolver;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A proxy's reply to CONNECT larger than this is not a proxy's reply.
const MAX_REPLY_HEAD: usize = 16 << 10;

/// Where not to use the proxy.
#[derive(Clone, Debug, PartialEq)]
enum Exempt {
    /// `*`: nowhere (the proxy is off).
    All,
    /// A name and its subdomains (`example.com`, `.example.com` and
    /// `*.example.com` all mean this, as in curl's `NO_PROXY`).
    Domain(String),
    /// Addresses, literal or resolved.
    Net(IpNet),
}

/// The outbound proxy and what bypasses it.
#[derive(Clone, PartialEq)]
pub struct Proxy {
    host: String,
    port: u16,
    /// `Basic <base64 user:password>` from the proxy URL's user info.
    authorization: Option<String>,
    exempt: Vec<Exempt>,
}

impl std::fmt::Debug for Proxy {
    // The credentials stay out of logs and error messages.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Proxy({self}, exempt: {:?})", self.exempt)
    }
}

impl std::fmt::Display for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

impl Proxy {
    /// Parses `http://[user:password@]host[:port]` and the `no_proxy`
    /// entries (names, `.suffix`, `*.suffix`, IPs, CIDRs or `*`).
    pub fn parse(url: &str, no_proxy: &[String]) -> Result<Proxy, String> {
        let u = url::Url::parse(url).map_err(|e| {
            format!("`{url}` is not a URL ({e}); write e.g. http://proxy.example.com:3128")
        })?;
        if u.scheme() != "http" {
            return Err(format!(
                "the proxy must be an http:// URL (rulehook talks to it in plain HTTP and tunnels TLS through it), not {}://",
                u.scheme()
            ));
        }
        let host = u
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| format!("`{url}` has no host"))?
            .trim_matches(['[', ']'])
            .to_string();
        let decode = |s: &str| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8_lossy()
                .into_owned()
        };
        let authorization = (!u.username().is_empty()).then(|| {
            let pair = format!(
                "{}:{}",
                decode(u.username()),
                decode(u.password().unwrap_or_default())
            );
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(pair)
            )
        });
        let exempt = no_proxy
            .iter()
            .map(|e| e.trim())
            .filter(|e| !e.is_empty())
            .map(|e| {
                if e == "*" {
                    Exempt::All
                } else if let Ok(net) = e.parse::<IpNet>() {
                    Exempt::Net(net)
                } else if let Ok(ip) = e.trim_matches(['[', ']']).parse::<IpAddr>() {
                    Exempt::Net(IpNet::from(ip))
                } else {
                    let name = e.trim_start_matches('*').trim_start_matches('.');
                    Exempt::Domain(name.to_ascii_lowercase())
                }
            })
            .collect();
        Ok(Proxy {
            host,
            port: u.port().unwrap_or(3128),
            authorization,
            exempt,
        })
    }

    /// True when `host` (a name, or an address as written) goes direct.
    fn exempts_name(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        self.exempt.iter().any(|e| match e {
            Exempt::All => true,
            Exempt::Domain(d) => {
                host == *d
                    || host
                        .strip_suffix(d.as_str())
                        .is_some_and(|s| s.ends_with('.'))
            }
            Exempt::Net(_) => false,
        })
    }

    /// True when the resolved (or literal) address goes direct.
    fn exempts_ip(&self, ip: IpAddr) -> bool {
        self.exempt
            .iter()
            .any(|e| matches!(e, Exempt::Net(net) if net.contains(&ip)))
    }
}

/// The connector the HTTP client uses: direct, or through the proxy.
#[derive(Clone)]
pub struct Connector {
    direct: HttpConnector<GuardedResolver>,
    resolver: GuardedResolver,
    proxy: Option<Arc<Proxy>>,
    connect_timeout: Duration,
}

impl Connector {
    pub fn new(
        direct: HttpConnector<GuardedResolver>,
        resolver: GuardedResolver,
        proxy: Option<Arc<Proxy>>,
        connect_timeout: Duration,
    ) -> Connector {
        Connector {
            direct,
            resolver,
            proxy,
            connect_timeout,
        }
    }
}

impl Service<Uri> for Connector {
    type Response = TokioIo<TcpStream>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.direct.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let host = uri
            .host()
            .unwrap_or_default()
            .trim_matches(['[', ']'])
            .to_string();
        let proxy = match &self.proxy {
            Some(p) if !p.exempts_name(&host) => p.clone(),
            _ => {
                let direct = self.direct.call(uri);
                return Box::pin(async move { direct.await.map_err(Into::into) });
            }
        };
        let mut resolver = self.resolver.clone();
        let timeout = self.connect_timeout;
        Box::pin(async move {
            let port = uri
                .port_u16()
                .unwrap_or(if uri.scheme_str() == Some("https") {
                    443
                } else {
                    80
                });
            let connect = async {
                // The same vetting as a direct connection: resolve once,
                // refuse forbidden addresses, use the vetted one.
                let ip = match host.parse::<IpAddr>() {
                    Ok(ip) => ip, // a literal, vetted with the URL
                    Err(_) => {
                        let name: Name = host
                            .parse()
                            .map_err(|e| format!("bad host name {host}: {e}"))?;
                        let mut addrs = resolver.call(name).await?;
                        addrs
                            .next()
                            .ok_or_else(|| format!("{host}: the name has no addresses"))?
                            .ip()
                    }
                };
                let target = SocketAddr::new(ip, port);
                if proxy.exempts_ip(ip) {
                    let stream = TcpStream::connect(target).await?;
                    let _ = stream.set_nodelay(true);
                    return Ok(TokioIo::new(stream));
                }
                tunnel(&proxy, target).await.map(TokioIo::new)
            };
            match tokio::time::timeout(timeout, connect).await {
                Ok(result) => result,
                Err(_) => Err(format!(
                    "connecting to {host}:{port} through proxy {proxy} timed out after {} s",
                    timeout.as_secs_f64()
                )
                .into()),
            }
        })
    }
}

/// Opens a CONNECT tunnel through `proxy` to `target`.
async fn tunnel(proxy: &Proxy, target: SocketAddr) -> Result<TcpStream, BoxError> {
    let mut stream = TcpStream::connect((proxy.host.as_str(), proxy.port))
        .await
        .map_err(|e| format!("cannot connect to proxy {proxy}: {e}"))?;
    let _ = stream.set_nodelay(true);
    let mut head = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
    if let Some(auth) = &proxy.authorization {
        head.push_str(&format!("Proxy-Authorization: {auth}\r\n"));
    }
    head.push_str("\r\n");
    stream
        .write_all(head.as_bytes())
        .await
        .map_err(|e| format!("proxy {proxy}: sending CONNECT: {e}"))?;
    // Read the reply's head only: the endpoint says nothing before the
    // client speaks (HTTP and TLS both start with the client), so nothing
    // of the tunnel is read here.
    let mut reply = Vec::with_capacity(256);
    let mut byte = [0u8; 512];
    while !reply.ends_with(b"\r\n\r\n") {
        let n = stream
            .read(&mut byte)
            .await
            .map_err(|e| format!("proxy {proxy}: reading the CONNECT reply: {e}"))?;
        if n == 0 {
            return Err(format!(
                "proxy {proxy} closed the connection instead of answering CONNECT {target}"
            )
            .into());
        }
        reply.extend_from_slice(&byte[..n]);
        if reply.len() > MAX_REPLY_HEAD {
            return Err(format!("proxy {proxy}: the CONNECT reply has no end").into());
        }
    }
    let status_line = String::from_utf8_lossy(&reply)
        .lines()
        .next()
        .unwrap_or_default()
        .to_string();
    let code = status_line.split_whitespace().nth(1).unwrap_or_default();
    if !code.starts_with('2') || code.len() != 3 {
        return Err(format!("proxy {proxy} refused CONNECT {target}: {status_line}").into());
    }
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_urls_and_credentials() {
        let p = Proxy::parse("http://hook:p%40ss@proxy.corp:8080", &[]).unwrap();
        assert_eq!(p.to_string(), "proxy.corp:8080");
        let basic = base64::engine::general_purpose::STANDARD.encode("hook:p@ss");
        assert_eq!(p.authorization, Some(format!("Basic {basic}")));
        assert!(!format!("{p:?}").contains(&basic), "credentials in Debug");
        assert_eq!(Proxy::parse("http://proxy.corp", &[]).unwrap().port, 3128);
        assert_eq!(Proxy::parse("http://[::1]:3128", &[]).unwrap().host, "::1");
        for (bad, says) in [
            ("https://proxy.corp:3128", "must be an http:// URL"),
            ("proxy.corp:3128", "must be an http:// URL"),
            ("not a url", "is not a URL"),
        ] {
            let e = Proxy::parse(bad, &[]).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn what_bypasses_the_proxy() {
        let list: Vec<String> = [
            "localhost",
            ".internal.example",
            "*.corp.test",
            "10.0.0.0/8",
            "::1",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let p = Proxy::parse("http://proxy:3128", &list).unwrap();
        let names = [
            ("localhost", true),
            ("LOCALHOST.", true),
            ("internal.example", true),
            ("api.internal.example", true),
            ("notinternal.example", false),
            ("build.corp.test", true),
            ("ci.example.com", false),
        ];
        for (name, direct) in names {
            assert_eq!(p.exempts_name(name), direct, "{name}");
        }
        let ips = [
            ("10.1.2.3", true),
            ("11.0.0.1", false),
            ("::1", true),
            ("::2", false),
        ];
        for (ip, direct) in ips {
            assert_eq!(p.exempts_ip(ip.parse().unwrap()), direct, "{ip}");
        }
        let all = Proxy::parse("http://proxy:3128", &["*".to_string()]).unwrap();
        assert!(all.exempts_name("anything.example"));
    }
}
