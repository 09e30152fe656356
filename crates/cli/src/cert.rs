//! `pgquorum cert`: a cluster CA and the certificates of its members and operators, for a test
//! or a small deployment (a larger one issues the same names from its own CA).

use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use raft_node::security::{node_name, NODE_NAME, OPERATOR_NAME};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// `pgquorum cert ...`
#[derive(Subcommand)]
pub enum CertCmd {
    /// Create a cluster CA in DIR: ca.crt (give it to every member and client) and ca.key
    /// (keep it off the members; it signs new certificates).
    Init {
        /// Where to write ca.crt and ca.key.
        dir: PathBuf,
        /// The cluster's name, written into the CA's subject.
        #[arg(long, default_value = "pgquorum")]
        cluster: String,
        /// How long the CA is valid.
        #[arg(long, default_value_t = 3650)]
        days: u32,
    },
    /// Sign a member's or an operator's certificate with the CA in --dir.
    Issue {
        /// `node` (a sidecar) or `operator` (a person or program that uses the verbs).
        kind: Kind,
        /// The member's node id, or the operator's name.
        name: String,
        /// The directory of ca.crt and ca.key; the new files go there too.
        #[arg(long)]
        dir: PathBuf,
        /// How long the certificate is valid.
        #[arg(long, default_value_t = 825)]
        days: u32,
        /// Replace existing files (a rotation; the sidecars pick them up without a restart).
        #[arg(long)]
        force: bool,
    },
    /// Write a random bearer token to FILE (mode 600), for `security.token_file` and
    /// `--token-file`, or for `security.metrics_token_file`.
    Token {
        /// The file to write.
        file: PathBuf,
        /// Replace an existing file.
        #[arg(long)]
        force: bool,
    },
}

/// What a certificate is for.
#[derive(Clone, Copy, clap::ValueEnum)]
pub enum Kind {
    /// A sidecar: server and client of the other members.
    Node,
    /// A client that may use every verb.
    Operator,
}

/// Runs one `cert` command.
pub fn run(cmd: CertCmd) -> Result<()> {
    match cmd {
        CertCmd::Init { dir, cluster, days } => {
            init(&dir, &cluster, days, false)?;
            println!(
                "wrote {} and {} (keep ca.key off the members)",
                dir.join("ca.crt").display(),
                dir.join("ca.key").display()
            );
        }
        CertCmd::Issue {
            kind,
            name,
            dir,
            days,
            force,
        } => {
            let (crt, key) = issue(&dir, kind, &name, days, force)?;
            println!("wrote {} and {}", crt.display(), key.display());
        }
        CertCmd::Token { file, force } => {
            token(&file, force)?;
            println!("wrote a token to {}", file.display());
        }
    }
    Ok(())
}

fn validity(params: &mut CertificateParams, days: u32) -> Result<()> {
    use chrono::Datelike;
    if days == 0 {
        bail!("--days must be positive");
    }
    let day = |d: chrono::DateTime<chrono::Utc>| -> Result<_> {
        Ok(rcgen::date_time_ymd(
            d.year(),
            u8::try_from(d.month())?,
            u8::try_from(d.day())?,
        ))
    };
    let now = chrono::Utc::now();
    // From yesterday: a member whose clock is a little behind still takes it.
    params.not_before = day(now - chrono::Duration::days(1))?;
    params.not_after = day(now + chrono::Duration::days(i64::from(days)))?;
    Ok(())
}

/// Writes `contents` to `path` through a temporary file and a rename, so a sidecar that reloads
/// never reads half a file, with `mode`; refuses to replace an existing file unless `force`.
fn write_file(path: &Path, contents: &str, mode: u32, force: bool) -> Result<()> {
    if path.exists() && !force {
        bail!(
            "{} exists; remove it or pass --force to replace it",
            path.display()
        );
    }
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("cannot create {}", tmp.display()))?;
    f.write_all(contents.as_bytes())
        .and_then(|()| f.sync_all())
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot rename to {}", path.display()))?;
    Ok(())
}

/// Creates `dir/ca.crt` and `dir/ca.key`.
pub fn init(dir: &Path, cluster: &str, days: u32, force: bool) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let key = KeyPair::generate().context("cannot generate a key")?;
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, format!("pgquorum CA {cluster}"));
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    validity(&mut params, days)?;
    let cert = params.self_signed(&key).context("cannot sign the CA")?;
    write_file(&dir.join("ca.key"), &key.serialize_pem(), 0o600, force)?;
    write_file(&dir.join("ca.crt"), &cert.pem(), 0o644, force)?;
    Ok(())
}

/// Signs a certificate for a member (`name` is its node id) or an operator; returns the paths
/// of the certificate and the key.
pub fn issue(
    dir: &Path,
    kind: Kind,
    name: &str,
    days: u32,
    force: bool,
) -> Result<(PathBuf, PathBuf)> {
    let (sans, stem, eku) = match kind {
        Kind::Node => {
            let id: u64 = name
                .parse()
                .ok()
                .filter(|id| *id > 0)
                .with_context(|| format!("'{name}' is not a node id (a positive integer, the node_id of the member's config)"))?;
            (
                vec![node_name(id), NODE_NAME.to_string()],
                format!("node-{id}"),
                vec![
                    ExtendedKeyUsagePurpose::ServerAuth,
                    ExtendedKeyUsagePurpose::ClientAuth,
                ],
            )
        }
        Kind::Operator => {
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                bail!("operator name '{name}' must be letters, digits, '-' or '_'");
            }
            (
                vec![OPERATOR_NAME.to_string()],
                format!("operator-{name}"),
                vec![ExtendedKeyUsagePurpose::ClientAuth],
            )
        }
    };
    let ca_pem = std::fs::read_to_string(dir.join("ca.crt")).with_context(|| {
        format!(
            "cannot read {}/ca.crt; run `pgquorum cert init {}` first",
            dir.display(),
            dir.display()
        )
    })?;
    let ca_key_pem = std::fs::read_to_string(dir.join("ca.key")).with_context(|| {
        format!(
            "cannot read {}/ca.key (the CA's key signs new certificates)",
            dir.display()
        )
    })?;
    let ca_key = KeyPair::from_pem(&ca_key_pem).context("ca.key holds no usable key")?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).context("ca.crt holds no usable CA")?;
    let key = KeyPair::generate().context("cannot generate a key")?;
    let mut params = CertificateParams::new(sans).context("bad certificate names")?;
    params
        .distinguished_name
        .push(DnType::CommonName, stem.clone());
    params.extended_key_usages = eku;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    validity(&mut params, days)?;
    let cert = params.signed_by(&key, &issuer).context("cannot sign")?;
    let crt_path = dir.join(format!("{stem}.crt"));
    let key_path = dir.join(format!("{stem}.key"));
    write_file(&key_path, &key.serialize_pem(), 0o600, force)?;
    write_file(&crt_path, &cert.pem(), 0o644, force)?;
    Ok((crt_path, key_path))
}

/// Writes a random 32-byte token, hex-encoded, to `file` with mode 600.
pub fn token(file: &Path, force: bool) -> Result<()> {
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .context("cannot read /dev/urandom")?;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    if let Some(parent) = file.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    write_file(file, &format!("{hex}\n"), 0o600, force)
}
