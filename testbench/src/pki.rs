//! Throwaway ECDSA P-256 certificates for the testbench: the control plane's
//! CA, serving certificate and ServiceAccount signing key, and the peer VPNs'
//! pinned certificates.

use std::net::IpAddr;

use anyhow::Result;
use openssl::asn1::Asn1Time;
use openssl::bn::{BigNum, MsbOption};
use openssl::ec::{EcGroup, EcKey};
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::{PKey, Private};
use openssl::x509::extension::{BasicConstraints, SubjectAlternativeName};
use openssl::x509::{X509Name, X509};

/// A certificate with its private key.
pub struct Issued {
    /// The certificate.
    pub cert: X509,
    /// Its private key.
    pub key: PKey<Private>,
}

/// Issues a certificate for common name `cn`, valid for a week: signed by
/// `signer`, or self-signed without one. `ca` marks it as a CA (a self-signed
/// certificate that peers pin as their trust anchor wants that too); `ips`
/// become IP subject alternative names.
pub fn issue(cn: &str, signer: Option<&Issued>, ca: bool, ips: &[IpAddr]) -> Result<Issued> {
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1)?;
    let key = PKey::from_ec_key(EcKey::generate(&group)?)?;
    let mut name = X509Name::builder()?;
    name.append_entry_by_nid(Nid::COMMONNAME, cn)?;
    let name = name.build();
    let mut serial = BigNum::new()?;
    serial.rand(64, MsbOption::MAYBE_ZERO, false)?;

    let mut cert = X509::builder()?;
    cert.set_version(2)?;
    let serial = serial.to_asn1_integer()?;
    cert.set_serial_number(&serial)?;
    cert.set_subject_name(&name)?;
    cert.set_issuer_name(signer.map_or(&*name, |s| s.cert.subject_name()))?;
    cert.set_pubkey(&key)?;
    cert.set_not_before(&*Asn1Time::days_from_now(0)?)?;
    cert.set_not_after(&*Asn1Time::days_from_now(7)?)?;
    if ca {
        cert.append_extension(BasicConstraints::new().critical().ca().build()?)?;
    }
    if !ips.is_empty() {
        let mut san = SubjectAlternativeName::new();
        for ip in ips {
            san.ip(&ip.to_string());
        }
        let san = san.build(&cert.x509v3_context(signer.map(|s| &*s.cert), None))?;
        cert.append_extension(san)?;
    }
    cert.sign(signer.map_or(&key, |s| &s.key), MessageDigest::sha256())?;
    Ok(Issued {
        cert: cert.build(),
        key,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signed_certificate_verifies_against_its_ca_and_a_self_signed_one_against_itself() {
        let ca = issue("ca", None, true, &[]).unwrap();
        let server = issue("server", Some(&ca), false, &["192.0.2.1".parse().unwrap()]).unwrap();
        assert!(server.cert.verify(&ca.key).unwrap());
        assert!(!server.cert.verify(&server.key).unwrap());
        assert!(ca.cert.verify(&ca.key).unwrap());
        assert_eq!(
            server.cert.issuer_name().to_der().unwrap(),
            ca.cert.subject_name().to_der().unwrap()
        );
        let sans = server.cert.subject_alt_names().unwrap();
        assert_eq!(
            sans.iter().next().and_then(|n| n.ipaddress()),
            Some(&[192, 0, 2, 1][..])
        );
    }
}
