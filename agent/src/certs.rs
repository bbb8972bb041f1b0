//! `lockstep-agent certs`: a development CA and certificates for an agent and its receivers,
//! written as `ca.pem`, `ca.key`, `ID.pem`, `ID.key`. Each certificate's DNS names are its ID
//! plus any `--host`; each is usable as both TLS client and server. Production deployments
//! bring their own PKI.

use std::path::Path;

use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose};

/// Writes the CA and one certificate per id into `out`.
pub fn generate(out: &Path, ids: &[String], hosts: &[String]) -> Result<(), String> {
    std::fs::create_dir_all(out).map_err(|e| format!("create {}: {e}", out.display()))?;
    let ca_key = KeyPair::generate().map_err(|e| e.to_string())?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(|e| e.to_string())?;
    ca_params.distinguished_name.push(DnType::CommonName, "lockstep development CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages =
        vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let ca_cert = ca_params.self_signed(&ca_key).map_err(|e| e.to_string())?;
    write(out, "ca.pem", ca_cert.pem().as_bytes(), false)?;
    write(out, "ca.key", ca_key.serialize_pem().as_bytes(), true)?;
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    for id in ids {
        let mut names = vec![id.clone()];
        names.extend(hosts.iter().cloned());
        names.dedup();
        let key = KeyPair::generate().map_err(|e| e.to_string())?;
        let mut params = CertificateParams::new(names).map_err(|e| format!("certificate for {id}: {e}"))?;
        params.distinguished_name.push(DnType::CommonName, id.clone());
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        let cert = params.signed_by(&key, &issuer).map_err(|e| e.to_string())?;
        write(out, &format!("{id}.pem"), cert.pem().as_bytes(), false)?;
        write(out, &format!("{id}.key"), key.serialize_pem().as_bytes(), true)?;
    }
    Ok(())
}

fn write(dir: &Path, name: &str, data: &[u8], secret: bool) -> Result<(), String> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(name);
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true).mode(if secret { 0o600 } else { 0o644 });
    std::io::Write::write_all(&mut opts.open(&path).map_err(|e| format!("write {}: {e}", path.display()))?, data)
        .map_err(|e| format!("write {}: {e}", path.display()))
}
