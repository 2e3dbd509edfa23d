//! TLS between nodes (optional): mutual TLS 1.3 from PEM files (`[cluster] tls_cert`, `tls_key`,
//! `tls_ca`).
//!
//! Both directions verify the other side against the cluster's CA bundle: this node's acceptor
//! requires a client certificate that chains to it (rustls `WebPkiClientVerifier`), and its
//! connector checks the server's certificate against it, for the host of the address dialled
//! (an IP SAN for an IP address, else a DNS SAN), and presents this node's own certificate.
//!
//! The handshakes run here rather than inside ractor_cluster. Its listener
//! (`IncomingEncryptionMode::Tls`) awaits each handshake in its accept loop without a timeout (a
//! silent client would stall every later connection) and reports a failed one only as an
//! address-less log line. So [`serve`] accepts on the cluster port itself, handshakes each
//! connection on its own task with a deadline, reports a refusal with the peer's address (log
//! and `cluster_node_events_total{event="tls_failed"}`), and hands the encrypted stream to the
//! node server as an external transport; [`connect`] does the same for outgoing connections.
//! The node server's own listener is then bound to an ephemeral loopback port, behind the same
//! acceptor, and unused.

use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ractor::ActorRef;
use ractor_cluster::{BoxRead, BoxWrite, ClusterBidiStream, NodeServerMessage};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls::crypto::{CryptoProvider, aws_lc_rs};
use tokio_rustls::rustls::pki_types::pem::{self, PemObject};
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::server::danger::ClientCertVerifier;
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore, ServerConfig};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::membership::node_event;

/// Longest wait for a TLS handshake, either way.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait for an outgoing TCP connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Where this node's TLS material lives (`[cluster] tls_*`). Paths only: the key is read at
/// start and never kept in the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterTls {
    /// PEM certificate chain of this node (leaf first); must name the advertised host.
    pub cert: PathBuf,
    /// PEM private key of that certificate.
    pub key: PathBuf,
    /// PEM CA bundle that every peer's certificate must chain to.
    pub ca: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cluster.{key}: reading {path}")]
    Read {
        key: &'static str,
        path: PathBuf,
        #[source]
        source: pem::Error,
    },
    #[error("cluster.{key}: {path} holds no {what}")]
    Empty {
        key: &'static str,
        path: PathBuf,
        what: &'static str,
    },
    #[error("cluster.tls_ca: {path}")]
    Ca {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("cluster.tls_ca: {path}")]
    Verifier {
        path: PathBuf,
        #[source]
        source: rustls::server::VerifierBuilderError,
    },
    /// The certificate and key do not go together, or are of an unsupported kind.
    #[error("cluster.tls_cert / cluster.tls_key: not usable as this node's certificate and key")]
    Identity(#[source] rustls::Error),
}

/// The loaded TLS settings: an acceptor for incoming and a connector for outgoing connections.
#[derive(Clone)]
pub(crate) struct Tls {
    pub acceptor: TlsAcceptor,
    pub connector: TlsConnector,
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Tls { .. }")
    }
}

impl Tls {
    /// Reads the three PEM files and builds both ends (TLS 1.3 only, aws-lc-rs).
    pub fn load(files: &ClusterTls) -> Result<Tls, TlsError> {
        let provider: Arc<CryptoProvider> = Arc::new(aws_lc_rs::default_provider());
        let chain = read_certs("tls_cert", &files.cert, "certificate")?;
        let key = read_key(&files.key)?;
        let mut roots = RootCertStore::empty();
        for cert in read_certs("tls_ca", &files.ca, "CA certificate")? {
            roots.add(cert).map_err(|source| TlsError::Ca {
                path: files.ca.clone(),
                source,
            })?;
        }
        let roots = Arc::new(roots);
        let client_verifier: Arc<dyn ClientCertVerifier> =
            WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
                .build()
                .map_err(|source| TlsError::Verifier {
                    path: files.ca.clone(),
                    source,
                })?;
        let server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(TlsError::Identity)?
            .with_client_cert_verifier(client_verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(TlsError::Identity)?;
        let client = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(TlsError::Identity)?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(TlsError::Identity)?;
        Ok(Tls {
            acceptor: TlsAcceptor::from(Arc::new(server)),
            connector: TlsConnector::from(Arc::new(client)),
        })
    }
}

fn read_certs(
    key: &'static str,
    path: &Path,
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let read = |source| TlsError::Read {
        key,
        path: path.to_owned(),
        source,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(read)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(read)?;
    if certs.is_empty() {
        return Err(TlsError::Empty {
            key,
            path: path.to_owned(),
            what,
        });
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    // The errors name the file and what was wrong with it, never its content.
    PrivateKeyDer::from_pem_file(path).map_err(|source| match source {
        pem::Error::NoItemsFound => TlsError::Empty {
            key: "tls_key",
            path: path.to_owned(),
            what: "private key",
        },
        source => TlsError::Read {
            key: "tls_key",
            path: path.to_owned(),
            source,
        },
    })
}

/// The name a peer's certificate must carry: the host part of its `host:port` address, as an IP
/// address if it is one, else as a DNS name.
pub(crate) fn server_name(addr: &str) -> Result<ServerName<'static>, String> {
    if let Ok(socket) = addr.parse::<SocketAddr>() {
        return Ok(ServerName::IpAddress(socket.ip().into()));
    }
    let host = addr.rsplit_once(':').map_or(addr, |(host, _)| host);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(ServerName::IpAddress(ip.into()));
    }
    ServerName::try_from(host.to_owned())
        .map_err(|e| format!("`{host}` is neither an IP address nor a DNS name ({e})"))
}

/// Why an outgoing TLS connection did not start a node session.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnectError {
    #[error("{0}")]
    Name(String),
    #[error("connecting: {0}")]
    Tcp(io::Error),
    /// The peer's certificate was refused here, or ours there, or it does not speak TLS.
    #[error("TLS handshake: {0}")]
    Handshake(io::Error),
    #[error("the node server is gone")]
    NodeServer,
}

/// Dials `addr`, runs the TLS handshake (verifying the peer for its host) and hands the stream
/// to the node server, which then authenticates the session with the cookie.
pub(crate) async fn connect(
    server: &ActorRef<NodeServerMessage>,
    addr: &str,
    tls: &Tls,
) -> Result<(), ConnectError> {
    let name = server_name(addr).map_err(ConnectError::Name)?;
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| ConnectError::Tcp(io::ErrorKind::TimedOut.into()))?
        .map_err(ConnectError::Tcp)?;
    tcp.set_nodelay(true).map_err(ConnectError::Tcp)?;
    let peer = tcp.peer_addr().map_err(ConnectError::Tcp)?;
    let local = tcp.local_addr().map_err(ConnectError::Tcp)?;
    let stream = tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.connector.connect(name, tcp))
        .await
        .map_err(|_| ConnectError::Handshake(handshake_timed_out()))?
        .map_err(ConnectError::Handshake)?;
    server
        .cast(NodeServerMessage::ConnectionOpenedExternal {
            stream: Box::new(Encrypted {
                stream,
                peer,
                local,
            }),
            is_server: false,
        })
        .map_err(|_| ConnectError::NodeServer)
}

/// Accepts node-to-node connections on `listener` until the task is aborted: each one's
/// handshake runs on its own task, bounded by [`HANDSHAKE_TIMEOUT`].
pub(crate) async fn serve(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    server: ActorRef<NodeServerMessage>,
) {
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // E.g. out of file descriptors: wait a little rather than spin.
                tracing::warn!(error = %e, "cluster listener: accepting a connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let acceptor = acceptor.clone();
        let server = server.clone();
        tokio::spawn(async move {
            let _ = tcp.set_nodelay(true);
            let local = tcp.local_addr().unwrap_or(peer);
            let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp))
                .await
                .unwrap_or_else(|_| Err(handshake_timed_out()));
            match handshake {
                Ok(stream) => {
                    let _ = server.cast(NodeServerMessage::ConnectionOpenedExternal {
                        stream: Box::new(Encrypted {
                            stream,
                            peer,
                            local,
                        }),
                        is_server: true,
                    });
                }
                Err(e) => refused(&peer.to_string(), "inbound", &e),
            }
        });
    }
}

fn handshake_timed_out() -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        format!(
            "no TLS handshake within {}s",
            HANDSHAKE_TIMEOUT.as_secs_f32()
        ),
    )
}

/// Reports a failed handshake: a certificate from another CA, a name that does not match, or a
/// peer without TLS. The error says which (rustls' own words); no key material is in it. When
/// the peer's alert ended it, the peer refused this node, and says so in its own log.
pub(crate) fn refused(peer: &str, direction: &'static str, error: &io::Error) {
    let by_peer = error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .is_some_and(|e| matches!(e, rustls::Error::AlertReceived(_)));
    if by_peer {
        tracing::warn!(
            peer = %peer,
            direction,
            error = %error,
            "cluster connection refused by the peer: TLS handshake failed (this node's \
             certificate is not from the peer's CA, or the peer does not trust it)"
        );
    } else {
        tracing::warn!(
            peer = %peer,
            direction,
            error = %error,
            "cluster connection refused: TLS handshake failed (a certificate not from the \
             cluster's CA, a name it does not carry, or a peer without TLS)"
        );
    }
    node_event("tls_failed");
}

/// An established TLS stream, handed to ractor_cluster as an external transport.
struct Encrypted<S> {
    stream: S,
    peer: SocketAddr,
    local: SocketAddr,
}

impl<S> ClusterBidiStream for Encrypted<S>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    fn split(self: Box<Self>) -> (BoxRead, BoxWrite) {
        let (read, write) = tokio::io::split(self.stream);
        (Box::new(read), Box::new(write))
    }

    /// The session's peer address, as for a plain TCP session (membership reports refusals and
    /// matches members by it).
    fn peer_label(&self) -> Option<String> {
        Some(self.peer.to_string())
    }

    fn local_label(&self) -> Option<String> {
        Some(self.local.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_names_are_the_host_of_the_address() {
        let ip = |s: &str| match server_name(s) {
            Ok(ServerName::IpAddress(ip)) => IpAddr::from(ip).to_string(),
            other => panic!("{s}: {other:?}"),
        };
        assert_eq!(ip("127.0.0.1:7946"), "127.0.0.1");
        assert_eq!(ip("[::1]:7946"), "::1");
        assert_eq!(ip("10.0.0.2"), "10.0.0.2");
        match server_name("chorus-0.chorus-headless:7946") {
            Ok(ServerName::DnsName(name)) => {
                assert_eq!(name.as_ref(), "chorus-0.chorus-headless")
            }
            other => panic!("{other:?}"),
        }
        assert!(server_name("not a host:1").is_err());
    }

    #[test]
    fn missing_files_name_the_key_and_path() {
        let files = ClusterTls {
            cert: "/nonexistent/node.crt".into(),
            key: "/nonexistent/node.key".into(),
            ca: "/nonexistent/ca.crt".into(),
        };
        let Err(error) = Tls::load(&files) else {
            panic!("loaded missing files");
        };
        let message = error.to_string();
        assert!(message.starts_with("cluster.tls_cert:"), "{message}");
        assert!(message.contains("/nonexistent/node.crt"), "{message}");
    }

    #[test]
    fn a_file_without_pem_sections_is_reported_empty() {
        let dir = std::env::temp_dir().join(format!("chorus-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let files = ClusterTls {
            cert: empty.clone(),
            key: empty.clone(),
            ca: empty.clone(),
        };
        let Err(error) = Tls::load(&files) else {
            panic!("loaded an empty file");
        };
        assert!(
            matches!(
                error,
                TlsError::Empty {
                    key: "tls_cert",
                    ..
                }
            ),
            "{error}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
