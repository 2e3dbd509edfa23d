//! The two actors of a node that other nodes can address: the `Router` (calls: user-scoped
//! requests for users homed here, heartbeats) and the `Relay` (turn events and their credits).
//!
//! Only these are remote-capable: ractor_cluster announces every spawn of a remote-capable actor
//! to every peer (DEPENDENCIES.md, trap 2), so sessions and turns stay local. Both carry opaque
//! bytes ([`PeerMessage`]); what the bytes mean is [`crate::codec`]'s business. Handlers never
//! wait: calls run in their own task, casts are handed on at once, so one slow request does not
//! hold up a node's traffic.

use std::sync::Arc;

use ractor::message::SerializedMessage;
use ractor::{Actor, ActorProcessingErr, ActorRef, BytesConvertable, RpcReplyPort};

/// Process group (`ractor::pg`) of every node's router; ractor_cluster keeps it synchronized.
pub const ROUTER_GROUP: &str = "chorus.router";
/// Process group of every node's relay.
pub const RELAY_GROUP: &str = "chorus.relay";

/// A message to a router or relay: encoded bytes, as a one-way cast or a call awaiting bytes.
pub enum PeerMessage {
    Cast(Vec<u8>),
    Call(Vec<u8>, RpcReplyPort<Vec<u8>>),
}

impl std::fmt::Debug for PeerMessage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PeerMessage::Cast(b) => write!(f, "Cast({} bytes)", b.len()),
            PeerMessage::Call(b, _) => write!(f, "Call({} bytes)", b.len()),
        }
    }
}

const CAST: &str = "cast";
const CALL: &str = "call";

impl ractor::Message for PeerMessage {
    fn serializable() -> bool {
        true
    }

    fn serialize(self) -> Result<SerializedMessage, ractor::message::BoxedDowncastErr> {
        Ok(match self {
            PeerMessage::Cast(args) => SerializedMessage::Cast {
                variant: CAST.into(),
                args: args.into_bytes(),
                metadata: None,
            },
            PeerMessage::Call(args, reply) => SerializedMessage::Call {
                variant: CALL.into(),
                args: args.into_bytes(),
                reply,
                metadata: None,
            },
        })
    }

    fn deserialize(bytes: SerializedMessage) -> Result<Self, ractor::message::BoxedDowncastErr> {
        match bytes {
            SerializedMessage::Cast { variant, args, .. } if variant == CAST => {
                Ok(PeerMessage::Cast(Vec::<u8>::from_bytes(args)))
            }
            SerializedMessage::Call {
                variant,
                args,
                reply,
                ..
            } if variant == CALL => Ok(PeerMessage::Call(Vec::<u8>::from_bytes(args), reply)),
            _ => Err(ractor::message::BoxedDowncastErr),
        }
    }
}

/// What a router or relay does with what arrives. Implemented by the cluster's dispatcher.
pub trait Inbox: Send + Sync + 'static {
    /// A call: answer with encoded bytes (run in its own task).
    fn call(
        self: Arc<Self>,
        bytes: Vec<u8>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Vec<u8>> + Send>>;
    /// A cast: handle it now, without waiting (order of casts is kept).
    fn cast(&self, bytes: Vec<u8>);
}

/// The router or relay actor.
pub struct PeerEndpoint;

impl Actor for PeerEndpoint {
    type Msg = PeerMessage;
    type State = Arc<dyn Inbox>;
    type Arguments = (Arc<dyn Inbox>, &'static str);

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        (inbox, group): Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        ractor::pg::join(group.to_owned(), vec![myself.get_cell()]);
        Ok(inbox)
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        inbox: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            PeerMessage::Cast(bytes) => inbox.cast(bytes),
            PeerMessage::Call(bytes, reply) => {
                let inbox = inbox.clone();
                tokio::spawn(async move {
                    let answer = inbox.call(bytes).await;
                    // The caller may have timed out; nothing to do then.
                    let _ = reply.send(answer);
                });
            }
        }
        Ok(())
    }
}
