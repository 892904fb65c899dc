//! Development certificates: a throwaway CA, a server certificate for
//! `localhost`, `127.0.0.1` and `::1`, and a client certificate, made with
//! rcgen. For tests and demos only; production uses a real CA.
//!
//! [`write_to`] writes `ca.pem ca.key server.pem server.key client.pem
//! client.key`; the keys are created with mode 0600 on Unix.
//!
//! Not here: loading certificates (rpc-core `tls`).

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

use std::sync::Arc;

use rpc_core::tls::{self, Identity};

use crate::ServerError;

/// Subject common name of the development client certificate.
pub const CLIENT_SUBJECT_CN: &str = "srpc dev client";

/// The DNS subject alternative name of the development client certificate.
pub const CLIENT_SAN: &str = "client.srpc.test";

/// A CA and the server and client certificates it signed, as PEM text.
#[derive(Debug, Clone)]
pub struct DevCerts {
    /// CA certificate.
    pub ca_pem: String,
    /// CA private key.
    pub ca_key: String,
    /// Server certificate (SANs localhost, 127.0.0.1, ::1).
    pub server_pem: String,
    /// Server private key.
    pub server_key: String,
    /// Client certificate (CN [`CLIENT_SUBJECT_CN`]).
    pub client_pem: String,
    /// Client private key.
    pub client_key: String,
}

impl DevCerts {
    /// A server TLS config with the server certificate; with `mutual`,
    /// clients must present a certificate from this CA.
    pub fn server_tls(&self, mutual: bool) -> Result<Arc<rustls::ServerConfig>, ServerError> {
        let identity = Identity {
            cert_chain: tls::certs_from_pem(&self.server_pem)?,
            key: tls::key_from_pem(&self.server_key)?,
        };
        let ca = mutual
            .then(|| tls::certs_from_pem(&self.ca_pem))
            .transpose()?;
        Ok(tls::server_config_from_der(identity, ca)?)
    }

    /// A client TLS config trusting this CA; with `with_identity`, it
    /// presents the client certificate (mutual TLS).
    pub fn client_tls(
        &self,
        with_identity: bool,
    ) -> Result<Arc<rustls::ClientConfig>, ServerError> {
        let identity = if with_identity {
            Some(Identity {
                cert_chain: tls::certs_from_pem(&self.client_pem)?,
                key: tls::key_from_pem(&self.client_key)?,
            })
        } else {
            None
        };
        Ok(tls::client_config_from_der(
            tls::certs_from_pem(&self.ca_pem)?,
            identity,
        )?)
    }
}

/// Generates a fresh CA with a server and a client certificate.
pub fn generate() -> Result<DevCerts, ServerError> {
    generate_named("srpc dev CA")
}

/// A calendar date: year, month, day.
pub type Ymd = (i32, u8, u8);

/// Like [`generate`], with the CA's common name (tests make a second,
/// unrelated CA this way).
pub fn generate_named(ca_cn: &str) -> Result<DevCerts, ServerError> {
    generate_with(ca_cn, None)
}

/// Like [`generate_named`], with the server certificate valid only from the
/// first date to the second (tests make expired and not-yet-valid
/// certificates this way).
pub fn generate_with(
    ca_cn: &str,
    server_validity: Option<(Ymd, Ymd)>,
) -> Result<DevCerts, ServerError> {
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.distinguished_name.push(DnType::CommonName, ca_cn);
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca, &ca_key);

    let server_key = KeyPair::generate()?;
    let mut server = CertificateParams::new(vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ])?;
    server
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    if let Some(((fy, fm, fd), (uy, um, ud))) = server_validity {
        server.not_before = rcgen::date_time_ymd(fy, fm, fd);
        server.not_after = rcgen::date_time_ymd(uy, um, ud);
    }
    let server_cert = server.signed_by(&server_key, &issuer)?;

    let client_key = KeyPair::generate()?;
    let mut client = CertificateParams::new(vec![CLIENT_SAN.to_string()])?;
    client
        .distinguished_name
        .push(DnType::CommonName, CLIENT_SUBJECT_CN);
    client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let client_cert = client.signed_by(&client_key, &issuer)?;

    Ok(DevCerts {
        ca_pem: ca_cert.pem(),
        ca_key: ca_key.serialize_pem(),
        server_pem: server_cert.pem(),
        server_key: server_key.serialize_pem(),
        client_pem: client_cert.pem(),
        client_key: client_key.serialize_pem(),
    })
}

/// Generates development certificates into `dir` (created if missing) and
/// returns the paths written, in the order listed in the module docs.
pub fn write_to(dir: &Path) -> Result<Vec<PathBuf>, ServerError> {
    std::fs::create_dir_all(dir).map_err(|source| ServerError::Write {
        path: dir.to_owned(),
        source,
    })?;
    let certs = generate()?;
    let files = [
        ("ca.pem", &certs.ca_pem, false),
        ("ca.key", &certs.ca_key, true),
        ("server.pem", &certs.server_pem, false),
        ("server.key", &certs.server_key, true),
        ("client.pem", &certs.client_pem, false),
        ("client.key", &certs.client_key, true),
    ];
    let mut written = Vec::new();
    for (name, text, secret) in files {
        let path = dir.join(name);
        write_file(&path, text, secret).map_err(|source| ServerError::Write {
            path: path.clone(),
            source,
        })?;
        written.push(path);
    }
    Ok(written)
}

fn write_file(path: &Path, text: &str, secret: bool) -> std::io::Result<()> {
    let mut options = OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        options.mode(if secret { 0o600 } else { 0o644 });
        let mut file = options.open(path)?;
        // `mode` applies only when the file is created; fix an existing one.
        let mode = if secret { 0o600 } else { 0o644 };
        file.set_permissions(std::fs::Permissions::from_mode(mode))?;
        file.write_all(text.as_bytes())
    }
    #[cfg(not(unix))]
    {
        let _ = secret;
        options.open(path)?.write_all(text.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_six_files_with_private_keys() {
        let dir = tempfile::tempdir().unwrap();
        let paths = write_to(dir.path()).unwrap();
        assert_eq!(paths.len(), 6);
        for p in &paths {
            let text = std::fs::read_to_string(p).unwrap();
            assert!(text.starts_with("-----BEGIN"), "{}", p.display());
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join("server.key"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        // The pair loads and matches.
        rpc_core::tls::server_config(
            &dir.path().join("server.pem"),
            &dir.path().join("server.key"),
            Some(&dir.path().join("ca.pem")),
        )
        .unwrap();
    }
}
