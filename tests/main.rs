//! rulehook's integration tests: the real `rulehook` binary, run as a user
//! would, against real files (and, for delivery, real servers on 127.0.0.1).
//! One test binary, grouped by purpose.

mod support;

mod cli_delivery;
mod cli_rules;
mod cluster;
mod console_api;
mod console_browser;
mod delivery;
mod disk_full;
mod failure;
mod observability;
mod ordering;
mod plugin_languages;
mod plugins;
mod proxy;
mod reload;
mod rule_limits;
mod server_limits;
mod shutdown;
mod websocket;
