//! `serve --web-config FILE`: TLS and basic auth, configured in the file
//! format Prometheus exporters share (exporter-toolkit's `web.yml`), so
//! that a listener open to the node's network answers only to those who
//! hold the password, over an encrypted connection.
//!
//! ```yaml
//! tls_server_config:
//!   cert_file: ctrace.crt      # relative paths: from the file's folder
//!   key_file: ctrace.key
//!   client_auth_type: RequireAndVerifyClientCert   # optional (mTLS)
//!   client_ca_file: clients-ca.crt
//!   min_version: TLS13                             # optional
//! basic_auth_users:
//!   prometheus: $2y$10$...    # bcrypt hash (htpasswd -nBC 10 "" | tr -d ':\n')
//! ```
//!
//! The parts of that format ctrace does not implement (inline `cert` and
//! `key`, `cipher_suites`, `curve_preferences`, `client_allowed_sans`,
//! `http_server_config`) are refused by name rather than ignored.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use anyhow::{bail, Context as _};
use base64::Engine as _;
use serde::Deserialize;
use tokio_rustls::rustls::{
    self,
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer},
};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    tls_server_config: Option<TlsFile>,
    #[serde(default)]
    basic_auth_users: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsFile {
    cert_file: PathBuf,
    key_file: PathBuf,
    #[serde(default)]
    client_auth_type: ClientAuth,
    client_ca_file: Option<PathBuf>,
    min_version: Option<TlsVersion>,
}

/// exporter-toolkit's names, after Go's `tls.ClientAuthType`.
#[derive(Debug, Default, Deserialize, PartialEq, Eq)]
enum ClientAuth {
    #[default]
    NoClientCert,
    VerifyClientCertIfGiven,
    RequireAndVerifyClientCert,
}

#[derive(Debug, Deserialize, PartialEq, Eq)]
enum TlsVersion {
    TLS12,
    TLS13,
}

/// What the file asks for, ready to serve with.
pub struct WebConfig {
    pub tls: Option<Arc<rustls::ServerConfig>>,
    pub auth: Option<BasicAuth>,
}

impl WebConfig {
    /// Reads and checks the whole file, certificates and hashes included,
    /// so a mistake stops `serve` before it attaches anything.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        let file =
            parse(&text).with_context(|| format!("{} is not a web configuration ctrace takes", path.display()))?;
        let dir = path.parent().unwrap_or(Path::new("."));
        let tls = match file.tls_server_config {
            Some(tls) => Some(Arc::new(tls_config(&tls, dir)?)),
            None => None,
        };
        let auth = if file.basic_auth_users.is_empty() {
            None
        } else {
            Some(BasicAuth::new(file.basic_auth_users).with_context(|| format!("in {}", path.display()))?)
        };
        Ok(WebConfig { tls, auth })
    }
}

fn parse(text: &str) -> anyhow::Result<File> {
    // An empty file is YAML's null: no TLS, no users (exporter-toolkit's reading too).
    if text.trim().is_empty() {
        return Ok(File { tls_server_config: None, basic_auth_users: BTreeMap::new() });
    }
    Ok(serde_yaml::from_str(text)?)
}

fn tls_config(tls: &TlsFile, dir: &Path) -> anyhow::Result<rustls::ServerConfig> {
    let cert_file = dir.join(&tls.cert_file);
    let key_file = dir.join(&tls.key_file);
    let certs: Vec<CertificateDer> = CertificateDer::pem_file_iter(&cert_file)
        .and_then(|certs| certs.collect())
        .with_context(|| format!("cannot read certificates from {}", cert_file.display()))?;
    if certs.is_empty() {
        bail!("{} holds no PEM certificate", cert_file.display());
    }
    let key = PrivateKeyDer::from_pem_file(&key_file)
        .with_context(|| format!("cannot read a PEM private key from {}", key_file.display()))?;
    let versions: &[&rustls::SupportedProtocolVersion] = match tls.min_version {
        Some(TlsVersion::TLS13) => &[&rustls::version::TLS13],
        Some(TlsVersion::TLS12) | None => rustls::ALL_VERSIONS,
    };
    let builder = rustls::ServerConfig::builder_with_protocol_versions(versions);
    let builder = match (&tls.client_auth_type, &tls.client_ca_file) {
        (ClientAuth::NoClientCert, None) => builder.with_no_client_auth(),
        (ClientAuth::NoClientCert, Some(_)) => {
            bail!(
                "client_ca_file is set but client_auth_type is NoClientCert: say which client certificates to ask for"
            )
        }
        (_, None) => bail!("client_auth_type {:?} needs client_ca_file", tls.client_auth_type),
        (auth, Some(ca_file)) => {
            let ca_file = dir.join(ca_file);
            let mut roots = rustls::RootCertStore::empty();
            for cert in
                CertificateDer::pem_file_iter(&ca_file).with_context(|| format!("cannot read {}", ca_file.display()))?
            {
                roots.add(cert?).with_context(|| format!("a certificate in {} is not a CA", ca_file.display()))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots));
            let verifier =
                if *auth == ClientAuth::VerifyClientCertIfGiven { verifier.allow_unauthenticated() } else { verifier };
            builder.with_client_cert_verifier(verifier.build()?)
        }
    };
    builder.with_single_cert(certs, key).with_context(|| {
        format!("{} and {} do not make a usable certificate and key", cert_file.display(), key_file.display())
    })
}

/// Users and their bcrypt hashes. Checking a password costs what the hash's
/// cost factor says (about 50 ms at 10), so it runs off the engine's thread,
/// and an `Authorization` value once accepted is remembered: a scraper
/// sends the same one every time.
pub struct BasicAuth {
    users: BTreeMap<String, String>,
    accepted: Mutex<Vec<String>>,
}

/// Accepted `Authorization` values kept (users rarely number more).
const REMEMBERED: usize = 16;

impl BasicAuth {
    fn new(users: BTreeMap<String, String>) -> anyhow::Result<Self> {
        for (user, hash) in &users {
            if hash.parse::<bcrypt::HashParts>().is_err() {
                bail!("the password of {user} is not a bcrypt hash ($2y$..., as `htpasswd -nB {user}` writes)");
            }
        }
        Ok(BasicAuth { users, accepted: Mutex::new(Vec::new()) })
    }

    /// Does this `Authorization` header let the request in?
    pub async fn allows(self: &Arc<Self>, header: Option<&str>) -> bool {
        let Some(header) = header else { return false };
        if self.accepted.lock().unwrap().iter().any(|known| same(known.as_bytes(), header.as_bytes())) {
            return true;
        }
        let Some((user, password)) = credentials(header) else { return false };
        let Some(hash) = self.users.get(&user).cloned() else { return false };
        let ok = tokio::task::spawn_blocking(move || bcrypt::verify(password, &hash).unwrap_or(false))
            .await
            .unwrap_or(false);
        if ok {
            let mut accepted = self.accepted.lock().unwrap();
            if accepted.len() == REMEMBERED {
                accepted.remove(0);
            }
            accepted.push(header.to_string());
        }
        ok
    }
}

/// User and password of a `Basic` Authorization value (RFC 7617).
pub fn credentials(header: &str) -> Option<(String, String)> {
    let (scheme, encoded) = header.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD.decode(encoded.trim()).ok()?;
    let (user, password) = std::str::from_utf8(&decoded).ok()?.split_once(':')?;
    Some((user.to_string(), password.to_string()))
}

/// Equality in time that depends on the lengths only, not on where the
/// first difference is.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |diff, (x, y)| diff | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_exporter_toolkit_files() {
        let file = parse(
            "tls_server_config:\n  cert_file: a.crt\n  key_file: a.key\n  client_auth_type: RequireAndVerifyClientCert\n  \
             client_ca_file: ca.crt\n  min_version: TLS13\nbasic_auth_users:\n  prom: $2y$10$abc\n",
        )
        .unwrap();
        let tls = file.tls_server_config.unwrap();
        assert_eq!(tls.cert_file, Path::new("a.crt"));
        assert_eq!(tls.client_auth_type, ClientAuth::RequireAndVerifyClientCert);
        assert_eq!(tls.min_version, Some(TlsVersion::TLS13));
        assert_eq!(file.basic_auth_users["prom"], "$2y$10$abc");

        let empty = parse("\n").unwrap();
        assert!(empty.tls_server_config.is_none() && empty.basic_auth_users.is_empty());
    }

    #[test]
    fn refuses_what_it_does_not_implement_by_name() {
        let err =
            parse("tls_server_config:\n  cert_file: a\n  key_file: b\n  cipher_suites: [TLS_AES_128_GCM_SHA256]\n")
                .unwrap_err()
                .to_string();
        assert!(err.contains("cipher_suites"), "{err}");
        let err = parse("http_server_config:\n  http2: false\n").unwrap_err().to_string();
        assert!(err.contains("http_server_config"), "{err}");
        let err = parse("tls_server_config:\n  cert_file: a\n").unwrap_err().to_string();
        assert!(err.contains("key_file"), "{err}");
        let err = parse("tls_server_config:\n  cert_file: a\n  key_file: b\n  client_auth_type: RequestClientCert\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("RequestClientCert"), "{err}");
    }

    #[test]
    fn passwords_must_be_bcrypt_hashes() {
        let users = |hash: &str| BTreeMap::from([("prom".to_string(), hash.to_string())]);
        assert!(BasicAuth::new(users("secret")).is_err(), "a plain password");
        let hash = bcrypt::hash_with_salt("s3cret", 4, [7; 16]).unwrap().format_for_version(bcrypt::Version::TwoY);
        assert!(BasicAuth::new(users(&hash)).is_ok(), "{hash}");
        assert!(BasicAuth::new(users(&hash[..hash.len() - 1])).is_err(), "a hash cut short");
    }

    #[test]
    fn decodes_basic_credentials() {
        // "prom:s3cret:with:colons"
        assert_eq!(
            credentials("Basic cHJvbTpzM2NyZXQ6d2l0aDpjb2xvbnM="),
            Some(("prom".to_string(), "s3cret:with:colons".to_string()))
        );
        assert_eq!(credentials("basic cHJvbTo="), Some(("prom".to_string(), String::new())));
        assert_eq!(credentials("Bearer abc"), None);
        assert_eq!(credentials("Basic !!!"), None);
        assert_eq!(credentials("Basic cHJvbQ=="), None, "no colon");
        assert_eq!(credentials(""), None);
    }

    #[tokio::test]
    async fn checks_the_password_and_remembers_what_it_accepted() {
        let hash = bcrypt::hash_with_salt("s3cret", 4, [7; 16]).unwrap().format_for_version(bcrypt::Version::TwoY);
        let auth = Arc::new(BasicAuth::new(BTreeMap::from([("prom".to_string(), hash)])).unwrap());
        let header = |user: &str, password: &str| {
            format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}")))
        };
        assert!(!auth.allows(None).await);
        assert!(!auth.allows(Some(&header("prom", "wrong"))).await);
        assert!(!auth.allows(Some(&header("other", "s3cret"))).await);
        assert!(auth.allows(Some(&header("prom", "s3cret"))).await);
        assert_eq!(auth.accepted.lock().unwrap().len(), 1, "only the accepted value is remembered");
        assert!(auth.allows(Some(&header("prom", "s3cret"))).await);
        assert!(same(b"abc", b"abc") && !same(b"abc", b"abd") && !same(b"abc", b"ab"));
    }
}
