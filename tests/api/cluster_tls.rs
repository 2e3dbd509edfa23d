//! Mutual TLS between cluster nodes (`[cluster] tls_cert`, `tls_key`, `tls_ca`): real `chorus`
//! processes with certificates made at test time by `scripts/gen-cluster-certs` (openssl).

use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};

use crate::cluster::{Options, TestCluster, chatty_turn_through};
use crate::helpers::*;

/// A CA and one certificate per node host, in a temp dir.
struct Certs {
    dir: tempfile::TempDir,
}

impl Certs {
    fn generate(hosts: &[&str]) -> Certs {
        let dir = tempfile::tempdir().expect("a certs dir");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/gen-cluster-certs");
        let output = std::process::Command::new(script)
            .arg(dir.path())
            .args(hosts)
            .env("DAYS", "2")
            .output()
            .expect("running scripts/gen-cluster-certs (needs openssl)");
        assert!(
            output.status.success(),
            "gen-cluster-certs failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        Certs { dir }
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    /// The `[cluster]` TLS settings of `host`, trusting `ca` (a file in this dir).
    fn env_with_ca(&self, host: &str, ca: &Path) -> Vec<(String, String)> {
        let path = |file: String| self.path(&file).display().to_string();
        vec![
            (
                "CHORUS__CLUSTER__TLS_CERT".into(),
                path(format!("{host}.crt")),
            ),
            (
                "CHORUS__CLUSTER__TLS_KEY".into(),
                path(format!("{host}.key")),
            ),
            ("CHORUS__CLUSTER__TLS_CA".into(), ca.display().to_string()),
        ]
    }

    fn env(&self, host: &str) -> Vec<(String, String)> {
        self.env_with_ca(host, &self.path("ca.crt"))
    }

    /// The base64 body of `host`'s private key, which no log line may contain.
    fn key_body(&self, host: &str) -> Vec<String> {
        std::fs::read_to_string(self.path(&format!("{host}.key")))
            .unwrap()
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .map(str::to_owned)
            .collect()
    }
}

/// A field of a JSON log line (top level with flattened events, or under `fields`).
fn log_field<'a>(line: &'a Value, name: &str) -> Option<&'a str> {
    line.get(name)
        .or_else(|| line.get("fields").and_then(|f| f.get(name)))
        .and_then(Value::as_str)
}

fn is_tls_refusal(line: &Value, direction: &str) -> bool {
    log_message(line).is_some_and(|m| m.starts_with("cluster connection refused: TLS"))
        && log_field(line, "direction") == Some(direction)
}

fn tls_refusals(app: &TestApp, direction: &str) -> Vec<Value> {
    app.logs()
        .iter()
        .filter_map(|l| parse_log_line(l))
        .filter(|l| is_tls_refusal(l, direction))
        .collect()
}

async fn metrics_text(app: &TestApp) -> String {
    app.request(Method::GET, "/metrics")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

const HEARTBEAT_TIMEOUT_MS: u64 = 1500;

/// Nodes 1 and 2 of a TLS cluster, and a third node set up by the test: refused everywhere.
/// Waits for `node-1` to refuse the third node's connection, a few heartbeat timeouts more,
/// then checks that nodes 1 and 2 agree on just themselves and the third stays alone.
async fn assert_third_node_stays_out(cluster: &TestCluster) -> Value {
    let refused = cluster.nodes[0]
        .wait_for_log(|line| is_tls_refusal(line, "inbound"))
        .await;
    tokio::time::sleep(Duration::from_millis(3 * HEARTBEAT_TIMEOUT_MS)).await;
    let admin = cluster.admin().await;
    let views = cluster.converge(&admin, &[0, 1]).await;
    assert_eq!(views[0]["ring"]["members"], json!(["node-1", "node-2"]));
    let outsider = cluster.nodes[2]
        .get_ok("/api/v1/admin/cluster", admin.token())
        .await;
    assert_eq!(
        outsider["members"].as_array().map(Vec::len),
        Some(1),
        "{outsider}"
    );
    assert!(
        metrics_text(&cluster.nodes[0])
            .await
            .contains(r#"cluster_node_events_total{event="tls_failed"}"#)
    );
    refused
}

#[tokio::test]
async fn three_nodes_with_mutual_tls_agree_and_stream_across_nodes() {
    let certs = Certs::generate(&["node-1", "node-2", "node-3"]);
    let cluster = TestCluster::start(
        3,
        Options {
            node_env: (1..=3).map(|i| certs.env(&format!("node-{i}"))).collect(),
            ..Options::default()
        },
    )
    .await;
    let admin = cluster.admin().await;
    let views = cluster.converge(&admin, &[0, 1, 2]).await;
    assert_eq!(
        views[0]["ring"]["members"],
        json!(["node-1", "node-2", "node-3"])
    );
    assert_eq!(views[0]["ring"]["digest"], views[1]["ring"]["digest"]);
    assert_eq!(views[0]["ring"]["digest"], views[2]["ring"]["digest"]);

    // A user homed on another node than node-1, streaming through node-1: every event arrives
    // over the encrypted relay, in order.
    let user = loop {
        let user = cluster.nodes[0].register_user().await;
        if cluster.home_of(&admin, 0, &user).await != "node-1" {
            break user;
        }
    };
    let edge = &cluster.nodes[0];
    let thread = id_of(&edge.create_thread(user.token(), &json!({})).await);
    chatty_turn_through(edge, &user, &thread).await;

    for (i, node) in cluster.nodes.iter().enumerate() {
        let logs = node.logs();
        let refused: Vec<&String> = logs
            .iter()
            .filter(|l| l.contains("cluster connection refused"))
            .collect();
        assert!(refused.is_empty(), "node-{}: {refused:#?}", i + 1);
        for host in ["node-1", "node-2", "node-3"] {
            for key_line in certs.key_body(host) {
                assert!(
                    logs.iter().all(|l| !l.contains(&key_line)),
                    "node-{} logged key material",
                    i + 1
                );
            }
        }
    }
}

#[tokio::test]
async fn a_node_with_a_certificate_from_another_ca_is_refused_and_logged() {
    let certs = Certs::generate(&["node-1", "node-2"]);
    let rogue = Certs::generate(&["node-3"]);
    // The rogue node trusts both CAs, so that what refuses it is the cluster's check of its
    // client certificate (and, when the others dial it, of its server certificate).
    let both = rogue.path("both-ca.crt");
    let bundle = [
        std::fs::read_to_string(certs.path("ca.crt")).unwrap(),
        std::fs::read_to_string(rogue.path("ca.crt")).unwrap(),
    ]
    .concat();
    std::fs::write(&both, bundle).unwrap();
    let cluster = TestCluster::start(
        3,
        Options {
            node_env: vec![
                certs.env("node-1"),
                certs.env("node-2"),
                rogue.env_with_ca("node-3", &both),
            ],
            heartbeat_timeout_ms: HEARTBEAT_TIMEOUT_MS,
            ..Options::default()
        },
    )
    .await;
    let refused = assert_third_node_stays_out(&cluster).await;
    let error = log_field(&refused, "error").unwrap_or_default();
    assert!(error.contains("certificate"), "{refused}");
    assert!(
        log_field(&refused, "peer").is_some_and(|p| p.starts_with("127.0.0.1:")),
        "{refused}"
    );
    // The cluster's nodes also refuse the rogue node's server certificate when they dial it.
    let dialled = eventually(Duration::from_secs(20), || {
        cluster.nodes[..2]
            .iter()
            .any(|n| !tls_refusals(n, "outbound").is_empty())
    })
    .await;
    assert!(dialled, "no outbound refusal logged by node-1 or node-2");
    for node in &cluster.nodes {
        for key_line in certs
            .key_body("node-1")
            .iter()
            .chain(&rogue.key_body("node-3"))
        {
            assert!(node.logs().iter().all(|l| !l.contains(key_line)));
        }
    }
}

#[tokio::test]
async fn a_plain_tcp_node_cannot_join_a_tls_cluster() {
    let certs = Certs::generate(&["node-1", "node-2"]);
    let cluster = TestCluster::start(
        3,
        Options {
            // node-3 has no TLS settings: plain TCP.
            node_env: vec![certs.env("node-1"), certs.env("node-2")],
            heartbeat_timeout_ms: HEARTBEAT_TIMEOUT_MS,
            ..Options::default()
        },
    )
    .await;
    assert_third_node_stays_out(&cluster).await;
    // The plain node sees its sessions closed before authentication.
    cluster.nodes[2]
        .wait_for_log(|line| {
            log_message(line).is_some_and(|m| m.starts_with("cluster connection refused"))
        })
        .await;
}
