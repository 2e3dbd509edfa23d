//! Membership: who is in the cluster, as this node sees it.
//!
//! ractor_cluster gives authenticated node sessions and synchronized process groups, nothing
//! more (DEPENDENCIES.md, trap 2). On top of it this actor:
//! - connects to the seeds (a static list, or a DNS name re-resolved periodically) and to every
//!   peer the others know, retrying each address with exponential backoff;
//! - counts a peer only once it answered our heartbeat — which needs an authenticated, synced
//!   session — and keeps pinging every peer: a peer silent for `suspect_after` is suspected, for
//!   `heartbeat_timeout` it is dead: removed, its session stopped (a half-open connection is
//!   noticed this way), its streams ended, and the ring rebuilt without it;
//! - publishes each change as a new versioned [`View`] (members and ring) that placement reads.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use ractor_cluster::node::NodeServerSessionInformation;
use ractor_cluster::{NodeServerMessage, RactorMessage};
use tokio::sync::watch;

use crate::NodeId;
use crate::codec::{self, AnnouncedState, Cast, Heartbeat, Reply, Request};
use crate::peer::{PeerMessage, RELAY_GROUP, ROUTER_GROUP};
use crate::relay::Relay;
use crate::ring::Ring;
use crate::tls::{self, Tls};

/// Settings of membership (from `[cluster]`).
#[derive(Debug, Clone)]
pub struct MembershipConfig {
    pub local: NodeId,
    /// Where peers reach this node (`host:port`).
    pub advertise: String,
    pub seeds: Vec<String>,
    /// A DNS name (`host:port`) whose addresses are all seeds, re-resolved every `dns_refresh`.
    pub seed_dns: Option<String>,
    pub dns_refresh: Duration,
    pub heartbeat_interval: Duration,
    pub heartbeat_timeout: Duration,
    pub vnodes: usize,
}

/// A member's state as this node sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemberState {
    Alive,
    /// Missed heartbeats for a while; still a home until declared dead.
    Suspected,
    /// Announced it is leaving: no longer a home, still finishing its turns.
    Leaving,
}

impl MemberState {
    pub fn as_str(self) -> &'static str {
        match self {
            MemberState::Alive => "alive",
            MemberState::Suspected => "suspected",
            MemberState::Leaving => "leaving",
        }
    }
}

#[derive(Debug, Clone)]
pub struct MemberView {
    pub name: String,
    pub addr: String,
    pub state: MemberState,
    /// Since the last heartbeat answer (`None` for this node itself).
    pub last_heard: Option<Duration>,
}

/// The routers and relays of a peer, for calls and casts to it.
#[derive(Clone)]
pub(crate) struct PeerRefs {
    pub router: ActorRef<PeerMessage>,
    pub relay: ActorRef<PeerMessage>,
}

/// One version of the membership: members (this node included) and the ring over the homes.
pub struct View {
    /// Grows by one with every change this node sees.
    pub version: u64,
    pub local: NodeId,
    pub members: Vec<MemberView>,
    pub ring: Arc<Ring>,
    pub(crate) peers: HashMap<String, PeerRefs>,
}

impl View {
    pub(crate) fn initial(local: NodeId, advertise: String, vnodes: usize) -> View {
        View {
            version: 1,
            ring: Arc::new(Ring::new([local.clone()], vnodes)),
            members: vec![MemberView {
                name: local.as_str().to_owned(),
                addr: advertise,
                state: MemberState::Alive,
                last_heard: None,
            }],
            local,
            peers: HashMap::new(),
        }
    }

    /// What this node answers to a peer's heartbeat.
    pub(crate) fn heartbeat(&self) -> Heartbeat {
        let local = self.local.as_str();
        let me = self.members.iter().find(|m| m.name == local);
        Heartbeat {
            name: local.to_owned(),
            addr: me.map(|m| m.addr.clone()).unwrap_or_default(),
            state: match me.map(|m| m.state) {
                Some(MemberState::Leaving) => AnnouncedState::Leaving,
                _ => AnnouncedState::Alive,
            },
            peers: self
                .members
                .iter()
                .filter(|m| m.name != local)
                .map(|m| (m.name.clone(), m.addr.clone()))
                .collect(),
        }
    }

    /// The agreed part of the view: members and states, equal on nodes that agree.
    pub fn digest(&self) -> String {
        let mut parts: Vec<String> = self
            .members
            .iter()
            .map(|m| format!("{}={}", m.name, m.state.as_str()))
            .collect();
        parts.sort();
        format!("{}|{}", parts.join(","), self.ring.digest())
    }
}

pub(crate) type SharedView = Arc<RwLock<Arc<View>>>;

#[derive(RactorMessage)]
pub(crate) enum MembershipMessage {
    Tick,
    /// A heartbeat round trip to the peer whose sessions have ractor node id `node`.
    PingResult {
        node: u64,
        refs: PeerRefs,
        pong: Option<Heartbeat>,
    },
    /// A peer's heartbeat arrived (it pinged us).
    Heard(Heartbeat),
    /// A peer announced it is leaving.
    PeerLeaving(String),
    SessionOpened {
        actor: ractor::ActorId,
        addr: String,
    },
    SessionAuthenticated(ractor::ActorId),
    SessionClosed {
        actor: ractor::ActorId,
        addr: String,
        /// The peer's name, when it said it before the session closed.
        name: Option<String>,
    },
    Resolved(Vec<SocketAddr>),
    /// This node starts leaving: announce it and leave the ring.
    Leave(RpcReplyPort<()>),
}

pub(crate) struct MembershipArgs {
    pub config: MembershipConfig,
    pub node_server: ActorRef<NodeServerMessage>,
    pub view: SharedView,
    pub changes: watch::Sender<Arc<View>>,
    pub relay: Arc<Relay>,
    /// Outgoing connections use mutual TLS when set.
    pub tls: Option<Tls>,
}

struct Peer {
    addr: String,
    state: MemberState,
    last_ok: Instant,
    node: u64,
    refs: PeerRefs,
}

struct Target {
    next_attempt: Instant,
    backoff: Duration,
}

pub(crate) struct MembershipState {
    args: MembershipArgs,
    leaving: bool,
    peers: HashMap<String, Peer>,
    /// Addresses to connect to: seeds, DNS answers, and peers' peers.
    targets: HashMap<String, Target>,
    dns_addrs: Vec<SocketAddr>,
    last_dns: Option<Instant>,
    /// Node sessions not yet authenticated, by session actor (to report refused peers).
    unauthenticated: HashMap<ractor::ActorId, String>,
    /// Sessions that closed before authenticating: (peer name, address, when).
    unauthenticated_closes: Vec<(Option<String>, String, Instant)>,
    version: u64,
    published_digest: String,
}

const BACKOFF_MIN: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

pub(crate) struct Membership;

impl Actor for Membership {
    type Msg = MembershipMessage;
    type State = MembershipState;
    type Arguments = MembershipArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        let now = Instant::now();
        let targets = args
            .config
            .seeds
            .iter()
            .filter(|s| **s != args.config.advertise)
            .map(|s| {
                (
                    s.clone(),
                    Target {
                        next_attempt: now,
                        backoff: BACKOFF_MIN,
                    },
                )
            })
            .collect();
        myself.send_interval(args.config.heartbeat_interval, || MembershipMessage::Tick);
        let version = args.view.read().map(|v| v.version).unwrap_or(1);
        Ok(MembershipState {
            args,
            leaving: false,
            peers: HashMap::new(),
            targets,
            dns_addrs: Vec::new(),
            last_dns: None,
            unauthenticated: HashMap::new(),
            unauthenticated_closes: Vec::new(),
            version,
            published_digest: String::new(),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            MembershipMessage::Tick => state.tick(&myself),
            MembershipMessage::PingResult { node, refs, pong } => {
                if let Some(pong) = pong {
                    state.answered(node, refs, pong);
                }
            }
            MembershipMessage::Heard(heartbeat) => state.heard(heartbeat),
            MembershipMessage::PeerLeaving(name) => state.peer_leaving(&name),
            MembershipMessage::SessionOpened { actor, addr } => {
                state.unauthenticated.insert(actor, addr);
            }
            MembershipMessage::SessionAuthenticated(actor) => {
                state.unauthenticated.remove(&actor);
            }
            MembershipMessage::SessionClosed { actor, addr, name } => {
                if state.unauthenticated.remove(&actor).is_some() {
                    // Either the cookie did not match, or it was the losing half of two nodes
                    // connecting to each other at once. Judge a little later: a duplicate's
                    // peer is a member by then.
                    state
                        .unauthenticated_closes
                        .push((name, addr, Instant::now()));
                }
            }
            MembershipMessage::Resolved(addrs) => {
                state.dns_addrs = addrs;
                let now = Instant::now();
                for addr in state.dns_addrs.clone() {
                    state.targets.entry(addr.to_string()).or_insert(Target {
                        next_attempt: now,
                        backoff: BACKOFF_MIN,
                    });
                }
            }
            MembershipMessage::Leave(reply) => {
                state.leaving = true;
                let leaving = Cast::Leaving {
                    name: state.args.config.local.as_str().to_owned(),
                };
                if let Ok(bytes) = codec::encode(&leaving) {
                    for peer in state.peers.values() {
                        let _ = peer.refs.router.cast(PeerMessage::Cast(bytes.clone()));
                    }
                }
                tracing::info!("leaving the cluster: announced to peers, out of the ring");
                node_event("leaving");
                state.publish();
                let _ = reply.send(());
            }
        }
        Ok(())
    }
}

pub(crate) fn node_event(event: &str) {
    chorus_actors::metrics::metrics()
        .cluster_node_events_total
        .inc([event]);
}

impl MembershipState {
    fn local_heartbeat(&self) -> Heartbeat {
        Heartbeat {
            name: self.args.config.local.as_str().to_owned(),
            addr: self.args.config.advertise.clone(),
            state: if self.leaving {
                AnnouncedState::Leaving
            } else {
                AnnouncedState::Alive
            },
            peers: self
                .peers
                .iter()
                .map(|(name, p)| (name.clone(), p.addr.clone()))
                .collect(),
        }
    }

    fn tick(&mut self, myself: &ActorRef<MembershipMessage>) {
        self.ping_peers(myself);
        self.expire();
        self.judge_refusals();
        self.connect(myself);
        self.publish();
    }

    /// Pings every peer whose router and relay are in the process groups.
    fn ping_peers(&self, myself: &ActorRef<MembershipMessage>) {
        let routers = remote_by_node(ROUTER_GROUP);
        let relays = remote_by_node(RELAY_GROUP);
        let Ok(bytes) = codec::encode(&Request::Ping(self.local_heartbeat())) else {
            return;
        };
        let timeout = self
            .args
            .config
            .heartbeat_interval
            .max(Duration::from_millis(200))
            * 2;
        for (node, router) in routers {
            let Some(relay) = relays.get(&node).cloned() else {
                continue;
            };
            let refs = PeerRefs { router, relay };
            let bytes = bytes.clone();
            let myself = myself.clone();
            tokio::spawn(async move {
                let answer = refs
                    .router
                    .call(|port| PeerMessage::Call(bytes, port), Some(timeout))
                    .await;
                let pong = match answer {
                    Ok(ractor::rpc::CallResult::Success(bytes)) => match codec::decode(&bytes) {
                        Ok(Reply::Pong(heartbeat)) => Some(heartbeat),
                        _ => None,
                    },
                    _ => None,
                };
                let _ = myself.cast(MembershipMessage::PingResult { node, refs, pong });
            });
        }
    }

    fn answered(&mut self, node: u64, refs: PeerRefs, pong: Heartbeat) {
        if pong.name == self.args.config.local.as_str() {
            return;
        }
        let state = match pong.state {
            AnnouncedState::Alive => MemberState::Alive,
            AnnouncedState::Leaving => MemberState::Leaving,
        };
        match self.peers.get_mut(&pong.name) {
            Some(peer) => {
                if peer.state == MemberState::Suspected && state == MemberState::Alive {
                    tracing::info!(peer = %pong.name, "cluster peer answers again");
                }
                if peer.state != MemberState::Leaving && state == MemberState::Leaving {
                    tracing::info!(peer = %pong.name, "cluster peer is leaving");
                    node_event("leaving");
                }
                if peer.state == MemberState::Leaving && state == MemberState::Alive {
                    // Only a restarted node (a new session under the same name) says so.
                    tracing::info!(peer = %pong.name, "cluster peer rejoined");
                    node_event("joined");
                }
                // The peer's own word wins: it announces `Leaving` before telling anyone.
                peer.state = state;
                peer.last_ok = Instant::now();
                peer.node = node;
                peer.refs = refs;
                peer.addr = pong.addr.clone();
            }
            None => {
                tracing::info!(peer = %pong.name, addr = %pong.addr, "cluster peer joined");
                node_event("joined");
                self.peers.insert(
                    pong.name.clone(),
                    Peer {
                        addr: pong.addr.clone(),
                        state,
                        last_ok: Instant::now(),
                        node,
                        refs,
                    },
                );
            }
        }
        self.targets.remove(&pong.addr);
        self.learn(&pong.peers);
    }

    fn heard(&mut self, heartbeat: Heartbeat) {
        if heartbeat.state == AnnouncedState::Leaving {
            self.peer_leaving(&heartbeat.name);
        }
        if !self.peers.contains_key(&heartbeat.name) {
            // Not counted until it answers our own ping; but connect if we are not connected.
            self.learn(&[(heartbeat.name, heartbeat.addr)]);
        }
        self.learn(&heartbeat.peers);
    }

    fn peer_leaving(&mut self, name: &str) {
        if let Some(peer) = self.peers.get_mut(name)
            && peer.state != MemberState::Leaving
        {
            tracing::info!(peer = %name, "cluster peer is leaving");
            node_event("leaving");
            peer.state = MemberState::Leaving;
            self.publish();
        }
    }

    /// Reports sessions that closed unauthenticated and whose peer did not join meanwhile: a
    /// wrong cookie (or something that is not a chorus node) on that address.
    fn judge_refusals(&mut self) {
        let settle = self
            .args
            .config
            .heartbeat_timeout
            .max(Duration::from_secs(2));
        let peers = &self.peers;
        let is_member = |name: &Option<String>, addr: &str| {
            peers.values().any(|p| p.addr == addr)
                || name
                    .as_deref()
                    .is_some_and(|n| peers.contains_key(n.split('@').next().unwrap_or(n)))
        };
        let mut refused = Vec::new();
        self.unauthenticated_closes.retain(|(name, addr, at)| {
            if is_member(name, addr) {
                return false;
            }
            if at.elapsed() < settle {
                return true;
            }
            refused.push((name.clone(), addr.clone()));
            false
        });
        for (name, addr) in refused {
            tracing::warn!(
                peer = %addr,
                peer_name = name.as_deref().unwrap_or("unknown"),
                "cluster connection refused: the peer did not authenticate (wrong cookie, our \
                 certificate refused by its TLS, or not a chorus node)"
            );
            node_event("auth_failed");
        }
    }

    /// Addresses of peers we do not count yet become connection targets.
    fn learn(&mut self, peers: &[(String, String)]) {
        let now = Instant::now();
        for (name, addr) in peers {
            if name == self.args.config.local.as_str()
                || *addr == self.args.config.advertise
                || self.peers.contains_key(name)
            {
                continue;
            }
            self.targets.entry(addr.clone()).or_insert(Target {
                next_attempt: now,
                backoff: BACKOFF_MIN,
            });
        }
    }

    /// Suspects peers that stopped answering, and removes the dead.
    fn expire(&mut self) {
        let timeout = self.args.config.heartbeat_timeout;
        let suspect_after = timeout / 2;
        let mut dead = Vec::new();
        for (name, peer) in self.peers.iter_mut() {
            let silent = peer.last_ok.elapsed();
            if silent >= timeout {
                dead.push(name.clone());
            } else if silent >= suspect_after && peer.state == MemberState::Alive {
                tracing::warn!(peer = %name, silent_ms = silent.as_millis() as u64, "cluster peer suspected");
                node_event("suspected");
                peer.state = MemberState::Suspected;
            }
        }
        for name in dead {
            let Some(peer) = self.peers.remove(&name) else {
                continue;
            };
            if peer.state == MemberState::Leaving {
                tracing::info!(peer = %name, "cluster peer left");
                node_event("left");
            } else {
                tracing::warn!(
                    peer = %name,
                    timeout_ms = timeout.as_millis() as u64,
                    "cluster peer dead: no heartbeat answer within the timeout"
                );
                node_event("dead");
            }
            self.args.relay.end_streams_from(&name);
            self.args.relay.stop_pumps_to(&name);
            // Stop its session (a half-open connection would otherwise linger), and try its
            // address again later: a restarted node comes back under the same name.
            stop_session(&self.args.node_server, peer.node);
            self.targets.insert(
                peer.addr,
                Target {
                    next_attempt: Instant::now() + BACKOFF_MIN,
                    backoff: BACKOFF_MIN,
                },
            );
        }
    }

    /// Opens connections to targets that are due (each with its own backoff).
    fn connect(&mut self, myself: &ActorRef<MembershipMessage>) {
        let config = &self.args.config;
        if let Some(dns) = &config.seed_dns
            && self
                .last_dns
                .is_none_or(|t| t.elapsed() >= config.dns_refresh)
        {
            self.last_dns = Some(Instant::now());
            let dns = dns.clone();
            let myself = myself.clone();
            tokio::spawn(async move {
                match tokio::net::lookup_host(dns.as_str()).await {
                    Ok(addrs) => {
                        let _ = myself.cast(MembershipMessage::Resolved(addrs.collect()));
                    }
                    Err(e) => {
                        tracing::warn!(seed_dns = %dns, error = %e, "resolving cluster seeds")
                    }
                }
            });
        }
        let known: HashSet<&str> = self.peers.values().map(|p| p.addr.as_str()).collect();
        let advertise = config.advertise.clone();
        let now = Instant::now();
        for (addr, target) in self.targets.iter_mut() {
            if known.contains(addr.as_str()) || *addr == advertise || target.next_attempt > now {
                continue;
            }
            target.next_attempt = now + target.backoff;
            target.backoff = (target.backoff * 2).min(BACKOFF_MAX);
            let server = self.args.node_server.clone();
            let addr = addr.clone();
            let tls = self.args.tls.clone();
            tokio::spawn(async move {
                let Some(tls) = tls else {
                    if let Err(e) = ractor_cluster::client_connect(&server, addr.as_str()).await {
                        tracing::debug!(peer = %addr, error = %e, "cluster connect failed; will retry");
                    }
                    return;
                };
                match tls::connect(&server, &addr, &tls).await {
                    Ok(()) => {}
                    // Refused here (the peer's certificate) or there (ours, or no TLS); the
                    // peer logs its side too, with this connection's source address.
                    Err(tls::ConnectError::Handshake(e)) => tls::refused(&addr, "outbound", &e),
                    Err(tls::ConnectError::Name(e)) => {
                        tracing::warn!(peer = %addr, error = %e, "cluster peer address has no TLS server name")
                    }
                    Err(e) => {
                        tracing::debug!(peer = %addr, error = %e, "cluster connect failed; will retry")
                    }
                }
            });
        }
    }

    /// Publishes a new view when members or their states changed.
    fn publish(&mut self) {
        let config = &self.args.config;
        let mut members: Vec<MemberView> = self
            .peers
            .iter()
            .map(|(name, p)| MemberView {
                name: name.clone(),
                addr: p.addr.clone(),
                state: p.state,
                last_heard: Some(p.last_ok.elapsed()),
            })
            .collect();
        members.push(MemberView {
            name: config.local.as_str().to_owned(),
            addr: config.advertise.clone(),
            state: if self.leaving {
                MemberState::Leaving
            } else {
                MemberState::Alive
            },
            last_heard: None,
        });
        members.sort_by(|a, b| a.name.cmp(&b.name));
        // The ring only changes with the set of homes: reuse the published one otherwise (this
        // runs every heartbeat tick).
        let homes: Vec<NodeId> = members
            .iter()
            .filter(|m| m.state != MemberState::Leaving)
            .map(|m| NodeId::new(m.name.clone()))
            .collect();
        let current = self.args.view.read().ok().map(|v| v.ring.clone());
        let ring = match current {
            Some(ring) if ring.members() == homes.as_slice() => ring,
            _ => Arc::new(Ring::new(homes, config.vnodes)),
        };
        let peers = self
            .peers
            .iter()
            .map(|(name, p)| (name.clone(), p.refs.clone()))
            .collect();
        let mut view = View {
            version: self.version,
            local: config.local.clone(),
            members,
            ring,
            peers,
        };
        let digest = view.digest();
        let changed = digest != self.published_digest;
        if changed {
            self.version += 1;
            view.version = self.version;
            tracing::info!(
                version = view.version,
                members = %digest,
                "cluster membership changed"
            );
            self.published_digest = digest;
        }
        let gauges = &chorus_actors::metrics::metrics().cluster_members;
        for state in [
            MemberState::Alive,
            MemberState::Suspected,
            MemberState::Leaving,
        ] {
            let n = view.members.iter().filter(|m| m.state == state).count();
            gauges.set([state.as_str()], n as i64);
        }
        // Always refresh (last-heard times and peer refs move); announce only real changes.
        let view = Arc::new(view);
        if let Ok(mut shared) = self.args.view.write() {
            *shared = view.clone();
        }
        if changed {
            self.args.changes.send_replace(view);
        }
    }
}

/// Remote members of a process group, by the ractor node id of their session.
fn remote_by_node(group: &str) -> HashMap<u64, ActorRef<PeerMessage>> {
    ractor::pg::get_members(&group.to_owned())
        .into_iter()
        .filter(|cell| !cell.get_id().is_local())
        .map(|cell| (cell.get_id().node(), ActorRef::<PeerMessage>::from(cell)))
        .collect()
}

fn stop_session(server: &ActorRef<NodeServerMessage>, node: u64) {
    let server = server.clone();
    tokio::spawn(async move {
        let sessions = ractor::call_t!(server, NodeServerMessage::GetSessions, 2_000);
        if let Ok(sessions) = sessions {
            for info in sessions.values() {
                if info.node_id == node {
                    info.actor.stop(Some("heartbeat timeout".into()));
                }
            }
        }
    });
}

/// Forwards ractor_cluster's node session events to the membership actor.
pub(crate) struct SessionEvents(pub ActorRef<MembershipMessage>);

impl ractor_cluster::NodeEventSubscription for SessionEvents {
    fn node_session_opened(&self, ses: NodeServerSessionInformation) {
        let _ = self.0.cast(MembershipMessage::SessionOpened {
            actor: ses.actor.get_id(),
            addr: ses.peer_addr,
        });
    }

    fn node_session_disconnected(&self, ses: NodeServerSessionInformation) {
        let _ = self.0.cast(MembershipMessage::SessionClosed {
            actor: ses.actor.get_id(),
            addr: ses.peer_addr,
            name: ses.peer_name.map(|n| n.name),
        });
    }

    fn node_session_authenticated(&self, ses: NodeServerSessionInformation) {
        let _ = self
            .0
            .cast(MembershipMessage::SessionAuthenticated(ses.actor.get_id()));
    }
}
