//! `chorus-cluster`: turns one node into many (ARCHITECTURE.md, Workspace).
//!
//! Today a node is a cluster of one: [`Placement`] answers every user's home with this node, so
//! the edge's routing decision exists from day one and the cluster issue swaps in the
//! consistent-hash ring, membership and cross-node calls behind the same question.

use std::fmt;

use uuid::Uuid;

/// A node's name in the cluster (default: the hostname).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NodeId(String);

impl NodeId {
    pub fn new(name: impl Into<String>) -> Self {
        NodeId(name.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where each user's `UserSession` lives. Cheap and local: no I/O.
#[derive(Debug, Clone)]
pub struct Placement {
    local: NodeId,
}

impl Placement {
    /// A cluster of one: every user is homed on `local`.
    pub fn single_node(local: NodeId) -> Self {
        Placement { local }
    }

    pub fn local_node(&self) -> &NodeId {
        &self.local
    }

    /// The node that owns `user`'s session.
    pub fn home(&self, _user: Uuid) -> &NodeId {
        &self.local
    }

    pub fn is_local(&self, user: Uuid) -> bool {
        self.home(user) == &self.local
    }

    /// Members of the placement ring, for `/readyz` and the admin view.
    pub fn members(&self) -> Vec<&NodeId> {
        vec![&self.local]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_single_node_homes_everyone_locally() {
        let placement = Placement::single_node(NodeId::new("node-a"));
        for _ in 0..100 {
            let user = Uuid::now_v7();
            assert_eq!(placement.home(user).as_str(), "node-a");
            assert!(placement.is_local(user));
        }
        assert_eq!(placement.members().len(), 1);
    }
}
