//! Never returns: the host's CPU deadline (epoch interruption) must stop it and fail the delivery
//! with "timed out", while other deliveries go on.

use rulehook_plugin_sdk::{Context, Outcome, Plugin, Value};

pub struct Spin;

impl Plugin for Spin {
    fn transform(_: &Context, _: Value, _: &Value) -> Result<Outcome, String> {
        let mut n: u64 = 0;
        // `black_box` keeps the optimizer from proving the loop useless and removing it.
        loop {
            n = std::hint::black_box(n.wrapping_add(1));
        }
    }
}

rulehook_plugin_sdk::export_plugin!(Spin);
