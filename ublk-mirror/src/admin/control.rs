//! The control socket: JSON lines (see [`super`] for the protocol), at most
//! [`CONTROL_CONNECTIONS_MAX`] clients at once, each line bounded by [`LINE_BYTES_MAX`].

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{bail, Context};
use mirror_core::source::Mode;
use mirror_core::Seq;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use super::config::Settings;
use super::{client, Request, Response, LINE_BYTES_MAX};
use crate::device::{Started, TermSignals};
use crate::replicator::Handle;

/// What a mirror request gets from a daemon in passthrough.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("mirroring is off (the daemon was started with --no-mirror)")]
pub(super) struct MirrorOff;

/// Control connections served at once.
pub const CONTROL_CONNECTIONS_MAX: usize = 32;

/// Shared between the socket server and the main thread.
pub(super) struct DaemonState {
    pub(super) s: Settings,
    pub(super) volume_bytes: u64,
    /// `None`: passthrough (`--no-mirror`).
    pub(super) repl: Option<Handle>,
    /// When the replicator started (its clock's origin, for the lag in seconds).
    pub(super) epoch: tokio::time::Instant,
    device: Mutex<Option<Started>>,
    stopping: AtomicBool,
}

impl DaemonState {
    pub(super) fn new(
        s: Settings,
        volume_bytes: u64,
        repl: Option<Handle>,
        epoch: tokio::time::Instant,
    ) -> DaemonState {
        DaemonState {
            s,
            volume_bytes,
            repl,
            epoch,
            device: Mutex::new(None),
            stopping: AtomicBool::new(false),
        }
    }

    /// The device is live.
    pub(super) fn set_started(&self, started: Started) {
        *self.device.lock().unwrap_or_else(PoisonError::into_inner) = Some(started);
    }

    /// The device, once live.
    pub(super) fn started(&self) -> Option<Started> {
        self.device
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The daemon is on its way out; returns whether it already was.
    pub(super) fn set_stopping(&self) -> bool {
        self.stopping.swap(true, Ordering::SeqCst)
    }

    pub(super) fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Relaxed)
    }

    /// The mirror's handle, or the error every mirror request gets in passthrough.
    fn repl(&self) -> Result<&Handle, MirrorOff> {
        self.repl.as_ref().ok_or(MirrorOff)
    }

    async fn handle(&self, req: Request) -> Response {
        match req {
            Request::Status => match self.status().await {
                Ok(st) => Response {
                    ok: true,
                    status: Some(st),
                    ..Response::default()
                },
                Err(e) => Response::err(e.to_string()),
            },
            Request::SetMode { mode } => match (self.repl(), mode.parse::<Mode>()) {
                (Err(e), _) => Response::err(e.to_string()),
                (_, Err(e)) => Response::err(e),
                (Ok(repl), Ok(m)) => match repl.set_mode(m).await {
                    Ok(()) => {
                        eprintln!("ublk-mirror: mode set to {m}");
                        Response::ok()
                    }
                    Err(e) => Response::err(e.to_string()),
                },
            },
            Request::WaitReplicated { seq, timeout_secs } => {
                let repl = match self.repl() {
                    Ok(r) => r,
                    Err(e) => return Response::err(e.to_string()),
                };
                let secs = timeout_secs.unwrap_or(60.0);
                if !(secs.is_finite() && (0.0..=86_400.0).contains(&secs)) {
                    return Response::err(format!("timeout {secs} s: must be 0 to 86400"));
                }
                let seq = match seq {
                    Some(n) => Seq(n),
                    None => match repl.status().await {
                        Ok(st) => st.everything_so_far,
                        Err(e) => return Response::err(e.to_string()),
                    },
                };
                let wait = repl.wait_replicated(seq);
                match tokio::time::timeout(Duration::from_secs_f64(secs), wait).await {
                    Ok(Ok(())) => Response {
                        ok: true,
                        seq: Some(seq.0),
                        ..Response::default()
                    },
                    Ok(Err(e)) => Response::err(e.to_string()),
                    Err(_) => {
                        Response::err(format!("seq {} not replicated within {secs} s", seq.0))
                    }
                }
            }
            Request::Stop => {
                if !self.set_stopping() {
                    eprintln!("ublk-mirror: stop requested over the control socket");
                    TermSignals::raise_term();
                }
                Response::ok()
            }
        }
    }
}

pub(super) async fn serve(listener: UnixListener, state: Arc<DaemonState>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(CONTROL_CONNECTIONS_MAX));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            drop(stream); // too many clients: refuse by closing
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            serve_conn(stream, &state).await;
            drop(permit);
        });
    }
}

async fn serve_conn(stream: UnixStream, state: &DaemonState) {
    let (rd, mut wr) = stream.into_split();
    let limit = u64::try_from(LINE_BYTES_MAX).unwrap_or(u64::MAX);
    let mut rd = BufReader::new(rd.take(limit));
    let mut line = String::new();
    loop {
        line.clear();
        match rd.read_line(&mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let resp = if line.ends_with('\n') {
            match serde_json::from_str::<Request>(&line) {
                Ok(req) => state.handle(req).await,
                Err(e) => Response::err(format!("bad request: {e}")),
            }
        } else {
            Response::err(format!("request longer than {LINE_BYTES_MAX} bytes"))
        };
        let Ok(mut text) = serde_json::to_string(&resp) else {
            return;
        };
        text.push('\n');
        if wr.write_all(text.as_bytes()).await.is_err() {
            return;
        }
        if !line.ends_with('\n') {
            return;
        }
        // `take` bounds the whole connection: allow another full line.
        rd.get_mut().set_limit(limit);
    }
}

pub(super) fn bind_socket(path: &Path) -> anyhow::Result<std::os::unix::net::UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create directory {}", dir.display()))?;
    }
    if client::is_live(path) {
        bail!(
            "control socket {} is already in use by a running daemon",
            path.display()
        );
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => bail!("cannot remove stale socket {}: {e}", path.display()),
    }
    let l = std::os::unix::net::UnixListener::bind(path)
        .with_context(|| format!("cannot bind control socket {}", path.display()))?;
    l.set_nonblocking(true)
        .context("cannot make the control socket non-blocking")?;
    Ok(l)
}
