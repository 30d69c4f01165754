//! Helpers for the security tests: a throwaway PKI (rcgen), psql runs, TLS clients.
#![allow(dead_code)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

/// A test CA and the files of certificates it issued.
pub struct Pki {
    pub dir: tempfile::TempDir,
    pub ca: CertifiedIssuer<'static, KeyPair>,
    pub ca_file: PathBuf,
}

/// A certificate and key on disk.
pub struct Leaf {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Pki {
    pub fn new(cn: &str) -> Pki {
        let dir = tempfile::Builder::new()
            .prefix("pgsidecar-pki-")
            .tempdir()
            .expect("tempdir");
        // The postgres OS user must be able to reach files in here.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod pki dir");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, cn);
        let key = KeyPair::generate().expect("ca key");
        let ca = CertifiedIssuer::self_signed(params, key).expect("ca cert");
        let ca_file = dir.path().join(format!("{cn}.pem"));
        std::fs::write(&ca_file, ca.pem()).expect("write ca");
        Pki { dir, ca, ca_file }
    }

    /// Issues a server certificate for `names` (DNS names or IP addresses).
    pub fn leaf(&self, file_stem: &str, names: &[&str]) -> Leaf {
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let mut params = CertificateParams::new(names).expect("leaf params");
        params
            .distinguished_name
            .push(DnType::CommonName, file_stem.to_string());
        let key = KeyPair::generate().expect("leaf key");
        let cert = params.signed_by(&key, &self.ca).expect("sign leaf");
        let leaf = Leaf {
            cert: self.dir.path().join(format!("{file_stem}.crt")),
            key: self.dir.path().join(format!("{file_stem}.key")),
        };
        std::fs::write(&leaf.cert, cert.pem()).expect("write cert");
        std::fs::write(&leaf.key, key.serialize_pem()).expect("write key");
        std::fs::set_permissions(&leaf.key, std::fs::Permissions::from_mode(0o600))
            .expect("chmod key");
        leaf
    }

    /// The CA as a rustls root store.
    pub fn roots(&self) -> rustls::RootCertStore {
        let mut roots = rustls::RootCertStore::empty();
        let pem = std::fs::read(&self.ca_file).expect("read ca");
        for c in CertificateDer::pem_slice_iter(&pem) {
            roots.add(c.expect("ca pem")).expect("add root");
        }
        roots
    }
}

/// Makes a key and certificate usable by a PostgreSQL server running as the owner of
/// `owner_of` (the cluster's directory): same owner, key mode 0600.
pub fn give_to_owner_of(leaf: &Leaf, owner_of: &Path) {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(owner_of).expect("stat cluster dir");
    for f in [&leaf.cert, &leaf.key] {
        std::os::unix::fs::chown(f, Some(meta.uid()), Some(meta.gid())).expect("chown");
    }
}

/// A rustls client config trusting `roots`, with the ring provider.
pub fn client_config(roots: rustls::RootCertStore, alpn: bool) -> rustls::ClientConfig {
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("protocol versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    if alpn {
        cfg.alpn_protocols = vec![b"postgresql".to_vec()];
    }
    cfg
}

/// Result of one psql run.
#[derive(Debug)]
pub struct PsqlOut {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

fn psql_path() -> PathBuf {
    if let Ok(dir) = std::env::var("PG_BIN") {
        let p = Path::new(&dir).join("psql");
        if p.exists() {
            return p;
        }
    }
    for c in ["/usr/lib/postgresql/15/bin/psql", "/usr/bin/psql"] {
        if Path::new(c).exists() {
            return c.into();
        }
    }
    "psql".into()
}

/// Runs `psql "<conninfo>" -c <sql>` off the async runtime.
pub async fn psql(conninfo: &str, sql: &str) -> PsqlOut {
    let conninfo = conninfo.to_string();
    let sql = sql.to_string();
    tokio::task::spawn_blocking(move || {
        let out = Command::new(psql_path())
            .args([
                "-X",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-d",
                &conninfo,
                "-c",
                &sql,
            ])
            .env_remove("PGSSLMODE")
            .env_remove("PGHOST")
            .env_remove("PGPORT")
            .env("PGCONNECT_TIMEOUT", "10")
            .env("PGGSSENCMODE", "disable")
            .stdin(Stdio::null())
            .output()
            .expect("run psql");
        PsqlOut {
            ok: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).trim().to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        }
    })
    .await
    .expect("psql task")
}
