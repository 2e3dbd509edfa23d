//! The cluster: real `chorus` processes on loopback ports sharing one SQLite store (WAL) and a
//! real `redis-server`, joined with `[cluster]` (ractor_cluster under our own membership).

use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::*;

pub(crate) const COOKIE: &str = "test-cluster-cookie-0123456789";
/// Slow enough to kill its node mid-answer: 400 words, 50 ms apart.
const CRAWL: &str = "test-crawl";
/// 60 words, quickly: a streaming answer with many events.
pub(crate) const CHATTY: &str = "test-chatty";
/// Long enough to move its user's home while it runs: 300 words, 40 ms apart.
const WALK: &str = "test-walk";
/// A long answer at once: 1,000 words (the catalogue's output cap is 1,024), no delay — about
/// two relay windows of events.
const FLOOD: &str = "test-flood";
const FLOOD_WORDS: usize = 1_000;

pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("finding a free port")
}

/// A `CHATTY` turn sent through `edge`: asserts every event arrived in order and the answer is
/// complete; returns the events and the `message_complete` event.
pub(crate) async fn chatty_turn_through(
    edge: &TestApp,
    user: &Session,
    thread: &str,
) -> (Vec<SseEvent>, SseEvent) {
    let events = edge
        .chat_turn(
            user.token(),
            thread,
            &json!({ "content": "hi", "model": CHATTY }),
        )
        .await;
    assert_contiguous(&events);
    assert_eq!(events.first().map(|e| e.name()), Some("message_start"));
    assert_eq!(events.last().map(|e| e.name()), Some("done"));
    let text = delta_text(&events, None);
    assert_eq!(text.split_whitespace().count(), 60, "{text}");
    let complete = events
        .iter()
        .find(|e| e.name() == "message_complete")
        .unwrap();
    assert_eq!(complete.data["status"], "complete");
    let complete = complete.clone();
    (events, complete)
}

pub(crate) struct TestCluster {
    pub(crate) nodes: Vec<TestApp>,
    ports: Vec<u16>,
    _redis: RedisServer,
}

pub(crate) struct Options {
    pub(crate) tiers: &'static str,
    pub(crate) heartbeat_timeout_ms: u64,
    /// Extra environment of node `i` (e.g. `[cluster]` TLS files), after the defaults.
    pub(crate) node_env: Vec<Vec<(String, String)>>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            tiers: ROOMY_TIERS,
            heartbeat_timeout_ms: 1500,
            node_env: Vec::new(),
        }
    }
}

fn node_builder(
    data_dir: &Arc<tempfile::TempDir>,
    name: &str,
    port: u16,
    seeds: &[u16],
    redis: &RedisServer,
    options: &Options,
) -> TestAppBuilder {
    let seeds: Vec<String> = seeds.iter().map(|p| format!("\"127.0.0.1:{p}\"")).collect();
    TestApp::builder()
        .data_dir(data_dir.clone())
        .models_toml(&catalogue_toml(&[
            TestModel::new(CRAWL, "mock", "lorem;words=400;delay_ms=50"),
            TestModel::new(CHATTY, "mock", "lorem;words=60;delay_ms=2"),
            TestModel::new(WALK, "mock", "lorem;words=300;delay_ms=40"),
            TestModel::new(
                FLOOD,
                "mock",
                &format!("lorem;words={FLOOD_WORDS};delay_ms=0"),
            ),
        ]))
        .tiers_toml(options.tiers)
        .env("CHORUS__REDIS__URL", &redis.url())
        .env("CHORUS__CLUSTER__NODE_NAME", name)
        .env("CHORUS__CLUSTER__LISTEN", &format!("127.0.0.1:{port}"))
        .env("CHORUS__CLUSTER__COOKIE", COOKIE)
        .env("CHORUS__CLUSTER__SEEDS", &format!("[{}]", seeds.join(",")))
        .env("CHORUS__CLUSTER__HEARTBEAT_INTERVAL_MS", "200")
        .env(
            "CHORUS__CLUSTER__HEARTBEAT_TIMEOUT_MS",
            &options.heartbeat_timeout_ms.to_string(),
        )
        .env("CHORUS__CLUSTER__LEAVE_DRAIN_MS", "600")
}

impl TestAppBuilder {
    fn envs(self, pairs: &[(String, String)]) -> Self {
        pairs
            .iter()
            .fold(self, |builder, (key, value)| builder.env(key, value))
    }
}

impl TestCluster {
    pub(crate) async fn start(n: usize, options: Options) -> TestCluster {
        let redis = RedisServer::start();
        let data_dir = Arc::new(tempfile::tempdir().expect("shared data dir"));
        let ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let mut nodes = Vec::new();
        for (i, port) in ports.iter().enumerate() {
            let node = node_builder(
                &data_dir,
                &format!("node-{}", i + 1),
                *port,
                &ports,
                &redis,
                &options,
            )
            .envs(options.node_env.get(i).map_or(&[], Vec::as_slice))
            .spawn()
            .await;
            nodes.push(node);
        }
        TestCluster {
            nodes,
            ports,
            _redis: redis,
        }
    }

    /// An admin token (users and tokens are shared: one store, one JWT secret).
    pub(crate) async fn admin(&self) -> Session {
        self.nodes[0].register_admin().await
    }

    /// Waits until every running node listed in `alive` sees exactly those nodes alive, they
    /// agree on the view's digest and each is ready (joined); returns the views.
    pub(crate) async fn converge(&self, admin: &Session, alive: &[usize]) -> Vec<Value> {
        let expected: Vec<String> = alive.iter().map(|i| format!("node-{}", i + 1)).collect();
        let started = Instant::now();
        loop {
            let mut views = Vec::new();
            for i in alive {
                views.push(
                    self.nodes[*i]
                        .get_ok("/api/v1/admin/cluster", admin.token())
                        .await,
                );
            }
            let agreed = views.iter().all(|v| {
                let names: Vec<String> = v["members"]
                    .as_array()
                    .map(|m| {
                        m.iter()
                            .filter(|m| m["state"] == "alive")
                            .map(|m| m["name"].as_str().unwrap_or("").to_owned())
                            .collect()
                    })
                    .unwrap_or_default();
                names == expected
                    && v["members"]
                        .as_array()
                        .is_some_and(|m| m.len() == expected.len())
            }) && views.windows(2).all(|w| w[0]["digest"] == w[1]["digest"]);
            // ...and each has joined (a starting node serves no user before: see the join test).
            let mut ready = agreed;
            for i in alive.iter().filter(|_| agreed) {
                ready &= self.nodes[*i].get_anon("/readyz").await.status() == StatusCode::OK;
            }
            if ready {
                return views;
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "nodes {alive:?} did not converge: {views:#?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub(crate) async fn home_of(&self, admin: &Session, node: usize, user: &Session) -> String {
        let view = self.nodes[node]
            .get_ok(
                &format!("/api/v1/admin/cluster?user={}", user.user_uuid()),
                admin.token(),
            )
            .await;
        view["user"]["home"].as_str().expect("a home").to_owned()
    }

    pub(crate) fn index_of(name: &str) -> usize {
        name.trim_start_matches("node-")
            .parse::<usize>()
            .expect("node-N")
            - 1
    }

    /// A new user whose home is `node` (registered through the first node).
    async fn user_homed_on(&self, admin: &Session, node: &str) -> Session {
        loop {
            let user = self.nodes[0].register_user().await;
            if self.home_of(admin, 0, &user).await == node {
                return user;
            }
        }
    }

    /// Sends `n` non-streaming messages through the given nodes in turn; answers how many were
    /// admitted and how many limited (429 with `Retry-After`).
    async fn count_admitted(
        &self,
        through: &[usize],
        user: &Session,
        thread: &str,
        n: usize,
    ) -> (u32, u32) {
        let (mut admitted, mut limited) = (0, 0);
        for i in 0..n {
            let response = self.nodes[through[i % through.len()]]
                .post_message(
                    user.token(),
                    thread,
                    &json!({ "content": "count me", "model": "mock-echo", "stream": false }),
                )
                .await;
            match response.status() {
                StatusCode::OK => admitted += 1,
                StatusCode::TOO_MANY_REQUESTS => {
                    assert!(response.headers().contains_key("retry-after"));
                    limited += 1;
                }
                other => panic!("unexpected {other}: {}", response.text().await.unwrap()),
            }
        }
        (admitted, limited)
    }

    async fn live_sessions(&self, node: usize) -> u64 {
        let ready = body_json(self.nodes[node].get_anon("/readyz").await).await;
        ready["sessions"].as_u64().unwrap_or(0)
    }
}

#[tokio::test]
async fn three_nodes_agree_route_each_user_home_and_stream_across_nodes() {
    let cluster = TestCluster::start(3, Options::default()).await;
    let admin = cluster.admin().await;
    let views = cluster.converge(&admin, &[0, 1, 2]).await;
    assert_eq!(
        views[0]["ring"]["members"],
        json!(["node-1", "node-2", "node-3"])
    );
    assert_eq!(views[0]["ring"]["digest"], views[2]["ring"]["digest"]);

    let user = cluster.nodes[1].register_user().await;
    // Every node computes the same home for the user.
    let mut homes = Vec::new();
    for node in 0..3 {
        homes.push(cluster.home_of(&admin, node, &user).await);
    }
    assert!(homes.windows(2).all(|w| w[0] == w[1]), "{homes:?}");
    let home = TestCluster::index_of(&homes[0]);
    let others: Vec<usize> = (0..3).filter(|i| *i != home).collect();

    // The user's requests, sent to every node, all land on that one home session.
    let mut threads = Vec::new();
    for node in 0..3 {
        let thread = cluster.nodes[node]
            .create_thread(
                user.token(),
                &json!({ "title": format!("via node {node}") }),
            )
            .await;
        threads.push(id_of(&thread));
    }
    let patched = cluster.nodes[others[0]]
        .patch_json(
            &format!("/api/v1/threads/{}", threads[0]),
            user.token(),
            &json!({ "bookmarked": true }),
        )
        .await;
    assert_eq!(patched.status(), StatusCode::OK);
    assert!(cluster.live_sessions(home).await >= 1);
    for other in &others {
        assert_eq!(
            cluster.live_sessions(*other).await,
            0,
            "node-{} built a session for a user homed on {}",
            other + 1,
            homes[0]
        );
    }

    // A turn on the home, streamed to a client of another node: every event, in order.
    let edge = &cluster.nodes[others[0]];
    let (events, complete) = chatty_turn_through(edge, &user, &threads[1]).await;
    let text = delta_text(&events, None);

    // Resume on a third node after a mid-stream id: exactly the rest, same ids and data.
    let third = &cluster.nodes[others[1]];
    let cut = events.len() / 2;
    let mut resumed = third
        .open_events(user.token(), &threads[1], "", Some(events[cut - 1].seq()))
        .await;
    let rest = resumed.until_done().await;
    let expected: Vec<(u64, String)> = events[cut..]
        .iter()
        .map(|e| (e.seq(), e.raw.clone()))
        .collect();
    let got: Vec<(u64, String)> = rest.iter().map(|e| (e.seq(), e.raw.clone())).collect();
    assert_eq!(got, expected);

    // The message was stored once, complete, and every node reads it.
    let assistant = complete.data["message_id"].as_str().unwrap().to_owned();
    for node in 0..3 {
        let stored = cluster.nodes[node]
            .thread_message(user.token(), &threads[1], &assistant)
            .await;
        assert_eq!(stored["status"], "complete");
        assert_eq!(stored["content"], text);
    }

    // Another user's thread answers 404 through every node, as on one node.
    let stranger = cluster.nodes[0].register_user().await;
    for node in 0..3 {
        let response = cluster.nodes[node]
            .get(&format!("/api/v1/threads/{}", threads[0]), stranger.token())
            .await;
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
    }
}

const TIGHT_TIERS: &str = r#"
default_tier = "free"

[tiers.free]
name = "Free"
requests_per_minute = 7
tokens_per_minute = 1000000000
models = ["*"]
files_per_request = 3
upload_max_bytes = 10485760
"#;

#[tokio::test]
async fn a_per_user_limit_spread_over_three_nodes_admits_exactly_n() {
    let cluster = TestCluster::start(
        3,
        Options {
            tiers: TIGHT_TIERS,
            ..Options::default()
        },
    )
    .await;
    let admin = cluster.admin().await;
    cluster.converge(&admin, &[0, 1, 2]).await;
    let user = cluster.nodes[0].register_user().await;
    let thread = id_of(
        &cluster.nodes[0]
            .create_thread(user.token(), &json!({}))
            .await,
    );
    assert_eq!(
        cluster.count_admitted(&[0, 1, 2], &user, &thread, 15).await,
        (7, 8)
    );
}

#[tokio::test]
async fn a_client_reading_late_across_nodes_gets_every_event_of_a_long_answer() {
    let cluster = TestCluster::start(2, Options::default()).await;
    let admin = cluster.admin().await;
    cluster.converge(&admin, &[0, 1]).await;
    let user = cluster.user_homed_on(&admin, "node-2").await;
    let thread = id_of(
        &cluster.nodes[0]
            .create_thread(user.token(), &json!({}))
            .await,
    );
    // Streamed through node-1 to a client that reads nothing for now.
    let response = cluster.nodes[0]
        .post_message(
            user.token(),
            &thread,
            &json!({ "content": "flood", "model": FLOOD }),
        )
        .await;
    assert_eq!(response.status(), StatusCode::OK);

    // The turn finishes at home at its own pace...
    let deadline = Instant::now() + Duration::from_secs(30);
    let message_id = loop {
        let messages = cluster.nodes[1]
            .thread_messages(user.token(), &thread)
            .await;
        if let Some(done) = messages
            .iter()
            .find(|m| m["role"] == "assistant" && m["status"] == "complete")
        {
            break done["id"].as_str().unwrap().to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "the turn did not finish: {messages:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // Once the client reads, every event arrives, in order. (The relay's credits hold a home
    // back when the edge's client is slower than its socket buffers: see the relay's tests.)
    let mut stream = sse_of(response).await;
    let events = stream.until_done().await;
    assert_contiguous(&events);
    let text = delta_text(&events, Some(&message_id));
    assert_eq!(text.split_whitespace().count(), FLOOD_WORDS);
}

#[tokio::test]
async fn a_per_user_limit_moves_with_its_user_to_a_new_home() {
    let mut cluster = TestCluster::start(
        3,
        Options {
            tiers: TIGHT_TIERS,
            ..Options::default()
        },
    )
    .await;
    let admin = cluster.admin().await;
    cluster.converge(&admin, &[0, 1, 2]).await;
    let user = cluster.user_homed_on(&admin, "node-3").await;
    let thread = id_of(
        &cluster.nodes[0]
            .create_thread(user.token(), &json!({}))
            .await,
    );
    // 5 of the 7 a minute are used while node-3 is away (on node-1 or node-2)...
    let status = cluster.nodes[2].stop_gracefully().await;
    assert!(status.success(), "{status}");
    cluster.converge(&admin, &[0, 1]).await;
    assert_ne!(cluster.home_of(&admin, 0, &user).await, "node-3");
    assert_eq!(
        cluster.count_admitted(&[0, 1], &user, &thread, 5).await,
        (5, 0)
    );

    // ...and node-3, back, is the user's home again: it admits only the 2 left.
    cluster.nodes[2].start().await;
    cluster.converge(&admin, &[0, 1, 2]).await;
    assert_eq!(cluster.home_of(&admin, 0, &user).await, "node-3");
    assert_eq!(
        cluster.count_admitted(&[0, 1, 2], &user, &thread, 9).await,
        (2, 7)
    );
}

#[tokio::test]
async fn a_killed_node_is_removed_its_turn_ends_interrupted_and_its_users_rehome() {
    let mut cluster = TestCluster::start(3, Options::default()).await;
    let admin = cluster.admin().await;
    cluster.converge(&admin, &[0, 1, 2]).await;

    // A user homed on node-3, streaming through node-1.
    let user = cluster.user_homed_on(&admin, "node-3").await;
    let thread = id_of(
        &cluster.nodes[0]
            .create_thread(user.token(), &json!({}))
            .await,
    );
    let mut stream = cluster.nodes[0]
        .send_streaming(
            user.token(),
            &thread,
            &json!({ "content": "go", "model": CRAWL }),
        )
        .await;
    let start = stream.expect_event().await;
    assert_eq!(start.name(), "message_start");
    let assistant = start.data["message_id"].as_str().unwrap().to_owned();
    for _ in 0..5 {
        assert_eq!(stream.expect_event().await.name(), "delta");
    }

    let killed_at = Instant::now();
    cluster.nodes[2].kill().await;
    // The client's stream ends without a `done` (its home is gone); it can reconnect.
    let rest = stream.rest().await;
    assert!(rest.iter().all(|e| e.name() == "delta"), "{rest:#?}");

    // Removed within the heartbeat timeout (plus a tick), by both survivors.
    let views = cluster.converge(&admin, &[0, 1]).await;
    let detected = killed_at.elapsed();
    assert_eq!(views[0]["ring"]["members"], json!(["node-1", "node-2"]));
    assert!(
        detected < Duration::from_secs(10),
        "dead node removed after {detected:?}"
    );

    // The turn that ran there is settled as interrupted by the new home's reaper.
    let message = cluster.nodes[1]
        .wait_for_message_status(user.token(), &thread, &assistant, "interrupted")
        .await;
    assert_eq!(message["role"], "assistant");

    // The user is served by a new home, and nothing else was lost.
    let new_home = cluster.home_of(&admin, 1, &user).await;
    assert_ne!(new_home, "node-3");
    let events = cluster.nodes[1]
        .chat_turn(
            user.token(),
            &thread,
            &json!({ "content": "still here", "model": "mock-echo" }),
        )
        .await;
    assert_eq!(delta_text(&events, None), "still here");
    let messages = cluster.nodes[0]
        .thread_messages(user.token(), &thread)
        .await;
    let statuses: Vec<&str> = messages
        .iter()
        .map(|m| m["status"].as_str().unwrap())
        .collect();
    assert_eq!(
        statuses,
        ["complete", "interrupted", "complete", "complete"]
    );
    let _ = &cluster.ports;
}

#[tokio::test]
async fn a_turn_running_when_its_users_home_moves_finishes_there_and_stays_reachable() {
    let mut cluster = TestCluster::start(3, Options::default()).await;
    let admin = cluster.admin().await;
    cluster.converge(&admin, &[0, 1, 2]).await;
    // A user homed on node-3; while node-3 is away, on node-1 or node-2.
    let user = cluster.user_homed_on(&admin, "node-3").await;
    let status = cluster.nodes[2].stop_gracefully().await;
    assert!(status.success(), "{status}");
    cluster.converge(&admin, &[0, 1]).await;
    let old_home = TestCluster::index_of(&cluster.home_of(&admin, 0, &user).await);
    let edge = 1 - old_home;

    // A long turn starts on the old home, streamed through the other node.
    let thread = id_of(
        &cluster.nodes[edge]
            .create_thread(user.token(), &json!({}))
            .await,
    );
    let mut stream = cluster.nodes[edge]
        .send_streaming(
            user.token(),
            &thread,
            &json!({ "content": "walk", "model": WALK }),
        )
        .await;
    let mut seen = stream.until_event("delta").await;
    let turn_id = seen[0].data["turn_id"].as_str().unwrap().to_owned();
    let message_id = seen[0].data["message_id"].as_str().unwrap().to_owned();

    // node-3 joins again and becomes the user's home while the turn runs.
    cluster.nodes[2].start().await;
    cluster.converge(&admin, &[0, 1, 2]).await;
    assert_eq!(cluster.home_of(&admin, 0, &user).await, "node-3");
    seen.push(stream.expect_event().await);
    assert_eq!(seen.last().map(|e| e.name()), Some("delta"), "{seen:#?}");

    // A client resuming at the new home gets the rest of the turn, from where it stopped.
    let cursor = seen.last().unwrap().seq();
    let mut resumed = cluster.nodes[2]
        .open_events(user.token(), &thread, "", Some(cursor))
        .await;
    let first = resumed.expect_event().await;
    assert_eq!(
        (first.name(), first.seq()),
        ("delta", cursor + 1),
        "{first:#?}"
    );
    // A second tab opening without a cursor sees that answer from its start.
    let mut watcher = cluster.nodes[edge]
        .open_events(user.token(), &thread, "", None)
        .await;
    assert_eq!(watcher.expect_event().await.seq(), seen[0].seq());

    // Cancelling through the new home reaches the turn where it runs.
    let response = cluster.nodes[2]
        .cancel_turn(user.token(), &thread, &turn_id)
        .await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let mut rest = vec![first];
    rest.extend(resumed.until_done().await);
    seen.extend(stream.until_done().await);
    assert_contiguous(&seen);
    // The resumed client got exactly what the original one got after its cursor.
    let tail: Vec<(u64, String)> = seen
        .iter()
        .filter(|e| e.seq() > cursor)
        .map(|e| (e.seq(), e.raw.clone()))
        .collect();
    let got: Vec<(u64, String)> = rest.iter().map(|e| (e.seq(), e.raw.clone())).collect();
    assert_eq!(got, tail);
    let complete = &seen[seen.len() - 2];
    assert_eq!(complete.name(), "message_complete");
    assert_eq!(complete.data["status"], "interrupted", "{complete:#?}");
    let watched = watcher.until_done().await;
    assert_eq!(
        watched.last().map(|e| e.seq()),
        seen.last().map(|e| e.seq())
    );

    // The answer was stored once, as far as it got; the next turn runs at the new home, and a
    // stream that outlived the turn continues with it there.
    let partial = delta_text(&seen, Some(&message_id));
    let stored = cluster.nodes[0]
        .thread_message(user.token(), &thread, &message_id)
        .await;
    assert_eq!(
        (stored["status"].as_str(), stored["content"].as_str()),
        (Some("interrupted"), Some(partial.as_str()))
    );
    let next = cluster.nodes[edge]
        .chat_turn(
            user.token(),
            &thread,
            &json!({ "content": "at the new home", "model": "mock-echo" }),
        )
        .await;
    assert_eq!(delta_text(&next, None), "at the new home");
    assert!(cluster.live_sessions(2).await >= 1);
    let continued = watcher.until_done().await;
    assert_eq!(delta_text(&continued, None), "at the new home");
    assert!(continued[0].seq() > seen.last().unwrap().seq());
    let messages = cluster.nodes[1]
        .thread_messages(user.token(), &thread)
        .await;
    assert_eq!(messages.len(), 4, "{messages:#?}");
}

#[tokio::test]
async fn profile_changes_cross_nodes_also_to_a_crashed_and_restarted_home() {
    let mut cluster = TestCluster::start(3, Options::default()).await;
    let admin = cluster.admin().await;
    cluster.converge(&admin, &[0, 1, 2]).await;
    cluster.nodes[2].kill().await;
    cluster.converge(&admin, &[0, 1]).await;
    cluster.nodes[2].start().await;
    cluster.converge(&admin, &[0, 1, 2]).await;
    // Users homed on the restarted node are served through every node at once — also changes
    // whose answer (the user, with unset settings) crosses the cluster.
    let user = cluster.user_homed_on(&admin, "node-3").await;
    for node in 0..3 {
        let response = cluster.nodes[node]
            .patch_json(
                &format!("/api/v1/admin/users/{}", user.user_uuid()),
                admin.token(),
                &json!({ "tier": "free" }),
            )
            .await;
        assert_eq!(
            response.status(),
            StatusCode::OK,
            "through node-{}: {}",
            node + 1,
            response.text().await.unwrap()
        );
        let thread = cluster.nodes[node]
            .create_thread(user.token(), &json!({}))
            .await;
        assert!(thread["id"].is_string(), "{thread}");
    }
}

#[tokio::test]
async fn a_rolling_restart_under_traffic_fails_no_request() {
    let mut cluster = TestCluster::start(3, Options::default()).await;
    let admin = cluster.admin().await;
    cluster.converge(&admin, &[0, 1, 2]).await;
    let mut users = Vec::new();
    for _ in 0..6 {
        let user = cluster.nodes[0].register_user().await;
        let thread = id_of(
            &cluster.nodes[0]
                .create_thread(user.token(), &json!({}))
                .await,
        );
        users.push((user, thread));
    }
    let users = Arc::new(users);
    let bases: Arc<std::sync::Mutex<Vec<Option<String>>>> = Arc::new(std::sync::Mutex::new(
        cluster.nodes.iter().map(|n| Some(n.base.clone())).collect(),
    ));

    // A load balancer: probes /readyz every 100 ms and sends only to ready nodes.
    let ready: Arc<std::sync::Mutex<Vec<bool>>> = Arc::new(std::sync::Mutex::new(vec![true; 3]));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let prober = {
        let (ready, bases, stop, client) =
            (ready.clone(), bases.clone(), stop.clone(), client.clone());
        tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let current: Vec<Option<String>> = bases.lock().unwrap().clone();
                for (i, base) in current.iter().enumerate() {
                    let ok = match base {
                        Some(base) => client
                            .get(format!("{base}/readyz"))
                            .send()
                            .await
                            .is_ok_and(|r| r.status() == StatusCode::OK),
                        None => false,
                    };
                    ready.lock().unwrap()[i] = ok;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let traffic = {
        let (ready, bases, stop, client, users) = (
            ready.clone(),
            bases.clone(),
            stop.clone(),
            client.clone(),
            users.clone(),
        );
        tokio::spawn(async move {
            let (mut ok, mut failures) = (0u32, Vec::new());
            let mut i = 0usize;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                i += 1;
                let targets: Vec<String> = {
                    let ready = ready.lock().unwrap().clone();
                    let bases = bases.lock().unwrap().clone();
                    bases
                        .into_iter()
                        .zip(ready)
                        .filter_map(|(b, r)| if r { b } else { None })
                        .collect()
                };
                if targets.is_empty() {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
                let base = &targets[i % targets.len()];
                let (user, thread) = &users[i % users.len()];
                let response = client
                    .post(format!("{base}/api/v1/threads/{thread}/messages"))
                    .bearer_auth(user.token())
                    .json(&json!({ "content": "ping", "model": "mock-echo", "stream": false }))
                    .send()
                    .await;
                match response {
                    Ok(r) if r.status() == StatusCode::OK => ok += 1,
                    Ok(r) => failures.push(format!(
                        "{base}: {} {}",
                        r.status(),
                        r.text().await.unwrap_or_default()
                    )),
                    Err(e) => failures.push(format!("{base}: {e}")),
                }
            }
            (ok, failures)
        })
    };

    tokio::time::sleep(Duration::from_millis(500)).await;
    for node in 0..3 {
        cluster.nodes[node].restart().await;
        bases.lock().unwrap()[node] = Some(cluster.nodes[node].base.clone());
        let alive = [0, 1, 2];
        cluster.converge(&admin, &alive).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failures) = traffic.await.unwrap();
    prober.await.unwrap();
    assert!(failures.is_empty(), "{} ok, failed: {failures:#?}", ok);
    assert!(ok > 20, "too little traffic to mean anything: {ok}");
    // Every admitted request's answer was stored.
    for (user, thread) in users.iter() {
        let messages = cluster.nodes[0].thread_messages(user.token(), thread).await;
        assert!(
            messages.iter().all(|m| m["status"] == "complete"),
            "{messages:#?}"
        );
    }
}

#[tokio::test]
async fn a_starting_node_serves_no_user_until_it_has_joined() {
    // Its only seed never answers: it waits for the join timeout, then starts a cluster alone.
    let redis = RedisServer::start();
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let node = node_builder(
        &dir,
        "node-1",
        free_port(),
        &[free_port()],
        &redis,
        &Options::default(),
    )
    .env("CHORUS__CLUSTER__JOIN_TIMEOUT_MS", "3000")
    .spawn()
    .await;
    let started = Instant::now();
    let user = node.register_user().await;
    let ready = node.get_anon("/readyz").await;
    assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body = body_json(ready).await;
    assert!(
        body["checks"]["cluster"]
            .as_str()
            .is_some_and(|c| c.starts_with("joining")),
        "{body}"
    );
    // No user is served meanwhile: this node owns no one yet.
    let response = node
        .post_json("/api/v1/threads", Some(user.token()), &json!({}))
        .await;
    if started.elapsed() < Duration::from_millis(2500) {
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    }
    // Then it is ready, alone, and serves.
    let deadline = Instant::now() + Duration::from_secs(10);
    while node.get_anon("/readyz").await.status() != StatusCode::OK {
        assert!(Instant::now() < deadline, "never became ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(started.elapsed() >= Duration::from_millis(2500));
    let thread = node.create_thread(user.token(), &json!({})).await;
    assert!(thread["id"].is_string(), "{thread}");
    node.wait_for_log(|line| {
        log_message(line).is_some_and(|m| m.starts_with("no cluster peer answered in time"))
    })
    .await;
}

#[tokio::test]
async fn a_wrong_cookie_is_refused_and_logged() {
    let redis = RedisServer::start();
    let options = Options::default();
    let (port_a, port_b) = (free_port(), free_port());
    let dir_a = Arc::new(tempfile::tempdir().unwrap());
    let dir_b = Arc::new(tempfile::tempdir().unwrap());
    let a = node_builder(&dir_a, "node-a", port_a, &[port_b], &redis, &options)
        .spawn()
        .await;
    let _b = node_builder(&dir_b, "node-b", port_b, &[port_a], &redis, &options)
        .env("CHORUS__CLUSTER__COOKIE", "not-the-cluster-cookie-000")
        .spawn()
        .await;
    let refused = a
        .wait_for_log(|line| {
            log_message(line).is_some_and(|m| m.starts_with("cluster connection refused"))
        })
        .await;
    assert!(
        !refused.to_string().contains(COOKIE),
        "the cookie must never be logged"
    );
    let admin = a.register_admin().await;
    let view = a.get_ok("/api/v1/admin/cluster", admin.token()).await;
    assert_eq!(view["members"].as_array().map(Vec::len), Some(1), "{view}");
    assert!(a.logs().iter().all(|l| !l.contains(COOKIE)));
}
