//! rulehook: a webhook rule engine.
//!
//! An event travels through the modules in this order, and the folders are
//! named after the stages:
//!
//! - [`event`]: the entity event senders post, and the changes an update carries.
//! - [`rules`]: rule files parsed, validated and indexed; which rules match
//!   an event and why not. Pure: no I/O, clock or randomness.
//! - [`payload`]: the payload a matching rule starts from.
//! - [`plugins`]: the rule's WASM plugin chain that reshapes it (wasmtime).
//! - [`ingest`], [`outbox`], [`store`]: matched, built and durably stored,
//!   each delivery bound to the rule version that matched it ([`targets`]).
//! - [`deliver`], [`sign`]: signed and sent, retried, every attempt recorded.
//! - [`api`], [`serve`], [`reload`]: the server around them; [`cluster`]:
//!   the node's part when many share one PostgreSQL store.
//! - [`metrics`], [`telemetry`]: what operators watch: `/metrics`, logs,
//!   and OTLP traces of every stage.
//! - [`cli`]: the `rulehook` command line.
//!
//! See ARCHITECTURE.md for the whole flow and the invariants.

pub mod admin_client;
pub mod api;
pub mod channel_cli;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod deliver;
pub mod event;
pub mod ingest;
pub mod listen;
pub mod metrics;
pub mod outbox;
pub mod payload;
pub mod plugin_cli;
pub mod plugins;
pub mod reload;
pub mod rules;
pub mod serve;
pub mod sign;
pub mod store;
pub mod store_cli;
pub mod targets;
pub mod telemetry;
pub mod time;
