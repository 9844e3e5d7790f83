//! Keys and peer pinning.
//!
//! TeleTUN keys are ECDSA P-256 (OpenSSL 3.0 offers no Ed25519 in DTLS 1.2).
//! `teletun keygen` writes `PREFIX.key` (PKCS#8 PEM, mode 0600) and `PREFIX.pub`
//! (SubjectPublicKeyInfo PEM). There is no CA: at start-up each side wraps its key
//! in a throw-away self-signed certificate, and each side accepts a peer only if
//! the peer certificate's SubjectPublicKeyInfo equals the pinned public key file.
//! `teletun keygen --link` writes a link key instead: 32 random bytes in hex,
//! the secret shared by one pair's server-external and server-cluster.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use openssl::asn1::Asn1Time;
use openssl::bn::{BigNum, MsbOption};
use openssl::ec::{EcGroup, EcKey};
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::{Id, PKey, Private, Public};
use openssl::x509::{X509Name, X509};

/// Our own key with the self-signed certificate that presents it in TLS and DTLS.
pub struct Identity {
    /// The private key.
    pub key: PKey<Private>,
    /// A throw-away self-signed certificate for `key`.
    pub cert: X509,
}

/// A peer's public key that a handshake must present.
#[derive(Clone, Debug)]
pub struct PinnedKey {
    /// DER of the SubjectPublicKeyInfo.
    pub spki_der: Vec<u8>,
    /// Where it was read from, for error messages.
    pub path: PathBuf,
}

impl PinnedKey {
    /// Whether a DER certificate carries exactly this key.
    pub fn matches_cert_der(&self, cert_der: &[u8]) -> bool {
        X509::from_der(cert_der)
            .ok()
            .and_then(|c| c.public_key().ok())
            .and_then(|k| k.public_key_to_der().ok())
            .is_some_and(|der| der == self.spki_der)
    }
}

fn check_p256<T: openssl::pkey::HasPublic>(key: &PKey<T>, path: &Path) -> Result<()> {
    let is_p256 = key.id() == Id::EC
        && key
            .ec_key()
            .ok()
            .and_then(|k| k.group().curve_name())
            .is_some_and(|nid| nid == Nid::X9_62_PRIME256V1);
    if !is_p256 {
        bail!(
            "{}: not an ECDSA P-256 key; create TeleTUN keys with `teletun keygen --out PREFIX`",
            path.display()
        );
    }
    Ok(())
}

fn read_key_file(path: &Path, what: &str) -> Result<Vec<u8>> {
    fs::read(path).with_context(|| format!("cannot read {what} {}", path.display()))
}

/// Refuses a private key file that group or others may read or write
/// (unless `allow_insecure`), as ssh does.
fn check_private_mode(path: &Path, allow_insecure: bool) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mode = fs::metadata(path)
        .with_context(|| format!("cannot read private key {}", path.display()))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 && !allow_insecure {
        bail!(
            "private key {} is open to others (mode {:o}); run `chmod 600 {}` (or in Kubernetes set the Secret's defaultMode to 0400), or pass --insecure-key-permissions",
            path.display(),
            mode & 0o777,
            path.display()
        );
    }
    Ok(())
}

/// Loads a private key (`PREFIX.key`) and makes its self-signed certificate.
/// A key file others may read is refused unless `allow_insecure`.
pub fn load_identity(path: &Path, allow_insecure: bool) -> Result<Identity> {
    let mut pem = read_key_file(path, "private key")?;
    let parsed = PKey::private_key_from_pem(&pem);
    // The file's bytes are the key: gone from memory once OpenSSL has it.
    pem.fill(0);
    std::hint::black_box(&pem);
    let key = match parsed {
        Ok(key) => key,
        Err(_) if fs::read(path).is_ok_and(|p| PKey::public_key_from_pem(&p).is_ok()) => bail!(
            "{} holds a public key, but a private key (PREFIX.key) is needed here",
            path.display()
        ),
        Err(_) => bail!(
            "{}: not a PEM private key; create keys with `teletun keygen --out PREFIX`",
            path.display()
        ),
    };
    check_private_mode(path, allow_insecure)?;
    check_p256(&key, path)?;
    let cert = self_signed(&key).with_context(|| format!("cannot make a certificate for {}", path.display()))?;
    Ok(Identity { key, cert })
}

/// Loads a public key (`PREFIX.pub`) to pin.
pub fn load_pinned(path: &Path) -> Result<PinnedKey> {
    let pem = read_key_file(path, "public key")?;
    let key: PKey<Public> = match PKey::public_key_from_pem(&pem) {
        Ok(key) => key,
        Err(_) if PKey::private_key_from_pem(&pem).is_ok() => bail!(
            "{} holds a private key, but a public key (PREFIX.pub) is needed here; never hand out private keys",
            path.display()
        ),
        Err(_) => bail!(
            "{}: not a PEM public key; create keys with `teletun keygen --out PREFIX`",
            path.display()
        ),
    };
    check_p256(&key, path)?;
    Ok(PinnedKey {
        spki_der: key.public_key_to_der()?,
        path: path.to_owned(),
    })
}

/// Checks that a public key file belongs to a loaded private key.
pub fn ensure_pair(identity: &Identity, public: &PinnedKey, private_path: &Path) -> Result<()> {
    if identity.key.public_key_to_der()? != public.spki_der {
        bail!(
            "public key {} does not belong to private key {}",
            public.path.display(),
            private_path.display()
        );
    }
    Ok(())
}

fn self_signed(key: &PKey<Private>) -> Result<X509, openssl::error::ErrorStack> {
    let mut name = X509Name::builder()?;
    name.append_entry_by_nid(Nid::COMMONNAME, "teletun")?;
    let name = name.build();
    let mut serial = BigNum::new()?;
    serial.rand(127, MsbOption::MAYBE_ZERO, false)?;
    let mut b = X509::builder()?;
    b.set_version(2)?;
    let serial = serial.to_asn1_integer()?;
    b.set_serial_number(&serial)?;
    b.set_subject_name(&name)?;
    b.set_issuer_name(&name)?;
    b.set_pubkey(key)?;
    // Backdated a day so peers with a slightly wrong clock still accept it.
    let not_before = Asn1Time::from_unix(unix_now() - 86_400)?;
    let not_after = Asn1Time::days_from_now(3650)?;
    b.set_not_before(&not_before)?;
    b.set_not_after(&not_after)?;
    b.sign(key, MessageDigest::sha256())?;
    Ok(b.build())
}

fn unix_now() -> libc::time_t {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as libc::time_t)
        .unwrap_or(0)
}

/// Writes a new key pair to `PREFIX.key` (0600) and `PREFIX.pub`; refuses to
/// overwrite existing files. Returns both paths.
pub fn generate(prefix: &Path) -> Result<(PathBuf, PathBuf)> {
    let key_path = PathBuf::from(format!("{}.key", prefix.display()));
    let pub_path = PathBuf::from(format!("{}.pub", prefix.display()));
    for p in [&key_path, &pub_path] {
        if p.exists() {
            bail!(
                "{} already exists; remove it or choose another --out prefix",
                p.display()
            );
        }
    }
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1)?;
    let key = PKey::from_ec_key(EcKey::generate(&group)?)?;
    let private_pem = key.private_key_to_pem_pkcs8()?;
    let public_pem = key.public_key_to_pem()?;
    write_new(&key_path, &private_pem, 0o600)?;
    if let Err(e) = write_new(&pub_path, &public_pem, 0o644) {
        let _ = fs::remove_file(&key_path);
        return Err(e);
    }
    Ok((key_path, pub_path))
}

/// The secret one pair's server-external and server-cluster share: each
/// proves it holds it before the AF_UNIX link carries anything (docs/protocol.md).
pub struct LinkKey([u8; LINK_KEY_LEN]);

/// A link key's length in bytes (written as twice as many hex digits).
pub const LINK_KEY_LEN: usize = 32;

impl LinkKey {
    /// The key's bytes, for the MACs of the link's authentication.
    pub fn bytes(&self) -> &[u8; LINK_KEY_LEN] {
        &self.0
    }

    /// A key from its bytes (tests and the testbench's intruders).
    pub fn from_bytes(bytes: [u8; LINK_KEY_LEN]) -> LinkKey {
        LinkKey(bytes)
    }
}

impl Drop for LinkKey {
    fn drop(&mut self) {
        self.0.fill(0);
        std::hint::black_box(&self.0);
    }
}

/// Writes a new link key to `PREFIX.key` (0600, 64 hex digits and a newline);
/// refuses to overwrite an existing file. Returns its path.
pub fn generate_link_key(prefix: &Path) -> Result<PathBuf> {
    let path = PathBuf::from(format!("{}.key", prefix.display()));
    if path.exists() {
        bail!(
            "{} already exists; remove it or choose another --out prefix",
            path.display()
        );
    }
    let mut key = [0u8; LINK_KEY_LEN];
    openssl::rand::rand_bytes(&mut key)?;
    let mut text: String = key.iter().map(|b| format!("{b:02x}")).collect();
    key.fill(0);
    text.push('\n');
    write_new(&path, text.as_bytes(), 0o600)?;
    Ok(path)
}

/// Loads a link key written by [`generate_link_key`]. A file others may read
/// is refused unless `allow_insecure`, as for private keys.
pub fn load_link_key(path: &Path, allow_insecure: bool) -> Result<LinkKey> {
    let mut text = read_key_file(path, "link key")?;
    let parsed = parse_link_key(&text);
    text.fill(0);
    std::hint::black_box(&text);
    let Some(key) = parsed else {
        bail!(
            "{}: not a link key (64 hex digits); create one with `teletun keygen --link --out PREFIX`",
            path.display()
        );
    };
    check_private_mode(path, allow_insecure)?;
    Ok(key)
}

fn parse_link_key(text: &[u8]) -> Option<LinkKey> {
    let hex = text.strip_suffix(b"\n").unwrap_or(text);
    if hex.len() != 2 * LINK_KEY_LEN {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut key = LinkKey([0u8; LINK_KEY_LEN]);
    for (byte, pair) in key.0.iter_mut().zip(hex.chunks(2)) {
        *byte = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(key)
}

fn write_new(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    f.write_all(data)
        .and_then(|_| f.sync_all())
        .with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn tempdir() -> PathBuf {
        let d = std::env::temp_dir().join(format!("teletun-keys-{}-{}", std::process::id(), rand_suffix()));
        fs::create_dir_all(&d).unwrap();
        d
    }

    fn rand_suffix() -> u64 {
        let mut b = [0u8; 8];
        openssl::rand::rand_bytes(&mut b).unwrap();
        u64::from_le_bytes(b)
    }

    #[test]
    fn keygen_round_trip_and_modes() {
        let dir = tempdir();
        let (k, p) = generate(&dir.join("a")).unwrap();
        assert_eq!(fs::metadata(&k).unwrap().permissions().mode() & 0o777, 0o600);
        let id = load_identity(&k, false).unwrap();
        let pin = load_pinned(&p).unwrap();
        ensure_pair(&id, &pin, &k).unwrap();
        assert!(pin.matches_cert_der(&id.cert.to_der().unwrap()));
        assert!(generate(&dir.join("a")).is_err(), "must not overwrite");
        let (_, p2) = generate(&dir.join("b")).unwrap();
        let other = load_pinned(&p2).unwrap();
        assert!(!other.matches_cert_der(&id.cert.to_der().unwrap()));
        assert!(ensure_pair(&id, &other, &k).is_err());
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn link_keys_round_trip_and_are_checked() {
        let dir = tempdir();
        let path = generate_link_key(&dir.join("link")).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let text = fs::read_to_string(&path).unwrap();
        assert_eq!(text.len(), 65, "{text:?}");
        let key = load_link_key(&path, false).unwrap();
        assert_ne!(key.bytes(), &[0u8; LINK_KEY_LEN]);
        assert_eq!(
            text.trim(),
            key.bytes().iter().map(|b| format!("{b:02x}")).collect::<String>()
        );
        assert!(generate_link_key(&dir.join("link")).is_err(), "must not overwrite");
        let other = load_link_key(&generate_link_key(&dir.join("other")).unwrap(), false).unwrap();
        assert_ne!(key.bytes(), other.bytes());
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
        let e = load_link_key(&path, false).err().unwrap().to_string();
        assert!(e.contains("is open to others"), "{e}");
        for junk in ["", "abc\n", &"g".repeat(64), &"0".repeat(66)] {
            fs::write(dir.join("junk"), junk).unwrap();
            let e = load_link_key(&dir.join("junk"), true).err().unwrap().to_string();
            assert!(e.contains("not a link key (64 hex digits)"), "{junk:?}: {e}");
        }
        // A key pair's private key is not a link key.
        let (k, _) = generate(&dir.join("pair")).unwrap();
        assert!(load_link_key(&k, false).is_err());
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn wrong_kinds_of_files_give_clear_errors() {
        let dir = tempdir();
        let (k, p) = generate(&dir.join("a")).unwrap();
        let e = load_identity(&p, false).err().unwrap().to_string();
        assert!(e.contains("holds a public key"), "{e}");
        // A private key others may read is refused, with the fix, unless allowed.
        fs::set_permissions(&k, fs::Permissions::from_mode(0o644)).unwrap();
        let e = load_identity(&k, false).err().unwrap().to_string();
        assert!(e.contains("is open to others (mode 644); run `chmod 600"), "{e}");
        load_identity(&k, true).unwrap();
        let e = load_pinned(&k).err().unwrap().to_string();
        assert!(e.contains("holds a private key"), "{e}");
        let junk = dir.join("junk");
        fs::write(&junk, "hello").unwrap();
        assert!(load_pinned(&junk)
            .err()
            .unwrap()
            .to_string()
            .contains("not a PEM public key"));
        let rsa = PKey::from_rsa(openssl::rsa::Rsa::generate(2048).unwrap()).unwrap();
        let rsa_path = dir.join("rsa.pub");
        fs::write(&rsa_path, rsa.public_key_to_pem().unwrap()).unwrap();
        assert!(load_pinned(&rsa_path).err().unwrap().to_string().contains("P-256"));
        let e = format!("{:#}", load_pinned(&dir.join("missing")).err().unwrap());
        assert!(e.contains("cannot read public key"), "{e}");
        fs::remove_dir_all(dir).unwrap();
    }
}
