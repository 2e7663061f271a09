//! TLS for the agent and its clients: TLS 1.3 only, rustls with the `ring` provider,
//! mutual certificate authentication against one CA (PEM files), the identity a
//! certificate names (subject CN and SANs), and one-line explanations of TLS failures.
//! It does not decide what an identity may do: that is the agent's allow-list.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection, StreamOwned};

use super::proto::Deadline;
use crate::{CliError, connection_err, err};

/// A client's certificate files: its certificate chain and key (absent: no client
/// certificate is offered, which an agent refuses) and the CA that signed the agent's.
#[derive(Clone, Debug, Default)]
pub struct TlsFiles {
    /// PEM certificate chain.
    pub cert: Option<PathBuf>,
    /// PEM private key.
    pub key: Option<PathBuf>,
    /// PEM CA certificate(s) to trust.
    pub ca: Option<PathBuf>,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn load_certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, CliError> {
    let bytes = std::fs::read(path).map_err(|e| err(format!("cannot read the {what} {}: {e}", path.display())))?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(format!("the {what} {} is not PEM: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(err(format!("the {what} {} holds no certificate", path.display())));
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, CliError> {
    let bytes = std::fs::read(path).map_err(|e| err(format!("cannot read the private key {}: {e}", path.display())))?;
    PrivateKeyDer::from_pem_slice(&bytes)
        .map_err(|e| err(format!("the private key {} is not a PEM key: {e}", path.display())))
}

fn roots(ca: &Path) -> Result<Arc<RootCertStore>, CliError> {
    let mut roots = RootCertStore::empty();
    for c in load_certs(ca, "CA certificate")? {
        roots.add(c).map_err(|e| err(format!("the CA certificate {} is unusable: {e}", ca.display())))?;
    }
    Ok(Arc::new(roots))
}

/// The client side: trust `files.ca`, offer `files.cert`/`files.key` if given.
pub fn client_config(files: &TlsFiles) -> Result<Arc<ClientConfig>, CliError> {
    let ca = files.ca.as_deref().ok_or_else(|| {
        err("a tls:// target needs the CA that signed the agent's certificate: --tls-ca FILE or a context (see hvctl agent init)")
    })?;
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| err(format!("TLS setup: {e}")))?
        .with_root_certificates(roots(ca)?);
    let config = match (&files.cert, &files.key) {
        (Some(cert), Some(key)) => builder
            .with_client_auth_cert(load_certs(cert, "client certificate")?, load_key(key)?)
            .map_err(|e| err(format!("the client certificate {} and key do not fit: {e}", cert.display())))?,
        (None, None) => builder.with_no_client_auth(),
        (Some(_), None) => return Err(err("--tls-cert needs --tls-key (the certificate's private key)")),
        (None, Some(_)) => return Err(err("--tls-key needs --tls-cert")),
    };
    Ok(Arc::new(config))
}

/// The agent's side: its certificate and key, and every client must present a
/// certificate signed by `ca`.
pub fn server_config(cert: &Path, key: &Path, ca: &Path) -> Result<Arc<ServerConfig>, CliError> {
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(ca)?, provider())
        .build()
        .map_err(|e| err(format!("cannot verify clients with {}: {e}", ca.display())))?;
    let config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| err(format!("TLS setup: {e}")))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(load_certs(cert, "agent certificate")?, load_key(key)?)
        .map_err(|e| err(format!("the agent certificate {} and key do not fit: {e}", cert.display())))?;
    Ok(Arc::new(config))
}

/// The agent's side for Prometheus' `/metrics` over TLS: as [`server_config`] (the
/// same certificate, a client certificate from `ca` required), and HTTP/1.1 as the only
/// ALPN protocol: the endpoint speaks nothing else, and Go clients (Prometheus) offer
/// h2 first.
pub fn metrics_server_config(cert: &Path, key: &Path, ca: &Path) -> Result<Arc<ServerConfig>, CliError> {
    let base = server_config(cert, key, ca)?;
    let mut config = ServerConfig::clone(&base);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The names a certificate gives its subject: the CN first, then DNS and IP SANs.
pub fn names(cert: &CertificateDer<'_>) -> Vec<String> {
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(cert.as_ref()) else { return Vec::new() };
    let mut out: Vec<String> =
        parsed.subject().iter_common_name().filter_map(|cn| cn.as_str().ok().map(String::from)).collect();
    if let Ok(Some(san)) = parsed.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                x509_parser::extensions::GeneralName::DNSName(d) => out.push(d.to_string()),
                x509_parser::extensions::GeneralName::IPAddress(ip) => match ip.len() {
                    4 => out.extend(<[u8; 4]>::try_from(*ip).ok().map(|b| std::net::Ipv4Addr::from(b).to_string())),
                    16 => out.extend(<[u8; 16]>::try_from(*ip).ok().map(|b| std::net::Ipv6Addr::from(b).to_string())),
                    _ => {}
                },
                _ => {}
            }
        }
    }
    out
}

/// Turn an I/O error from a TLS stream into a sentence: rustls reports certificate and
/// alert problems inside `io::Error`s.
pub fn explain(e: &std::io::Error, peer: &str) -> String {
    let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) else {
        return match e.kind() {
            std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset => {
                format!("{peer} closed the connection during the TLS handshake or right after it")
            }
            _ => format!("talking to {peer}: {e}"),
        };
    };
    use rustls::{AlertDescription as A, CertificateError as C, Error as E};
    match tls {
        E::InvalidCertificate(C::UnknownIssuer | C::BadSignature) => {
            format!("{peer}'s certificate is not signed by our CA (unknown issuer): check --tls-ca or the context's ca")
        }
        E::InvalidCertificate(C::NotValidForName | C::NotValidForNameContext { .. }) => {
            format!("{peer}'s certificate is not valid for that address (no matching SAN)")
        }
        E::InvalidCertificate(C::Expired | C::ExpiredContext { .. }) => format!("{peer}'s certificate has expired"),
        E::InvalidCertificate(other) => format!("{peer}'s certificate is unusable: {other:?}"),
        E::AlertReceived(A::CertificateRequired) => {
            format!("{peer} requires a client certificate: pass --tls-cert and --tls-key, or use a context")
        }
        E::AlertReceived(A::UnknownCA | A::BadCertificate | A::DecryptError) => {
            format!("{peer} refused our certificate: it is not signed by the agent's CA")
        }
        E::AlertReceived(A::ProtocolVersion) => format!("{peer} speaks only TLS 1.3"),
        E::AlertReceived(a) => format!("{peer} ended the TLS session: {a:?}"),
        other => format!("TLS with {peer}: {other}"),
    }
}

/// A server-side TLS stream over TCP.
pub type ServerStream = StreamOwned<ServerConnection, TcpStream>;
/// A client-side TLS stream over TCP.
pub type ClientStream = StreamOwned<ClientConnection, TcpStream>;

impl Deadline for ServerStream {
    fn set_timeout(&mut self, d: Duration) -> std::io::Result<()> {
        self.sock.set_read_timeout(Some(d.max(Duration::from_millis(1))))
    }
}
impl crate::metrics::HttpStream for ServerStream {
    fn socket(&self) -> &TcpStream {
        &self.sock
    }
}
impl Deadline for ClientStream {
    fn set_timeout(&mut self, d: Duration) -> std::io::Result<()> {
        self.sock.set_read_timeout(Some(d.max(Duration::from_millis(1))))
    }
}

/// Drive a handshake to its end by `deadline`, one TLS record at a time, so a peer
/// that sends slowly or not at all is cut off when the deadline passes.
pub fn handshake<D>(
    conn: &mut rustls::ConnectionCommon<D>,
    sock: &mut TcpStream,
    deadline: Instant,
) -> std::io::Result<()> {
    while conn.is_handshaking() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "the TLS handshake took too long"));
        }
        sock.set_read_timeout(Some(left))?;
        sock.set_write_timeout(Some(left))?;
        while conn.wants_write() {
            conn.write_tls(sock)?;
        }
        if !conn.is_handshaking() {
            break;
        }
        if conn.wants_read() {
            match conn.read_tls(sock) {
                Ok(0) => {
                    return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "closed during the handshake"));
                }
                Ok(_) => {
                    if let Err(e) = conn.process_new_packets() {
                        // Tell the peer why (the alert) before giving up.
                        let _ = conn.write_tls(sock);
                        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, e));
                    }
                }
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                Err(e) => return Err(e),
            }
        }
    }
    // The last flight (the client's Finished, the server's tickets).
    while conn.wants_write() {
        conn.write_tls(sock)?;
    }
    Ok(())
}

/// The client's TLS 1.3 handshake with an agent over a connected socket, by
/// `deadline`. The agent's certificate must name `host` (an IP SAN for an address).
pub fn client_handshake(
    config: Arc<ClientConfig>,
    mut sock: TcpStream,
    host: &str,
    deadline: Instant,
) -> Result<ClientStream, CliError> {
    let peer = format!("the agent at {host}");
    let _ = sock.set_nodelay(true);
    let name = ServerName::try_from(host.to_string())
        .map_err(|e| err(format!("{host} is not a host name or address: {e}")))?;
    let mut conn = ClientConnection::new(config, name).map_err(|e| connection_err(format!("TLS with {peer}: {e}")))?;
    handshake(&mut conn, &mut sock, deadline).map_err(|e| connection_err(explain(&e, &peer)))?;
    // Not the handshake's leftover: a write may take as long as a request may.
    sock.set_write_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| connection_err(format!("socket setup for {peer}: {e}")))?;
    Ok(StreamOwned::new(conn, sock))
}
