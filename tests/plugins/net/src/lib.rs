//! Tries the network: a TCP connection to a loopback port and a name lookup. The sandbox links
//! `wasi:sockets` as traps, so the call must fail with "plugins have no network access", never
//! with an OS error that would tell the guest what exists on the host's network.

use std::net::{TcpStream, ToSocketAddrs};

use rulehook_plugin_sdk::{Context, Outcome, Plugin, Value};

pub struct Net;

impl Plugin for Net {
    fn transform(_: &Context, _: Value, config: &Value) -> Result<Outcome, String> {
        if config.get("lookup").is_some() {
            return match "localhost:80".to_socket_addrs() {
                Ok(addrs) => Err(format!(
                    "resolved localhost to {:?}",
                    addrs.collect::<Vec<_>>()
                )),
                Err(e) => Err(format!("lookup failed: {e}")),
            };
        }
        match TcpStream::connect("127.0.0.1:1") {
            Ok(_) => Err("connected to 127.0.0.1:1".into()),
            Err(e) => Err(format!("connect failed: {e}")),
        }
    }
}

rulehook_plugin_sdk::export_plugin!(Net);
