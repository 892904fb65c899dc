//! Who the peer is: the subject and subject alternative names of the
//! certificate it presented in the TLS handshake.
//!
//! On a server with mutual TLS, handlers see the client's identity in
//! [`CallContext::identity`](crate::CallContext); on a client, the
//! connection knows the server's. rustls has already verified the chain
//! when this is read; this module only reads names out of it (with
//! `x509-parser`) and decides nothing.

use std::net::IpAddr;

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
}
