//! TLS to PostgreSQL servers, configured the way libpq is: the `sslmode`, `sslrootcert`,
//! `sslcert` and `sslkey` keys of a connection string.
//!
//! tokio-postgres understands only `sslmode=disable|prefer|require` and no certificate keys,
//! so [`parse_dsn`] takes these keys out of the connection string (key=value or URL form) and
//! returns them as a [`PgTls`], which builds the rustls configuration:
//!
//! | sslmode | encrypted | server certificate checked against `sslrootcert` | host name checked |
//! |---|---|---|---|
//! | `disable` | never | — | — |
//! | `prefer` (default, as in libpq) | when the server offers it | no | no |
//! | `require` | always | only when `sslrootcert` is given (as libpq) | no |
//! | `verify-ca` | always | yes | no |
//! | `verify-full` | always | yes | yes |
//!
//! `sslcert` + `sslkey` present a client certificate (PEM) to servers that ask for one.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres::Socket;
use tokio_postgres_rustls::MakeRustlsConnect;

/// How much TLS a connection insists on (libpq's `sslmode`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    #[default]
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(v: &str) -> Option<SslMode> {
        Some(match v {
            "disable" => SslMode::Disable,
            // `allow` (plain first, TLS if the server insists) is served by `prefer`.
            "allow" | "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => return None,
        })
    }
}

/// The TLS half of a connection string.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PgTls {
    pub mode: SslMode,
    /// PEM file of the certificate authorities trusted to sign the server's certificate.
    pub root_cert: Option<PathBuf>,
    /// PEM client certificate chain and key, for servers that ask for one.
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
}

/// A connection string split into what tokio-postgres takes and the TLS settings.
pub fn parse_dsn(dsn: &str) -> Result<(tokio_postgres::Config, PgTls), String> {
    let mut tls = PgTls::default();
    let mut take = |key: &str, value: &str| -> Result<bool, String> {
        match key {
            "sslmode" => {
                tls.mode = SslMode::parse(value).ok_or_else(|| {
                    format!("sslmode={value:?} is not one of disable, allow, prefer, require, verify-ca, verify-full")
                })?
            }
            "sslrootcert" => tls.root_cert = Some(PathBuf::from(value)),
            "sslcert" => tls.client_cert = Some(PathBuf::from(value)),
            "sslkey" => tls.client_key = Some(PathBuf::from(value)),
            _ => return Ok(false),
        }
        Ok(true)
    };
    let is_url = dsn.starts_with("postgres://") || dsn.starts_with("postgresql://");
    let rest = if is_url {
        match dsn.split_once('?') {
            None => dsn.to_string(),
            Some((base, query)) => {
                let mut kept = Vec::new();
                for pair in query.split('&').filter(|p| !p.is_empty()) {
                    let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                    if !take(k, &percent_decode(v))? {
                        kept.push(pair);
                    }
                }
                if kept.is_empty() {
                    base.to_string()
                } else {
                    format!("{base}?{}", kept.join("&"))
                }
            }
        }
    } else {
        let mut kept = Vec::new();
        for (k, v) in split_key_values(dsn)? {
            if !take(&k, &v)? {
                kept.push(format!("{k}='{}'", v.replace('\\', "\\\\").replace('\'', "\\'")));
            }
        }
        kept.join(" ")
    };
    if tls.client_cert.is_some() != tls.client_key.is_some() {
        return Err("sslcert and sslkey go together: give both or neither".into());
    }
    if matches!(tls.mode, SslMode::VerifyCa | SslMode::VerifyFull) && tls.root_cert.is_none() {
        return Err(format!(
            "sslmode={} needs sslrootcert=<PEM file of the CA that signed the server's certificate>",
            if tls.mode == SslMode::VerifyCa { "verify-ca" } else { "verify-full" }
        ));
    }
    let mut config: tokio_postgres::Config = rest.parse().map_err(|e| format!("{e}"))?;
    let hosts = config.get_hosts();
    if !hosts.is_empty() && hosts.iter().all(|h| matches!(h, tokio_postgres::config::Host::Unix(_))) {
        // As libpq: TLS is never used over a unix-domain socket, whatever sslmode says.
        tls.mode = SslMode::Disable;
    }
    config.ssl_mode(match tls.mode {
        SslMode::Disable => tokio_postgres::config::SslMode::Disable,
        SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
        _ => tokio_postgres::config::SslMode::Require,
    });
    Ok((config, tls))
}

/// A tokio-postgres connection over [`PgConn`]'s transport (TLS or plain, per `sslmode`).
pub type PgConnection = tokio_postgres::Connection<tokio_postgres::Socket, <Make as MakeTlsConnect<Socket>>::Stream>;

/// The rustls connector, also for unix-domain sockets: tokio-postgres asks for a connector
/// even where it will not use it (their `sslmode` is forced to `disable`), with an empty
/// host name that is no valid server name.
#[derive(Clone)]
pub struct Make(MakeRustlsConnect);

impl MakeTlsConnect<Socket> for Make {
    type Stream = <MakeRustlsConnect as MakeTlsConnect<Socket>>::Stream;
    type TlsConnect = <MakeRustlsConnect as MakeTlsConnect<Socket>>::TlsConnect;
    type Error = <MakeRustlsConnect as MakeTlsConnect<Socket>>::Error;

    fn make_tls_connect(&mut self, hostname: &str) -> Result<Self::TlsConnect, Self::Error> {
        let name = if hostname.is_empty() { "localhost" } else { hostname };
        <MakeRustlsConnect as MakeTlsConnect<Socket>>::make_tls_connect(&mut self.0, name)
    }
}

/// A parsed connection string, ready to connect with its TLS settings.
#[derive(Clone)]
pub struct PgConn {
    /// Everything but TLS (callers may adjust timeouts, application name...).
    pub config: tokio_postgres::Config,
    pub tls: PgTls,
    make: Make,
}

impl PgConn {
    /// Parses `dsn` and loads the certificate files it names.
    pub fn parse(dsn: &str) -> Result<PgConn, String> {
        let (config, tls) = parse_dsn(dsn)?;
        let make = Make(MakeRustlsConnect::new(tls.client_config()?));
        Ok(PgConn { config, tls, make })
    }

    /// Opens a connection; the caller drives the returned `PgConnection` (spawn it).
    pub async fn connect(&self) -> Result<(tokio_postgres::Client, PgConnection), tokio_postgres::Error> {
        self.config.connect(self.make.clone()).await
    }
}

impl PgTls {
    /// The rustls client configuration these settings call for (never used with `disable`).
    pub fn client_config(&self) -> Result<ClientConfig, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?;
        let webpki = match &self.root_cert {
            None => None,
            Some(path) => {
                let mut roots = RootCertStore::empty();
                for cert in read_certs("sslrootcert", path)? {
                    roots.add(cert).map_err(|e| format!("sslrootcert {}: {e}", path.display()))?;
                }
                let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                    .build()
                    .map_err(|e| format!("sslrootcert {}: {e}", path.display()))?;
                Some(webpki)
            }
        };
        let verifier = Arc::new(Verifier { provider, webpki, check_name: self.mode == SslMode::VerifyFull });
        let builder = builder.dangerous().with_custom_certificate_verifier(verifier);
        match (&self.client_cert, &self.client_key) {
            (Some(cert), Some(key)) => {
                let chain = read_certs("sslcert", cert)?;
                let key = PrivateKeyDer::from_pem_file(key)
                    .map_err(|e| format!("sslkey {}: not a PEM private key: {e}", key.display()))?;
                builder.with_client_auth_cert(chain, key).map_err(|e| format!("sslcert/sslkey: {e}"))
            }
            _ => Ok(builder.with_no_client_auth()),
        }
    }
}

fn read_certs(key: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{key} {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{key} {}: no PEM CERTIFICATE block in the file", path.display()));
    }
    Ok(certs)
}

/// Checks the server's certificate as `sslmode` asks. Without a root certificate
/// (`prefer`/`require`) the server is not authenticated, as with libpq — the connection is
/// only encrypted. With one, the chain must lead to it, and the host name must match for
/// `verify-full`. Handshake signatures are always checked.
#[derive(Debug)]
struct Verifier {
    provider: Arc<rustls::crypto::CryptoProvider>,
    webpki: Option<Arc<WebPkiServerVerifier>>,
    check_name: bool,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(webpki) = &self.webpki else { return Ok(ServerCertVerified::assertion()) };
        match webpki.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if !self.check_name => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// `key=value` pairs of a libpq connection string; values may be single-quoted with `\'` and
/// `\\` escapes.
fn split_key_values(dsn: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    let mut it = dsn.chars().peekable();
    loop {
        while it.peek().is_some_and(|c| c.is_whitespace()) {
            it.next();
        }
        if it.peek().is_none() {
            return Ok(out);
        }
        let mut key = String::new();
        while let Some(&c) = it.peek() {
            if c == '=' || c.is_whitespace() {
                break;
            }
            key.push(c);
            it.next();
        }
        while it.peek().is_some_and(|c| c.is_whitespace()) {
            it.next();
        }
        if it.next() != Some('=') {
            return Err(format!("{key:?} has no value (expected key=value pairs)"));
        }
        while it.peek().is_some_and(|c| c.is_whitespace()) {
            it.next();
        }
        let mut value = String::new();
        if it.peek() == Some(&'\'') {
            it.next();
            loop {
                match it.next() {
                    None => return Err(format!("unterminated quoted value of {key}")),
                    Some('\'') => break,
                    Some('\\') => value.push(it.next().ok_or_else(|| format!("dangling \\ in the value of {key}"))?),
                    Some(c) => value.push(c),
                }
            }
        } else {
            while let Some(&c) = it.peek() {
                if c.is_whitespace() {
                    break;
                }
                if c == '\\' {
                    it.next();
                    value.push(it.next().ok_or_else(|| format!("dangling \\ in the value of {key}"))?);
                    continue;
                }
                value.push(c);
                it.next();
            }
        }
        out.push((key, value));
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Some(v) = std::str::from_utf8(&b[i + 1..i + 3]).ok().and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ssl_keys_are_taken_out_and_the_rest_kept() {
        let (cfg, tls) =
            parse_dsn("host=db.example port=5433 user=me sslmode=verify-full sslrootcert=/ca.pem").unwrap();
        assert_eq!(tls.mode, SslMode::VerifyFull);
        assert_eq!(tls.root_cert.as_deref(), Some(Path::new("/ca.pem")));
        assert_eq!(cfg.get_ports(), &[5433]);
        assert_eq!(cfg.get_user(), Some("me"));
        let (cfg, tls) = parse_dsn("host=h user=me").unwrap();
        assert_eq!(tls, PgTls::default());
        assert_eq!(cfg.get_ssl_mode(), tokio_postgres::config::SslMode::Prefer);
    }

    #[test]
    fn quoting_survives() {
        let (cfg, tls) = parse_dsn(r"user=me password='a b\'c\\' dbname=x sslmode=require").unwrap();
        assert_eq!(cfg.get_password(), Some(&br"a b'c\"[..]));
        assert_eq!(cfg.get_dbname(), Some("x"));
        assert_eq!(tls.mode, SslMode::Require);
        assert_eq!(cfg.get_ssl_mode(), tokio_postgres::config::SslMode::Require);
    }

    #[test]
    fn urls_too() {
        let (cfg, tls) =
            parse_dsn("postgresql://me@h:5432/db?sslmode=verify-ca&sslrootcert=%2Fetc%2Fca.pem&application_name=x")
                .unwrap();
        assert_eq!(tls.mode, SslMode::VerifyCa);
        assert_eq!(tls.root_cert.as_deref(), Some(Path::new("/etc/ca.pem")));
        assert_eq!(cfg.get_application_name(), Some("x"));
        let (_, tls) = parse_dsn("postgresql://me@h/db").unwrap();
        assert_eq!(tls.mode, SslMode::Prefer);
    }

    #[test]
    fn unix_sockets_never_use_tls() {
        let (cfg, tls) = parse_dsn("host=/run/postgresql user=me sslmode=require").unwrap();
        assert_eq!(tls.mode, SslMode::Disable);
        assert_eq!(cfg.get_ssl_mode(), tokio_postgres::config::SslMode::Disable);
    }

    #[test]
    fn mistakes_are_named() {
        assert!(parse_dsn("user=me sslmode=sometimes").unwrap_err().contains("sslmode"));
        assert!(parse_dsn("user=me sslmode=verify-full").unwrap_err().contains("sslrootcert"));
        assert!(parse_dsn("user=me sslcert=/c.pem").unwrap_err().contains("sslkey"));
        assert!(parse_dsn("user=me password='open").unwrap_err().contains("unterminated"));
    }
}
