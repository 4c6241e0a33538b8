//! Reports what a plugin can observe of the world: the wall clock, the monotonic clock (before
//! and after a 10 s sleep), random bytes from `wasi:random/random` and `wasi:random/insecure`,
//! and a `HashMap`'s iteration order (std seeds it from `wasi:random/insecure-seed`). It also
//! writes a line to stdout and one to stderr. In the host's sandbox every value is the same on
//! every run for the same input, and the sleep takes no real time.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rulehook_plugin_sdk::{Context, Outcome, Plugin, Value, json};

#[cfg(target_arch = "wasm32")]
mod wasi_random {
    wit_bindgen::generate!({
        inline: "
            package rulehook-test:entropy;

            package wasi:random@0.2.0 {
                interface random {
                    get-random-bytes: func(len: u64) -> list<u8>;
                    get-random-u64: func() -> u64;
                }
                interface insecure {
                    get-insecure-random-bytes: func(len: u64) -> list<u8>;
                    get-insecure-random-u64: func() -> u64;
                }
                interface insecure-seed {
                    insecure-seed: func() -> tuple<u64, u64>;
                }
            }

            world probes {
                import wasi:random/random@0.2.0;
                import wasi:random/insecure@0.2.0;
            }
        ",
        world: "probes",
        generate_all,
    });

    pub fn secure(n: u64) -> Vec<u8> {
        wasi::random::random::get_random_bytes(n)
    }

    pub fn insecure(n: u64) -> Vec<u8> {
        wasi::random::insecure::get_insecure_random_bytes(n)
    }
}

#[cfg(not(target_arch = "wasm32"))]
mod wasi_random {
    pub fn secure(n: u64) -> Vec<u8> {
        vec![0; n as usize]
    }

    pub fn insecure(n: u64) -> Vec<u8> {
        vec![0; n as usize]
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub struct Entropy;

impl Plugin for Entropy {
    fn transform(ctx: &Context, _: Value, _: &Value) -> Result<Outcome, String> {
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let start = Instant::now();
        std::thread::sleep(Duration::from_secs(10));
        let slept = start.elapsed().as_nanos() as u64;
        let order: Vec<u32> = (0..16u32)
            .map(|i| (i, ()))
            .collect::<std::collections::HashMap<_, _>>()
            .into_keys()
            .collect();
        println!("entropy says hello on stdout for {}", ctx.event_id);
        eprintln!("entropy says hello on stderr");
        Ok(Outcome::Send(json!({
            "event_id": ctx.event_id,
            "wall_clock_ns": wall,
            "slept_ns": slept,
            "random": hex(&wasi_random::secure(16)),
            "insecure_random": hex(&wasi_random::insecure(16)),
            "hash_order": order,
        })))
    }
}

rulehook_plugin_sdk::export_plugin!(Entropy);
