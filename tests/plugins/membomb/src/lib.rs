//! Allocates without bound: the host's memory cap must trap it with a memory error before it
//! takes memory from anything else.

use rulehook_plugin_sdk::{Context, Outcome, Plugin, Value};

pub struct MemBomb;

impl Plugin for MemBomb {
    fn transform(_: &Context, _: Value, _: &Value) -> Result<Outcome, String> {
        let mut hoard: Vec<Vec<u8>> = Vec::new();
        loop {
            // Touch every page so the memory is really committed, not just reserved.
            hoard.push(std::hint::black_box(vec![1u8; 1 << 20]));
            if hoard.len() == usize::MAX {
                return Ok(Outcome::Skip(format!("{} MiB", hoard.len())));
            }
        }
    }
}

rulehook_plugin_sdk::export_plugin!(MemBomb);
