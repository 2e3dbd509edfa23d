//! What nodes say to each other, and its bytes.
//!
//! Every cross-node message is one of the typed enums below, encoded with bincode (serde) —
//! the only place that knows the encoding (DEPENDENCIES.md, trap 3). Bytes from the network are
//! decoded fallibly: a peer that sends garbage gets an error, never a panic.

use chorus_actors::provider::ProviderError;
use chorus_actors::session::retrieval::SearchResults;
use chorus_actors::session::turn::FirstOutcome;
use chorus_actors::session::{
    NewThread, ProfilePatch, Reservation, SearchQuery, SendMessage, SessionError, ThreadPatch,
    TierRoleChange, UsedLimits,
};
use chorus_actors::store::{
    ApiKey, Document, Message, ProviderKey, StoreError, Summary, Thread, User,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A frame the codec refused.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("encoding a cluster message: {0}")]
    Encode(String),
    #[error("undecodable cluster message: {0}")]
    Decode(String),
}

/// Larger frames are refused on decode (ractor_cluster's inbound limit is 16 MiB).
const MAX_DECODED: usize = 16 * 1024 * 1024;

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_DECODED>()
}

pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, CodecError> {
    bincode::serde::encode_to_vec(value, config()).map_err(|e| CodecError::Encode(e.to_string()))
}

pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    let (value, read) = bincode::serde::decode_from_slice(bytes, config())
        .map_err(|e| CodecError::Decode(e.to_string()))?;
    if read != bytes.len() {
        return Err(CodecError::Decode(format!(
            "{} trailing bytes",
            bytes.len() - read
        )));
    }
    Ok(value)
}

/// A node's state as it announces it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AnnouncedState {
    Alive,
    /// Shutting down: no longer a home, finishing its running turns.
    Leaving,
}

/// What a heartbeat carries both ways: who the node is and which peers it knows (so that every
/// node connects to every other).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Heartbeat {
    pub name: String,
    /// Where peers reach its cluster port (`host:port`).
    pub addr: String,
    pub state: AnnouncedState,
    /// Alive or leaving peers it currently counts, as `(name, addr)`.
    pub peers: Vec<(String, String)>,
}

/// Where a remote event stream is delivered: the edge node's name, its stream id, and how many
/// events may be in flight before the edge grants more (flow control).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StreamTarget {
    pub origin: String,
    pub id: u64,
    pub window: u32,
}

/// A call to another node (answered with a [`Reply`]).
#[derive(Debug, Serialize, Deserialize)]
pub enum Request {
    Ping(Heartbeat),
    /// A user-scoped operation for a user homed on the receiver.
    Session {
        user: Uuid,
        op: SessionOp,
    },
    /// Start a turn and stream its events to `stream` from its first event; with
    /// `wait_first`, answer once its first outcome is known.
    StartTurn {
        user: Uuid,
        thread: Uuid,
        send: SendMessage,
        stream: StreamTarget,
        wait_first: bool,
    },
    /// Stream a thread's events after `after` (`None`: from the live start) to `stream`.
    OpenStream {
        user: Uuid,
        thread: Uuid,
        after: Option<u64>,
        stream: StreamTarget,
    },
    /// To the node a thread's turn started on, after the user's home moved: if turns still
    /// run there, stream the thread's events after `after` to `stream` as `OpenStream` does.
    /// Never starts a session.
    OpenLiveTurns {
        user: Uuid,
        thread: Uuid,
        after: Option<u64>,
        stream: StreamTarget,
    },
    /// To the node a turn runs on, after the user's home moved: cancel it there. Never starts
    /// a session; answers `Session(Ok(Unit))` or a not-found error.
    CancelLiveTurn {
        user: Uuid,
        thread: Uuid,
        turn: Uuid,
    },
}

/// The user-scoped operations of a home session that answer with data (`Sessions` methods).
#[derive(Debug, Serialize, Deserialize)]
pub enum SessionOp {
    Search(SearchQuery),
    FlushUsage,
    CreateThread(NewThread),
    UpdateThread(Uuid, ThreadPatch),
    DeleteThread(Uuid),
    UpdateProfile(ProfilePatch),
    SetTierRole(TierRoleChange),
    CreateApiKey(ApiKey, usize),
    DeleteApiKey(Uuid),
    PutProviderKey(ProviderKey),
    DeleteProviderKey(String),
    CancelTurn(Uuid, Uuid),
    Summarize(Uuid, Option<String>),
    UploadLimit,
    CreateDocument(Document),
    DeleteDocument(Uuid),
    Admit(String, u64),
}

/// What a [`SessionOp`] answers.
#[derive(Debug, Serialize, Deserialize)]
pub enum Value {
    Unit,
    Thread(Thread),
    User(User),
    ApiKey(ApiKey),
    Summary(Summary),
    Bytes(u64),
    Document(Document),
    Search(SearchResults),
    Reservation(Reservation),
}

/// A started turn as the edge needs it; its events follow on the stream it asked for.
#[derive(Debug, Serialize, Deserialize)]
pub struct TurnStartedWire {
    pub turn_id: Uuid,
    pub user_message: Message,
    pub assistant_messages: Vec<Message>,
    pub from_seq: u64,
    /// `None` when no model had produced output or failed within the first-token deadline.
    pub first_outcome: Option<FirstOutcome>,
    pub rate_limit: chorus_actors::quota::Admission,
}

/// Turns still running on a user's previous home, streamed after `after`.
#[derive(Debug, Serialize, Deserialize)]
pub struct LiveTurnsWire {
    pub after: u64,
    pub turns: Vec<Uuid>,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum Reply {
    Pong(Heartbeat),
    Session(Result<Value, WireError>),
    TurnStarted(Result<Box<TurnStartedWire>, WireError>),
    /// The stream is open; its first event follows `start`.
    StreamOpened(Result<u64, WireError>),
    /// The receiver could not decode or serve the request at all.
    Refused(String),
    /// `OpenLiveTurns`: `None` when no turn runs there (no stream was opened). (New variants go
    /// last, so that the others keep their encoding.)
    LiveTurnsOpened(Option<LiveTurnsWire>),
}

/// One thread event on the wire (`EventRecord`).
#[derive(Debug, Serialize, Deserialize)]
pub struct WireEvent {
    pub seq: u64,
    pub turn_id: Uuid,
    pub name: String,
    pub data: String,
}

/// One-way messages between nodes.
#[derive(Debug, Serialize, Deserialize)]
pub enum Cast {
    /// Settle a reservation from `Admit` (the OpenAI-compatible API).
    Settle {
        user: Uuid,
        reservation: Reservation,
        used_tokens: u64,
        cost_usd: f64,
    },
    /// Events for an edge's stream, in order.
    Events { id: u64, events: Vec<WireEvent> },
    /// The edge consumed `n` events of stream `id`: the home may send `n` more.
    Credit { origin: String, id: u64, n: u32 },
    /// The edge's client went away: stop streaming.
    Close { origin: String, id: u64 },
    /// The home's log ended (thread deleted, or the home is going away).
    End { id: u64 },
    /// The sender is leaving the cluster: take it out of the ring now.
    Leaving { name: String },
    /// The user's home moved to the receiver: what the sender's per-minute buckets held.
    Limits { user: Uuid, used: UsedLimits },
}

/// [`SessionError`] as it crosses the wire.
#[derive(Debug, Serialize, Deserialize)]
pub enum WireError {
    NotFound,
    DocumentNotFound,
    Conflict(String),
    Invalid(String),
    Provider(ProviderError),
    Store(String),
    Unavailable(String),
    Forbidden(String),
    RateLimited {
        what: String,
        limit: u64,
        remaining: u64,
        retry_after: std::time::Duration,
        reset_after: std::time::Duration,
    },
    TooLarge {
        what: String,
        limit: u64,
    },
    QuotaExceeded {
        what: String,
        limit: u64,
        used: u64,
        resets_at: chrono::DateTime<chrono::Utc>,
    },
}

impl From<SessionError> for WireError {
    fn from(e: SessionError) -> Self {
        match e {
            SessionError::NotFound => WireError::NotFound,
            SessionError::DocumentNotFound => WireError::DocumentNotFound,
            SessionError::Conflict(m) => WireError::Conflict(m),
            SessionError::Invalid(m) => WireError::Invalid(m),
            SessionError::Provider(p) => WireError::Provider(p),
            SessionError::Store(StoreError::Conflict(m)) => WireError::Conflict(m),
            SessionError::Store(other) => WireError::Store(other.to_string()),
            SessionError::Unavailable(m) => WireError::Unavailable(m),
            SessionError::Forbidden(m) => WireError::Forbidden(m),
            SessionError::RateLimited {
                what,
                limit,
                remaining,
                retry_after,
                reset_after,
            } => WireError::RateLimited {
                what,
                limit,
                remaining,
                retry_after,
                reset_after,
            },
            SessionError::TooLarge { what, limit } => WireError::TooLarge { what, limit },
            SessionError::QuotaExceeded {
                what,
                limit,
                used,
                resets_at,
            } => WireError::QuotaExceeded {
                what,
                limit,
                used,
                resets_at,
            },
        }
    }
}

/// A store failure on the home node, as the edge reports it (the home logged the cause).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct RemoteStoreFailure(String);

impl From<WireError> for SessionError {
    fn from(e: WireError) -> Self {
        match e {
            WireError::NotFound => SessionError::NotFound,
            WireError::DocumentNotFound => SessionError::DocumentNotFound,
            WireError::Conflict(m) => SessionError::Conflict(m),
            WireError::Invalid(m) => SessionError::Invalid(m),
            WireError::Provider(p) => SessionError::Provider(p),
            WireError::Store(m) => SessionError::Store(StoreError::Backend {
                op: "home node",
                source: Box::new(RemoteStoreFailure(m)),
            }),
            WireError::Unavailable(m) => SessionError::Unavailable(m),
            WireError::Forbidden(m) => SessionError::Forbidden(m),
            WireError::RateLimited {
                what,
                limit,
                remaining,
                retry_after,
                reset_after,
            } => SessionError::RateLimited {
                what,
                limit,
                remaining,
                retry_after,
                reset_after,
            },
            WireError::TooLarge { what, limit } => SessionError::TooLarge { what, limit },
            WireError::QuotaExceeded {
                what,
                limit,
                used,
                resets_at,
            } => SessionError::QuotaExceeded {
                what,
                limit,
                used,
                resets_at,
            },
        }
    }
}

/// Unpacks a [`Value`] into the type an operation answers; a mismatch means the peer answered
/// another question (a version skew), reported as unavailable.
pub trait FromValue: Sized {
    fn from_value(value: Value) -> Result<Self, SessionError>;
}

macro_rules! from_value {
    ($($ty:ty => $variant:ident),* $(,)?) => {$(
        impl FromValue for $ty {
            fn from_value(value: Value) -> Result<Self, SessionError> {
                match value {
                    Value::$variant(inner) => Ok(inner),
                    other => Err(mismatch(&other)),
                }
            }
        }
    )*};
}

from_value!(
    Thread => Thread,
    User => User,
    ApiKey => ApiKey,
    Summary => Summary,
    u64 => Bytes,
    Document => Document,
    SearchResults => Search,
    Reservation => Reservation,
);

impl FromValue for () {
    fn from_value(value: Value) -> Result<Self, SessionError> {
        match value {
            Value::Unit => Ok(()),
            other => Err(mismatch(&other)),
        }
    }
}

fn mismatch(value: &Value) -> SessionError {
    let kind = match value {
        Value::Unit => "unit",
        Value::Thread(_) => "thread",
        Value::User(_) => "user",
        Value::ApiKey(_) => "api key",
        Value::Summary(_) => "summary",
        Value::Bytes(_) => "bytes",
        Value::Document(_) => "document",
        Value::Search(_) => "search results",
        Value::Reservation(_) => "reservation",
    };
    SessionError::Unavailable(format!("home node answered with an unexpected {kind}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip() {
        let user = Uuid::now_v7();
        let request = Request::Session {
            user,
            op: SessionOp::UpdateThread(
                Uuid::now_v7(),
                ThreadPatch {
                    title: Some(None),
                    system_prompt: Some(Some("be brief".into())),
                    model: None,
                    bookmarked: Some(true),
                },
            ),
        };
        let bytes = encode(&request).unwrap();
        let Request::Session { user: back, op } = decode::<Request>(&bytes).unwrap() else {
            panic!("wrong variant");
        };
        assert_eq!(back, user);
        let SessionOp::UpdateThread(_, patch) = op else {
            panic!("wrong op");
        };
        assert_eq!(patch.title, Some(None));
        assert_eq!(patch.system_prompt, Some(Some("be brief".into())));
        assert_eq!(patch.bookmarked, Some(true));
    }

    /// Domain types cross the wire inside `Value`s and turns; their serde attributes must suit a
    /// format that is not self-describing (a `skip_serializing_if` shifts every later field).
    #[test]
    fn domain_values_with_unset_fields_round_trip() {
        use chorus_actors::session::retrieval::Passage;
        use chorus_actors::store::{ChunkPosition, Citation, contract};

        let mut user = contract::user("wire@example.com");
        user.settings.default_model = None;
        let Value::User(back) =
            decode::<Value>(&encode(&Value::User(user.clone())).unwrap()).unwrap()
        else {
            panic!("wrong variant");
        };
        assert_eq!(back, user);

        let position = ChunkPosition {
            page: None,
            heading_path: vec![],
            char_start: 3,
            char_end: 9,
        };
        let results = SearchResults {
            mode: "lexical".into(),
            results: vec![Passage {
                document_id: Uuid::now_v7(),
                document_name: "notes.md".into(),
                chunk: 0,
                text: "some text".into(),
                position: position.clone(),
                score: 0.5,
                bm25_rank: Some(1),
                vector_rank: None,
            }],
        };
        let Value::Search(back) =
            decode::<Value>(&encode(&Value::Search(results)).unwrap()).unwrap()
        else {
            panic!("wrong variant");
        };
        assert_eq!(back.results[0].position, position);
        assert_eq!(back.results[0].vector_rank, None);

        let thread = contract::thread(user.id, 1);
        let mut message = contract::message(&thread, 2, None);
        message.citations = vec![Citation {
            document_id: Uuid::now_v7(),
            document_name: "notes.md".into(),
            chunk: 1,
            position,
            text: "cited".into(),
        }];
        let back: Message = decode(&encode(&message).unwrap()).unwrap();
        assert_eq!(back, message);
    }

    #[test]
    fn used_limits_round_trip() {
        let used = UsedLimits {
            requests: Some((chorus_actors::quota::BucketSpec::per_minute(7), 4.5)),
            tokens: None,
        };
        let user = Uuid::now_v7();
        let bytes = encode(&Cast::Limits {
            user,
            used: used.clone(),
        })
        .unwrap();
        let Cast::Limits {
            user: back,
            used: got,
        } = decode::<Cast>(&bytes).unwrap()
        else {
            panic!("wrong variant");
        };
        assert_eq!((back, got), (user, used));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for bytes in [&b""[..], &b"\xff\xff\xff\xff\xff\xff"[..], &[7u8; 64][..]] {
            assert!(decode::<Request>(bytes).is_err());
            assert!(decode::<Cast>(bytes).is_err());
        }
        // A valid frame with trailing bytes is refused too.
        let mut bytes = encode(&Cast::End { id: 3 }).unwrap();
        bytes.push(0);
        assert!(decode::<Cast>(&bytes).is_err());
    }

    #[test]
    fn errors_keep_their_meaning() {
        let wire = WireError::from(SessionError::RateLimited {
            what: "requests_per_minute".into(),
            limit: 5,
            remaining: 0,
            retry_after: std::time::Duration::from_secs(7),
            reset_after: std::time::Duration::from_secs(60),
        });
        let back: SessionError = decode::<WireError>(&encode(&wire).unwrap()).unwrap().into();
        match back {
            SessionError::RateLimited {
                limit, retry_after, ..
            } => {
                assert_eq!(limit, 5);
                assert_eq!(retry_after.as_secs(), 7);
            }
            other => panic!("{other:?}"),
        }
    }
}
