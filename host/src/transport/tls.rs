//! The manager's TLS identity, the admin token and the QUIC endpoint configs.
//!
//! # What this module owns
//!
//! - **Files in the data directory**: the self-signed certificate
//!   ([`CERT_FILE`]), its private key ([`KEY_FILE`], mode 0600) and the admin
//!   token ([`TOKEN_FILE`], mode 0600). They are created on first start
//!   ([`load_or_create_identity`], [`load_or_create_token`]) and reloaded
//!   unchanged afterwards; an existing file is never overwritten.
//! - **QUIC transport and TLS configs**: [`transport_config`] (shared by
//!   both ends), [`migration_transport_config`] (bulk KV-cache transfers:
//!   larger datagrams), [`server_config`] / [`client_config`] /
//!   [`migration_client_config`] and the endpoint constructors
//!   [`server_endpoint`] / [`client_endpoint`], whose UDP sockets ask for
//!   large kernel buffers and accept datagrams up to 64 KB. QUIC runs over
//!   TLS 1.3 only, with the *ring* crypto provider chosen explicitly (no
//!   process-default provider is installed or read).
//! - **The pinned-certificate verifier**: clients trust exactly one
//!   end-entity certificate, identified by the SHA-256 of its DER
//!   ([`Trust`]). Names, CA chains and validity periods are ignored; the
//!   handshake signatures are still verified with the provider's algorithms,
//!   so the peer must hold the pinned certificate's private key.
//!
//! # What it must never touch
//!
//! Requests, the engine, scheduling and policies: this module only hands out
//! identities, tokens and configured endpoints. What flows over a connection,
//! and whether a presented admin token authorises anything, is decided by the
//! callers ([`token_matches`] is only the comparison).

use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{NoInitialCipherSuite, QuicClientConfig, QuicServerConfig};
use quinn::{IdleTimeout, VarInt};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};

/// The ALPN protocol id of llumen's QUIC protocol.
pub const ALPN: &[u8] = b"llumen/1";
/// The server name (SNI) clients send. The certificate's SAN lists it, plus
/// `localhost`, `127.0.0.1` and `::1`; the pinned verifier ignores names.
pub const SERVER_NAME: &str = "llumen";
/// The certificate (PEM) in the data directory.
pub const CERT_FILE: &str = "cert.pem";
/// The private key (PEM, PKCS#8) in the data directory, mode 0600.
pub const KEY_FILE: &str = "key.pem";
/// The admin token in the data directory, mode 0600: 64 lowercase hex chars.
pub const TOKEN_FILE: &str = "admin-token";

/// Bytes of randomness in a generated admin token.
const TOKEN_BYTES: usize = 32;

/// Errors from loading or creating the identity and token, and from building
/// QUIC configs and endpoints. Every file error names its path.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file-system operation on `path` failed.
    #[error("{action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A PEM file does not hold what it should.
    #[error("{} is not a valid PEM {what}: {source}", path.display())]
    Pem {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    /// Only one of the certificate and the key exists: refuse to guess.
    #[error(
        "{} exists but {} is missing; restore it, or remove both to generate a new identity",
        present.display(),
        missing.display()
    )]
    IncompleteIdentity { present: PathBuf, missing: PathBuf },
    /// The key in `key` does not belong to the certificate in `cert`.
    #[error("{} does not match the certificate {}: {source}", key.display(), cert.display())]
    KeyMismatch {
        cert: PathBuf,
        key: PathBuf,
        #[source]
        source: rustls::Error,
    },
    /// Generating the self-signed certificate failed.
    #[error("generating the self-signed certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// The system random source failed.
    #[error("reading the system random source: {0}")]
    Random(String),
    /// The token file exists but holds nothing but whitespace.
    #[error("admin token file {} is empty", path.display())]
    EmptyToken { path: PathBuf },
    /// A fingerprint is not 64 hex digits (after removing ':' separators).
    #[error(
        "invalid certificate fingerprint {given:?}: expected the SHA-256 as 64 hex digits, \
         optionally separated by ':'"
    )]
    InvalidFingerprint { given: String },
    /// rustls refused a configuration.
    #[error("building the TLS {what} config: {source}")]
    Rustls {
        what: &'static str,
        #[source]
        source: rustls::Error,
    },
    /// The rustls config cannot be used for QUIC.
    #[error("building the QUIC {what} config: {source}")]
    Quic {
        what: &'static str,
        #[source]
        source: NoInitialCipherSuite,
    },
    /// Creating a QUIC endpoint on `addr` failed.
    #[error("binding a QUIC {what} endpoint on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> TlsError + 'a {
    move |source| TlsError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// The manager's certificate and private key.
pub struct ServerIdentity {
    pub cert_der: CertificateDer<'static>,
    pub key_der: PrivateKeyDer<'static>,
    /// SHA-256 of `cert_der`, lowercase hex without separators.
    pub fingerprint: String,
}

impl Clone for ServerIdentity {
    fn clone(&self) -> Self {
        Self {
            cert_der: self.cert_der.clone(),
            key_der: self.key_der.clone_key(),
            fingerprint: self.fingerprint.clone(),
        }
    }
}

impl fmt::Debug for ServerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerIdentity")
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

/// The crypto provider used everywhere in this module.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Loads cert.pem/key.pem from data_dir, or generates a self-signed one
/// (rcgen, ECDSA P-256) on first start and writes them (dir created, key
/// 0600). Returns (identity, created: bool).
///
/// A loaded pair is checked for consistency (the key must belong to the
/// certificate). If only one of the two files exists, this fails rather than
/// replacing it.
pub fn load_or_create_identity(data_dir: &Path) -> Result<(ServerIdentity, bool), TlsError> {
    let cert_path = data_dir.join(CERT_FILE);
    let key_path = data_dir.join(KEY_FILE);
    let cert_exists = exists(&cert_path)?;
    let key_exists = exists(&key_path)?;
    match (cert_exists, key_exists) {
        (true, true) => Ok((load_identity(&cert_path, &key_path)?, false)),
        (true, false) => Err(TlsError::IncompleteIdentity {
            present: cert_path,
            missing: key_path,
        }),
        (false, true) => Err(TlsError::IncompleteIdentity {
            present: key_path,
            missing: cert_path,
        }),
        (false, false) => {
            create_private_dir(data_dir)?;
            let key_pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
            let mut params = rcgen::CertificateParams::new(vec![
                SERVER_NAME.to_string(),
                "localhost".to_string(),
                "127.0.0.1".to_string(),
                "::1".to_string(),
            ])?;
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, SERVER_NAME);
            let cert = params.self_signed(&key_pair)?;
            // Key first: a crash in between leaves a lone key, which the next
            // start reports instead of silently pairing it with a new cert.
            // If another process wins the race for the key, its identity is
            // used (and never paired with this certificate).
            if !write_new_file(&key_path, key_pair.serialize_pem().as_bytes(), 0o600)?
                || !write_new_file(&cert_path, cert.pem().as_bytes(), 0o644)?
            {
                return Ok((load_identity(&cert_path, &key_path)?, false));
            }
            let cert_der = cert.der().clone();
            let identity = ServerIdentity {
                fingerprint: sha256_hex(&cert_der),
                cert_der,
                key_der: PrivateKeyDer::Pkcs8(key_pair.serialize_der().into()),
            };
            Ok((identity, true))
        }
    }
}

fn load_identity(cert_path: &Path, key_path: &Path) -> Result<ServerIdentity, TlsError> {
    let cert_der = read_cert_pem(cert_path)?;
    warn_if_not_private(key_path);
    let key_pem = fs::read(key_path).map_err(io_err("reading", key_path))?;
    let key_der = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|source| TlsError::Pem {
        what: "private key",
        path: key_path.to_path_buf(),
        source,
    })?;
    rustls::sign::CertifiedKey::from_der(vec![cert_der.clone()], key_der.clone_key(), &provider())
        .map_err(|source| TlsError::KeyMismatch {
            cert: cert_path.to_path_buf(),
            key: key_path.to_path_buf(),
            source,
        })?;
    Ok(ServerIdentity {
        fingerprint: sha256_hex(&cert_der),
        cert_der,
        key_der,
    })
}

fn read_cert_pem(path: &Path) -> Result<CertificateDer<'static>, TlsError> {
    let pem = fs::read(path).map_err(io_err("reading", path))?;
    CertificateDer::from_pem_slice(&pem).map_err(|source| TlsError::Pem {
        what: "certificate",
        path: path.to_path_buf(),
        source,
    })
}

/// Loads the admin token from `data_dir`, or creates it (64 hex chars from
/// 32 random bytes, mode 0600) on first start.
pub fn load_or_create_token(data_dir: &Path) -> Result<String, TlsError> {
    let path = data_dir.join(TOKEN_FILE);
    if exists(&path)? {
        warn_if_not_private(&path);
        return read_token(&path);
    }
    create_private_dir(data_dir)?;
    let mut bytes = [0u8; TOKEN_BYTES];
    provider()
        .secure_random
        .fill(&mut bytes)
        .map_err(|e| TlsError::Random(format!("{e:?}")))?;
    let token = hex::encode(bytes);
    if write_new_file(&path, format!("{token}\n").as_bytes(), 0o600)? {
        Ok(token)
    } else {
        // Created concurrently by another process: theirs wins.
        read_token(&path)
    }
}

/// Reads a token file, trimming surrounding whitespace. Fails (naming the
/// path) if the file is missing, unreadable or empty.
pub fn read_token(path: &Path) -> Result<String, TlsError> {
    let text = fs::read_to_string(path).map_err(io_err("reading admin token", path))?;
    let token = text.trim();
    if token.is_empty() {
        return Err(TlsError::EmptyToken {
            path: path.to_path_buf(),
        });
    }
    Ok(token.to_string())
}

/// Constant-time comparison of tokens.
///
/// Both sides are hashed first, so the time taken depends on neither the
/// position of the first difference nor the expected token's length.
pub fn token_matches(expected: &str, given: &str) -> bool {
    let a = Sha256::digest(expected.as_bytes());
    let b = Sha256::digest(given.as_bytes());
    let diff = a
        .iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0 && !expected.is_empty()
}

/// How a client decides to trust the server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Trust {
    /// Pin the certificate stored in this PEM file (the manager's cert.pem).
    CertFile(PathBuf),
    /// Pin the certificate with this SHA-256 fingerprint (hex, with or
    /// without ':' separators, any case).
    Fingerprint(String),
}

impl Trust {
    /// The pinned fingerprint, normalised to 64 lowercase hex digits.
    pub fn fingerprint(&self) -> Result<String, TlsError> {
        match self {
            Trust::CertFile(path) => fingerprint_of_cert_file(path),
            Trust::Fingerprint(given) => normalize_fingerprint(given),
        }
    }
}

/// SHA-256 of the (first) certificate in a PEM file, lowercase hex.
pub fn fingerprint_of_cert_file(path: &Path) -> Result<String, TlsError> {
    Ok(sha256_hex(&read_cert_pem(path)?))
}

/// Normalises a fingerprint to 64 lowercase hex digits: ':' separators and
/// surrounding whitespace are removed, case is ignored.
pub fn normalize_fingerprint(given: &str) -> Result<String, TlsError> {
    let cleaned: String = given
        .trim()
        .chars()
        .filter(|c| *c != ':')
        .map(|c| c.to_ascii_lowercase())
        .collect();
    if cleaned.len() != 64 || !cleaned.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(TlsError::InvalidFingerprint {
            given: given.to_string(),
        });
    }
    Ok(cleaned)
}

/// Kernel socket buffer asked for on every endpoint's UDP socket, each
/// direction (Linux caps it at `net.core.rmem_max` / `wmem_max`): the
/// default ~208 KB receive buffer drops packets at migration speeds.
const SOCKET_BUFFER_BYTES: usize = 8 << 20;
/// Largest UDP payload an endpoint accepts (advertised to peers; the QUIC
/// maximum). What a sender actually uses is found by MTU discovery.
const MAX_UDP_PAYLOAD: u16 = 65_527;
/// Upper bound of MTU discovery towards a loopback peer: a datagram of
/// ~64 KB crosses loopback in one piece, and one send per datagram (no GSO)
/// is then the cheapest way to move bulk data (quic-facts: ~2.4× the
/// default configuration).
const LOOPBACK_MTU: u16 = 65_000;
/// Upper bound of MTU discovery towards other peers, GSO on: quinn batches
/// up to 10 datagrams per send, and over 65,507 bytes per batch the kernel
/// refuses it (the path then falls back to 1,200 bytes). Jumbo-frame
/// networks reach it; 1,500-byte networks stop at their own MTU.
const NETWORK_MTU: u16 = 6_500;

/// The transport parameters both ends use.
///
/// Keep-alive 1 s under a 5 s idle timeout (a peer that vanishes, such as a
/// killed instance process, is noticed within 5 s); up to 4096 concurrent
/// bidirectional streams; flow-control windows sized for multi-MB KV-cache
/// transfers (a 16-block migration stage of SmolLM2-135M is ~12 MB) so a
/// warm connection never waits on window updates: 16 MiB per stream, 64 MiB
/// per connection in each direction. MTU settings stay at quinn's defaults
/// (initial 1200, discovery up to 1452, GSO on): an `initial_mtu` above the
/// initial congestion window stalls the handshake, and a larger discovery
/// bound only pays on loopback (see ../shared/notes/quic-facts.md).
pub fn transport_config() -> quinn::TransportConfig {
    const STREAM_WINDOW: u32 = 16 << 20;
    const CONNECTION_WINDOW: u32 = 64 << 20;
    let mut config = quinn::TransportConfig::default();
    config
        .keep_alive_interval(Some(Duration::from_secs(1)))
        .max_idle_timeout(Some(
            IdleTimeout::try_from(Duration::from_secs(5)).expect("5 s fits a QUIC idle timeout"),
        ))
        .max_concurrent_bidi_streams(VarInt::from_u32(4096))
        .stream_receive_window(VarInt::from_u32(STREAM_WINDOW))
        .receive_window(VarInt::from_u32(CONNECTION_WINDOW))
        .send_window(u64::from(CONNECTION_WINDOW));
    config
}

/// The transport of a live-migration connection to `peer` (the connecting
/// side's, which sends the KV cache): [`transport_config`] with MTU
/// discovery up to 64 KB datagrams and GSO off towards a loopback peer,
/// and up to [`NETWORK_MTU`] with GSO on towards others. The handshake still
/// starts at 1,200 bytes (an initial MTU above the initial congestion window
/// stalls it); discovery climbs within a few round trips of a warm
/// connection.
pub fn migration_transport_config(peer: SocketAddr) -> quinn::TransportConfig {
    let mut config = transport_config();
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    if peer.ip().is_loopback() {
        mtu.upper_bound(LOOPBACK_MTU);
        config.enable_segmentation_offload(false);
    } else {
        mtu.upper_bound(NETWORK_MTU);
    }
    config.mtu_discovery_config(Some(mtu));
    config
}

/// The client config of a live-migration connection to `peer`:
/// [`client_config`] with [`migration_transport_config`].
pub fn migration_client_config(
    trust: &Trust,
    peer: SocketAddr,
) -> Result<quinn::ClientConfig, TlsError> {
    let mut config = client_config(trust, &[ALPN])?;
    config.transport_config(Arc::new(migration_transport_config(peer)));
    Ok(config)
}

/// A QUIC server config presenting `identity` (TLS 1.3, no client
/// certificates, no 0-RTT) and offering the `alpn` protocols.
pub fn server_config(
    identity: &ServerIdentity,
    alpn: &[&[u8]],
) -> Result<quinn::ServerConfig, TlsError> {
    let rustls_err = |source| TlsError::Rustls {
        what: "server",
        source,
    };
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(rustls_err)?
        .with_no_client_auth()
        .with_single_cert(
            vec![identity.cert_der.clone()],
            identity.key_der.clone_key(),
        )
        .map_err(rustls_err)?;
    tls.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let quic = QuicServerConfig::try_from(tls).map_err(|source| TlsError::Quic {
        what: "server",
        source,
    })?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
    config.transport_config(Arc::new(transport_config()));
    Ok(config)
}

/// A QUIC client config that trusts exactly the pinned certificate (TLS 1.3,
/// no client certificate, no 0-RTT) and offers the `alpn` protocols.
pub fn client_config(trust: &Trust, alpn: &[&[u8]]) -> Result<quinn::ClientConfig, TlsError> {
    let provider = provider();
    let verifier = PinnedCertVerifier::new(&trust.fingerprint()?, provider.clone())?;
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|source| TlsError::Rustls {
            what: "client",
            source,
        })?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    tls.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let quic = QuicClientConfig::try_from(tls).map_err(|source| TlsError::Quic {
        what: "client",
        source,
    })?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    config.transport_config(Arc::new(transport_config()));
    Ok(config)
}

/// A client endpoint bound to an ephemeral port of the right family for
/// `server` (0.0.0.0:0 or [::]:0), with client_config set as default (ALPN
/// [`ALPN`]). Must be called inside a tokio runtime. Connect with
/// `endpoint.connect(server, SERVER_NAME)`.
pub fn client_endpoint(server: SocketAddr, trust: &Trust) -> Result<quinn::Endpoint, TlsError> {
    let config = client_config(trust, &[ALPN])?;
    let bind: SocketAddr = match server {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let mut endpoint = endpoint(bind, None).map_err(|source| TlsError::Bind {
        what: "client",
        addr: bind,
        source,
    })?;
    endpoint.set_default_client_config(config);
    Ok(endpoint)
}

/// A server endpoint bound to `addr` (must be called inside a tokio runtime),
/// presenting `identity` and accepting ALPN [`ALPN`].
pub fn server_endpoint(
    addr: SocketAddr,
    identity: &ServerIdentity,
) -> Result<quinn::Endpoint, TlsError> {
    let config = server_config(identity, &[ALPN])?;
    endpoint(addr, Some(config)).map_err(|source| TlsError::Bind {
        what: "server",
        addr,
        source,
    })
}

/// A quinn endpoint on a UDP socket bound to `addr` with large kernel
/// buffers (best effort: the kernel may cap them) that accepts datagrams
/// up to [`MAX_UDP_PAYLOAD`]. Must be called inside a tokio runtime.
fn endpoint(addr: SocketAddr, server: Option<quinn::ServerConfig>) -> io::Result<quinn::Endpoint> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        // Like std's bind of [::]: accept IPv4-mapped peers too.
        let _ = socket.set_only_v6(false);
    }
    for (what, result) in [
        ("receive", socket.set_recv_buffer_size(SOCKET_BUFFER_BYTES)),
        ("send", socket.set_send_buffer_size(SOCKET_BUFFER_BYTES)),
    ] {
        if let Err(e) = result {
            tracing::debug!(error = %e, "UDP {what} buffer left at the system default");
        }
    }
    socket.bind(&addr.into())?;
    socket.set_nonblocking(true)?;
    let mut config = quinn::EndpointConfig::default();
    config
        .max_udp_payload_size(MAX_UDP_PAYLOAD)
        .expect("65,527 is QUIC's largest UDP payload");
    let runtime = quinn::default_runtime()
        .ok_or_else(|| io::Error::other("no async runtime: call inside tokio"))?;
    quinn::Endpoint::new(config, server, socket.into(), runtime)
}

/// Accepts exactly the end-entity certificate whose SHA-256 is pinned,
/// whatever its names, issuer or validity period; the handshake signatures
/// are verified against that certificate's key.
#[derive(Debug)]
struct PinnedCertVerifier {
    fingerprint: [u8; 32],
    provider: Arc<CryptoProvider>,
}

impl PinnedCertVerifier {
    fn new(fingerprint: &str, provider: Arc<CryptoProvider>) -> Result<Self, TlsError> {
        let normalized = normalize_fingerprint(fingerprint)?;
        let mut pinned = [0u8; 32];
        hex::decode_to_slice(&normalized, &mut pinned).map_err(|_| {
            TlsError::InvalidFingerprint {
                given: fingerprint.to_string(),
            }
        })?;
        Ok(Self {
            fingerprint: pinned,
            provider,
        })
    }
}

/// The reason a pinned verification failed, readable in the connection
/// error (rustls prints it with `Debug`).
struct PinMismatch {
    presented: String,
    pinned: String,
}

impl fmt::Debug for PinMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "server certificate fingerprint {} does not match the pinned fingerprint {}",
            self.presented, self.pinned
        )
    }
}

impl fmt::Display for PinMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

impl std::error::Error for PinMismatch {}

impl ServerCertVerifier for PinnedCertVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let presented: [u8; 32] = Sha256::digest(end_entity.as_ref()).into();
        if presented == self.fingerprint {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Other(rustls::OtherError(Arc::new(PinMismatch {
                    presented: hex::encode(presented),
                    pinned: hex::encode(self.fingerprint),
                }))),
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

// ---- files -----------------------------------------------------------------

fn exists(path: &Path) -> Result<bool, TlsError> {
    path.try_exists().map_err(io_err("checking", path))
}

/// Creates `dir` (and parents) if missing; a directory created here gets
/// mode 0700 on unix.
fn create_private_dir(dir: &Path) -> Result<(), TlsError> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder
        .create(dir)
        .map_err(io_err("creating directory", dir))
}

/// Writes `contents` to `path` only if it does not exist yet, atomically:
/// the bytes go to a temporary file (created with `mode` on unix) that is
/// then hard-linked into place, so readers never see a partial file and an
/// existing file is never replaced. Returns false if `path` already existed.
fn write_new_file(path: &Path, contents: &[u8], mode: u32) -> Result<bool, TlsError> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let tmp = path.with_file_name(format!(
        ".{name}.tmp.{}.{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| {
        let mut options = fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(mode);
        }
        #[cfg(not(unix))]
        let _ = mode;
        let mut file = options.open(&tmp).map_err(io_err("creating", &tmp))?;
        file.write_all(contents).map_err(io_err("writing", &tmp))?;
        file.sync_all().map_err(io_err("syncing", &tmp))?;
        drop(file);
        match fs::hard_link(&tmp, path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(io_err("creating", path)(e)),
        }
    })();
    let _ = fs::remove_file(&tmp);
    result
}

/// Warns when a secret file is readable or writable by group or others.
fn warn_if_not_private(path: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = fs::metadata(path) {
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                tracing::warn!(
                    path = %path.display(),
                    mode = format_args!("{mode:o}"),
                    "secret file is accessible to group or others; chmod 600 it"
                );
            }
        }
    }
    #[cfg(not(unix))]
    let _ = path;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loopback() -> SocketAddr {
        (Ipv4Addr::LOCALHOST, 0).into()
    }

    #[cfg(unix)]
    fn mode_of(path: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn identity_is_created_once_then_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("nested").join("data");
        let (first, created) = load_or_create_identity(&data).unwrap();
        assert!(created);
        assert_eq!(first.fingerprint.len(), 64);
        assert_eq!(first.fingerprint, sha256_hex(&first.cert_der));
        let (second, created) = load_or_create_identity(&data).unwrap();
        assert!(!created);
        assert_eq!(first.fingerprint, second.fingerprint);
        assert_eq!(first.cert_der, second.cert_der);
        assert_eq!(first.key_der.secret_der(), second.key_der.secret_der());
        assert_eq!(
            fingerprint_of_cert_file(&data.join(CERT_FILE)).unwrap(),
            first.fingerprint
        );
        #[cfg(unix)]
        assert_eq!(mode_of(&data.join(KEY_FILE)), 0o600);
        // No temporary files are left behind.
        let names: Vec<_> = fs::read_dir(&data)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }

    #[test]
    fn lone_key_or_cert_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        load_or_create_identity(dir.path()).unwrap();
        fs::remove_file(dir.path().join(CERT_FILE)).unwrap();
        let err = load_or_create_identity(dir.path()).unwrap_err();
        assert!(matches!(err, TlsError::IncompleteIdentity { .. }), "{err}");
        assert!(err.to_string().contains(CERT_FILE), "{err}");
    }

    #[test]
    fn mismatched_key_is_refused() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        load_or_create_identity(a.path()).unwrap();
        load_or_create_identity(b.path()).unwrap();
        fs::copy(b.path().join(KEY_FILE), a.path().join(KEY_FILE)).unwrap();
        let err = load_or_create_identity(a.path()).unwrap_err();
        assert!(matches!(err, TlsError::KeyMismatch { .. }), "{err}");
    }

    #[test]
    fn token_is_private_and_stable() {
        let dir = tempfile::tempdir().unwrap();
        let token = load_or_create_token(dir.path()).unwrap();
        assert_eq!(token.len(), 64);
        assert!(token
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
        let path = dir.path().join(TOKEN_FILE);
        #[cfg(unix)]
        assert_eq!(mode_of(&path), 0o600);
        assert_eq!(load_or_create_token(dir.path()).unwrap(), token);
        assert_eq!(read_token(&path).unwrap(), token);
        let other = tempfile::tempdir().unwrap();
        assert_ne!(load_or_create_token(other.path()).unwrap(), token);
    }

    #[test]
    fn read_token_trims_and_reports_problems() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tok");
        fs::write(&path, "  abc \n").unwrap();
        assert_eq!(read_token(&path).unwrap(), "abc");
        fs::write(&path, " \n").unwrap();
        let err = read_token(&path).unwrap_err();
        assert!(matches!(err, TlsError::EmptyToken { .. }), "{err}");
        let missing = dir.path().join("missing");
        let err = read_token(&missing).unwrap_err();
        assert!(err.to_string().contains("missing"), "{err}");
    }

    #[test]
    fn token_comparison() {
        assert!(token_matches("abc", "abc"));
        assert!(!token_matches("abc", "abd"));
        assert!(!token_matches("abc", "ab"));
        assert!(!token_matches("abc", ""));
        assert!(!token_matches("", ""));
    }

    #[test]
    fn fingerprints_are_normalised() {
        let fp = "ab".repeat(32);
        let colons = vec!["AB"; 32].join(":");
        assert_eq!(normalize_fingerprint(&colons).unwrap(), fp);
        assert_eq!(normalize_fingerprint(&format!(" {fp}\n")).unwrap(), fp);
        assert!(normalize_fingerprint("abcd").is_err());
        assert!(normalize_fingerprint(&"zz".repeat(32)).is_err());
    }

    /// Echoes every bidirectional stream of every connection on `server`.
    fn serve_echo(server: quinn::Endpoint) {
        tokio::spawn(async move {
            while let Some(incoming) = server.accept().await {
                tokio::spawn(async move {
                    let Ok(conn) = incoming.await else { return };
                    while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                        let data = recv.read_to_end(64 << 20).await.unwrap();
                        send.write_all(&data).await.unwrap();
                        send.finish().unwrap();
                        let _ = send.stopped().await;
                    }
                });
            }
        });
    }

    /// A loopback server endpoint offering `alpn`, echoing streams.
    fn echo_server(identity: &ServerIdentity, alpn: &[&[u8]]) -> quinn::Endpoint {
        let config = server_config(identity, alpn).unwrap();
        let server = quinn::Endpoint::server(config, loopback()).unwrap();
        serve_echo(server.clone());
        server
    }

    async fn echo_round_trip(conn: &quinn::Connection, payload: &[u8]) -> Vec<u8> {
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(payload).await.unwrap();
        send.finish().unwrap();
        recv.read_to_end(64 << 20).await.unwrap()
    }

    async fn check_echo(trust: Trust) {
        let dir = tempfile::tempdir().unwrap();
        let (identity, _) = load_or_create_identity(dir.path()).unwrap();
        let server = server_endpoint(loopback(), &identity).unwrap();
        let addr = server.local_addr().unwrap();
        let accepting = server.clone();
        tokio::spawn(async move {
            let conn = accepting.accept().await.unwrap().await.unwrap();
            assert_eq!(
                conn.handshake_data()
                    .unwrap()
                    .downcast::<quinn::crypto::rustls::HandshakeData>()
                    .unwrap()
                    .protocol
                    .as_deref(),
                Some(ALPN)
            );
            let (mut send, mut recv) = conn.accept_bi().await.unwrap();
            let data = recv.read_to_end(64 << 20).await.unwrap();
            send.write_all(&data).await.unwrap();
            send.finish().unwrap();
            let _ = send.stopped().await;
        });
        let trust = match trust {
            Trust::CertFile(name) => Trust::CertFile(dir.path().join(name)),
            Trust::Fingerprint(fp) if fp.is_empty() => {
                // Upper case with ':' separators, as openssl prints it.
                let upper = identity.fingerprint.to_ascii_uppercase();
                let pairs: Vec<&str> = (0..32).map(|i| &upper[2 * i..2 * i + 2]).collect();
                Trust::Fingerprint(pairs.join(":"))
            }
            other => other,
        };
        let client = client_endpoint(addr, &trust).unwrap();
        let conn = client.connect(addr, SERVER_NAME).unwrap().await.unwrap();
        // A few MB, to exercise the flow-control windows.
        let payload: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        assert_eq!(echo_round_trip(&conn, &payload).await, payload);
        conn.close(0u32.into(), b"done");
        client.wait_idle().await;
    }

    #[tokio::test]
    async fn quic_echo_with_cert_file() {
        check_echo(Trust::CertFile(PathBuf::from(CERT_FILE))).await;
    }

    #[tokio::test]
    async fn quic_echo_with_fingerprint() {
        check_echo(Trust::Fingerprint(String::new())).await;
    }

    #[tokio::test]
    async fn quic_echo_over_ipv6_when_available() {
        let dir = tempfile::tempdir().unwrap();
        let (identity, _) = load_or_create_identity(dir.path()).unwrap();
        let Ok(server) = server_endpoint((Ipv6Addr::LOCALHOST, 0).into(), &identity) else {
            return; // no IPv6 loopback on this machine
        };
        serve_echo(server.clone());
        let addr = server.local_addr().unwrap();
        let trust = Trust::Fingerprint(identity.fingerprint.clone());
        let client = client_endpoint(addr, &trust).unwrap();
        assert!(client.local_addr().unwrap().is_ipv6());
        let conn = client.connect(addr, SERVER_NAME).unwrap().await.unwrap();
        assert_eq!(echo_round_trip(&conn, b"hello v6").await, b"hello v6");
    }

    #[tokio::test]
    async fn wrong_fingerprint_fails_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let (identity, _) = load_or_create_identity(dir.path()).unwrap();
        let server = echo_server(&identity, &[ALPN]);
        let addr = server.local_addr().unwrap();
        let wrong = "00".repeat(32);
        let client = client_endpoint(addr, &Trust::Fingerprint(wrong.clone())).unwrap();
        let err = client
            .connect(addr, SERVER_NAME)
            .unwrap()
            .await
            .expect_err("a wrong pin must not connect");
        let text = err.to_string();
        eprintln!("wrong pin: {text}");
        assert!(
            text.contains("does not match the pinned fingerprint"),
            "{text}"
        );
        assert!(text.contains(&wrong), "{text}");
        assert!(text.contains(&identity.fingerprint), "{text}");

        // Another identity's real certificate is refused just the same.
        let other = tempfile::tempdir().unwrap();
        load_or_create_identity(other.path()).unwrap();
        let trust = Trust::CertFile(other.path().join(CERT_FILE));
        let client = client_endpoint(addr, &trust).unwrap();
        let err = client
            .connect(addr, SERVER_NAME)
            .unwrap()
            .await
            .unwrap_err();
        assert!(err.to_string().contains("pinned fingerprint"), "{err}");
    }

    #[tokio::test]
    async fn wrong_alpn_fails() {
        let dir = tempfile::tempdir().unwrap();
        let (identity, _) = load_or_create_identity(dir.path()).unwrap();
        let server = echo_server(&identity, &[ALPN]);
        let addr = server.local_addr().unwrap();
        let trust = Trust::Fingerprint(identity.fingerprint.clone());
        let mut client = quinn::Endpoint::client(loopback()).unwrap();
        client.set_default_client_config(client_config(&trust, &[b"other/1"]).unwrap());
        let err = client
            .connect(addr, SERVER_NAME)
            .unwrap()
            .await
            .expect_err("a wrong ALPN must not connect");
        eprintln!("wrong ALPN: {err}");
        assert!(
            err.to_string()
                .to_lowercase()
                .contains("application protocol")
                || err.to_string().contains("120"),
            "{err}"
        );
    }

    #[test]
    fn invalid_fingerprint_is_rejected_before_connecting() {
        let err = client_config(&Trust::Fingerprint("nope".into()), &[ALPN]).unwrap_err();
        assert!(matches!(err, TlsError::InvalidFingerprint { .. }), "{err}");
        let err =
            client_config(&Trust::CertFile("/nonexistent/cert.pem".into()), &[ALPN]).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/cert.pem"), "{err}");
    }

    #[test]
    fn transport_config_builds() {
        // quinn panics on inconsistent settings only when used; build both
        // configs to make sure the shared transport is accepted.
        let dir = tempfile::tempdir().unwrap();
        let (identity, _) = load_or_create_identity(dir.path()).unwrap();
        server_config(&identity, &[ALPN]).unwrap();
        client_config(&Trust::Fingerprint(identity.fingerprint), &[ALPN]).unwrap();
        let _ = transport_config();
    }
}
