//! Development certificates: a throwaway CA, a server certificate for
//! `localhost`, `127.0.0.1` and `::1`, and a client certificate, made with
//! rcgen. For tests and demos only; production uses a real CA.
//!
//! [`write_to`] writes `ca.pem ca.key server.pem server.key client.pem
//! client.key`; the keys are created with mode 0600 on Unix. Each CA's name
//! ends in a random suffix (`srpc dev CA 3f9a1c2e`), so certificates of two
//! runs are told apart in errors. [`write_new`] refuses to replace files
//! unless told to, as `rpc-server gen-certs` does without `--force`.
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

/// Generates a fresh CA (named `srpc dev CA` and a random suffix) with a
/// server and a client certificate.
pub fn generate() -> Result<DevCerts, ServerError> {
    generate_for(CLIENT_SUBJECT_CN)
}

/// Like [`generate`], with `client_cn` as the client certificate's common
/// name.
pub fn generate_for(client_cn: &str) -> Result<DevCerts, ServerError> {
    build(None, client_cn, None)
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
    build(Some(ca_cn), CLIENT_SUBJECT_CN, server_validity)
}

/// The certificates; a CA without a given name gets `srpc dev CA` and a
/// suffix taken from its (random) key.
fn build(
    ca_cn: Option<&str>,
    client_cn: &str,
    server_validity: Option<(Ymd, Ymd)>,
) -> Result<DevCerts, ServerError> {
    let ca_key = KeyPair::generate()?;
    let ca_cn = match ca_cn {
        Some(name) => name.to_owned(),
        None => {
            let suffix: String = ca_key
                .public_key_raw()
                .iter()
                .rev()
                .take(4)
                .map(|b| format!("{b:02x}"))
                .collect();
            format!("srpc dev CA {suffix}")
        }
    };
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
        .push(DnType::CommonName, client_cn);
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

/// The files [`write_to`] writes, in order.
pub const FILES: [&str; 6] = [
    "ca.pem",
    "ca.key",
    "server.pem",
    "server.key",
    "client.pem",
    "client.key",
];

/// Generates development certificates into `dir` (created if missing),
/// replacing any there, and returns the paths written, in the order of
/// [`FILES`].
pub fn write_to(dir: &Path) -> Result<Vec<PathBuf>, ServerError> {
    write_certs(dir, &generate()?)
}

/// Like [`write_to`], with `client_cn` as the client certificate's common
/// name, and refusing to replace any of [`FILES`] already in `dir` unless
/// `replace` (`ServerError::Exists` names the first one found).
pub fn write_new(dir: &Path, client_cn: &str, replace: bool) -> Result<Vec<PathBuf>, ServerError> {
    if !replace {
        if let Some(path) = FILES.iter().map(|f| dir.join(f)).find(|p| p.exists()) {
            return Err(ServerError::Exists { path });
        }
    }
    write_certs(dir, &generate_for(client_cn)?)
}

fn write_certs(dir: &Path, certs: &DevCerts) -> Result<Vec<PathBuf>, ServerError> {
    std::fs::create_dir_all(dir).map_err(|source| ServerError::Write {
        path: dir.to_owned(),
        source,
    })?;
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
