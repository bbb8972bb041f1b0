//! Mutual TLS on the replication link: loading and checking the CA, certificate and key named
//! in config, the receiver's acceptor ([`ServerTls`]) and the agent's connector
//! ([`ClientTls`]), reading a peer's identity (its DNS names) from its certificate, and saying
//! what is wrong, and what to do, when a handshake fails ([`TlsProblem`]).
//!
//! Both sides run rustls themselves instead of through tonic's TLS settings: those take no
//! verifier of ours and report every refused handshake as "transport error", which made a
//! certificate from the wrong CA look like a network blip. The receiver hands tonic finished
//! TLS streams; the agent gives tonic a plain `http://` URI and dials TLS in its connector.
//! Certificates are judged by rustls' WebPKI verifiers, unchanged; the wrappers here only note
//! the certificate that was presented, so a refusal can name its subject, issuer, dates and
//! names. TLS 1.3 lets a client finish its handshake before the server has judged the client's
//! certificate: the server's verdict reaches the agent as an alert on the first read, long
//! after `connect` succeeded, so the agent's stream is watched ([`Watched`]) and the alert is
//! kept for the shipper, whatever error tonic makes of it.

use std::cell::RefCell;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{AlertDescription, CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tonic::transport::Uri;

use crate::config::TlsConfig;

/// ALPN protocol id of HTTP/2, which gRPC runs on.
const ALPN_H2: &[u8] = b"h2";
/// A handshake that has not finished by then is dropped (a stalled or idle client).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Problems with TLS material (all need a person: wrong file, wrong key) or with a peer's
/// identity after a completed handshake.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file named by `key` (`tls.ca`, `tls.cert`, `tls.key`) is unusable.
    #[error("{key} {path}: {problem}")]
    Material { key: &'static str, path: String, problem: String },
    #[error("peer presented no client certificate")]
    NoPeerCert,
    #[error("peer certificate unreadable: {0}")]
    BadPeerCert(String),
    #[error("peer certificate carries no DNS name or common name")]
    NoIdentity,
}

fn material(key: &'static str, path: &Path, problem: impl Into<String>) -> TlsError {
    TlsError::Material { key, path: path.display().to_string(), problem: problem.into() }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The TLS material of one node, loaded and checked.
struct Material {
    roots: Arc<RootCertStore>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    /// What this node's own certificate says, for messages when a peer refuses it.
    own: CertFacts,
}

fn read_file(key: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path)
        .map_err(|e| material(key, path, format!("cannot be read ({e}); fix the path or its permissions")))
}

fn read_certs(key: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let data = read_file(key, path)?;
    let certs = CertificateDer::pem_slice_iter(&data)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| material(key, path, format!("is not a readable PEM file ({e}); give a PEM certificate file")))?;
    if certs.is_empty() {
        return Err(material(key, path, "holds no PEM CERTIFICATE block; give a PEM certificate file"));
    }
    Ok(certs)
}

fn load(tls: &TlsConfig) -> Result<Material, TlsError> {
    let mut roots = RootCertStore::empty();
    for ca in read_certs("tls.ca", &tls.ca)? {
        roots
            .add(ca)
            .map_err(|e| material("tls.ca", &tls.ca, format!("holds a certificate that is not a usable CA ({e})")))?;
    }
    let chain = read_certs("tls.cert", &tls.cert)?;
    let own = CertFacts::parse(&chain[0])
        .map_err(|e| material("tls.cert", &tls.cert, format!("holds an unreadable certificate ({e})")))?;
    let key_pem = read_file("tls.key", &tls.key)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
        material(
            "tls.key",
            &tls.key,
            format!("holds no usable PEM private key ({e}); give the key file that belongs to tls.cert"),
        )
    })?;
    rustls::sign::CertifiedKey::from_der(chain.clone(), key.clone_key(), &provider()).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => material(
            "tls.key",
            &tls.key,
            format!(
                "is not the key of the certificate in tls.cert {}; give the key that certificate was issued for",
                tls.cert.display()
            ),
        ),
        e => material("tls.key", &tls.key, format!("holds a private key rustls cannot use ({e})")),
    })?;
    Ok(Material { roots: Arc::new(roots), chain, key, own })
}

/// Checks that the CA, certificate and key named in config can be read and parsed and that the
/// key belongs to the certificate (start-up: the error names the key and the path).
pub fn check_material(tls: &TlsConfig) -> Result<(), TlsError> {
    load(tls).map(|_| ())
}

/// Why this node's own certificate will be refused by its peers right now (expired, not yet
/// valid), if it will: worth an error at start-up, before the first refusal.
pub fn own_certificate_problem(tls: &TlsConfig) -> Option<String> {
    let own = CertFacts::parse(read_certs("tls.cert", &tls.cert).ok()?.first()?).ok()?;
    let now = unix_now();
    let path = tls.cert.display();
    if now > own.not_after {
        Some(format!(
            "tls.cert {path} expired at {} (valid from {}); peers will refuse it; renew it",
            date(own.not_after),
            date(own.not_before)
        ))
    } else if now < own.not_before {
        Some(format!(
            "tls.cert {path} is valid only from {} (now {}); peers will refuse it until then; check this host's clock",
            date(own.not_before),
            date(now)
        ))
    } else {
        None
    }
}

/// What a certificate says about itself, for messages.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CertFacts {
    pub subject: String,
    pub issuer: String,
    /// Validity, seconds since the Unix epoch.
    pub not_before: i64,
    pub not_after: i64,
    /// DNS subject-alternative names, then common names.
    pub names: Vec<String>,
    /// The DNS subject-alternative names alone: what TLS matches a server name against.
    pub dns_names: Vec<String>,
}

impl CertFacts {
    pub fn parse(der: &[u8]) -> Result<CertFacts, String> {
        use x509_parser::prelude::*;
        let (_, cert) = X509Certificate::from_der(der).map_err(|e| e.to_string())?;
        Ok(CertFacts {
            subject: cert.subject().to_string(),
            issuer: cert.issuer().to_string(),
            not_before: cert.validity().not_before.timestamp(),
            not_after: cert.validity().not_after.timestamp(),
            names: names_of(&cert),
            dns_names: dns_names_of(&cert),
        })
    }

    fn describe(&self) -> String {
        format!("subject \"{}\", issued by \"{}\"", self.subject, self.issuer)
    }
}

fn dns_names_of(cert: &x509_parser::certificate::X509Certificate<'_>) -> Vec<String> {
    use x509_parser::prelude::*;
    let mut out = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::DNSName(d) = name {
                out.push((*d).to_string());
            }
        }
    }
    out
}

fn names_of(cert: &x509_parser::certificate::X509Certificate<'_>) -> Vec<String> {
    let mut out = dns_names_of(cert);
    for cn in cert.subject().iter_common_name() {
        if let Ok(s) = cn.as_str() {
            if !out.iter().any(|n| n == s) {
                out.push(s.to_string());
            }
        }
    }
    out
}

/// A Unix time as an RFC 3339 date, as certificates' dates are shown in messages.
pub fn date(secs: i64) -> String {
    match u64::try_from(secs) {
        Ok(s) => humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(s)).to_string(),
        Err(_) => format!("{secs} s before 1970"),
    }
}

fn unix_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// Why a handshake failed, as a small fixed set (the receiver's metric label).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// The peer's certificate is not signed by the CA in `tls.ca`.
    UnknownCa,
    /// The peer's certificate has expired.
    Expired,
    /// The peer's certificate is not valid yet.
    NotYetValid,
    /// The receiver's certificate lacks the name the agent expects.
    BadName,
    /// The client presented no certificate.
    NoClientCert,
    /// A valid certificate of an agent this receiver has no (or another) target for.
    UnknownAgent,
    /// The peer refused this node's certificate (a TLS alert from the other side).
    RefusedByPeer,
    /// The bytes were not a TLS handshake, or were corrupted on the way: not a certificate
    /// matter, and the only reason a retry may fix.
    Malformed,
    /// Anything else about the certificates or TLS settings.
    Other,
}

impl Reason {
    pub const ALL: [Reason; 9] = [
        Reason::UnknownCa,
        Reason::Expired,
        Reason::NotYetValid,
        Reason::BadName,
        Reason::NoClientCert,
        Reason::UnknownAgent,
        Reason::RefusedByPeer,
        Reason::Malformed,
        Reason::Other,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Reason::UnknownCa => "unknown_ca",
            Reason::Expired => "expired",
            Reason::NotYetValid => "not_yet_valid",
            Reason::BadName => "bad_name",
            Reason::NoClientCert => "no_client_cert",
            Reason::UnknownAgent => "unknown_agent",
            Reason::RefusedByPeer => "refused_by_peer",
            Reason::Malformed => "malformed",
            Reason::Other => "other",
        }
    }
}

/// A failed handshake: its reason, and a message naming the certificate and the fix.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct TlsProblem {
    pub reason: Reason,
    pub message: String,
    /// Subject of the certificate the peer presented, when it presented one.
    pub subject: Option<String>,
}

/// Which end of the link this node is, for the wording of messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Agent,
    Receiver,
}

/// What messages about this node's handshakes need to know about it.
#[derive(Clone, Debug)]
struct Local {
    role: Role,
    tls: TlsConfig,
    own: CertFacts,
}

/// Explains a rustls failure of a handshake with `peer` ("receiver eu-west", "the client at
/// 10.0.0.5:41000"). `presented` is what the peer's certificate said, if it sent one;
/// `expected` the name the agent looks for in the receiver's certificate. `None` for failures
/// that are not about TLS at all.
fn explain(
    err: &rustls::Error,
    peer: &str,
    presented: Option<&CertFacts>,
    expected: Option<&str>,
    local: &Local,
) -> Option<TlsProblem> {
    use rustls::Error as E;
    use CertificateError as C;
    let (agent, receiver) = (local.role == Role::Agent, local.role == Role::Receiver);
    let theirs = if agent { format!("{peer}'s certificate") } else { format!("the certificate of {peer}") };
    let desc = presented.map(|f| format!(" ({})", f.describe())).unwrap_or_default();
    let whose_cert = if agent { "the receiver's tls.cert" } else { "the agent's tls.cert" };
    let ca = local.tls.ca.display();
    let now_or = |t: &UnixTime| t.as_secs() as i64;
    let problem =
        |reason: Reason, message: String| TlsProblem { reason, message, subject: presented.map(|f| f.subject.clone()) };
    Some(match err {
        E::InvalidCertificate(c) => match c {
            C::UnknownIssuer => problem(
                Reason::UnknownCa,
                format!(
                    "unknown CA: {theirs}{desc} is not signed by the CA in tls.ca ({ca}); issue {whose_cert} from that CA, or add the CA that signed it to tls.ca"
                ),
            ),
            // The issuer's name matches a CA in tls.ca but its key does not: another CA of
            // the same name (every `lockstep-agent certs` run makes one).
            C::BadSignature => problem(
                Reason::UnknownCa,
                format!(
                    "unknown CA: {theirs}{desc} is not signed by the CA in tls.ca ({ca}) but by another CA of the same name (its signature does not verify with that CA's key; another `lockstep-agent certs` run makes such a CA); issue {whose_cert} from the CA in tls.ca, or add the CA that signed it to tls.ca"
                ),
            ),
            C::Expired | C::ExpiredContext { .. } => {
                let (now, after) = match c {
                    C::ExpiredContext { time, not_after } => (now_or(time), now_or(not_after)),
                    _ => (unix_now(), presented.map_or(0, |f| f.not_after)),
                };
                let from = presented.map(|f| format!(", valid from {}", date(f.not_before))).unwrap_or_default();
                problem(
                    Reason::Expired,
                    format!(
                        "certificate expired: {theirs}{desc} expired at {} (now {}{from}); renew {whose_cert}",
                        date(after),
                        date(now)
                    ),
                )
            }
            C::NotValidYet | C::NotValidYetContext { .. } => {
                let (now, before) = match c {
                    C::NotValidYetContext { time, not_before } => (now_or(time), now_or(not_before)),
                    _ => (unix_now(), presented.map_or(0, |f| f.not_before)),
                };
                problem(
                    Reason::NotYetValid,
                    format!(
                        "certificate not yet valid: {theirs}{desc} is valid only from {} (now {}); check both hosts' clocks, or reissue {whose_cert} with an earlier start",
                        date(before),
                        date(now)
                    ),
                )
            }
            C::NotValidForName | C::NotValidForNameContext { .. } => {
                let found = match (presented, c) {
                    (Some(f), _) => f.dns_names.clone(),
                    (None, C::NotValidForNameContext { presented: p, .. }) => p.clone(),
                    _ => Vec::new(),
                };
                let expected = expected.unwrap_or("?");
                problem(
                    Reason::BadName,
                    format!(
                        "name mismatch: {theirs}{desc} carries the DNS names {found:?}, but this agent expects {expected:?} (the receiver's [[receivers]] name, or its server_name); add {expected:?} to the certificate's DNS names, or set server_name to a name it carries"
                    ),
                )
            }
            C::InvalidPurpose | C::InvalidPurposeContext { .. } => problem(
                Reason::Other,
                format!(
                    "{theirs}{desc} is not usable for {} authentication (its extended key usage); issue it for both serverAuth and clientAuth",
                    if agent { "server" } else { "client" }
                ),
            ),
            other => problem(Reason::Other, format!("{theirs}{desc} was refused: {other}; check {whose_cert}")),
        },
        E::NoCertificatesPresented if receiver => problem(
            Reason::NoClientCert,
            format!(
                "no client certificate: {peer} presented none; lockstep requires mutual TLS: give the agent tls.cert and tls.key signed by the CA in tls.ca ({ca})"
            ),
        ),
        E::AlertReceived(alert) => return explain_alert(*alert, peer, local),
        E::PeerIncompatible(e) => problem(
            Reason::Other,
            format!("TLS settings of {peer} are incompatible with this node's ({e:?}); use a TLS 1.2 or 1.3 client with modern ciphers"),
        ),
        E::NoApplicationProtocol => problem(
            Reason::Other,
            format!("{peer} does not speak HTTP/2 over TLS (ALPN h2); it is not a lockstep peer, or a proxy in between strips ALPN"),
        ),
        E::InvalidMessage(_)
        | E::DecryptError
        | E::PeerMisbehaved(_)
        | E::InappropriateMessage { .. }
        | E::InappropriateHandshakeMessage { .. }
        | E::PeerSentOversizedRecord => problem(
            Reason::Malformed,
            format!("the TLS stream with {peer} was not valid TLS ({err}): the link corrupted it, or the peer does not speak TLS"),
        ),
        other => problem(Reason::Other, format!("TLS handshake with {peer} failed: {other}")),
    })
}

/// Explains an alert from `peer`: its verdict on this node's certificate, mostly.
fn explain_alert(alert: AlertDescription, peer: &str, local: &Local) -> Option<TlsProblem> {
    use AlertDescription as A;
    let me = if local.role == Role::Agent { "agent" } else { "receiver" };
    let peer_role = if local.role == Role::Agent { "receiver" } else { "agent" };
    let own = &local.own;
    let ours = format!(
        "this {me}'s certificate (tls.cert {}, subject \"{}\", issued by \"{}\", valid from {} until {})",
        local.tls.cert.display(),
        own.subject,
        own.issuer,
        date(own.not_before),
        date(own.not_after)
    );
    let refused = |message: String| Some(TlsProblem { reason: Reason::RefusedByPeer, message, subject: None });
    match alert {
        A::UnknownCA => refused(format!(
            "unknown CA: {peer} refused {ours}: it is not signed by the CA in the {peer_role}'s tls.ca; issue this {me}'s certificate from that CA, or add the CA that signed it to the {peer_role}'s tls.ca"
        )),
        // What the peer sends when the signature on this certificate does not verify with
        // the key of the CA of its issuer's name: a different CA of the same name signed it.
        A::DecryptError => refused(format!(
            "unknown CA: {peer} could not verify {ours} (TLS alert: decrypt error): it is most likely not signed by the CA in the {peer_role}'s tls.ca but by another CA of the same name (another `lockstep-agent certs` run makes such a CA); issue this {me}'s certificate from the CA in the {peer_role}'s tls.ca"
        )),
        A::CertificateExpired => {
            let now = unix_now();
            if now > own.not_after {
                refused(format!(
                    "certificate expired: {peer} refused {ours}: it expired at {}; renew tls.cert",
                    date(own.not_after)
                ))
            } else if now < own.not_before {
                refused(format!(
                    "certificate not yet valid: {peer} refused {ours}: it is valid only from {}; check this host's clock or reissue it",
                    date(own.not_before)
                ))
            } else {
                refused(format!(
                    "{peer} refused {ours} as expired or not yet valid, though it is valid by this host's clock (now {}); check the {peer_role}'s clock",
                    date(now)
                ))
            }
        }
        A::BadCertificate if local.role == Role::Receiver => refused(format!(
            "{peer} refused {ours} (TLS alert: bad certificate) — most often a name mismatch: this certificate carries the DNS names {:?}, and the agent expects the name of its [[receivers]] entry (or its server_name) among them; add that name to the certificate, or fix the agent's config",
            own.dns_names
        )),
        A::BadCertificate
        | A::UnsupportedCertificate
        | A::CertificateRevoked
        | A::CertificateUnknown
        | A::AccessDenied
        | A::CertificateRequired
        | A::NoCertificate => refused(format!(
            "{peer} refused {ours} (TLS alert: {alert:?}); check that tls.cert is signed by the CA in the {peer_role}'s tls.ca and usable for client and server authentication"
        )),
        A::HandshakeFailure | A::ProtocolVersion | A::InsufficientSecurity | A::NoApplicationProtocol => {
            Some(TlsProblem {
                reason: Reason::Other,
                message: format!(
                    "{peer} ended the TLS handshake (alert: {alert:?}): its TLS settings are incompatible with this node's"
                ),
                subject: None,
            })
        }
        A::BadRecordMac | A::DecodeError | A::UnexpectedMessage | A::RecordOverflow => {
            Some(TlsProblem {
                reason: Reason::Malformed,
                message: format!("{peer} found the TLS stream corrupted (alert: {alert:?})"),
                subject: None,
            })
        }
        // close_notify and the like end a connection; they are not refusals.
        _ => None,
    }
}

/// The rustls error inside an I/O error, if that is what it is.
fn rustls_error(e: &std::io::Error) -> Option<&rustls::Error> {
    e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>())
}

/// The first [`TlsProblem`] in `err`'s source chain (the agent's fallback when its watched
/// stream saw nothing).
pub fn problem_in_chain(err: &(dyn std::error::Error + 'static)) -> Option<TlsProblem> {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if let Some(p) = e.downcast_ref::<TlsProblem>() {
            return Some(p.clone());
        }
        // `io::Error::source` skips the error it wraps; look at it directly.
        if let Some(p) = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<TlsProblem>())
        {
            return Some(p.clone());
        }
        cur = e.source();
    }
    None
}

tokio::task_local! {
    /// The certificate the peer of the handshake running in this task presented.
    static PRESENTED: RefCell<Option<CertFacts>>;
}

fn note_presented(der: &CertificateDer<'_>) {
    let facts = CertFacts::parse(der).ok();
    let _ = PRESENTED.try_with(|p| *p.borrow_mut() = facts);
}

/// Runs a handshake, returning also what certificate the peer presented (the verifiers note
/// it; rustls calls them while the handshake future is polled).
async fn watching<T>(handshake: impl Future<Output = T>) -> (T, Option<CertFacts>) {
    PRESENTED
        .scope(RefCell::new(None), async move {
            let r = handshake.await;
            (r, PRESENTED.with(|p| p.borrow_mut().take()))
        })
        .await
}

/// rustls' WebPKI client verifier, noting the certificate it is shown.
#[derive(Debug)]
struct NotingClientVerifier(Arc<dyn ClientCertVerifier>);

impl ClientCertVerifier for NotingClientVerifier {
    fn offer_client_auth(&self) -> bool {
        self.0.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.0.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.0.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        note_presented(end_entity);
        self.0.verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// rustls' WebPKI server verifier, noting the certificate it is shown.
#[derive(Debug)]
struct NotingServerVerifier(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for NotingServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        note_presented(end_entity);
        self.0.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// Why the receiver did not get a TLS stream from a connection.
#[derive(Debug)]
pub enum AcceptError {
    /// The handshake was refused, by either side: a certificate or TLS matter to report.
    Refused(TlsProblem),
    /// The connection went away or stalled before a handshake happened (a port probe, a
    /// reset): nothing to report.
    Dropped(std::io::Error),
}

/// A TLS stream the receiver accepted, as tonic serves it (and reads the client certificate
/// from: `Request::peer_certs`).
pub type ServerStream = tokio_rustls::server::TlsStream<TcpStream>;

/// The receiver's side: presents its certificate and requires a client certificate signed by
/// the CA.
pub struct ServerTls {
    acceptor: tokio_rustls::TlsAcceptor,
    local: Local,
}

impl ServerTls {
    pub fn new(tls: &TlsConfig) -> Result<ServerTls, TlsError> {
        let m = load(tls)?;
        let provider = provider();
        let webpki = WebPkiClientVerifier::builder_with_provider(m.roots.clone(), provider.clone())
            .build()
            .map_err(|e| material("tls.ca", &tls.ca, format!("cannot verify clients with it ({e})")))?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| material("tls.cert", &tls.cert, e.to_string()))?
            .with_client_cert_verifier(Arc::new(NotingClientVerifier(webpki)))
            .with_single_cert(m.chain, m.key)
            .map_err(|e| material("tls.key", &tls.key, format!("unusable with tls.cert ({e})")))?;
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        Ok(ServerTls {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
            local: Local { role: Role::Receiver, tls: tls.clone(), own: m.own },
        })
    }

    /// Runs the handshake of a connection from `peer`.
    pub async fn accept(&self, tcp: TcpStream, peer: SocketAddr) -> Result<ServerStream, AcceptError> {
        let (result, presented) = watching(tokio::time::timeout(HANDSHAKE_TIMEOUT, self.acceptor.accept(tcp))).await;
        let err = match result {
            Ok(Ok(stream)) => return Ok(stream),
            Ok(Err(e)) => e,
            Err(_) => {
                return Err(AcceptError::Dropped(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no TLS handshake within {HANDSHAKE_TIMEOUT:?}"),
                )))
            }
        };
        let label = format!("the client at {peer}");
        match rustls_error(&err).and_then(|re| explain(re, &label, presented.as_ref(), None, &self.local)) {
            Some(p) => Err(AcceptError::Refused(p)),
            None => Err(AcceptError::Dropped(err)),
        }
    }
}

/// The agent's side of one session with a receiver: presents its certificate, accepts only a
/// receiver certificate signed by the CA and naming the expected name, and keeps what went
/// wrong with either side's verdict.
pub struct ClientTls {
    connector: tokio_rustls::TlsConnector,
    server_name: ServerName<'static>,
    shared: Arc<Shared>,
}

/// What a [`ClientTls`] and the streams it made share.
#[derive(Debug)]
struct Shared {
    /// "receiver eu-west".
    peer: String,
    expected: String,
    local: Local,
    /// The first problem seen on a connection of this session.
    seen: Mutex<Option<TlsProblem>>,
}

impl Shared {
    fn note(&self, p: TlsProblem) {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.is_none() {
            *seen = Some(p);
        }
    }

    /// Notes the problem behind an I/O error on a connection, if it is a TLS one.
    fn note_io(&self, e: &std::io::Error, presented: Option<&CertFacts>) -> Option<TlsProblem> {
        let p = explain(rustls_error(e)?, &self.peer, presented, Some(&self.expected), &self.local)?;
        self.note(p.clone());
        Some(p)
    }
}

impl ClientTls {
    /// `server_name`: the name the receiver's certificate must carry; `peer`: how messages
    /// call the receiver ("receiver eu-west").
    pub fn new(tls: &TlsConfig, server_name: &str, peer: &str) -> Result<ClientTls, TlsError> {
        let m = load(tls)?;
        let provider = provider();
        let webpki = WebPkiServerVerifier::builder_with_provider(m.roots.clone(), provider.clone())
            .build()
            .map_err(|e| material("tls.ca", &tls.ca, format!("cannot verify servers with it ({e})")))?;
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| material("tls.cert", &tls.cert, e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NotingServerVerifier(webpki)))
            .with_client_auth_cert(m.chain, m.key)
            .map_err(|e| material("tls.key", &tls.key, format!("unusable with tls.cert ({e})")))?;
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        let server_name = ServerName::try_from(server_name.to_string()).map_err(|e| TlsError::Material {
            key: "receivers[].server_name",
            path: server_name.to_string(),
            problem: format!("is not a valid DNS name ({e})"),
        })?;
        Ok(ClientTls {
            connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
            shared: Arc::new(Shared {
                peer: peer.to_string(),
                expected: server_name_text(&server_name),
                local: Local { role: Role::Agent, tls: tls.clone(), own: m.own },
                seen: Mutex::new(None),
            }),
            server_name,
        })
    }

    /// The first TLS problem seen by this session's connections (either side's verdict).
    pub fn problem(&self) -> Option<TlsProblem> {
        self.shared.seen.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// A connector for tonic's `Endpoint::connect_with_connector`, whose endpoint must be the
    /// plain form of the receiver's URL ([`plain_uri`]).
    pub fn connector(&self) -> Connector {
        Connector {
            connector: self.connector.clone(),
            server_name: self.server_name.clone(),
            shared: self.shared.clone(),
        }
    }
}

fn server_name_text(name: &ServerName<'_>) -> String {
    match name {
        ServerName::DnsName(d) => d.as_ref().to_string(),
        ServerName::IpAddress(ip) => std::net::IpAddr::from(*ip).to_string(),
        other => format!("{other:?}"),
    }
}

/// `https://host:port` as `http://host:port`: tonic insists on its own TLS for https URIs,
/// and here TLS is the connector's.
pub fn plain_uri(endpoint: &str) -> Result<String, String> {
    let uri: Uri = endpoint.parse().map_err(|e| format!("{endpoint:?} is not a URL: {e}"))?;
    if uri.scheme_str() != Some("https") {
        return Err(format!("{endpoint:?} must start with https://"));
    }
    let authority = uri.authority().ok_or_else(|| format!("{endpoint:?} names no host"))?;
    let port = authority.port_u16().unwrap_or(443);
    Ok(format!("http://{}:{port}", authority.host()))
}

/// Dials TCP and runs the TLS handshake for tonic (see [`ClientTls::connector`]).
#[derive(Clone)]
pub struct Connector {
    connector: tokio_rustls::TlsConnector,
    server_name: ServerName<'static>,
    shared: Arc<Shared>,
}

type Dialing = Pin<Box<dyn Future<Output = std::io::Result<TokioIo<Watched>>> + Send>>;

impl tower::Service<Uri> for Connector {
    type Response = TokioIo<Watched>;
    type Error = std::io::Error;
    type Future = Dialing;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let me = self.clone();
        Box::pin(async move {
            let host = uri.host().unwrap_or_default().trim_start_matches('[').trim_end_matches(']').to_string();
            let port = uri.port_u16().unwrap_or(443);
            let tcp = TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            let (result, presented) = watching(me.connector.connect(me.server_name.clone(), tcp)).await;
            let stream = match result {
                Ok(s) => s,
                Err(e) => {
                    return Err(match me.shared.note_io(&e, presented.as_ref()) {
                        Some(p) => std::io::Error::new(e.kind(), p),
                        None => e,
                    })
                }
            };
            if stream.get_ref().1.alpn_protocol() != Some(ALPN_H2) {
                let p = TlsProblem {
                    reason: Reason::Other,
                    message: format!(
                        "{} does not speak HTTP/2 over TLS (ALPN h2); the endpoint is not a lockstep receiver",
                        me.shared.peer
                    ),
                    subject: presented.map(|f| f.subject),
                };
                me.shared.note(p.clone());
                return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, p));
            }
            Ok(TokioIo::new(Watched { inner: stream, shared: me.shared }))
        })
    }
}

/// The agent's TLS stream, watched for the receiver's verdict arriving as an alert.
pub struct Watched {
    inner: tokio_rustls::client::TlsStream<TcpStream>,
    shared: Arc<Shared>,
}

impl Watched {
    fn check<T>(&self, r: Poll<std::io::Result<T>>) -> Poll<std::io::Result<T>> {
        if let Poll::Ready(Err(e)) = &r {
            self.shared.note_io(e, None);
        }
        r
    }
}

impl AsyncRead for Watched {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        self.check(r)
    }
}

impl AsyncWrite for Watched {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.check(r)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_flush(cx);
        self.check(r)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.check(r)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// All identities a certificate names: its DNS subject-alternative names, then its common name.
pub fn cert_identities(der: &[u8]) -> Result<Vec<String>, TlsError> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| TlsError::BadPeerCert(e.to_string()))?;
    let out = names_of(&cert);
    if out.is_empty() {
        return Err(TlsError::NoIdentity);
    }
    Ok(out)
}

/// The identities of the client that opened `req`'s connection (verified by rustls against
/// our CA before the request reached us).
pub fn peer_identities<T>(req: &tonic::Request<T>) -> Result<Vec<String>, TlsError> {
    let certs = req.peer_certs().ok_or(TlsError::NoPeerCert)?;
    let leaf = certs.first().ok_or(TlsError::NoPeerCert)?;
    cert_identities(leaf.as_ref())
}

/// Subject of the client certificate of `req`'s connection, for logs.
pub fn peer_subject<T>(req: &tonic::Request<T>) -> Option<String> {
    let certs = req.peer_certs()?;
    CertFacts::parse(certs.first()?.as_ref()).ok().map(|f| f.subject)
}

#[cfg(test)]
mod tests;
