//! The consistent-hash ring: which node is each user's home.
//!
//! `consistent_hash` (pinned; its ring is static) is rebuilt on every membership change. Nodes
//! and users are hashed from explicit bytes with a fixed function (FNV-1a, then a 64-bit
//! finaliser), so every node — whatever its build or platform — computes the same home.

use std::hash::{Hash, Hasher};

use consistent_hash::{Node, RingHash, StaticHashRing};
use uuid::Uuid;

use crate::NodeId;

/// Virtual nodes per member: enough for an even spread over a handful of nodes.
pub const DEFAULT_VNODES: usize = 128;

/// A user's ring key: the 16 bytes of the id, nothing else.
struct UserKey([u8; 16]);

impl Hash for UserKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write(&self.0);
    }
}

/// A member's name and virtual-node number as explicit bytes.
struct VnodeKey<'a>(&'a str, u32);

impl Hash for VnodeKey<'_> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write(self.0.as_bytes());
        state.write(b"#");
        state.write(&self.1.to_be_bytes());
    }
}

/// FNV-1a over the written bytes, finalised so that nearby inputs spread over the ring.
#[derive(Default)]
struct StableHasher(u64);

impl Hasher for StableHasher {
    fn write(&mut self, bytes: &[u8]) {
        if self.0 == 0 {
            self.0 = 0xcbf2_9ce4_8422_2325;
        }
        for byte in bytes {
            self.0 ^= u64::from(*byte);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    fn finish(&self) -> u64 {
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

#[derive(Debug, Clone, Copy)]
struct StableHash;

impl RingHash for StableHash {
    fn hash_item<T: Hash>(&self, item: &T) -> u64 {
        let mut hasher = StableHasher::default();
        item.hash(&mut hasher);
        hasher.finish()
    }

    fn hash_vnode<K: Hash>(&self, node_key: &K, vnode_seq: usize) -> u64 {
        // Node keys are member names; hash them as bytes with the sequence number.
        let mut name = NameBytes::default();
        node_key.hash(&mut name);
        let name = String::from_utf8_lossy(&name.0);
        self.hash_item(&VnodeKey(&name, vnode_seq as u32))
    }
}

/// Collects the bytes a `String` key writes (its UTF-8, then a 0xff terminator, dropped here).
#[derive(Default)]
struct NameBytes(Vec<u8>);

impl Hasher for NameBytes {
    fn write(&mut self, bytes: &[u8]) {
        self.0.extend_from_slice(bytes);
    }

    fn write_u8(&mut self, byte: u8) {
        // `str`'s Hash ends with 0xff; it is not part of the name.
        if byte != 0xff {
            self.0.push(byte);
        }
    }

    fn finish(&self) -> u64 {
        0
    }
}

/// One version of the ring.
pub struct Ring {
    members: Vec<NodeId>,
    ring: StaticHashRing<'static, String, (), StableHash>,
    vnodes: usize,
}

impl Ring {
    /// A ring over `members` (order does not matter; duplicates are ignored).
    pub fn new(members: impl IntoIterator<Item = NodeId>, vnodes: usize) -> Ring {
        let mut members: Vec<NodeId> = members.into_iter().collect();
        members.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        members.dedup();
        let nodes = members
            .iter()
            .map(|m| Node::new(m.as_str().to_owned()).quantity(vnodes.max(1)));
        Ring {
            ring: StaticHashRing::new(StableHash, nodes),
            members,
            vnodes: vnodes.max(1),
        }
    }

    /// The home of `user`; `None` only for an empty ring.
    pub fn home(&self, user: Uuid) -> Option<&str> {
        self.ring
            .calc_candidates(&UserKey(*user.as_bytes()))
            .next()
            .map(|node| node.key.as_str())
    }

    pub fn members(&self) -> &[NodeId] {
        &self.members
    }

    pub fn vnodes(&self) -> usize {
        self.vnodes
    }

    /// A short fingerprint of the ring (members and vnodes), equal on every node that built the
    /// same ring.
    pub fn digest(&self) -> String {
        let mut hasher = StableHasher::default();
        for member in &self.members {
            hasher.write(member.as_str().as_bytes());
            hasher.write(b"\n");
        }
        hasher.write(&(self.vnodes as u64).to_be_bytes());
        format!("{:016x}", hasher.finish())
    }
}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring")
            .field("members", &self.members)
            .field("vnodes", &self.vnodes)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(names: &[&str]) -> Ring {
        Ring::new(names.iter().map(|n| NodeId::new(*n)), DEFAULT_VNODES)
    }

    #[test]
    fn every_node_computes_the_same_home() {
        let a = ring(&["node-a", "node-b", "node-c"]);
        let b = ring(&["node-c", "node-a", "node-b", "node-a"]);
        assert_eq!(a.digest(), b.digest());
        for _ in 0..1000 {
            let user = Uuid::new_v4();
            assert_eq!(a.home(user), b.home(user));
        }
    }

    #[test]
    fn homes_are_fixed_values_not_process_dependent() {
        // The hash is ours, over explicit bytes: these answers never change between builds.
        let r = ring(&["node-a", "node-b", "node-c"]);
        let user = Uuid::from_u128(0x0192_0000_0000_7000_8000_0000_0000_0001);
        let first = r.home(user).map(str::to_owned);
        assert_eq!(
            ring(&["node-b", "node-c", "node-a"])
                .home(user)
                .map(str::to_owned),
            first
        );
        assert_eq!(
            StableHash.hash_item(&UserKey([0; 16])),
            StableHash.hash_item(&UserKey([0; 16]))
        );
    }

    #[test]
    fn spread_is_even_and_moves_are_minimal() {
        let three = ring(&["node-a", "node-b", "node-c"]);
        let users: Vec<Uuid> = (0..30_000).map(|_| Uuid::new_v4()).collect();
        let mut counts = std::collections::HashMap::new();
        for user in &users {
            *counts
                .entry(three.home(*user).unwrap_or(""))
                .or_insert(0usize) += 1;
        }
        for (node, count) in &counts {
            assert!(
                (7_000..13_000).contains(count),
                "{node} got {count} of 30000 users"
            );
        }
        // Adding a fourth node moves only users to it, about a quarter of them.
        let four = ring(&["node-a", "node-b", "node-c", "node-d"]);
        let mut moved = 0;
        for user in &users {
            let (before, after) = (three.home(*user), four.home(*user));
            if before != after {
                assert_eq!(after, Some("node-d"));
                moved += 1;
            }
        }
        assert!((4_000..11_000).contains(&moved), "{moved} moved");
    }

    #[test]
    fn an_empty_ring_has_no_home() {
        assert_eq!(ring(&[]).home(Uuid::new_v4()), None);
    }
}
