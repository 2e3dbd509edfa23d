//! The edge of Chorus: CLI, configuration, HTTP API, authentication, telemetry and wiring.
//! It never holds user state: it verifies, routes to the user's session (`chorus-actors`), and
//! writes bytes to sockets. See ARCHITECTURE.md for the map.

pub mod app;
pub mod auth;
pub mod cli;
pub mod config;
pub mod edge;
pub mod handoff;
pub mod http;
pub mod telemetry;
