//! Configuration files (`agent.toml`, `receiver.toml`): serde structs that refuse unknown keys,
//! relative paths resolved against the config file's directory, and a `validate()` whose errors
//! name the file, the key and the fix.

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::event::SourceKind;

/// A configuration mistake: which file, which key, what is wrong and how to fix it.
#[derive(Debug, thiserror::Error)]
#[error("config {file}: {key}: {problem}")]
pub struct ConfigError {
    pub file: String,
    pub key: String,
    pub problem: String,
}

fn err(file: &Path, key: impl Into<String>, problem: impl Into<String>) -> ConfigError {
    ConfigError { file: file.display().to_string(), key: key.into(), problem: problem.into() }
}

/// Mutual-TLS material: the CA that signs peers, and this node's certificate and key.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Paths only; key material is never read into this struct.
        f.debug_struct("TlsConfig").field("ca", &self.ca).field("cert", &self.cert).field("key", &self.key).finish()
    }
}

/// Journal limits.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JournalConfig {
    /// Size cap in bytes: past it, the oldest records go even if a receiver has not acknowledged
    /// them, and that receiver is resynced when it returns.
    #[serde(default = "default_journal_max_bytes")]
    pub max_bytes: u64,
}

fn default_journal_max_bytes() -> u64 {
    8 << 30
}

impl Default for JournalConfig {
    fn default() -> Self {
        JournalConfig { max_bytes: default_journal_max_bytes() }
    }
}

/// One `[[sources]]` entry. Fields apply by `kind`; `validate` says which are required.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    pub name: String,
    pub kind: SourceKind,
    /// fs: the tree to watch; sqlite: the database file.
    pub path: Option<PathBuf>,
    /// fs: glob patterns (relative to `path`) never replicated.
    #[serde(default)]
    pub exclude: Vec<String>,
    /// fs: how often a full reconciliation scan runs ("0s" disables it).
    #[serde(default = "default_rescan", with = "humantime_serde")]
    pub rescan_interval: Duration,
    /// postgres: connection string.
    pub dsn: Option<String>,
    pub publication: Option<String>,
    pub slot: Option<String>,
    /// sqlite: switch a database that is not in WAL mode to WAL (persistent) instead of
    /// refusing it.
    #[serde(default)]
    pub switch_to_wal: bool,
}

fn default_rescan() -> Duration {
    Duration::from_secs(600)
}

/// One `[[receivers]]` entry of the agent.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReceiverEndpoint {
    /// The receiver's identity: the DNS name its certificate must carry.
    pub name: String,
    /// `https://host:port`.
    pub endpoint: String,
    /// Name to verify in the receiver's certificate, if not `name`.
    pub server_name: Option<String>,
    /// Sources shipped to this receiver (default: all).
    pub sources: Option<Vec<String>>,
    /// Flow-control window: most bytes sent and not yet acknowledged.
    #[serde(default = "default_window")]
    pub window_bytes: u64,
}

fn default_window() -> u64 {
    64 << 20
}

/// `agent.toml`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    pub id: String,
    pub data_dir: PathBuf,
    pub admin_listen: SocketAddr,
    pub metrics_listen: Option<SocketAddr>,
    pub tls: TlsConfig,
    #[serde(default)]
    pub journal: JournalConfig,
    #[serde(default = "default_heartbeat", with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    #[serde(default)]
    pub sources: Vec<SourceConfig>,
    #[serde(default)]
    pub receivers: Vec<ReceiverEndpoint>,
}

fn default_heartbeat() -> Duration {
    Duration::from_secs(1)
}

/// One `[[targets]]` entry: which agent's source this receiver applies, and where.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetConfig {
    pub agent: String,
    pub source: String,
    pub kind: SourceKind,
    pub path: Option<PathBuf>,
    pub dsn: Option<String>,
    /// fs: rsync's `--safe-links`: skip symlinks whose target is absolute or climbs above the
    /// tree from the link's directory, and keep the standby holding exactly the source's links
    /// that are safe at this moment (a rename can make a link safe or unsafe). Default false:
    /// every symlink is created with its target verbatim. Links are never followed when the
    /// receiver writes, either way.
    #[serde(default)]
    pub safe_links: Option<bool>,
    /// fs, deprecated since 0.4.0 (replaced by `safe_links`): `true` is the new default
    /// (`safe_links = false`), `false` means `safe_links = true`. Accepted with a warning.
    #[serde(default)]
    pub allow_external_symlinks: Option<bool>,
    /// fs: set owner and group as the source has them (needs CAP_CHOWN, i.e. root in
    /// practice). Default true.
    #[serde(default)]
    pub owners: Option<bool>,
    /// fs: owners by numeric id (default true); false maps them by the source's user and group
    /// names, falling back to the numeric id for a name unknown on the receiver (as rsync).
    #[serde(default)]
    pub numeric_ids: Option<bool>,
    /// fs: extended attributes other than POSIX ACLs. Default true.
    #[serde(default)]
    pub xattrs: Option<bool>,
    /// fs: POSIX ACLs (`system.posix_acl_access`, `system.posix_acl_default`). Default true.
    #[serde(default)]
    pub acls: Option<bool>,
    /// fs: ranges of zeros the source does not store stay holes on the standby. Default true.
    #[serde(default)]
    pub sparse: Option<bool>,
    /// fs: hard links within the tree stay links (false: each name gets its own copy).
    /// Default true.
    #[serde(default)]
    pub hard_links: Option<bool>,
    /// fs: FIFOs. Default true.
    #[serde(default)]
    pub specials: Option<bool>,
    /// fs: character and block device nodes (needs CAP_MKNOD). Default false.
    #[serde(default)]
    pub devices: Option<bool>,
}

/// What an fs target reproduces besides content, modes and mtimes, resolved from its
/// [`TargetConfig`] keys. The defaults are `rsync -aHAXS --numeric-ids`: what a standby that
/// may become the primary needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FsTargetOptions {
    pub safe_links: bool,
    pub owners: bool,
    pub numeric_ids: bool,
    pub xattrs: bool,
    pub acls: bool,
    pub sparse: bool,
    pub hard_links: bool,
    pub specials: bool,
    pub devices: bool,
}

impl Default for FsTargetOptions {
    fn default() -> Self {
        FsTargetOptions {
            safe_links: false,
            owners: true,
            numeric_ids: true,
            xattrs: true,
            acls: true,
            sparse: true,
            hard_links: true,
            specials: true,
            devices: false,
        }
    }
}

impl TargetConfig {
    /// The fs keys of this target, resolved to their values (defaults where unset).
    pub fn fs_options(&self) -> FsTargetOptions {
        let d = FsTargetOptions::default();
        FsTargetOptions {
            safe_links: self.safe_links.or(self.allow_external_symlinks.map(|allow| !allow)).unwrap_or(d.safe_links),
            owners: self.owners.unwrap_or(d.owners),
            numeric_ids: self.numeric_ids.unwrap_or(d.numeric_ids),
            xattrs: self.xattrs.unwrap_or(d.xattrs),
            acls: self.acls.unwrap_or(d.acls),
            sparse: self.sparse.unwrap_or(d.sparse),
            hard_links: self.hard_links.unwrap_or(d.hard_links),
            specials: self.specials.unwrap_or(d.specials),
            devices: self.devices.unwrap_or(d.devices),
        }
    }

    /// The fs-only keys that are set, by name.
    fn fs_keys_set(&self) -> Vec<&'static str> {
        [
            ("safe_links", self.safe_links),
            ("allow_external_symlinks", self.allow_external_symlinks),
            ("owners", self.owners),
            ("numeric_ids", self.numeric_ids),
            ("xattrs", self.xattrs),
            ("acls", self.acls),
            ("sparse", self.sparse),
            ("hard_links", self.hard_links),
            ("specials", self.specials),
            ("devices", self.devices),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.map(|_| k))
        .collect()
    }
}

/// `receiver.toml`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReceiverConfig {
    pub id: String,
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub admin_listen: SocketAddr,
    pub metrics_listen: Option<SocketAddr>,
    pub tls: TlsConfig,
    #[serde(default)]
    pub targets: Vec<TargetConfig>,
}

fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|e| err(path, "(file)", format!("cannot read: {e}")))
}

fn parse<T: serde::de::DeserializeOwned>(path: &Path, text: &str) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| {
        let msg = e.message().to_string();
        let key = match e.span() {
            Some(span) => {
                let line = text[..span.start.min(text.len())].lines().count().max(1);
                format!("line {line}")
            }
            None => "(document)".to_string(),
        };
        err(path, key, format!("{msg}; see deploy/ for a commented example"))
    })
}

fn base_dir(path: &Path) -> PathBuf {
    path.parent().map(Path::to_path_buf).filter(|p| !p.as_os_str().is_empty()).unwrap_or_else(|| PathBuf::from("."))
}

fn resolve(base: &Path, p: &mut PathBuf) {
    if p.is_relative() {
        *p = base.join(&*p);
    }
}

fn check_name(file: &Path, key: &str, v: &str) -> Result<(), ConfigError> {
    if v.is_empty()
        || v.len() > 128
        || !v.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
    {
        return Err(err(
            file,
            key,
            format!("{v:?} is not a valid name; use 1-128 characters from a-z, A-Z, 0-9, '-', '_', '.'"),
        ));
    }
    Ok(())
}

fn check_tls(file: &Path, tls: &TlsConfig) -> Result<(), ConfigError> {
    for (k, p) in [("tls.ca", &tls.ca), ("tls.cert", &tls.cert), ("tls.key", &tls.key)] {
        if !p.is_file() {
            return Err(err(
                file,
                k,
                format!("{} does not exist; create dev certificates with `lockstep-agent certs --out DIR ...` or point it at your PKI", p.display()),
            ));
        }
    }
    Ok(())
}

/// Checks that the TLS files of `file`'s config are readable PEM and that the key belongs to
/// the certificate — what `run` needs, found at start-up rather than at the first handshake.
/// Not part of `validate`: `status` needs no key (and may run as a user who cannot read it).
pub fn check_tls_material(file: &Path, tls: &TlsConfig) -> Result<(), ConfigError> {
    crate::tls::check_material(tls).map_err(|e| match e {
        crate::tls::TlsError::Material { key, path, problem } => err(file, key, format!("{path} {problem}")),
        other => err(file, "tls", other.to_string()),
    })
}

impl AgentConfig {
    /// Reads, resolves and validates an agent config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let mut c: AgentConfig = parse(path, &read(path)?)?;
        let base = base_dir(path);
        resolve(&base, &mut c.data_dir);
        resolve(&base, &mut c.tls.ca);
        resolve(&base, &mut c.tls.cert);
        resolve(&base, &mut c.tls.key);
        for s in &mut c.sources {
            if let Some(p) = &mut s.path {
                resolve(&base, p);
            }
        }
        c.validate(path)?;
        Ok(c)
    }

    /// Checks everything that can be checked without touching the network.
    pub fn validate(&self, file: &Path) -> Result<(), ConfigError> {
        check_name(file, "id", &self.id)?;
        check_tls(file, &self.tls)?;
        if self.sources.is_empty() {
            return Err(err(file, "sources", "no [[sources]] configured; add at least one"));
        }
        let mut names = HashSet::new();
        for (i, s) in self.sources.iter().enumerate() {
            let k = |f: &str| format!("sources[{i}].{f}");
            check_name(file, &k("name"), &s.name)?;
            if !names.insert(s.name.as_str()) {
                return Err(err(file, k("name"), format!("duplicate source name {:?}; names must be unique", s.name)));
            }
            match s.kind {
                SourceKind::Fs => {
                    let p = s
                        .path
                        .as_ref()
                        .ok_or_else(|| err(file, k("path"), "missing; an fs source needs the directory to watch"))?;
                    if !p.is_dir() {
                        return Err(err(
                            file,
                            k("path"),
                            format!("{} is not a directory; create it or fix the path", p.display()),
                        ));
                    }
                    for (j, g) in s.exclude.iter().enumerate() {
                        globset::Glob::new(g).map_err(|e| {
                            err(file, format!("sources[{i}].exclude[{j}]"), format!("bad glob {g:?}: {e}"))
                        })?;
                    }
                }
                SourceKind::Postgres => {
                    if s.dsn.is_none() {
                        return Err(err(file, k("dsn"), "missing; a postgres source needs a connection string"));
                    }
                }
                SourceKind::Sqlite => {
                    if s.path.is_none() {
                        return Err(err(file, k("path"), "missing; a sqlite source needs the database file"));
                    }
                }
            }
        }
        let mut rnames = HashSet::new();
        for (i, r) in self.receivers.iter().enumerate() {
            let k = |f: &str| format!("receivers[{i}].{f}");
            check_name(file, &k("name"), &r.name)?;
            if !rnames.insert(r.name.as_str()) {
                return Err(err(file, k("name"), format!("duplicate receiver name {:?}", r.name)));
            }
            if !r.endpoint.starts_with("https://") {
                return Err(err(
                    file,
                    k("endpoint"),
                    format!("{:?} must start with https:// (lockstep always uses mutual TLS)", r.endpoint),
                ));
            }
            if r.endpoint.parse::<tonic::transport::Uri>().is_err() {
                return Err(err(
                    file,
                    k("endpoint"),
                    format!("{:?} is not a valid URL like https://host:7443", r.endpoint),
                ));
            }
            if let Some(list) = &r.sources {
                for s in list {
                    if !names.contains(s.as_str()) {
                        return Err(err(file, k("sources"), format!("{s:?} is not a configured source")));
                    }
                }
            }
            if r.window_bytes < 1 << 20 {
                return Err(err(file, k("window_bytes"), "must be at least 1048576"));
            }
        }
        if self.heartbeat_interval.is_zero() {
            return Err(err(file, "heartbeat_interval", "must be greater than 0, e.g. \"1s\""));
        }
        Ok(())
    }
}

impl ReceiverConfig {
    /// Reads, resolves and validates a receiver config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let mut c: ReceiverConfig = parse(path, &read(path)?)?;
        let base = base_dir(path);
        resolve(&base, &mut c.data_dir);
        resolve(&base, &mut c.tls.ca);
        resolve(&base, &mut c.tls.cert);
        resolve(&base, &mut c.tls.key);
        for t in &mut c.targets {
            if let Some(p) = &mut t.path {
                resolve(&base, p);
            }
        }
        c.validate(path)?;
        for w in c.warnings(path) {
            tracing::warn!("{w}");
        }
        Ok(c)
    }

    /// Deprecated keys still accepted, each as a sentence naming the file, the key and the
    /// replacement.
    pub fn warnings(&self, file: &Path) -> Vec<String> {
        let mut out = Vec::new();
        for (i, t) in self.targets.iter().enumerate() {
            if let Some(allow) = t.allow_external_symlinks {
                out.push(format!(
                    "config {}: targets[{i}].allow_external_symlinks is deprecated; replace it with {}",
                    file.display(),
                    if allow {
                        "nothing (symlinks are now copied verbatim by default, i.e. safe_links = false)"
                    } else {
                        "safe_links = true"
                    }
                ));
            }
        }
        out
    }

    pub fn validate(&self, file: &Path) -> Result<(), ConfigError> {
        check_name(file, "id", &self.id)?;
        check_tls(file, &self.tls)?;
        let mut seen = HashSet::new();
        let mut paths: Vec<(usize, &PathBuf)> = Vec::new();
        for (i, t) in self.targets.iter().enumerate() {
            let k = |f: &str| format!("targets[{i}].{f}");
            check_name(file, &k("agent"), &t.agent)?;
            check_name(file, &k("source"), &t.source)?;
            if !seen.insert((t.agent.as_str(), t.source.as_str())) {
                return Err(err(
                    file,
                    k("source"),
                    format!("agent {:?} source {:?} is mapped twice", t.agent, t.source),
                ));
            }
            if t.kind != SourceKind::Fs {
                if let Some(key) = t.fs_keys_set().first() {
                    return Err(err(
                        file,
                        k(key),
                        format!("applies only to kind = \"fs\" targets, this one is {}; remove it", t.kind),
                    ));
                }
            } else if t.safe_links.is_some() && t.allow_external_symlinks.is_some() {
                return Err(err(
                    file,
                    k("allow_external_symlinks"),
                    "set together with safe_links, which replaces it; remove allow_external_symlinks",
                ));
            }
            match t.kind {
                SourceKind::Fs | SourceKind::Sqlite => {
                    let p = t
                        .path
                        .as_ref()
                        .ok_or_else(|| err(file, k("path"), "missing; where should the standby copy live?"))?;
                    if t.kind == SourceKind::Sqlite && p.is_dir() {
                        return Err(err(
                            file,
                            k("path"),
                            format!(
                                "{} is a directory; a sqlite target's path is the standby database file",
                                p.display()
                            ),
                        ));
                    }
                    if p.starts_with(&self.data_dir) || self.data_dir.starts_with(p) {
                        return Err(err(file, k("path"), "must not overlap data_dir"));
                    }
                    for (j, other) in &paths {
                        if p.starts_with(other) || other.starts_with(p) {
                            return Err(err(
                                file,
                                k("path"),
                                format!("overlaps targets[{j}].path; each standby needs its own directory"),
                            ));
                        }
                    }
                    paths.push((i, p));
                }
                SourceKind::Postgres => {
                    if t.dsn.is_none() {
                        return Err(err(
                            file,
                            k("dsn"),
                            "missing; a postgres target needs the standby's connection string",
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// The target configured for (agent, source), if any.
    pub fn target(&self, agent: &str, source: &str) -> Option<&TargetConfig> {
        self.targets.iter().find(|t| t.agent == agent && t.source == source)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A receiver.toml with real TLS files (validation checks they exist) and `targets`
    /// appended; returns its path and the loaded result.
    fn load_receiver(dir: &Path, targets: &str) -> (PathBuf, Result<ReceiverConfig, ConfigError>) {
        for f in ["ca.pem", "r.pem", "r.key"] {
            std::fs::write(dir.join(f), b"x").unwrap();
        }
        let path = dir.join("receiver.toml");
        std::fs::write(
            &path,
            format!(
                "id = \"r\"\nlisten = \"127.0.0.1:1\"\ndata_dir = \"data\"\nadmin_listen = \"127.0.0.1:2\"\n\
                 [tls]\nca = \"ca.pem\"\ncert = \"r.pem\"\nkey = \"r.key\"\n{targets}"
            ),
        )
        .unwrap();
        let loaded = ReceiverConfig::load(&path);
        (path, loaded)
    }

    const FS: &str = "[[targets]]\nagent = \"a\"\nsource = \"s\"\nkind = \"fs\"\npath = \"standby\"\n";

    #[test]
    fn fs_target_defaults_are_a_standby_that_can_take_over() {
        let t = tempfile::tempdir().unwrap();
        let (path, c) = load_receiver(t.path(), FS);
        let c = c.unwrap();
        let o = c.targets[0].fs_options();
        assert_eq!(o, FsTargetOptions::default());
        assert!(!o.safe_links && o.owners && o.numeric_ids && o.xattrs && o.acls);
        assert!(o.sparse && o.hard_links && o.specials && !o.devices);
        assert!(c.warnings(&path).is_empty());

        let (_, c) = load_receiver(t.path(), &format!("{FS}safe_links = true\nowners = false\ndevices = true\n"));
        let o = c.unwrap().targets[0].fs_options();
        assert!(o.safe_links && !o.owners && o.devices && o.xattrs);
    }

    #[test]
    fn allow_external_symlinks_is_deprecated_but_honoured() {
        let t = tempfile::tempdir().unwrap();
        let (path, c) = load_receiver(t.path(), &format!("{FS}allow_external_symlinks = false\n"));
        let c = c.unwrap();
        assert!(c.targets[0].fs_options().safe_links);
        let w = c.warnings(&path);
        assert_eq!(w.len(), 1);
        assert!(w[0].contains(&path.display().to_string()), "{w:?}");
        assert!(w[0].contains("targets[0].allow_external_symlinks") && w[0].contains("safe_links = true"), "{w:?}");

        let (_, c) = load_receiver(t.path(), &format!("{FS}allow_external_symlinks = true\n"));
        let c = c.unwrap();
        assert!(!c.targets[0].fs_options().safe_links);
        assert!(c.warnings(&path)[0].contains("safe_links = false"));

        let (path, c) = load_receiver(t.path(), &format!("{FS}allow_external_symlinks = true\nsafe_links = true\n"));
        let e = c.unwrap_err();
        assert_eq!(e.key, "targets[0].allow_external_symlinks");
        assert_eq!(e.file, path.display().to_string());
        assert!(e.problem.contains("remove allow_external_symlinks"), "{e}");
    }

    #[test]
    fn fs_keys_on_other_targets_are_refused() {
        let t = tempfile::tempdir().unwrap();
        for key in ["owners", "safe_links", "allow_external_symlinks", "sparse", "devices"] {
            let pg =
                format!("[[targets]]\nagent = \"a\"\nsource = \"s\"\nkind = \"postgres\"\ndsn = \"x\"\n{key} = true\n");
            let (path, c) = load_receiver(t.path(), &pg);
            let e = c.unwrap_err();
            assert_eq!(e.key, format!("targets[0].{key}"));
            assert_eq!(e.file, path.display().to_string());
            assert!(e.problem.contains("kind = \"fs\"") && e.problem.contains("remove it"), "{e}");
        }
        let sq = "[[targets]]\nagent = \"a\"\nsource = \"s\"\nkind = \"sqlite\"\npath = \"db\"\nxattrs = false\n";
        assert_eq!(load_receiver(t.path(), sq).1.unwrap_err().key, "targets[0].xattrs");
        // Unknown keys stay refused.
        let (_, c) = load_receiver(t.path(), &format!("{FS}safe_link = true\n"));
        assert!(c.unwrap_err().problem.contains("unknown field"));
    }
}
