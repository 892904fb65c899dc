//! TLS setup shared by both sides: PEM loading, rustls configs, ALPN check.
//!
//! - PEM files are read with `rustls_pki_types::pem::PemObject` (the parser
//!   rustls-pemfile wrapped; that crate is archived). Every error names the
//!   file and what is wrong with it.
//! - Configs are built with an explicit crypto provider (aws-lc-rs, rustls'
//!   default), never a process-wide default, and allow TLS 1.3 only.
//! - Key exchange prefers the post-quantum hybrid X25519MLKEM768, so traffic
//!   recorded today stays secret from a future quantum computer; classical
//!   groups stay offered for peers without it. [`KeyExchange::Classical`]
//!   is the opt-out for links where handshake cost matters more.
//! - Both sides offer only the ALPN protocol [`ALPN`]. rustls lets a client
//!   that offers *no* ALPN through, so the server calls [`check_alpn`] after
//!   every handshake.
//! - Certificate verification is always on. There is no switch to turn it off.
//!
//! Mutual TLS: [`server_config`] takes an optional client CA; with one, the
//! server requires a client certificate signed by it (`WebPkiClientVerifier`).
//!
//! Session resumption is on: clients keep tickets in memory (per config, so
//! reconnects resume); servers issue stateless TLS 1.3 tickets sealed with a
//! key of their own config. A ticket carries the client's certificate chain,
//! so handlers see the same identity on a resumed connection, and a new config
//! (a certificate or CA reload) refuses every ticket of the old one: resumption
//! can never skip client authentication of a stricter config.
//!
//! This module does not open sockets or run handshakes; see
//! [`crate::transport`].

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// The ALPN protocol name of this wire protocol, version 1.
pub const ALPN: &[u8] = b"srpc/1";

/// A certificate, key or CA file that could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// The file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file has no `BEGIN CERTIFICATE` section.
    #[error("no certificate found in {} (expected a PEM \"BEGIN CERTIFICATE\" section)", path.display())]
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// The file has no private key section.
    #[error("no private key found in {} (expected a PEM \"BEGIN PRIVATE KEY\" section)", path.display())]
    NoPrivateKey {
        /// The file.
        path: PathBuf,
    },
    /// The file is not well-formed PEM.
    #[error("malformed PEM in {}: {source}", path.display())]
    Pem {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        #[source]
        source: pem::Error,
    },
    /// The private key does not belong to the certificate.
    #[error("private key does not match the certificate{}", describe_pair(.cert, .key))]
    KeyMismatch {
        /// The certificate file, when loaded from files.
        cert: Option<PathBuf>,
        /// The key file, when loaded from files.
        key: Option<PathBuf>,
    },
    /// A CA certificate could not be used as a trust anchor.
    #[error("unusable CA certificate{}: {source}", describe_file(.path))]
    BadCa {
        /// The CA file, when loaded from a file.
        path: Option<PathBuf>,
        /// What rustls or webpki said.
        #[source]
        source: rustls::Error,
    },
    /// rustls refused the configuration for another reason.
    #[error("invalid TLS configuration: {0}")]
    Config(#[source] rustls::Error),
    /// The client-certificate verifier could not be built.
    #[error("cannot build the client certificate verifier: {0}")]
    Verifier(#[source] rustls::server::VerifierBuilderError),
}

fn describe_file(path: &Option<PathBuf>) -> String {
    path.as_ref()
        .map(|p| format!(" in {}", p.display()))
        .unwrap_or_default()
}

fn describe_pair(cert: &Option<PathBuf>, key: &Option<PathBuf>) -> String {
    match (cert, key) {
        (Some(c), Some(k)) => format!(" ({} is not the key of {})", k.display(), c.display()),
        _ => String::new(),
    }
}

fn pem_error(path: &Path, e: pem::Error) -> TlsError {
    match e {
        pem::Error::Io(source) => TlsError::Read {
            path: path.to_owned(),
            source,
        },
        source => TlsError::Pem {
            path: path.to_owned(),
            source,
        },
    }
}

/// Which key exchange groups a config offers, in order of preference.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum KeyExchange {
    /// X25519MLKEM768 (X25519 combined with ML-KEM-768) first, then X25519,
    /// P-256 and P-384: post-quantum security with any peer that has it,
    /// classical with any other. The default: rustls' order with its
    /// `prefer-post-quantum` feature.
    #[default]
    PostQuantumHybrid,
    /// X25519, P-256 and P-384 only: a smaller, cheaper handshake (no
    /// 1.2 KB ML-KEM key share each way), without protection against a
    /// future quantum computer.
    Classical,
}

impl std::str::FromStr for KeyExchange {
    type Err = String;

    /// `post-quantum` or `classical` (the CLIs' `--key-exchange`).
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "post-quantum" | "hybrid" => Ok(KeyExchange::PostQuantumHybrid),
            "classical" => Ok(KeyExchange::Classical),
            other => Err(format!(
                "unknown key exchange {other:?}: expected \"post-quantum\" or \"classical\""
            )),
        }
    }
}

/// The crypto provider of [`KeyExchange::PostQuantumHybrid`], the one every
/// config uses unless told otherwise; see [`provider_for`].
pub fn provider() -> Arc<CryptoProvider> {
    provider_for(KeyExchange::default())
}

/// The crypto provider every config uses: rustls' default, aws-lc-rs, with
/// the key exchange groups of `key_exchange`, and `TLS13_AES_128_GCM_SHA256`
/// preferred over rustls' default first choice, `TLS13_AES_256_GCM_SHA384`
/// (both stay offered, with ChaCha20-Poly1305). AES-128-GCM is the suite
/// every TLS 1.3 stack must implement and the one Go and most browsers
/// prefer; on x86 it runs about a third faster than AES-256, and SHA-256
/// has CPU instructions (SHA-NI) that SHA-384 lacks, which shortens every
/// handshake's key schedule.
pub fn provider_for(key_exchange: KeyExchange) -> Arc<CryptoProvider> {
    use rustls::crypto::aws_lc_rs::{cipher_suite, kx_group};
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    provider.cipher_suites = vec![
        cipher_suite::TLS13_AES_128_GCM_SHA256,
        cipher_suite::TLS13_AES_256_GCM_SHA384,
        cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
    ];
    provider.kx_groups = match key_exchange {
        KeyExchange::PostQuantumHybrid => vec![
            kx_group::X25519MLKEM768,
            kx_group::X25519,
            kx_group::SECP256R1,
            kx_group::SECP384R1,
        ],
        KeyExchange::Classical => {
            vec![kx_group::X25519, kx_group::SECP256R1, kx_group::SECP384R1]
        }
    };
    Arc::new(provider)
}

/// Reads every certificate in a PEM file; at least one must be there.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_error(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(path, e))?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// Reads the first private key (PKCS#8, PKCS#1 or SEC1) in a PEM file.
pub fn load_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| match e {
        pem::Error::NoItemsFound => TlsError::NoPrivateKey {
            path: path.to_owned(),
        },
        e => pem_error(path, e),
    })
}

fn roots_from(
    certs: Vec<CertificateDer<'static>>,
    path: Option<&Path>,
) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certs {
        roots.add(cert).map_err(|source| TlsError::BadCa {
            path: path.map(Path::to_owned),
            source,
        })?;
    }
    Ok(roots)
}

/// A server identity: certificate chain and its private key.
#[derive(Debug)]
pub struct Identity {
    /// The end-entity certificate first, then any intermediates.
    pub cert_chain: Vec<CertificateDer<'static>>,
    /// The private key of the first certificate.
    pub key: PrivateKeyDer<'static>,
}

impl Identity {
    /// Loads a certificate chain and key from PEM files.
    pub fn from_pem_files(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        Ok(Identity {
            cert_chain: load_certs(cert)?,
            key: load_private_key(key)?,
        })
    }
}

fn certified_key_error(e: rustls::Error, cert: Option<&Path>, key: Option<&Path>) -> TlsError {
    match e {
        rustls::Error::InconsistentKeys(_) => TlsError::KeyMismatch {
            cert: cert.map(Path::to_owned),
            key: key.map(Path::to_owned),
        },
        e => TlsError::Config(e),
    }
}

/// Builds a server config from PEM files: TLS 1.3, ALPN `srpc/1`, and client
/// certificates required when `client_ca` is given.
pub fn server_config(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> Result<Arc<ServerConfig>, TlsError> {
    server_config_with(cert, key, client_ca, KeyExchange::default())
}

/// [`server_config`] with the key exchange groups of `key_exchange`.
pub fn server_config_with(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
    key_exchange: KeyExchange,
) -> Result<Arc<ServerConfig>, TlsError> {
    let identity = Identity::from_pem_files(cert, key)?;
    let client_roots = match client_ca {
        Some(path) => Some(roots_from(load_certs(path)?, Some(path))?),
        None => None,
    };
    build_server_config(identity, client_roots, Some((cert, key)), key_exchange)
}

/// Builds a server config from certificates already in memory.
pub fn server_config_from_der(
    identity: Identity,
    client_ca: Option<Vec<CertificateDer<'static>>>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let client_roots = client_ca.map(|c| roots_from(c, None)).transpose()?;
    build_server_config(identity, client_roots, None, KeyExchange::default())
}

fn build_server_config(
    identity: Identity,
    client_roots: Option<RootCertStore>,
    files: Option<(&Path, &Path)>,
    key_exchange: KeyExchange,
) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = provider_for(key_exchange);
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Config)?;
    let builder = match client_roots {
        Some(roots) => {
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(TlsError::Verifier)?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(identity.cert_chain, identity.key)
        .map_err(|e| certified_key_error(e, files.map(|f| f.0), files.map(|f| f.1)))?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    // Session resumption with stateless TLS 1.3 tickets: the server keeps
    // nothing per client, so any number of clients can resume. A ticket
    // carries the client's certificate chain (handlers see the same
    // identity) and is sealed with a key made for this config only, so a
    // reload, which builds a new config, ends every earlier session: a
    // client the new CA refuses cannot resume its way around it.
    config.ticketer = rustls::crypto::aws_lc_rs::Ticketer::new().map_err(TlsError::Config)?;
    // One ticket per handshake instead of rustls' two: an srpc client keeps
    // one connection per server and each handshake, resumed or not, hands
    // it the ticket for its next one; a second would be a spare it never
    // uses, paid for on every handshake.
    config.send_tls13_tickets = 1;
    // Lets the server's `Hello` travel with its handshake flight, saving the
    // client a round trip before its first call. It carries only limits and
    // the version, nothing secret; rustls ignores this whenever it asks for a
    // client certificate, so nothing reaches an unauthenticated client then.
    config.send_half_rtt_data = true;
    Ok(Arc::new(config))
}

/// Builds a client config trusting the CA certificates in a PEM file, with an
/// optional client identity (`cert`, `key` files) for mutual TLS.
pub fn client_config(
    ca: &Path,
    identity: Option<(&Path, &Path)>,
) -> Result<Arc<ClientConfig>, TlsError> {
    client_config_with(ca, identity, KeyExchange::default())
}

/// [`client_config`] with the key exchange groups of `key_exchange`.
pub fn client_config_with(
    ca: &Path,
    identity: Option<(&Path, &Path)>,
    key_exchange: KeyExchange,
) -> Result<Arc<ClientConfig>, TlsError> {
    let roots = roots_from(load_certs(ca)?, Some(ca))?;
    let identity = identity
        .map(|(cert, key)| Identity::from_pem_files(cert, key).map(|i| (i, cert, key)))
        .transpose()?;
    let provider = provider_for(key_exchange);
    let builder = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Config)?
        .with_root_certificates(roots);
    let mut config = match identity {
        Some((id, cert, key)) => builder
            .with_client_auth_cert(id.cert_chain, id.key)
            .map_err(|e| certified_key_error(e, Some(cert), Some(key)))?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![ALPN.to_vec()];
    config.resumption = resumption();
    Ok(Arc::new(config))
}

/// Client session resumption, on by default: up to 256 servers' tickets in
/// memory, shared by every connection made with the same config (reconnects
/// included). Set `ClientConfig::resumption` to
/// `Resumption::disabled()` to turn it off.
fn resumption() -> rustls::client::Resumption {
    rustls::client::Resumption::in_memory_sessions(256)
}

/// Builds a client config from CA certificates already in memory.
pub fn client_config_from_der(
    ca: Vec<CertificateDer<'static>>,
    identity: Option<Identity>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let roots = roots_from(ca, None)?;
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Config)?
        .with_root_certificates(roots);
    let mut config = match identity {
        Some(id) => builder
            .with_client_auth_cert(id.cert_chain, id.key)
            .map_err(|e| certified_key_error(e, None, None))?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![ALPN.to_vec()];
    config.resumption = resumption();
    Ok(Arc::new(config))
}

/// Parses every certificate in PEM text (certificates made in memory, for
/// tests and examples).
pub fn certs_from_pem(pem: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem {
            path: PathBuf::from("<memory>"),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: PathBuf::from("<memory>"),
        });
    }
    Ok(certs)
}

/// Parses the first private key in PEM text.
pub fn key_from_pem(pem: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| match e {
        pem::Error::NoItemsFound => TlsError::NoPrivateKey {
            path: PathBuf::from("<memory>"),
        },
        source => TlsError::Pem {
            path: PathBuf::from("<memory>"),
            source,
        },
    })
}

/// Refuses a finished handshake that did not agree on [`ALPN`].
pub fn check_alpn(negotiated: Option<&[u8]>) -> Result<(), crate::Error> {
    match negotiated {
        Some(p) if p == ALPN => Ok(()),
        Some(p) => Err(crate::Error::Alpn {
            offered: format!("{:?}", String::from_utf8_lossy(p)),
        }),
        None => Err(crate::Error::Alpn {
            offered: "none".into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn self_signed() -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap();
        let cert = params.self_signed(&key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    #[test]
    fn loads_matching_pair_and_builds_both_configs() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = self_signed();
        fs::write(dir.path().join("c.pem"), cert).unwrap();
        fs::write(dir.path().join("k.pem"), key).unwrap();
        let sc = server_config(&dir.path().join("c.pem"), &dir.path().join("k.pem"), None).unwrap();
        assert_eq!(sc.alpn_protocols, vec![ALPN.to_vec()]);
        let cc = client_config(&dir.path().join("c.pem"), None).unwrap();
        assert_eq!(cc.alpn_protocols, vec![ALPN.to_vec()]);
    }

    #[test]
    fn errors_name_the_file_and_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = self_signed();
        let (_, other_key) = self_signed();
        let p = |n: &str| dir.path().join(n);
        fs::write(p("c.pem"), &cert).unwrap();
        fs::write(p("k.pem"), &key).unwrap();
        fs::write(p("other.key"), &other_key).unwrap();
        fs::write(p("garbage.pem"), "this is not pem\n").unwrap();
        fs::write(
            p("broken.pem"),
            "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
        )
        .unwrap();

        let missing = server_config(&p("nope.pem"), &p("k.pem"), None).unwrap_err();
        assert!(matches!(missing, TlsError::Read { .. }), "{missing}");
        assert!(missing.to_string().contains("nope.pem"), "{missing}");

        let no_cert = server_config(&p("garbage.pem"), &p("k.pem"), None).unwrap_err();
        assert!(
            matches!(no_cert, TlsError::NoCertificate { .. }),
            "{no_cert}"
        );
        assert!(no_cert.to_string().contains("garbage.pem"));

        let bad_b64 = load_certs(&p("broken.pem")).unwrap_err();
        assert!(matches!(bad_b64, TlsError::Pem { .. }), "{bad_b64}");
        assert!(bad_b64.to_string().contains("broken.pem"));

        let no_key = server_config(&p("c.pem"), &p("c.pem"), None).unwrap_err();
        assert!(matches!(no_key, TlsError::NoPrivateKey { .. }), "{no_key}");

        let mismatch = server_config(&p("c.pem"), &p("other.key"), None).unwrap_err();
        assert!(
            matches!(mismatch, TlsError::KeyMismatch { .. }),
            "{mismatch}"
        );
        assert!(mismatch.to_string().contains("other.key"), "{mismatch}");
    }

    #[test]
    fn alpn_must_be_srpc() {
        assert!(check_alpn(Some(b"srpc/1")).is_ok());
        assert!(check_alpn(Some(b"h2")).is_err());
        assert!(check_alpn(None).is_err());
    }
}
