#![allow(dead_code)]
pub mod redis_server;
