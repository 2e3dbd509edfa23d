//! `chorus-actors`: the node runtime of Chorus — every part that has state, each owned by an actor.
//!
//! ```text
//! NodeSupervisor
//! └── SessionSupervisor ── UserSession(user)      one per active user, passivated when idle
//! ```
//!
//! The edge (`src/`) never holds user state: it authenticates, then asks the user's home
//! `UserSession` (through [`session::Sessions`]) to change anything, and may read straight from
//! the [`store::Store`].

pub mod indexer;
pub mod metrics;
pub mod node;
pub mod provider;
pub mod quota;
pub mod session;
pub mod store;

pub use node::Node;
