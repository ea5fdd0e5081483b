//! Shared test helpers: an in-process server and a hand-driven client around the `Source` engine.

#![allow(dead_code, clippy::cast_possible_truncation)]

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use mirror_core::genid::GenIds;
use mirror_core::meta::{meta_area_bytes, MetaRecord, META_FILE_BYTES};
use mirror_core::source::{LockStyle, Mode, Source, SourceConfig, SourceError};
use mirror_core::wire::{Frame, Op};
use mirror_core::{Lba, NodeId, Seq, VolumeId};
use target_server::{ServerConfig, ServerHandle};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::Instant;

pub const VOLUME_ID: VolumeId = VolumeId([0x11; 16]);
pub const SECRET: &[u8] = b"test-secret";
pub const BLOCK: u64 = 4096;

pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub volume: PathBuf,
    pub volume_bytes: u64,
    pub server: ServerHandle,
}

impl Fixture {
    pub fn addr(&self) -> std::net::SocketAddr {
        self.server.local_addr()
    }

    /// The data area (the file is larger by its metadata area).
    pub fn volume_content(&self) -> Vec<u8> {
        data_area(&self.volume, self.volume_bytes)
    }
}

/// The data area of the volume file at `path`, checking that the file is data plus metadata.
pub fn data_area(path: &std::path::Path, volume_bytes: u64) -> Vec<u8> {
    let mut bytes = std::fs::read(path).unwrap();
    let want = volume_bytes + meta_area_bytes(volume_bytes);
    assert_eq!(bytes.len() as u64, want, "data and metadata area");
    bytes.truncate(volume_bytes as usize);
    bytes
}

/// The record at the end of the volume file (read without the server's lock: it may run).
pub fn volume_record(cfg: &ServerConfig) -> Option<MetaRecord> {
    let bytes = std::fs::read(&cfg.volume_path).unwrap();
    let slots = &bytes[bytes.len() - META_FILE_BYTES..];
    match MetaRecord::decode_file(slots) {
        Ok((record, _)) => Some(record),
        Err(why) if why.holds_no_record() => None,
        Err(why) => panic!("corrupt record: {why}"),
    }
}

/// Overwrites both slots at the end of the volume file with `record` alone (as a crash, or a
/// test, leaves it), stamped with the file's metadata area.
pub fn write_volume_record(cfg: &ServerConfig, record: &MetaRecord) {
    let len = std::fs::metadata(&cfg.volume_path).unwrap().len();
    let record = MetaRecord {
        meta_area_bytes: len - record.volume_bytes,
        ..*record
    };
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&cfg.volume_path)
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(
        &file,
        &record.encode_file(1_000),
        len - META_FILE_BYTES as u64,
    )
    .unwrap();
}

/// A volume of `volume_bytes` that a server created and stopped cleanly, with the config that
/// starts it again.
pub async fn stopped_volume(dir: &tempfile::TempDir, volume_bytes: u64) -> ServerConfig {
    let cfg = server_config(dir, volume_bytes);
    target_server::start(cfg.clone())
        .await
        .unwrap()
        .shutdown()
        .await
        .unwrap();
    cfg
}

pub fn server_config(dir: &tempfile::TempDir, volume_bytes: u64) -> ServerConfig {
    let volume = dir.path().join("target.img");
    let mut cfg = ServerConfig::new(volume, VOLUME_ID, SECRET.to_vec());
    cfg.listen = "127.0.0.1:0".parse().unwrap();
    cfg.create_bytes = Some(volume_bytes);
    cfg
}

pub async fn start_server(volume_bytes: u64, tweak: impl FnOnce(&mut ServerConfig)) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = server_config(&dir, volume_bytes);
    tweak(&mut cfg);
    let volume = cfg.volume_path.clone();
    let server = target_server::start(cfg).await.unwrap();
    Fixture {
        dir,
        volume,
        volume_bytes,
        server,
    }
}

pub fn source_config(volume_bytes: u64, mode: Mode) -> SourceConfig {
    SourceConfig {
        volume_id: VOLUME_ID,
        node_id: NodeId(1),
        gen_ids: GenIds::default(),
        volume_bytes,
        block_bytes: BLOCK as u32,
        secret: SECRET.to_vec(),
        mode,
        flush_replicates: true,
        lock_style: LockStyle::Implied,
        log_bytes_max: 32 << 20,
        log_entries_max: 4096,
    }
}

/// How a read ended without a frame.
#[derive(Debug, PartialEq, Eq)]
pub enum End {
    /// Nothing arrived in time.
    Timeout,
    /// The server closed the connection.
    Closed,
}

/// A frame received, or how reading ended (through the transport every driver uses).
pub async fn read_frame(stream: &mut TcpStream, wait: Duration) -> Result<Frame, End> {
    match mirror_net::read_frame(stream, Some(wait)).await {
        Ok(Ok(frame)) => Ok(frame),
        Ok(Err(e)) => panic!("server sent a bad frame: {e}"),
        Err(mirror_net::ReadEnd::Idle(_)) => Err(End::Timeout),
        Err(mirror_net::ReadEnd::Wire(e)) => panic!("server sent a bad header: {e}"),
        Err(_) => Err(End::Closed),
    }
}

/// Reads until the server closes the connection; returns the frames seen. Panics after `wait`.
pub async fn read_until_closed(stream: &mut TcpStream, wait: Duration) -> Vec<Frame> {
    let deadline = Instant::now() + wait;
    let mut frames = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "connection still open; got {frames:?}");
        match read_frame(stream, left).await {
            Ok(f) => frames.push(f),
            Err(End::Closed) => return frames,
            Err(End::Timeout) => panic!("connection still open after {wait:?}; got {frames:?}"),
        }
    }
}

/// A source engine pumped by hand over one TCP connection.
pub struct Client {
    pub src: Source,
    pub stream: TcpStream,
    /// Frames received from the target, in order (for checks on NAK, REJECT, GRANTED).
    pub seen: Vec<Frame>,
    rng: fastrand::Rng,
}

impl Client {
    /// Connects and starts the handshake (HELLO is queued, not yet sent).
    pub async fn connect(addr: std::net::SocketAddr, mut src: Source, seed: u64) -> Client {
        let stream = TcpStream::connect(addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut nonce = [0u8; 32];
        rng.fill(&mut nonce);
        src.on_connect(nonce);
        Client {
            src,
            stream,
            seen: Vec::new(),
            rng,
        }
    }

    /// Connects and completes the handshake, retrying while the server still serves an earlier
    /// connection (REFUSE Busy).
    pub async fn connect_ready(addr: std::net::SocketAddr, mut src: Source, seed: u64) -> Client {
        for attempt in 0..100 {
            let mut c = Client::connect(addr, src, seed + attempt).await;
            match c
                .pump_until(
                    |s| s.status().conn == mirror_core::source::ConnState::Connected,
                    Duration::from_secs(5),
                )
                .await
            {
                Ok(()) => return c,
                Err(e) if e.contains("already serves") => {
                    c.src.on_disconnect();
                    src = c.src;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("handshake failed: {e}"),
            }
        }
        panic!("server stayed busy");
    }

    /// Hands the engine back after closing the connection.
    pub fn disconnect(mut self) -> Source {
        self.src.on_disconnect();
        self.src
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    /// Submits a write of `data` at byte `offset`.
    pub fn write(&mut self, offset: u64, data: Vec<u8>) -> Seq {
        self.src
            .submit(
                Op::Write {
                    lba: Lba::from_bytes(offset),
                    data: Bytes::from(data),
                },
                0,
            )
            .unwrap()
    }

    /// Pumps until `done` holds for the engine. Errors carry the engine's or the stream's message.
    pub async fn pump_until(
        &mut self,
        done: impl FnMut(&Source) -> bool,
        wait: Duration,
    ) -> Result<(), String> {
        self.pump_until_with(done, wait, |_, _| {}).await
    }

    /// Like [`Client::pump_until`]; `mutate` may change each frame's bytes before they are sent.
    pub async fn pump_until_with(
        &mut self,
        mut done: impl FnMut(&Source) -> bool,
        wait: Duration,
        mut mutate: impl FnMut(&Frame, &mut Vec<u8>),
    ) -> Result<(), String> {
        let deadline = Instant::now() + wait;
        loop {
            while let Some(frame) = self.src.poll_transmit() {
                let mut bytes = frame.encode().to_vec();
                mutate(&frame, &mut bytes);
                self.stream
                    .write_all(&bytes)
                    .await
                    .map_err(|e| format!("send: {e}"))?;
            }
            while self.src.poll_completion().is_some() {}
            if done(&self.src) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("timed out; source status {:?}", self.src.status()));
            }
            match read_frame(&mut self.stream, Duration::from_millis(20)).await {
                Ok(frame) => {
                    self.seen.push(frame.clone());
                    self.src
                        .handle_frame(frame)
                        .map_err(|e: SourceError| e.to_string())?;
                }
                Err(End::Timeout) => {}
                Err(End::Closed) => return Err("connection closed".into()),
            }
        }
    }

    /// Pumps until everything submitted is durable on the target.
    pub async fn sync(&mut self) {
        let last = self.src.status().last_local;
        self.pump_until(|s| s.status().durable >= last, Duration::from_secs(20))
            .await
            .unwrap();
    }

    pub fn rng(&mut self) -> &mut fastrand::Rng {
        &mut self.rng
    }
}

/// A seed from the environment (`TEST_SEED`) or the clock; printed so a failure replays.
pub fn seed(test: &str) -> u64 {
    let seed = std::env::var("TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
    println!("{test}: seed {seed} (replay with TEST_SEED={seed})");
    seed
}
