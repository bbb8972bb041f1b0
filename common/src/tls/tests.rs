//! Real handshakes over loopback between [`ServerTls`] and [`ClientTls`], with certificates
//! made for each case: what each side reports when a certificate is from another CA, expired,
//! not yet valid, or lacks the expected name, when no client certificate is presented, and
//! when the key does not belong to the certificate.

use std::path::Path;

use rcgen::{
    date_time_ymd, BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;
use tower::Service;

use super::*;

struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

fn ca(name: &str) -> Ca {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
    let pem = params.self_signed(&key).unwrap().pem();
    Ca { issuer: Issuer::new(params, key), pem }
}

/// Writes `name`.pem/.key signed by `by` (valid from `from` to `until`, as y/m/d) and a
/// `name`-ca.pem holding `trusts`; returns the TLS config using them.
fn node(
    dir: &Path,
    name: &str,
    names: &[&str],
    by: &Ca,
    trusts: &Ca,
    from: (i32, u8, u8),
    until: (i32, u8, u8),
) -> TlsConfig {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
    params.distinguished_name.push(DnType::CommonName, name);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    params.not_before = date_time_ymd(from.0, from.1, from.2);
    params.not_after = date_time_ymd(until.0, until.1, until.2);
    let cert = params.signed_by(&key, &by.issuer).unwrap();
    let tls = TlsConfig {
        ca: dir.join(format!("{name}-ca.pem")),
        cert: dir.join(format!("{name}.pem")),
        key: dir.join(format!("{name}.key")),
    };
    std::fs::write(&tls.ca, &trusts.pem).unwrap();
    std::fs::write(&tls.cert, cert.pem()).unwrap();
    std::fs::write(&tls.key, key.serialize_pem()).unwrap();
    tls
}

const ALWAYS: ((i32, u8, u8), (i32, u8, u8)) = ((2000, 1, 1), (4000, 1, 1));

/// What each side made of one connection attempt.
struct Outcome {
    server: Result<(), AcceptError>,
    client: Option<TlsProblem>,
    connected: bool,
}

/// Connects a client (expecting the name `expect`) to a server and reads until either side
/// gives its verdict.
async fn attempt(server: &TlsConfig, client: &TlsConfig, expect: &str) -> Outcome {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server_tls = ServerTls::new(server).unwrap();
    let accepting = tokio::spawn(async move {
        let (tcp, peer) = listener.accept().await.unwrap();
        server_tls.accept(tcp, peer).await.map(|_stream| ())
    });
    let client_tls = ClientTls::new(client, expect, &format!("receiver {expect}")).unwrap();
    let uri: Uri = format!("http://{addr}").parse().unwrap();
    let connected = match client_tls.connector().call(uri).await {
        Ok(io) => {
            // TLS 1.3: the server's verdict on our certificate comes with the first read.
            let mut w = io.into_inner();
            let mut buf = [0u8; 16];
            let _ = tokio::time::timeout(Duration::from_secs(5), w.read(&mut buf)).await;
            true
        }
        Err(_) => false,
    };
    let server = accepting.await.unwrap();
    Outcome { server, client: client_tls.problem(), connected }
}

fn refused(o: &Outcome) -> &TlsProblem {
    match &o.server {
        Err(AcceptError::Refused(p)) => p,
        Err(AcceptError::Dropped(e)) => panic!("server saw no refusal, only {e}"),
        Ok(()) => panic!("server accepted"),
    }
}

#[tokio::test]
async fn matching_certificates_complete_the_handshake() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca("good CA");
    let r = node(dir.path(), "eu-west", &["eu-west"], &ca, &ca, ALWAYS.0, ALWAYS.1);
    let a = node(dir.path(), "web-1", &["web-1"], &ca, &ca, ALWAYS.0, ALWAYS.1);
    let o = attempt(&r, &a, "eu-west").await;
    assert!(o.connected);
    assert!(o.server.is_ok(), "{:?}", o.server);
    assert_eq!(o.client, None);
}

#[tokio::test]
async fn an_agent_certificate_from_another_ca_is_named_on_both_sides() {
    let dir = tempfile::tempdir().unwrap();
    let (good, foreign) = (ca("good CA"), ca("foreign CA"));
    let r = node(dir.path(), "eu-west", &["eu-west"], &good, &good, ALWAYS.0, ALWAYS.1);
    let a = node(dir.path(), "web-1", &["web-1"], &foreign, &good, ALWAYS.0, ALWAYS.1);
    let o = attempt(&r, &a, "eu-west").await;
    let p = refused(&o);
    assert_eq!(p.reason, Reason::UnknownCa);
    assert_eq!(p.subject.as_deref(), Some("CN=web-1"));
    assert!(p.message.contains("not signed by the CA in tls.ca"), "{}", p.message);
    assert!(p.message.contains("foreign CA"), "the issuer is named: {}", p.message);
    let c = o.client.clone().expect("the agent learns why");
    assert_eq!(c.reason, Reason::RefusedByPeer);
    assert!(c.message.starts_with("unknown CA: receiver eu-west refused this agent's certificate"), "{}", c.message);
    assert!(c.message.contains(&a.cert.display().to_string()), "names tls.cert: {}", c.message);
}

#[tokio::test]
async fn a_certificate_from_another_ca_of_the_same_name_is_named_on_both_sides() {
    // Two `lockstep-agent certs` runs make two CAs with one name.
    let dir = tempfile::tempdir().unwrap();
    let (good, twin) = (ca("lockstep development CA"), ca("lockstep development CA"));
    let r = node(dir.path(), "eu-west", &["eu-west"], &good, &good, ALWAYS.0, ALWAYS.1);
    let a = node(dir.path(), "web-1", &["web-1"], &twin, &good, ALWAYS.0, ALWAYS.1);
    let o = attempt(&r, &a, "eu-west").await;
    let p = refused(&o);
    assert_eq!(p.reason, Reason::UnknownCa);
    assert!(p.message.contains("not signed by the CA in tls.ca") && p.message.contains("same name"), "{}", p.message);
    let c = o.client.clone().expect("the agent learns why");
    assert_eq!(c.reason, Reason::RefusedByPeer);
    assert!(
        c.message.starts_with("unknown CA: receiver eu-west could not verify this agent's certificate"),
        "{}",
        c.message
    );
    assert!(c.message.contains("not signed by the CA in the receiver's tls.ca"), "{}", c.message);
    // The other way round: the agent names the receiver's certificate.
    let r2 = node(dir.path(), "eu-west-2", &["eu-west"], &twin, &good, ALWAYS.0, ALWAYS.1);
    let a2 = node(dir.path(), "web-2", &["web-2"], &good, &good, ALWAYS.0, ALWAYS.1);
    let o = attempt(&r2, &a2, "eu-west").await;
    let c = o.client.clone().expect("the agent says why");
    assert_eq!(c.reason, Reason::UnknownCa);
    assert!(c.message.starts_with("unknown CA: receiver eu-west's certificate"), "{}", c.message);
    assert_eq!(refused(&o).reason, Reason::RefusedByPeer);
}

#[tokio::test]
async fn a_receiver_certificate_from_another_ca_is_named_on_both_sides() {
    let dir = tempfile::tempdir().unwrap();
    let (good, foreign) = (ca("good CA"), ca("foreign CA"));
    let r = node(dir.path(), "eu-west", &["eu-west"], &foreign, &good, ALWAYS.0, ALWAYS.1);
    let a = node(dir.path(), "web-1", &["web-1"], &good, &good, ALWAYS.0, ALWAYS.1);
    let o = attempt(&r, &a, "eu-west").await;
    assert!(!o.connected);
    let c = o.client.clone().expect("the agent says why");
    assert_eq!(c.reason, Reason::UnknownCa);
    assert!(
        c.message.starts_with("unknown CA: receiver eu-west's certificate (subject \"CN=eu-west\", issued by \"CN=foreign CA\") is not signed by the CA in tls.ca"),
        "{}",
        c.message
    );
    let p = refused(&o);
    assert_eq!(p.reason, Reason::RefusedByPeer);
    assert!(p.message.contains("refused this receiver's certificate"), "{}", p.message);
}

#[tokio::test]
async fn expired_and_not_yet_valid_certificates_are_named_with_their_dates() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca("good CA");
    let good_r = node(dir.path(), "eu-west", &["eu-west"], &ca, &ca, ALWAYS.0, ALWAYS.1);
    let good_a = node(dir.path(), "web-1", &["web-1"], &ca, &ca, ALWAYS.0, ALWAYS.1);
    // The agent's certificate expired: the receiver names the date, and so does the agent.
    let old_a = node(dir.path(), "old-agent", &["web-1"], &ca, &ca, (2019, 1, 1), (2020, 1, 2));
    let o = attempt(&good_r, &old_a, "eu-west").await;
    let p = refused(&o);
    assert_eq!(p.reason, Reason::Expired);
    assert!(p.message.contains("expired at 2020-01-02T00:00:00Z"), "{}", p.message);
    let c = o.client.clone().expect("the agent says why");
    assert!(c.message.starts_with("certificate expired: receiver eu-west refused"), "{}", c.message);
    assert!(c.message.contains("it expired at 2020-01-02T00:00:00Z"), "{}", c.message);
    assert!(own_certificate_problem(&old_a).is_some_and(|m| m.contains("expired at 2020-01-02")));
    // The receiver's certificate is not valid yet: the agent names the start date.
    let future_r = node(dir.path(), "future", &["eu-west"], &ca, &ca, (2999, 1, 1), (3000, 1, 1));
    let o = attempt(&future_r, &good_a, "eu-west").await;
    let c = o.client.clone().expect("the agent says why");
    assert_eq!(c.reason, Reason::NotYetValid);
    assert!(c.message.contains("is valid only from 2999-01-01T00:00:00Z"), "{}", c.message);
    assert_eq!(refused(&o).reason, Reason::RefusedByPeer);
}

#[tokio::test]
async fn a_name_mismatch_names_the_expected_and_the_found_names() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca("good CA");
    let r = node(dir.path(), "eu-west", &["other-host", "localhost"], &ca, &ca, ALWAYS.0, ALWAYS.1);
    let a = node(dir.path(), "web-1", &["web-1"], &ca, &ca, ALWAYS.0, ALWAYS.1);
    let o = attempt(&r, &a, "eu-west").await;
    let c = o.client.clone().expect("the agent says why");
    assert_eq!(c.reason, Reason::BadName);
    assert!(c.message.contains("[\"other-host\", \"localhost\"]"), "found names: {}", c.message);
    assert!(c.message.contains("expects \"eu-west\""), "expected name: {}", c.message);
    let p = refused(&o);
    assert_eq!(p.reason, Reason::RefusedByPeer);
    assert!(p.message.contains("name mismatch") && p.message.contains("other-host"), "{}", p.message);
}

#[tokio::test]
async fn a_client_without_a_certificate_is_refused_as_such() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca("good CA");
    let r = node(dir.path(), "eu-west", &["eu-west"], &ca, &ca, ALWAYS.0, ALWAYS.1);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server_tls = ServerTls::new(&r).unwrap();
    let accepting = tokio::spawn(async move {
        let (tcp, peer) = listener.accept().await.unwrap();
        server_tls.accept(tcp, peer).await.map(|_| ())
    });
    let mut roots = RootCertStore::empty();
    roots.add_parsable_certificates(CertificateDer::pem_file_iter(&r.ca).unwrap().map(|c| c.unwrap()));
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    let tcp = TcpStream::connect(addr).await.unwrap();
    if let Ok(mut s) =
        tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(ServerName::try_from("eu-west").unwrap(), tcp).await
    {
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read(&mut [0u8; 8])).await;
    }
    match accepting.await.unwrap() {
        Err(AcceptError::Refused(p)) => {
            assert_eq!(p.reason, Reason::NoClientCert);
            assert!(p.message.contains("presented none"), "{}", p.message);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn unusable_material_names_the_key_and_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca("good CA");
    let a = node(dir.path(), "web-1", &["web-1"], &ca, &ca, ALWAYS.0, ALWAYS.1);
    let b = node(dir.path(), "web-2", &["web-2"], &ca, &ca, ALWAYS.0, ALWAYS.1);
    assert!(check_material(&a).is_ok());
    // Another certificate's key.
    let mixed = TlsConfig { key: b.key.clone(), ..a.clone() };
    match check_material(&mixed) {
        Err(TlsError::Material { key, path, problem }) => {
            assert_eq!((key, path), ("tls.key", b.key.display().to_string()));
            assert!(problem.contains("is not the key of the certificate in tls.cert"), "{problem}");
        }
        other => panic!("{other:?}"),
    }
    // Not PEM, and missing.
    std::fs::write(dir.path().join("junk.pem"), "hello").unwrap();
    let junk = TlsConfig { ca: dir.path().join("junk.pem"), ..a.clone() };
    assert!(matches!(check_material(&junk), Err(TlsError::Material { key: "tls.ca", .. })));
    let missing = TlsConfig { cert: dir.path().join("nope.pem"), ..a.clone() };
    match check_material(&missing) {
        Err(e @ TlsError::Material { key: "tls.cert", .. }) => assert!(e.to_string().contains("cannot be read"), "{e}"),
        other => panic!("{other:?}"),
    }
    let keyless = TlsConfig { key: a.cert.clone(), ..a.clone() };
    assert!(matches!(check_material(&keyless), Err(TlsError::Material { key: "tls.key", .. })));
}

#[test]
fn the_source_chain_gives_up_a_problem_wrapped_in_io() {
    let p = TlsProblem { reason: Reason::Expired, message: "certificate expired: x".into(), subject: None };
    let io = std::io::Error::other(p.clone());
    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);
    assert_eq!(problem_in_chain(&Outer(io)), Some(p));
}

#[test]
fn plain_uri_keeps_host_and_port() {
    assert_eq!(plain_uri("https://r.example:7443").unwrap(), "http://r.example:7443");
    assert_eq!(plain_uri("https://127.0.0.1:9").unwrap(), "http://127.0.0.1:9");
    assert_eq!(plain_uri("https://[::1]:9").unwrap(), "http://[::1]:9");
    assert_eq!(plain_uri("https://r.example").unwrap(), "http://r.example:443");
    assert!(plain_uri("http://r.example:1").is_err());
}
