//! End-to-end tests: every test spawns the real `chorus` binary (port 0, its own temp data dir)
//! and talks to it over HTTP, as a client would. One binary for all of `tests/api/`, so the
//! harness is compiled once. Set `TEST_LOG=1` to see the servers' logs.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod helpers;

mod account;
mod admin;
mod auth;
mod billing;
mod chat;
mod cli;
mod cluster;
mod cluster_tls;
mod documents;
mod edge;
mod isolation;
mod lifecycle;
mod limits;
mod messages;
mod metrics;
mod openai_compat;
mod providers;
mod quota;
mod routing;
mod threads;
mod validation;
mod ws;
