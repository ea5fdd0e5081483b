//! Command-line flags and the TOML configuration file. Every flag has a snake_case key in the file;
//! flags override the file. Relative paths in the file are relative to the file's directory.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Parser, ValueEnum};
use mirror_core::target::ConflictPolicy;
use mirror_core::{NodeId, Size, VolumeId};
use serde::Deserialize;

use mirror_storage::legacy_meta_path;

use crate::server::ServerConfig;

/// Conflict policy as spelled on the command line and in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    /// Keep the mirrored operation waiting until the local holder releases the region.
    Wait,
    /// REJECT now, GRANTED once the region is free.
    Reject,
}

impl From<Policy> for ConflictPolicy {
    fn from(p: Policy) -> ConflictPolicy {
        match p {
            Policy::Wait => ConflictPolicy::Wait,
            Policy::Reject => ConflictPolicy::Reject,
        }
    }
}

/// `target-server` flags.
#[derive(Debug, Clone, Default, Parser)]
#[command(
    name = "target-server",
    version,
    about = "Receives mirrored writes over TCP and applies them to a target volume",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    /// Address to listen on [default: 127.0.0.1:7700].
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// The target volume: a file or block device; its metadata lives at its end (must exist
    /// unless --create-size is given).
    #[arg(long, value_name = "PATH")]
    pub volume: Option<PathBuf>,
    /// The volume's data size (K/M/G/T suffixes): create it (sparse, larger by the metadata
    /// area) if it does not exist, or initialise an existing one without metadata (as not
    /// consistent); an existing volume must hold this many data bytes.
    #[arg(long, value_name = "SIZE")]
    pub create_size: Option<Size>,
    /// Id of the mirrored volume: 32 hex digits (dashes allowed).
    #[arg(long, value_name = "HEX32")]
    pub volume_id: Option<String>,
    /// File holding the shared secret (surrounding whitespace is trimmed).
    #[arg(long, value_name = "PATH")]
    pub secret_file: Option<PathBuf>,
    /// Logical block size: 4096 or 512 [default: 4096].
    #[arg(long, value_name = "BYTES")]
    pub block_bytes: Option<u32>,
    /// What a mirrored lock does when it meets a local lock holder [default: wait].
    #[arg(long, value_enum)]
    pub conflict_policy: Option<Policy>,
    /// This node's id [default: 0].
    #[arg(long, value_name = "N")]
    pub node_id: Option<u64>,
    /// Bound on the commit log's payload bytes (K/M/G suffixes) [default: 64M; at least 1M].
    #[arg(long, value_name = "SIZE")]
    pub commit_log_bytes: Option<Size>,
    /// TOML file with the same settings (snake_case keys); flags override it.
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Legacy external metadata file of an earlier release, moved into the volume at start
    /// [default: the volume path with `.meta` appended].
    #[arg(long, value_name = "PATH")]
    pub meta: Option<PathBuf>,
    /// Close a connection that sends nothing for this many seconds [default: 30].
    #[arg(long, value_name = "SECS")]
    pub idle_timeout_secs: Option<u64>,
    /// Close a connection that has not authenticated this many seconds after it was accepted
    /// [default: 5].
    #[arg(long, value_name = "SECS")]
    pub handshake_timeout_secs: Option<u64>,
    /// Answer status requests on this Unix socket (`target-server status --status-socket PATH`)
    /// [default: none].
    #[arg(long, value_name = "PATH")]
    pub status_socket: Option<PathBuf>,
    /// Run this shell command before a resync's copies reach the volume (to snapshot the last
    /// consistent copy); environment: UBLK_MIRROR_VOLUME, UBLK_MIRROR_VOLUME_ID, UBLK_MIRROR_RESYNC
    /// (partial or full), UBLK_MIRROR_SEQ. The server waits for it and stops if it fails
    /// [default: none].
    #[arg(long, value_name = "CMD")]
    pub before_resync: Option<String>,
    /// `status`: print a running server's status and exit.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// What `target-server` does instead of serving.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// Print the status of the server answering on `--status-socket` (role, what the volume
    /// holds, a resync under way, sequence numbers, generation ids).
    Status {
        /// The server's status socket.
        #[arg(long, value_name = "PATH")]
        status_socket: PathBuf,
        /// Print the status as one JSON object.
        #[arg(long)]
        json: bool,
    },
}

/// The configuration file: the flags' keys in snake_case (without `config`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// See [`Cli::listen`].
    pub listen: Option<SocketAddr>,
    /// See [`Cli::volume`].
    pub volume: Option<PathBuf>,
    /// See [`Cli::create_size`] (an integer or a string such as `"1G"`).
    pub create_size: Option<Size>,
    /// See [`Cli::volume_id`].
    pub volume_id: Option<String>,
    /// See [`Cli::secret_file`].
    pub secret_file: Option<PathBuf>,
    /// See [`Cli::block_bytes`].
    pub block_bytes: Option<u32>,
    /// See [`Cli::conflict_policy`].
    pub conflict_policy: Option<Policy>,
    /// See [`Cli::node_id`].
    pub node_id: Option<u64>,
    /// See [`Cli::commit_log_bytes`] (an integer or a string such as `"64M"`).
    pub commit_log_bytes: Option<Size>,
    /// See [`Cli::meta`].
    pub meta: Option<PathBuf>,
    /// See [`Cli::idle_timeout_secs`].
    pub idle_timeout_secs: Option<u64>,
    /// See [`Cli::handshake_timeout_secs`].
    pub handshake_timeout_secs: Option<u64>,
    /// See [`Cli::status_socket`].
    pub status_socket: Option<PathBuf>,
    /// See [`Cli::before_resync`].
    pub before_resync: Option<String>,
}

/// A configuration that cannot be used. The message is one line.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A file could not be read.
    #[error("cannot read {what} {path}: {source}")]
    Read {
        /// Which file.
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// The failure.
        source: std::io::Error,
    },
    /// The configuration file is not valid.
    #[error("config file {path}: {message}")]
    Toml {
        /// Its path.
        path: PathBuf,
        /// What is wrong (one line).
        message: String,
    },
    /// A required setting is missing.
    #[error("missing --{flag} (or `{key}` in the config file)")]
    Missing {
        /// The flag.
        flag: &'static str,
        /// The file key.
        key: &'static str,
    },
    /// The volume id is not 32 hex digits.
    #[error("bad volume id '{0}' (expected 32 hex digits, dashes allowed)")]
    BadVolumeId(String),
    /// The secret file holds only whitespace.
    #[error("secret file {} is empty", .0.display())]
    EmptySecret(PathBuf),
    /// The block size is not supported.
    #[error(transparent)]
    BlockSize(#[from] mirror_core::BadBlockSize),
    /// The commit log bound is too small or too large.
    #[error("commit log of {bytes} bytes is out of range (at least {min_bytes})")]
    CommitLogBytes {
        /// What was asked for.
        bytes: u64,
        /// The smallest bound.
        min_bytes: u64,
    },
    /// A timeout is out of range.
    #[error("{what} timeout of {secs} s is out of range (1 to {max_secs})")]
    Timeout {
        /// Which timeout.
        what: &'static str,
        /// What was asked for.
        secs: u64,
        /// The largest allowed.
        max_secs: u64,
    },
}

impl FileConfig {
    /// Reads and parses a configuration file.
    pub fn load(path: &Path) -> Result<FileConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            what: "config file",
            path: path.to_owned(),
            source,
        })?;
        FileConfig::parse(&text).map_err(|message| ConfigError::Toml {
            path: path.to_owned(),
            message,
        })
    }

    /// Parses TOML text; the error is one line with the line number.
    pub fn parse(text: &str) -> Result<FileConfig, String> {
        toml::from_str(text).map_err(|e: toml::de::Error| {
            let message = e.message().replace('\n', " ");
            match e.span() {
                Some(span) => {
                    let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
                    format!("line {line}: {message}")
                }
                None => message,
            }
        })
    }
}

fn relative_to(base: Option<&Path>, p: PathBuf) -> PathBuf {
    match base {
        Some(dir) if p.is_relative() => dir.join(p),
        _ => p,
    }
}

/// Reads the shared secret: the file's contents without surrounding whitespace, never empty.
pub fn read_secret(path: &Path) -> Result<Vec<u8>, ConfigError> {
    let bytes = std::fs::read(path).map_err(|source| ConfigError::Read {
        what: "secret file",
        path: path.to_owned(),
        source,
    })?;
    mirror_core::auth::secret_from_file(&bytes)
        .map(<[u8]>::to_vec)
        .ok_or_else(|| ConfigError::EmptySecret(path.to_owned()))
}

/// Merges flags over the configuration file (if any) into a server configuration.
pub fn resolve(cli: &Cli) -> Result<ServerConfig, ConfigError> {
    let (file, base) = match &cli.config {
        Some(path) => (FileConfig::load(path)?, path.parent().map(Path::to_owned)),
        None => (FileConfig::default(), None),
    };
    let base = base.as_deref();
    let volume = match (&cli.volume, file.volume) {
        (Some(v), _) => v.clone(),
        (None, Some(v)) => relative_to(base, v),
        (None, None) => {
            return Err(ConfigError::Missing {
                flag: "volume",
                key: "volume",
            })
        }
    };
    let id_text = cli
        .volume_id
        .clone()
        .or(file.volume_id)
        .ok_or(ConfigError::Missing {
            flag: "volume-id",
            key: "volume_id",
        })?;
    let volume_id =
        VolumeId::parse(&id_text).ok_or_else(|| ConfigError::BadVolumeId(id_text.clone()))?;
    let secret_file = match (&cli.secret_file, file.secret_file) {
        (Some(p), _) => p.clone(),
        (None, Some(p)) => relative_to(base, p),
        (None, None) => {
            return Err(ConfigError::Missing {
                flag: "secret-file",
                key: "secret_file",
            })
        }
    };
    let secret = read_secret(&secret_file)?;
    let mut cfg = ServerConfig::new(volume, volume_id, secret);
    if let Some(listen) = cli.listen.or(file.listen) {
        cfg.listen = listen;
    }
    cfg.create_bytes = cli.create_size.or(file.create_size).map(|s| s.0);
    if let Some(block) = cli.block_bytes.or(file.block_bytes) {
        mirror_core::block_shift(block)?;
        cfg.block_bytes = block;
    }
    if let Some(policy) = cli.conflict_policy.or(file.conflict_policy) {
        cfg.conflict_policy = policy.into();
    }
    if let Some(node) = cli.node_id.or(file.node_id) {
        cfg.node_id = NodeId(node);
    }
    if let Some(Size(bytes)) = cli.commit_log_bytes.or(file.commit_log_bytes) {
        let min = u64::from(mirror_core::wire::PAYLOAD_BYTES_MAX);
        let usable = usize::try_from(bytes).ok().filter(|_| bytes >= min);
        cfg.commit_log_bytes_max = usable.ok_or(ConfigError::CommitLogBytes {
            bytes,
            min_bytes: min,
        })?;
    }
    cfg.legacy_meta_path = match (&cli.meta, file.meta) {
        (Some(p), _) => p.clone(),
        (None, Some(p)) => relative_to(base, p),
        (None, None) => legacy_meta_path(&cfg.volume_path),
    };
    if let Some(secs) = cli.idle_timeout_secs.or(file.idle_timeout_secs) {
        if secs == 0 || secs > 86_400 {
            return Err(ConfigError::Timeout {
                what: "idle",
                secs,
                max_secs: 86_400,
            });
        }
        cfg.idle_timeout = Duration::from_secs(secs);
    }
    if let Some(secs) = cli.handshake_timeout_secs.or(file.handshake_timeout_secs) {
        if secs == 0 || secs > 3_600 {
            return Err(ConfigError::Timeout {
                what: "handshake",
                secs,
                max_secs: 3_600,
            });
        }
        cfg.handshake_timeout = Duration::from_secs(secs);
    }
    cfg.before_resync = cli
        .before_resync
        .clone()
        .or(file.before_resync)
        .filter(|c| !c.trim().is_empty());
    cfg.status_socket = match (&cli.status_socket, file.status_socket) {
        (Some(p), _) => Some(p.clone()),
        (None, Some(p)) => Some(relative_to(base, p)),
        (None, None) => None,
    };
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "00112233-4455-6677-8899-aabbccddeeff";

    fn setup() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "  s3cret\n").unwrap();
        (dir, secret)
    }

    #[test]
    fn flags_override_the_file_and_file_paths_are_relative_to_it() {
        let (dir, _) = setup();
        let conf = dir.path().join("t.toml");
        std::fs::write(
            &conf,
            format!(
                "listen = \"127.0.0.1:9000\"\nvolume = \"vol.img\"\nvolume_id = \"{ID}\"\n\
                 secret_file = \"secret\"\nblock_bytes = 512\nconflict_policy = \"reject\"\n\
                 node_id = 7\ncommit_log_bytes = \"2M\"\ncreate_size = 65536\nidle_timeout_secs = 5\nhandshake_timeout_secs = 2\n"
            ),
        )
        .unwrap();
        let cli = Cli {
            config: Some(conf),
            block_bytes: Some(4096),
            ..Cli::default()
        };
        let cfg = resolve(&cli).unwrap();
        assert_eq!(cfg.listen, "127.0.0.1:9000".parse().unwrap());
        assert_eq!(cfg.volume_path, dir.path().join("vol.img"));
        assert_eq!(cfg.legacy_meta_path, dir.path().join("vol.img.meta"));
        assert_eq!(cfg.secret, b"s3cret");
        assert_eq!(cfg.block_bytes, 4096, "the flag wins");
        assert_eq!(cfg.conflict_policy, ConflictPolicy::Reject);
        assert_eq!(cfg.node_id, NodeId(7));
        assert_eq!(cfg.commit_log_bytes_max, 2 << 20);
        assert_eq!(cfg.create_bytes, Some(65536));
        assert_eq!(cfg.idle_timeout, Duration::from_secs(5));
        assert_eq!(cfg.handshake_timeout, Duration::from_secs(2));
        assert_eq!(cfg.volume_id.to_string(), ID.replace('-', ""));
    }

    #[test]
    fn bad_inputs_give_one_line_errors() {
        let (dir, secret) = setup();
        let base = Cli {
            volume: Some(dir.path().join("v")),
            volume_id: Some(ID.into()),
            secret_file: Some(secret),
            ..Cli::default()
        };
        let empty = dir.path().join("empty");
        std::fs::write(&empty, " \n").unwrap();
        let cases: Vec<(Cli, &str)> = vec![
            (
                Cli {
                    volume_id: Some("xyz".into()),
                    ..base.clone()
                },
                "bad volume id",
            ),
            (
                Cli {
                    volume: None,
                    ..base.clone()
                },
                "missing --volume",
            ),
            (
                Cli {
                    secret_file: Some(dir.path().join("nope")),
                    ..base.clone()
                },
                "cannot read secret file",
            ),
            (
                Cli {
                    secret_file: Some(empty),
                    ..base.clone()
                },
                "is empty",
            ),
            (
                Cli {
                    block_bytes: Some(1024),
                    ..base.clone()
                },
                "block size 1024 is not supported",
            ),
            (
                Cli {
                    commit_log_bytes: Some(Size(4096)),
                    ..base.clone()
                },
                "out of range",
            ),
            (
                Cli {
                    handshake_timeout_secs: Some(0),
                    ..base.clone()
                },
                "handshake timeout of 0 s is out of range",
            ),
            (
                Cli {
                    idle_timeout_secs: Some(0),
                    ..base.clone()
                },
                "out of range",
            ),
        ];
        for (cli, want) in cases {
            let msg = resolve(&cli).unwrap_err().to_string();
            assert!(msg.contains(want), "{msg:?} lacks {want:?}");
            assert!(!msg.contains('\n'), "{msg:?}");
        }
    }

    #[test]
    fn sizes_take_suffixes_on_the_command_line_and_in_the_file() {
        let cli = Cli::try_parse_from([
            "target-server",
            "--create-size",
            "1G",
            "--commit-log-bytes",
            "8m",
        ])
        .unwrap();
        assert_eq!(cli.create_size, Some(Size(1 << 30)));
        assert_eq!(cli.commit_log_bytes, Some(Size(8 << 20)));
        let err = Cli::try_parse_from(["target-server", "--create-size", "12Q"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("'12Q' is not a size"), "{err}");
        let file = FileConfig::parse("create_size = \"3K\"\ncommit_log_bytes = 4194304\n").unwrap();
        assert_eq!(file.create_size, Some(Size(3 << 10)));
        assert_eq!(file.commit_log_bytes, Some(Size(4 << 20)));
        let err = FileConfig::parse("create_size = \"lots\"").unwrap_err();
        assert!(err.contains("line 1") && err.contains("'lots'"), "{err}");
        let err = FileConfig::parse("create_size = -5").unwrap_err();
        assert!(err.contains("must not be negative"), "{err}");
    }

    #[test]
    fn unknown_toml_key_names_the_line() {
        let err = FileConfig::parse("volume = \"a\"\nvolume_size = 3\n").unwrap_err();
        assert!(err.starts_with("line 2:"), "{err}");
        assert!(err.contains("volume_size"), "{err}");
        assert!(!err.contains('\n'));
        let err = FileConfig::parse("conflict_policy = \"maybe\"").unwrap_err();
        assert!(err.contains("line 1"), "{err}");
    }
}
