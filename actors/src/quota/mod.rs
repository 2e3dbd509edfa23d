//! Rate limiting. Today: the in-process keyed token bucket the edge uses for per-IP and
//! per-account limits on public routes (login, register, refresh). The provider and per-user
//! buckets, and the Redis backend shared by all nodes, join this module with the quota issue.

mod local;

pub use local::{Decision, KeyedLimiter, LimitSpec};
mod buckets;
pub mod tiers;
pub use buckets::{Admission, BackendHealth, BucketSpec, TokenBuckets};
