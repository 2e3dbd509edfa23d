//! `chorus-cluster`: turns one node into many (ARCHITECTURE.md, Workspace).
//!
//! ```text
//! ClusterSupervisor (this crate's Cluster handle)
//! ├─ NodeServer (ractor_cluster)   authenticated node sessions, process groups
//! │  └─ (with TLS) tls::serve      the cluster port: mutual TLS handshakes, then node sessions
//! ├─ Membership                    seeds/DNS, reconnect, heartbeats, versioned view + ring
//! ├─ Router  (remote-capable)      user-scoped calls for users homed here, heartbeats
//! └─ Relay   (remote-capable)      turn events to edges on other nodes, with credits
//! ```
//!
//! Without a `[cluster]` section a node is a cluster of one: [`Cluster::single`] routes every
//! user to the local sessions and nothing else runs.

pub mod codec;
pub mod homes;
pub mod membership;
pub mod peer;
pub mod relay;
pub mod ring;
pub mod tls;

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use chorus_actors::session::Sessions;
use ractor::{Actor, ActorRef};
use ractor_cluster::node::NodeConnectionMode;
use ractor_cluster::{IncomingEncryptionMode, NodeServer, NodeServerMessage};
use tokio::sync::watch;
use uuid::Uuid;

pub use homes::{EventStream, HomeTurn, Homes, Subscription, turn_events};
pub use membership::{MemberState, MemberView, MembershipConfig, View};
pub use tls::{ClusterTls, TlsError};

use homes::Dispatcher;
use membership::{Membership, MembershipArgs, MembershipMessage, SessionEvents, SharedView};
use peer::{PeerEndpoint, PeerMessage, RELAY_GROUP, ROUTER_GROUP};
use relay::Relay;

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

/// Marks the node joined `settle` after a peer became a member — time for the peers to count
/// this node too and hand over the users it now owns (their limits) — or when `timeout` passes
/// without one (the first node of a new cluster).
fn spawn_join_watch(
    mut changes: watch::Receiver<Arc<View>>,
    joined: Arc<AtomicBool>,
    timeout: Duration,
    settle: Duration,
) {
    tokio::spawn(async move {
        let with_peer = async {
            while changes.borrow_and_update().members.len() < 2 {
                if changes.changed().await.is_err() {
                    return;
                }
            }
        };
        match tokio::time::timeout(timeout, with_peer).await {
            // Peers ping every heartbeat interval: within two, each has counted this node.
            Ok(()) => tokio::time::sleep(settle).await,
            Err(_) => tracing::warn!(
                timeout_ms = timeout.as_millis() as u64,
                "no cluster peer answered in time: serving as a cluster of one"
            ),
        }
        joined.store(true, Ordering::Release);
    });
}

/// Relayed streams of a node, for the admin view.
#[derive(Debug, Clone, Copy)]
pub struct RelayStats {
    pub sending: usize,
    /// Sent streams held back because the edge's client has not consumed its window.
    pub sending_waiting_for_credit: usize,
    pub receiving: usize,
}

/// `[cluster]` as the cluster takes it.
#[derive(Clone)]
pub struct ClusterConfig {
    pub node_name: String,
    /// The node-to-node port.
    pub listen: SocketAddr,
    /// Where peers reach this node; default: `listen` (with the hostname if it is unspecified).
    pub advertise: Option<String>,
    /// Shared secret; never logged.
    pub cookie: String,
    pub seeds: Vec<String>,
    pub seed_dns: Option<String>,
    pub dns_refresh: Duration,
    pub heartbeat_interval: Duration,
    /// A peer silent this long is dead (suspected after half of it).
    pub heartbeat_timeout: Duration,
    /// Longest wait at start for a peer to answer before serving as a cluster of one.
    pub join_timeout: Duration,
    /// Upper bound of one call to a remote home.
    pub call_timeout: Duration,
    pub vnodes: usize,
    /// Mutual TLS between nodes; `None`: plain TCP (the cookie still authenticates).
    pub tls: Option<ClusterTls>,
}

impl fmt::Debug for ClusterConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterConfig")
            .field("node_name", &self.node_name)
            .field("listen", &self.listen)
            .field("advertise", &self.advertise)
            .field("cookie", &"<redacted>")
            .field("seeds", &self.seeds)
            .field("seed_dns", &self.seed_dns)
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("starting the cluster: {0}")]
    Start(String),
    #[error("loading the cluster's TLS files")]
    Tls(#[from] TlsError),
}

async fn bind_cluster_port(listen: SocketAddr) -> Result<tokio::net::TcpListener, ClusterError> {
    tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| ClusterError::Start(format!("binding the cluster port {listen}: {e}")))
}

/// This node's part of the cluster. Cheap to clone.
#[derive(Clone)]
pub struct Cluster {
    local: NodeId,
    view: SharedView,
    changes: watch::Receiver<Arc<View>>,
    homes: Homes,
    relay: Arc<Relay>,
    /// Set once this node has joined (a peer answered, or none did within the join timeout);
    /// until then it is no user's home.
    joined: Arc<AtomicBool>,
    running: Option<Arc<Running>>,
}

struct Running {
    node_server: ActorRef<NodeServerMessage>,
    membership: ActorRef<MembershipMessage>,
    endpoints: Vec<ActorRef<PeerMessage>>,
    /// The TLS accept loop on the cluster port (with TLS only).
    tls_listener: Option<tokio::task::JoinHandle<()>>,
}

impl Cluster {
    /// A cluster of one: every user is homed here.
    pub fn single(local: NodeId, sessions: Sessions, first_wait: Duration) -> Cluster {
        let view = Arc::new(View::initial(local.clone(), String::new(), 1));
        let (tx, changes) = watch::channel(view.clone());
        drop(tx);
        Cluster {
            homes: Homes::local(sessions, first_wait),
            relay: Arc::new(Relay::new(local.as_str().to_owned())),
            local,
            view: Arc::new(RwLock::new(view)),
            changes,
            joined: Arc::new(AtomicBool::new(true)),
            running: None,
        }
    }

    /// Starts the node server, the router, the relay and membership, and begins joining.
    pub async fn start(
        config: ClusterConfig,
        sessions: Sessions,
        store: Arc<dyn chorus_actors::store::Store>,
        first_wait: Duration,
    ) -> Result<Cluster, ClusterError> {
        let local = NodeId::new(config.node_name.clone());
        let advertise = config.advertise.clone().unwrap_or_else(|| {
            if config.listen.ip().is_unspecified() {
                let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "localhost".into());
                format!("{host}:{}", config.listen.port())
            } else {
                config.listen.to_string()
            }
        });
        let vnodes = config.vnodes.max(1);
        let view: SharedView = Arc::new(RwLock::new(Arc::new(View::initial(
            local.clone(),
            advertise.clone(),
            vnodes,
        ))));
        let initial = view
            .read()
            .map(|v| v.clone())
            .map_err(|_| ClusterError::Start("view poisoned".into()))?;
        let (changes_tx, changes) = watch::channel(initial);
        let relay = Arc::new(Relay::new(local.as_str().to_owned()));

        let tls = config.tls.as_ref().map(tls::Tls::load).transpose()?;
        // Without TLS the node server listens on the cluster port itself. With TLS, `tls::serve`
        // does (see `tls` for why), and the node server's own listener, which cannot be turned
        // off, sits on an ephemeral loopback port behind the same mutual-TLS acceptor.
        let (port, listen_ip, encryption) = match &tls {
            None => (config.listen.port(), config.listen.ip(), None),
            Some(tls) => (
                0,
                Ipv4Addr::LOCALHOST.into(),
                Some(IncomingEncryptionMode::Tls(tls.acceptor.clone())),
            ),
        };
        let tls_port = match &tls {
            None => None,
            Some(_) => Some(bind_cluster_port(config.listen).await?),
        };
        let server = NodeServer::new(
            port,
            config.cookie.clone(),
            local.as_str().to_owned(),
            advertise
                .rsplit_once(':')
                .map_or(advertise.clone(), |(host, _)| host.to_owned()),
            encryption,
            Some(NodeConnectionMode::Isolated),
        )
        .with_listen_addr(listen_ip);
        let (node_server, _) = Actor::spawn(None, server, ())
            .await
            .map_err(|e| ClusterError::Start(format!("node server: {e}")))?;
        let tls_listener = match (&tls, tls_port) {
            (Some(tls), Some(listener)) => Some(tokio::spawn(tls::serve(
                listener,
                tls.acceptor.clone(),
                node_server.clone(),
            ))),
            _ => None,
        };

        let dispatcher = Arc::new(Dispatcher {
            sessions: sessions.clone(),
            view: view.clone(),
            relay: relay.clone(),
            membership: OnceLock::new(),
            first_wait,
        });
        let mut endpoints = Vec::new();
        for group in [ROUTER_GROUP, RELAY_GROUP] {
            let (endpoint, _) = Actor::spawn(
                None,
                PeerEndpoint,
                (dispatcher.clone() as Arc<dyn peer::Inbox>, group),
            )
            .await
            .map_err(|e| ClusterError::Start(format!("{group}: {e}")))?;
            endpoints.push(endpoint);
        }
        let own_addr = advertise.clone();
        let membership_config = MembershipConfig {
            local: local.clone(),
            advertise,
            seeds: config.seeds.clone(),
            seed_dns: config.seed_dns.clone(),
            dns_refresh: config.dns_refresh,
            heartbeat_interval: config.heartbeat_interval,
            heartbeat_timeout: config.heartbeat_timeout,
            vnodes,
        };
        let (membership, _) = Actor::spawn(
            None,
            Membership,
            MembershipArgs {
                config: membership_config,
                node_server: node_server.clone(),
                view: view.clone(),
                changes: changes_tx,
                relay: relay.clone(),
                tls,
            },
        )
        .await
        .map_err(|e| ClusterError::Start(format!("membership: {e}")))?;
        let _ = dispatcher.membership.set(membership.clone());
        node_server
            .cast(NodeServerMessage::SubscribeToEvents {
                id: "chorus.membership".into(),
                subscription: Box::new(SessionEvents(membership.clone())),
            })
            .map_err(|e| ClusterError::Start(format!("subscribing to node events: {e}")))?;
        let joined = Arc::new(AtomicBool::new(false));
        let has_seeds = config.seed_dns.is_some()
            || config
                .seeds
                .iter()
                .any(|seed| *seed != own_addr && *seed != config.listen.to_string());
        if has_seeds {
            spawn_join_watch(
                changes.clone(),
                joined.clone(),
                config.join_timeout,
                config.heartbeat_interval * 2,
            );
        } else {
            joined.store(true, Ordering::Release);
        }
        tracing::info!(
            node = %local,
            listen = %config.listen,
            seeds = ?config.seeds,
            seed_dns = ?config.seed_dns,
            tls = config.tls.is_some(),
            "cluster node started"
        );
        Ok(Cluster {
            homes: Homes::clustered(
                sessions,
                store,
                joined.clone(),
                view.clone(),
                relay.clone(),
                config.call_timeout,
                first_wait,
            ),
            relay,
            local,
            view,
            changes,
            joined,
            running: Some(Arc::new(Running {
                node_server,
                membership,
                endpoints,
                tls_listener,
            })),
        })
    }

    pub fn local_node(&self) -> &NodeId {
        &self.local
    }

    /// Whether this node runs with peers (a `[cluster]` section).
    pub fn is_clustered(&self) -> bool {
        self.running.is_some()
    }

    pub fn homes(&self) -> &Homes {
        &self.homes
    }

    /// The current view (members, ring).
    pub fn view(&self) -> Arc<View> {
        self.view
            .read()
            .map(|v| v.clone())
            .unwrap_or_else(|poisoned| poisoned.into_inner().clone())
    }

    /// Announces every change of members or ring.
    pub fn changes(&self) -> watch::Receiver<Arc<View>> {
        self.changes.clone()
    }

    /// Whether this node is still joining (no peer answered yet, and the join timeout has not
    /// passed): it is then no user's home, and not ready.
    pub fn is_joining(&self) -> bool {
        !self.joined.load(Ordering::Acquire)
    }

    /// Whether `user` is homed on this node now.
    pub fn is_home(&self, user: Uuid) -> bool {
        let view = self.view();
        view.ring
            .home(user)
            .is_none_or(|home| home == self.local.as_str())
    }

    /// Relayed streams this node sends (as a home) and receives (as an edge).
    pub fn relay_stats(&self) -> RelayStats {
        RelayStats {
            sending: self.relay.pumps(),
            sending_waiting_for_credit: self.relay.pumps_waiting_for_credit(),
            receiving: self.relay.inbound(),
        }
    }

    /// Starts leaving: peers take this node out of the ring now; it keeps serving what runs.
    pub async fn leave(&self) {
        if let Some(running) = &self.running {
            let _ = ractor::call_t!(running.membership, MembershipMessage::Leave, 2_000);
        }
    }

    /// Stops the cluster actors (after [`Cluster::leave`] and draining).
    pub async fn stop(&self) {
        if let Some(running) = &self.running {
            if let Some(listener) = &running.tls_listener {
                listener.abort();
            }
            running.membership.stop(None);
            for endpoint in &running.endpoints {
                endpoint.stop(None);
            }
            let _ = running
                .node_server
                .stop_and_wait(Some("shutdown".into()), Some(Duration::from_secs(2)))
                .await;
        }
    }
}
