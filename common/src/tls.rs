//! Mutual TLS (rustls, through tonic): loading the CA, certificate and key named in config,
//! and reading a peer's identity (its DNS name) from the certificate it presented.

use std::path::Path;

use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

use crate::config::TlsConfig;

/// Problems with TLS material; all need a person (wrong file, wrong CA).
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("read {what} {path}: {source}")]
    Read { what: &'static str, path: String, source: std::io::Error },
    #[error("{what} {path} holds no PEM {expect}; give a PEM file")]
    NotPem { what: &'static str, path: String, expect: &'static str },
    #[error("peer presented no client certificate")]
    NoPeerCert,
    #[error("peer certificate unreadable: {0}")]
    BadPeerCert(String),
    #[error("peer certificate carries no DNS name or common name")]
    NoIdentity,
}

fn read_pem(what: &'static str, path: &Path, expect: &'static str) -> Result<Vec<u8>, TlsError> {
    let data =
        std::fs::read(path).map_err(|source| TlsError::Read { what, path: path.display().to_string(), source })?;
    let text = String::from_utf8_lossy(&data);
    if !text.contains("-----BEGIN") || !text.contains(expect) {
        return Err(TlsError::NotPem { what, path: path.display().to_string(), expect });
    }
    Ok(data)
}

fn identity(tls: &TlsConfig) -> Result<(Certificate, Identity), TlsError> {
    let ca = read_pem("tls.ca", &tls.ca, "CERTIFICATE")?;
    let cert = read_pem("tls.cert", &tls.cert, "CERTIFICATE")?;
    let key = read_pem("tls.key", &tls.key, "PRIVATE KEY")?;
    Ok((Certificate::from_pem(ca), Identity::from_pem(cert, key)))
}

/// Makes ring the process's rustls crypto provider. tonic builds its rustls configurations
/// with the process default, and rustls cannot pick one by itself once a dependency (the
/// replication client's tokio-rustls) also compiles in aws-lc-rs. Idempotent.
pub fn use_ring() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Server side: present our certificate and require a client certificate signed by the CA.
pub fn server_config(tls: &TlsConfig) -> Result<ServerTlsConfig, TlsError> {
    use_ring();
    let (ca, id) = identity(tls)?;
    Ok(ServerTlsConfig::new().identity(id).client_ca_root(ca).client_auth_optional(false))
}

/// Client side: present our certificate and accept only a server certificate signed by the CA
/// and naming `server_name`.
pub fn client_config(tls: &TlsConfig, server_name: &str) -> Result<ClientTlsConfig, TlsError> {
    use_ring();
    let (ca, id) = identity(tls)?;
    Ok(ClientTlsConfig::new().ca_certificate(ca).identity(id).domain_name(server_name.to_string()))
}

/// All identities a certificate names: its DNS subject-alternative names, then its common name.
pub fn cert_identities(der: &[u8]) -> Result<Vec<String>, TlsError> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| TlsError::BadPeerCert(e.to_string()))?;
    let mut out = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::DNSName(d) = name {
                out.push((*d).to_string());
            }
        }
    }
    for cn in cert.subject().iter_common_name() {
        if let Ok(s) = cn.as_str() {
            out.push(s.to_string());
        }
    }
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
