//! A fault-injecting TCP proxy on loopback.
//!
//! Every accepted connection is relayed to the upstream address through two pipes (client to
//! upstream, "up"; upstream to client, "down"). Each pipe reads chunks, may corrupt one byte of a
//! chunk (seeded probability), and delivers chunks in order after a one-way delay and at most at
//! the configured rate. A cut closes every open connection at once (on command or at seeded random
//! times). All settings can be changed while connections are open; they apply to the next chunk.
//!
//! Memory is bounded: each pipe holds at most [`CHUNKS_MAX`] chunks of at most [`CHUNK_BYTES`];
//! when full it stops reading, and TCP pushes back on the sender.

use std::net::SocketAddr;
use std::pin::pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

/// Largest chunk one read takes from a socket.
pub const CHUNK_BYTES: usize = 16 << 10;
/// Chunks buffered per direction of a connection.
pub const CHUNKS_MAX: usize = 1024;
/// Connections relayed at once (more are closed on accept).
pub const CONNECTIONS_MAX: usize = 64;

/// What the proxy does to the traffic.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Faults {
    /// One-way delay from client to upstream.
    pub delay_up: Duration,
    /// One-way delay from upstream to client.
    pub delay_down: Duration,
    /// Rate cap from client to upstream in bytes per second (0: none).
    pub bandwidth_up_bytes: u64,
    /// Rate cap from upstream to client in bytes per second (0: none).
    pub bandwidth_down_bytes: u64,
    /// Probability that a chunk (either direction) gets one byte flipped.
    pub corrupt_prob: f64,
    /// Mean time between random cuts of all connections (`None`: only on command). Each interval
    /// is drawn uniformly from half to one and a half times this.
    pub cut_every: Option<Duration>,
}

impl Faults {
    /// A transparent proxy.
    #[must_use]
    pub fn none() -> Faults {
        Faults {
            delay_up: Duration::ZERO,
            delay_down: Duration::ZERO,
            bandwidth_up_bytes: 0,
            bandwidth_down_bytes: 0,
            corrupt_prob: 0.0,
            cut_every: None,
        }
    }

    /// The same delay both ways.
    #[must_use]
    pub fn with_delay(mut self, delay: Duration) -> Faults {
        self.delay_up = delay;
        self.delay_down = delay;
        self
    }

    /// The same rate cap both ways.
    #[must_use]
    pub fn with_bandwidth(mut self, bytes_per_s: u64) -> Faults {
        self.bandwidth_up_bytes = bytes_per_s;
        self.bandwidth_down_bytes = bytes_per_s;
        self
    }
}

/// Counters of what the proxy did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ProxyStats {
    /// Connections accepted and relayed.
    pub connections: u64,
    /// Cuts (each closes every open connection).
    pub cuts: u64,
    /// Chunks corrupted.
    pub corrupted: u64,
    /// Bytes delivered client to upstream.
    pub bytes_up: u64,
    /// Bytes delivered upstream to client.
    pub bytes_down: u64,
}

#[derive(Debug)]
struct Settings {
    faults: Faults,
    upstream: SocketAddr,
}

#[derive(Debug, Default)]
struct Counters {
    connections: AtomicU64,
    cuts: AtomicU64,
    corrupted: AtomicU64,
    bytes_up: AtomicU64,
    bytes_down: AtomicU64,
}

#[derive(Debug)]
struct Shared {
    settings: Mutex<Settings>,
    rng: Mutex<fastrand::Rng>,
    cut_tx: watch::Sender<u64>,
    counters: Counters,
}

impl Shared {
    fn faults(&self) -> Faults {
        self.settings
            .lock()
            .map(|s| s.faults)
            .unwrap_or(Faults::none())
    }

    fn fork_rng(&self) -> fastrand::Rng {
        match self.rng.lock() {
            Ok(mut rng) => fastrand::Rng::with_seed(rng.u64(..)),
            Err(_) => fastrand::Rng::with_seed(0),
        }
    }

    fn cut(&self) {
        self.counters.cuts.fetch_add(1, Ordering::Relaxed);
        self.cut_tx.send_modify(|generation| *generation += 1);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dir {
    Up,
    Down,
}

/// A running proxy. Dropping it stops it and closes every connection.
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
    cutter: JoinHandle<()>,
}

impl FaultProxy {
    /// Listens on `listen` (e.g. `127.0.0.1:0`) and relays to `upstream` with `faults`; `seed`
    /// drives every random choice.
    pub async fn start(
        listen: &str,
        upstream: SocketAddr,
        faults: Faults,
        seed: u64,
    ) -> std::io::Result<FaultProxy> {
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let (cut_tx, _) = watch::channel(0u64);
        let shared = Arc::new(Shared {
            settings: Mutex::new(Settings { faults, upstream }),
            rng: Mutex::new(fastrand::Rng::with_seed(seed)),
            cut_tx,
            counters: Counters::default(),
        });
        let accept = tokio::spawn(accept_loop(listener, shared.clone()));
        let cutter = tokio::spawn(cut_loop(shared.clone()));
        Ok(FaultProxy {
            addr,
            shared,
            accept,
            cutter,
        })
    }

    /// Where clients connect.
    #[must_use]
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The current faults.
    #[must_use]
    pub fn faults(&self) -> Faults {
        self.shared.faults()
    }

    /// Replaces the faults (applies to the next chunk and the next cut interval).
    pub fn set_faults(&self, faults: Faults) {
        if let Ok(mut s) = self.shared.settings.lock() {
            s.faults = faults;
        }
    }

    /// Changes the upstream for new connections (e.g. a restarted server on another port).
    pub fn set_upstream(&self, upstream: SocketAddr) {
        if let Ok(mut s) = self.shared.settings.lock() {
            s.upstream = upstream;
        }
    }

    /// Closes every open connection now.
    pub fn cut(&self) {
        self.shared.cut();
    }

    /// What happened so far.
    #[must_use]
    pub fn stats(&self) -> ProxyStats {
        let c = &self.shared.counters;
        ProxyStats {
            connections: c.connections.load(Ordering::Relaxed),
            cuts: c.cuts.load(Ordering::Relaxed),
            corrupted: c.corrupted.load(Ordering::Relaxed),
            bytes_up: c.bytes_up.load(Ordering::Relaxed),
            bytes_down: c.bytes_down.load(Ordering::Relaxed),
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        // Aborting the accept loop drops its JoinSet, which aborts every connection.
        self.accept.abort();
        self.cutter.abort();
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((client, _)) = accepted else {
                    // Out of descriptors or similar: back off briefly.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                if conns.len() >= CONNECTIONS_MAX {
                    continue;
                }
                let upstream = match shared.settings.lock() {
                    Ok(s) => s.upstream,
                    Err(_) => continue,
                };
                conns.spawn(relay(client, upstream, shared.clone()));
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

async fn cut_loop(shared: Arc<Shared>) {
    let mut rng = shared.fork_rng();
    loop {
        let every = shared.faults().cut_every;
        match every {
            Some(mean) if !mean.is_zero() => {
                let ms = u64::try_from(mean.as_millis()).unwrap_or(u64::MAX).max(2);
                let wait = rng.u64(ms / 2..=ms + ms / 2);
                tokio::time::sleep(Duration::from_millis(wait)).await;
                if shared.faults().cut_every.is_some() {
                    shared.cut();
                }
            }
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

async fn relay(client: TcpStream, upstream: SocketAddr, shared: Arc<Shared>) {
    let mut cut_rx = shared.cut_tx.subscribe();
    let server =
        match tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(upstream)).await {
            Ok(Ok(s)) => s,
            _ => return,
        };
    shared.counters.connections.fetch_add(1, Ordering::Relaxed);
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_rd, client_wr) = client.into_split();
    let (server_rd, server_wr) = server.into_split();
    let mut up = pin!(pipe(client_rd, server_wr, Dir::Up, shared.clone()));
    let mut down = pin!(pipe(server_rd, client_wr, Dir::Down, shared.clone()));
    let (mut up_done, mut down_done) = (false, false);
    while !(up_done && down_done) {
        tokio::select! {
            clean = &mut up, if !up_done => {
                if !clean {
                    break;
                }
                up_done = true;
            }
            clean = &mut down, if !down_done => {
                if !clean {
                    break;
                }
                down_done = true;
            }
            _ = cut_rx.changed() => break,
        }
    }
    // Dropping the pipes closes all four halves.
}

/// Relays one direction; true when it ended cleanly (end of stream relayed), false on an error.
async fn pipe(rd: OwnedReadHalf, wr: OwnedWriteHalf, dir: Dir, shared: Arc<Shared>) -> bool {
    let (tx, rx) = mpsc::channel(CHUNKS_MAX);
    let rng = shared.fork_rng();
    let (read_ok, write_ok) = tokio::join!(
        read_side(rd, tx, dir, shared.clone(), rng),
        write_side(wr, rx, dir, shared)
    );
    read_ok && write_ok
}

async fn read_side(
    mut rd: OwnedReadHalf,
    tx: mpsc::Sender<(Instant, Bytes)>,
    dir: Dir,
    shared: Arc<Shared>,
    mut rng: fastrand::Rng,
) -> bool {
    loop {
        let mut buf = BytesMut::with_capacity(CHUNK_BYTES);
        match rd.read_buf(&mut buf).await {
            Ok(0) => return true,
            Ok(_) => {}
            Err(_) => return false,
        }
        let faults = shared.faults();
        if faults.corrupt_prob > 0.0 && rng.f64() < faults.corrupt_prob {
            let at = rng.usize(0..buf.len());
            buf[at] ^= rng.u8(1..=255);
            shared.counters.corrupted.fetch_add(1, Ordering::Relaxed);
        }
        let delay = match dir {
            Dir::Up => faults.delay_up,
            Dir::Down => faults.delay_down,
        };
        if tx
            .send((Instant::now() + delay, buf.freeze()))
            .await
            .is_err()
        {
            return false;
        }
    }
}

async fn write_side(
    mut wr: OwnedWriteHalf,
    mut rx: mpsc::Receiver<(Instant, Bytes)>,
    dir: Dir,
    shared: Arc<Shared>,
) -> bool {
    let mut link_free = Instant::now();
    while let Some((deliver_at, chunk)) = rx.recv().await {
        if deliver_at > Instant::now() {
            // The timer has millisecond resolution: a delay takes up to a millisecond longer.
            tokio::time::sleep_until(deliver_at).await;
        }
        let faults = shared.faults();
        let rate = match dir {
            Dir::Up => faults.bandwidth_up_bytes,
            Dir::Down => faults.bandwidth_down_bytes,
        };
        if rate > 0 {
            let now = Instant::now();
            let serialize = Duration::from_secs_f64(chunk.len() as f64 / rate as f64);
            link_free = link_free.max(now) + serialize;
            tokio::time::sleep_until(link_free).await;
        }
        if wr.write_all(&chunk).await.is_err() {
            return false;
        }
        let counter = match dir {
            Dir::Up => &shared.counters.bytes_up,
            Dir::Down => &shared.counters.bytes_down,
        };
        counter.fetch_add(chunk.len() as u64, Ordering::Relaxed);
    }
    // The reading side saw the end of its stream: pass it on.
    wr.shutdown().await.is_ok()
}
