//! Who the peer is: the subject and subject alternative names of the
//! certificate it presented in the TLS handshake.
//!
//! On a server with mutual TLS, handlers see the client's identity in
//! [`CallContext::identity`](crate::CallContext); on a client, the
//! connection knows the server's. rustls has already verified the chain
//! when this is read; this module only reads names out of it (with
//! `x509-parser`) and decides nothing.

use std::net::IpAddr;
use std::sync::{Arc, OnceLock};

use rustls::pki_types::CertificateDer;

use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// The names in a peer's certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    /// The subject distinguished name, e.g. `CN=srpc dev client`.
    pub subject: String,
    /// Subject alternative names, each with its kind: `DNS:host`,
    /// `IP:127.0.0.1`, `email:a@b`, `URI:spiffe://...`.
    pub sans: Vec<String>,
}

/// A peer's end-entity certificate, whose names are read the first time
/// someone asks. A client that never looks at the server's names does not
/// parse its certificate on every connection.
#[derive(Debug, Default)]
pub(crate) struct LazyIdentity {
    der: Option<CertificateDer<'static>>,
    parsed: OnceLock<Option<Arc<PeerIdentity>>>,
}

impl LazyIdentity {
    pub(crate) fn new(der: Option<CertificateDer<'static>>) -> Self {
        LazyIdentity {
            der,
            parsed: OnceLock::new(),
        }
    }

    /// The names, parsed on the first call.
    pub(crate) fn get(&self) -> Option<&Arc<PeerIdentity>> {
        self.parsed
            .get_or_init(|| {
                let der = self.der.as_ref()?;
                PeerIdentity::from_der(der).map(Arc::new)
            })
            .as_ref()
    }
}

impl PeerIdentity {
    /// Reads the names of a DER certificate; `None` if it does not parse
    /// (rustls accepted it, so that would be a parser gap, not an attack).
    pub fn from_der(der: &[u8]) -> Option<PeerIdentity> {
        let (_, cert) = X509Certificate::from_der(der).ok()?;
        let subject = cert.subject().to_string();
        let sans = match cert.subject_alternative_name() {
            Ok(Some(ext)) => ext
                .value
                .general_names
                .iter()
                .filter_map(describe)
                .collect(),
            _ => Vec::new(),
        };
        Some(PeerIdentity { subject, sans })
    }

    /// The first common name in the subject, if any.
    pub fn common_name(&self) -> Option<&str> {
        self.subject
            .split(", ")
            .find_map(|part| part.strip_prefix("CN="))
    }
}

fn describe(name: &GeneralName<'_>) -> Option<String> {
    Some(match name {
        GeneralName::DNSName(d) => format!("DNS:{d}"),
        GeneralName::RFC822Name(e) => format!("email:{e}"),
        GeneralName::URI(u) => format!("URI:{u}"),
        GeneralName::IPAddress(bytes) => {
            let ip = match bytes.len() {
                4 => IpAddr::from(<[u8; 4]>::try_from(*bytes).ok()?),
                16 => IpAddr::from(<[u8; 16]>::try_from(*bytes).ok()?),
                _ => return None,
            };
            format!("IP:{ip}")
        }
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_subject_and_sans() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params =
            rcgen::CertificateParams::new(vec!["svc.example".to_string(), "10.1.2.3".to_string()])
                .unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "billing service");
        let cert = params.self_signed(&key).unwrap();
        let id = PeerIdentity::from_der(cert.der()).unwrap();
        assert_eq!(id.subject, "CN=billing service");
        assert_eq!(id.common_name(), Some("billing service"));
        assert_eq!(
            id.sans,
            vec!["DNS:svc.example".to_string(), "IP:10.1.2.3".to_string()]
        );
    }

    #[test]
    fn garbage_is_none() {
        assert_eq!(PeerIdentity::from_der(b"not a certificate"), None);
    }

    #[test]
    fn a_lazy_identity_reads_the_names_once_when_asked() {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["svc.example".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let lazy = LazyIdentity::new(Some(cert.der().clone()));
        assert!(lazy.parsed.get().is_none(), "parsed before anyone asked");
        let first = lazy.get().expect("names").clone();
        assert_eq!(first.sans, vec!["DNS:svc.example".to_string()]);
        // The same parsed value every time after.
        assert!(Arc::ptr_eq(&first, lazy.get().unwrap()));
        assert!(LazyIdentity::new(None).get().is_none());
        let garbage = CertificateDer::from(b"not a certificate".to_vec());
        assert!(LazyIdentity::new(Some(garbage)).get().is_none());
    }
}
