//! The per-thread event log that turns write and clients read (SSE, WebSocket, resume).
//!
//! Events get sequence numbers that only grow, also across session restarts: a log starts at the
//! current time in microseconds, so a resuming client's `Last-Event-ID` from an older log is
//! always below the new log's numbers and it simply receives everything retained. Each event is
//! serialized once when appended; any number of readers share it.
//!
//! Readers never buffer: they copy what follows their cursor out of the log and wait on a `watch`
//! of the newest sequence number, so a slow client costs memory only in the bounded log itself.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use futures_util::{Stream, StreamExt};
use serde::Serialize;
use tokio::sync::watch;
use uuid::Uuid;

/// One event as clients see it: `id: seq`, `event: name`, `data: json`.
#[derive(Debug)]
pub struct EventRecord {
    pub seq: u64,
    pub turn_id: Uuid,
    pub name: &'static str,
    /// The JSON object of the event's data, serialized once.
    pub data: String,
}

impl EventRecord {
    pub fn is_done(&self) -> bool {
        self.name == "done"
    }
}

/// Most events a thread keeps for replay; older ones fall off (clients then re-read messages).
const MAX_RETAINED: usize = 20_000;

struct LogInner {
    events: VecDeque<Arc<EventRecord>>,
    next_seq: u64,
    last_append: std::time::Instant,
}

pub struct ThreadEvents {
    thread_id: Uuid,
    inner: Mutex<LogInner>,
    newest: watch::Sender<u64>,
    /// Set when the thread is deleted: readers drain what is left, then end.
    closed: std::sync::atomic::AtomicBool,
}

impl ThreadEvents {
    pub fn new(thread_id: Uuid) -> Arc<ThreadEvents> {
        let base = chrono::Utc::now().timestamp_micros().max(1) as u64;
        let (newest, _) = watch::channel(base - 1);
        Arc::new(ThreadEvents {
            thread_id,
            inner: Mutex::new(LogInner {
                events: VecDeque::new(),
                next_seq: base,
                last_append: std::time::Instant::now(),
            }),
            newest,
            closed: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Ends every reader (after what they have not read yet). Used when the thread is deleted.
    pub fn close(&self) {
        self.closed
            .store(true, std::sync::atomic::Ordering::Release);
        self.newest.send_modify(|_| {});
    }

    fn is_closed(&self) -> bool {
        self.closed.load(std::sync::atomic::Ordering::Acquire)
    }

    pub fn thread_id(&self) -> Uuid {
        self.thread_id
    }

    /// Appends an event and wakes readers; returns its sequence number.
    pub fn append<T: Serialize>(&self, turn_id: Uuid, name: &'static str, data: &T) -> u64 {
        let data = serde_json::to_string(data).unwrap_or_else(|_| "{}".to_owned());
        let seq = {
            let Ok(mut inner) = self.inner.lock() else {
                return 0;
            };
            let seq = inner.next_seq;
            inner.next_seq += 1;
            inner.last_append = std::time::Instant::now();
            inner.events.push_back(Arc::new(EventRecord {
                seq,
                turn_id,
                name,
                data,
            }));
            if inner.events.len() > MAX_RETAINED {
                inner.events.pop_front();
            }
            seq
        };
        self.newest.send_replace(seq);
        seq
    }

    /// How long since the last event was appended.
    pub fn quiet_for(&self) -> std::time::Duration {
        self.inner
            .lock()
            .map(|i| i.last_append.elapsed())
            .unwrap_or_default()
    }

    /// Whether `turn_id` has logged its `done` (among retained events).
    pub fn has_done(&self, turn_id: Uuid) -> bool {
        self.inner
            .lock()
            .map(|i| i.events.iter().any(|e| e.turn_id == turn_id && e.is_done()))
            .unwrap_or(false)
    }

    /// Where a reader without a cursor starts: at the first event of a turn still running (so
    /// a second tab sees that whole answer so far), otherwise from now on.
    pub fn live_start(&self) -> u64 {
        let Ok(inner) = self.inner.lock() else {
            return 0;
        };
        let mut finished = std::collections::HashSet::new();
        let mut open = None;
        for event in inner.events.iter().rev() {
            if event.is_done() {
                finished.insert(event.turn_id);
            } else if !finished.contains(&event.turn_id) {
                open = Some(event.seq);
            }
        }
        open.map_or(inner.next_seq - 1, |seq| seq - 1)
    }

    /// The sequence number the next event will get (a cursor "from now on" is this minus one).
    pub fn next_seq(&self) -> u64 {
        self.inner.lock().map(|i| i.next_seq).unwrap_or(0)
    }

    /// Up to `max` retained events with `seq > after`, oldest first.
    pub fn read_after(&self, after: u64, max: usize) -> Vec<Arc<EventRecord>> {
        let Ok(inner) = self.inner.lock() else {
            return Vec::new();
        };
        let start = inner.events.partition_point(|e| e.seq <= after);
        inner.events.range(start..).take(max).cloned().collect()
    }

    /// A reader positioned after `after`.
    pub fn reader(self: &Arc<Self>, after: u64) -> EventReader {
        EventReader {
            log: self.clone(),
            cursor: after,
            newest: self.newest.subscribe(),
        }
    }
}

/// A cursor over one thread's log.
pub struct EventReader {
    log: Arc<ThreadEvents>,
    cursor: u64,
    newest: watch::Receiver<u64>,
}

impl EventReader {
    /// The next batch after the cursor, waiting until there is one. `None` when the log is gone
    /// (its session stopped and dropped it).
    pub async fn next_batch(&mut self, max: usize) -> Option<Vec<Arc<EventRecord>>> {
        loop {
            // Mark the current value seen *before* reading, so an append between the read and the
            // wait still wakes us.
            self.newest.borrow_and_update();
            let batch = self.log.read_after(self.cursor, max);
            if let Some(last) = batch.last() {
                self.cursor = last.seq;
                return Some(batch);
            }
            if self.log.is_closed() || self.newest.changed().await.is_err() {
                return None;
            }
        }
    }

    pub fn cursor(&self) -> u64 {
        self.cursor
    }

    /// Every event from the cursor on, open-ended (ends only when the log is closed).
    pub fn into_stream(self) -> impl Stream<Item = Arc<EventRecord>> + Send + 'static {
        futures_util::stream::unfold(self, |mut reader| async move {
            let batch = reader.next_batch(STREAM_BATCH).await?;
            Some((futures_util::stream::iter(batch), reader))
        })
        .flatten()
    }

    /// The events of one turn from the cursor on, ending right after its `done` (without
    /// waiting for anything later in the log).
    pub fn into_turn_stream(
        self,
        turn_id: Uuid,
    ) -> impl Stream<Item = Arc<EventRecord>> + Send + 'static {
        turn_only(self.into_stream(), turn_id)
    }
}

/// The events of one turn out of a thread's events (a local log, or one relayed from another
/// node), ending right after its `done`.
pub fn turn_only<S>(
    events: S,
    turn_id: Uuid,
) -> impl Stream<Item = Arc<EventRecord>> + Send + 'static
where
    S: Stream<Item = Arc<EventRecord>> + Send + 'static,
{
    let mine = Box::pin(events.filter(move |e| futures_util::future::ready(e.turn_id == turn_id)));
    futures_util::stream::unfold((mine, false), |(mut events, finished)| async move {
        if finished {
            return None;
        }
        let event = events.next().await?;
        let done = event.is_done();
        Some((event, (events, done)))
    })
}

/// Events copied out of the log per wake-up by the streams above.
const STREAM_BATCH: usize = 256;

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[tokio::test]
    async fn readers_replay_then_follow_live() {
        let log = ThreadEvents::new(Uuid::now_v7());
        let turn = Uuid::now_v7();
        let first = log.append(turn, "message_start", &json!({"n": 1}));
        let second = log.append(turn, "delta", &json!({"n": 2}));
        assert_eq!(second, first + 1);

        let mut from_start = log.reader(0);
        let batch = from_start.next_batch(10).await.unwrap();
        assert_eq!(
            batch.iter().map(|e| e.seq).collect::<Vec<_>>(),
            vec![first, second]
        );

        let mut resumed = log.reader(first);
        assert_eq!(resumed.next_batch(10).await.unwrap()[0].seq, second);

        let waiter = tokio::spawn(async move { from_start.next_batch(10).await });
        tokio::task::yield_now().await;
        let third = log.append(turn, "done", &json!({}));
        let live = waiter.await.unwrap().unwrap();
        assert_eq!(live.len(), 1);
        assert_eq!(live[0].seq, third);
        assert!(live[0].is_done());
        assert_eq!(live[0].data, "{}");
    }

    #[tokio::test]
    async fn a_new_log_numbers_after_an_old_one() {
        let old = ThreadEvents::new(Uuid::now_v7());
        let last_old = old.append(Uuid::now_v7(), "done", &json!({}));
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        let new = ThreadEvents::new(Uuid::now_v7());
        assert!(new.next_seq() > last_old);
        // A client resuming with an id from the old log gets everything in the new one.
        let first_new = new.append(Uuid::now_v7(), "message_start", &json!({}));
        assert_eq!(new.read_after(last_old, 10)[0].seq, first_new);
    }

    #[tokio::test]
    async fn closing_ends_readers_after_what_is_left() {
        let log = ThreadEvents::new(Uuid::now_v7());
        let seq = log.append(Uuid::now_v7(), "delta", &json!({}));
        let mut reader = log.reader(0);
        let waiting = {
            let mut waiting = log.reader(seq);
            tokio::spawn(async move { waiting.next_batch(10).await })
        };
        tokio::task::yield_now().await;
        log.close();
        assert!(waiting.await.unwrap().is_none());
        assert_eq!(reader.next_batch(10).await.unwrap().len(), 1);
        assert!(reader.next_batch(10).await.is_none());
    }

    #[tokio::test]
    async fn a_turn_stream_keeps_its_turn_and_ends_at_its_done() {
        let log = ThreadEvents::new(Uuid::now_v7());
        let (mine, other) = (Uuid::now_v7(), Uuid::now_v7());
        log.append(mine, "message_start", &json!({}));
        log.append(other, "message_start", &json!({}));
        log.append(mine, "delta", &json!({}));
        log.append(mine, "done", &json!({}));
        // Nothing follows `done`: the stream must still end (a bounded wait proves it).
        let names: Vec<&str> = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            log.reader(0)
                .into_turn_stream(mine)
                .map(|e| e.name)
                .collect(),
        )
        .await
        .expect("the turn stream ended at its done");
        assert_eq!(names, vec!["message_start", "delta", "done"]);
    }

    #[test]
    fn retention_is_bounded() {
        let log = ThreadEvents::new(Uuid::now_v7());
        let turn = Uuid::now_v7();
        for _ in 0..MAX_RETAINED + 10 {
            log.append(turn, "delta", &json!({}));
        }
        assert_eq!(log.read_after(0, usize::MAX).len(), MAX_RETAINED);
    }
}
