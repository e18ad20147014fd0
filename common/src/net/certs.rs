//! The cluster CA and the certificates it issues (`troupe init-certs`), for
//! [`TlsSetup::ClusterCa`](super::TlsSetup::ClusterCa).
//!
//! Every troupe process both accepts and opens connections on one endpoint, so every leaf
//! certificate carries both the serverAuth and the clientAuth extended key usage: the same
//! certificate is presented as a server (to workers joining, to ring neighbours) and as a
//! client (when joining the coordinator, when connecting to the next ring peer).

use std::io::Write;
use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose};

use sha2::Digest;

use super::NetError;

/// File names inside a cert folder written by [`write_cert_dir`] (the config names them too).
pub use troupe_core::config::{worker_cert_files, CA_CERT_FILE, CA_KEY_FILE, COORDINATOR_CERT_FILE, COORDINATOR_KEY_FILE};

/// Leaf certificates are valid this many years (the CA one year longer, so that leaves
/// re-issued late in the CA's life still chain).
const LEAF_VALIDITY_YEARS: i32 = 5;

/// A PEM certificate and its PEM (PKCS#8) private key.
#[derive(Clone)]
pub struct PemPair {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for PemPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print private keys, not even in debug output.
        f.debug_struct("PemPair").field("cert_pem", &self.cert_pem).field("key_pem", &"<redacted>").finish()
    }
}

/// A cluster CA able to issue leaf certificates.
pub struct ClusterCa {
    issuer: Issuer<'static, KeyPair>,
    pem: PemPair,
}

fn gen_err(what: &str) -> impl FnOnce(rcgen::Error) -> NetError + '_ {
    move |e| NetError::Tls(format!("{what}: {e}"))
}

/// The current UTC year (approximately; only used for validity windows with a year of slack).
fn this_year() -> i32 {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    1970 + (secs / 31_556_952) as i32
}

fn validity(params: &mut CertificateParams, years: i32) {
    let year = this_year();
    // Start a year back so a peer whose clock is somewhat behind still accepts it.
    params.not_before = rcgen::date_time_ymd(year - 1, 1, 1);
    params.not_after = rcgen::date_time_ymd(year + years, 12, 31);
}

impl ClusterCa {
    /// A fresh CA (ECDSA P-256) named `common_name`.
    pub fn generate(common_name: &str) -> Result<ClusterCa, NetError> {
        let key = KeyPair::generate().map_err(gen_err("generating the CA key"))?;
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(gen_err("CA parameters"))?;
        // A per-CA suffix (from its public key): two clusters' CAs never share a name, so a
        // certificate from the other one is reported as "unknown issuer", not as a bad signature.
        let id = sha2::Sha256::digest(key.public_key_raw());
        params.distinguished_name.push(DnType::CommonName, format!("{common_name} {}", hex::encode(&id[..4])));
        // Leaves only: a stolen leaf key cannot mint more cluster members.
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        validity(&mut params, LEAF_VALIDITY_YEARS + 1);
        let cert = params.self_signed(&key).map_err(gen_err("self-signing the CA certificate"))?;
        let pem = PemPair { cert_pem: cert.pem(), key_pem: key.serialize_pem() };
        Ok(ClusterCa { issuer: Issuer::new(params, key), pem })
    }

    /// The CA certificate and key, PEM.
    pub fn pem(&self) -> &PemPair {
        &self.pem
    }

    /// A leaf certificate for `common_name` with `sans` (DNS names or IP addresses) as
    /// subject alternative names, usable as TLS server and TLS client.
    pub fn issue(&self, common_name: &str, sans: &[String]) -> Result<PemPair, NetError> {
        let key = KeyPair::generate().map_err(gen_err("generating a certificate key"))?;
        let mut params =
            CertificateParams::new(sans.to_vec()).map_err(|e| NetError::Tls(format!("invalid host name among {sans:?}: {e}")))?;
        params.distinguished_name.push(DnType::CommonName, common_name);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        validity(&mut params, LEAF_VALIDITY_YEARS);
        let cert = params.signed_by(&key, &self.issuer).map_err(gen_err(&format!("signing the certificate of {common_name}")))?;
        Ok(PemPair { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }
}

/// What [`write_cert_dir`] should produce.
#[derive(Debug, Clone)]
pub struct CertDirOptions {
    pub out: PathBuf,
    pub workers: usize,
    /// Subject alternative names of every certificate (DNS names or IP addresses).
    pub hosts: Vec<String>,
    /// Overwrite existing files.
    pub force: bool,
}

/// One file written by [`write_cert_dir`].
#[derive(Debug, Clone)]
pub struct WrittenFile {
    pub path: PathBuf,
    /// Whether it is a private key (mode 0600).
    pub private: bool,
}

/// Creates a cluster CA, a coordinator certificate and `workers` worker certificates under
/// `out` (see the `*_FILE` constants and [`worker_cert_files`]). Keys are written with mode
/// 0600. Refuses, before writing anything, to overwrite an existing file unless `force`.
pub fn write_cert_dir(opts: &CertDirOptions) -> Result<Vec<WrittenFile>, NetError> {
    let mut names: Vec<(String, String)> =
        vec![(CA_CERT_FILE.into(), CA_KEY_FILE.into()), (COORDINATOR_CERT_FILE.into(), COORDINATOR_KEY_FILE.into())];
    names.extend((0..opts.workers).map(worker_cert_files));
    if !opts.force {
        let existing: Vec<String> = names.iter().flat_map(|(c, k)| [c, k]).filter(|n| opts.out.join(n).exists()).cloned().collect();
        if !existing.is_empty() {
            return Err(NetError::Tls(format!(
                "{} already holds {}: refusing to overwrite (pass --force to replace them, which invalidates \
                 every certificate issued by the old CA)",
                opts.out.display(),
                existing.join(", ")
            )));
        }
    }
    std::fs::create_dir_all(&opts.out).map_err(|e| NetError::Tls(format!("cannot create {}: {e}", opts.out.display())))?;

    // Generate everything first so a failure leaves no half-written folder behind.
    let ca = ClusterCa::generate("troupe cluster CA")?;
    let mut pairs = vec![ca.pem().clone(), ca.issue("troupe coordinator", &opts.hosts)?];
    for i in 0..opts.workers {
        pairs.push(ca.issue(&format!("troupe worker {i}"), &opts.hosts)?);
    }

    let mut written = Vec::new();
    for ((cert_name, key_name), pair) in names.iter().zip(&pairs) {
        let cert_path = opts.out.join(cert_name);
        write_file(&cert_path, pair.cert_pem.as_bytes(), 0o644)?;
        written.push(WrittenFile { path: cert_path, private: false });
        let key_path = opts.out.join(key_name);
        write_file(&key_path, pair.key_pem.as_bytes(), 0o600)?;
        written.push(WrittenFile { path: key_path, private: true });
    }
    Ok(written)
}

fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), NetError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let err = |e: std::io::Error| NetError::Tls(format!("cannot write {}: {e}", path.display()));
    // The mode applies when the file is created; an overwritten (--force) file keeps its old
    // mode, so it is set again explicitly before the key goes in.
    let mut file = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(path).map_err(err)?;
    file.set_permissions(std::fs::Permissions::from_mode(mode)).map_err(err)?;
    file.write_all(bytes).map_err(err)?;
    file.sync_all().map_err(err)
}

/// Default subject alternative names: `localhost`, `127.0.0.1` and this machine's host name.
pub fn default_hosts() -> Vec<String> {
    let mut hosts = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    if let Ok(name) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
        let name = name.trim().to_string();
        if !name.is_empty() && !hosts.contains(&name) {
            hosts.push(name);
        }
    }
    hosts
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn cert_dir_has_private_keys_and_refuses_to_overwrite() {
        let out = std::env::temp_dir().join(format!("troupe-certdir-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&out);
        let opts = CertDirOptions { out: out.clone(), workers: 2, hosts: default_hosts(), force: false };
        let written = write_cert_dir(&opts).unwrap();
        assert_eq!(written.len(), 8);
        for f in &written {
            let mode = std::fs::metadata(&f.path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, if f.private { 0o600 } else { 0o644 }, "{}", f.path.display());
        }
        for name in ["ca.pem", "ca-key.pem", "coordinator.pem", "coordinator-key.pem", "worker-1.pem", "worker-1-key.pem"] {
            assert!(out.join(name).is_file(), "{name}");
        }
        let ca_before = std::fs::read(out.join(CA_CERT_FILE)).unwrap();
        let err = write_cert_dir(&opts).unwrap_err().to_string();
        assert!(err.contains("--force") && err.contains("ca.pem"), "{err}");
        assert_eq!(std::fs::read(out.join(CA_CERT_FILE)).unwrap(), ca_before, "nothing overwritten");
        // A loosened key file gets 0600 back when forced.
        std::fs::set_permissions(out.join(CA_KEY_FILE), std::fs::Permissions::from_mode(0o644)).unwrap();
        write_cert_dir(&CertDirOptions { force: true, ..opts }).unwrap();
        assert_ne!(std::fs::read(out.join(CA_CERT_FILE)).unwrap(), ca_before);
        let mode = std::fs::metadata(out.join(CA_KEY_FILE)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let _ = std::fs::remove_dir_all(&out);
    }
}
