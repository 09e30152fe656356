//! The TCP side of a proxy: accepting clients, dialing upstream and running each direction's
//! bytes through the toxics of that stream.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use rand::Rng;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::{sleep_until, Instant};

use crate::types::{Stream, Toxic, ToxicKind};

/// The toxic list of a proxy; connections watch it so changes reach them immediately.
pub(crate) type ToxicList = Arc<Vec<Toxic>>;

const READ_SIZE: usize = 32 * 1024;

/// A listening proxy. Stopping it closes the listener and every connection it accepted.
pub(crate) struct Running {
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Running {
    /// Binds `addr` and starts accepting; returns the bound address.
    pub(crate) async fn start(
        addr: SocketAddr,
        upstream: &str,
        toxics: watch::Receiver<ToxicList>,
    ) -> io::Result<(Running, SocketAddr)> {
        let listener = TcpListener::bind(addr).await?;
        let bound = listener.local_addr()?;
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(accept_loop(listener, upstream.into(), toxics, stopped));
        let running = Running {
            stop: Some(stop),
            task,
        };
        Ok((running, bound))
    }

    /// Stops and waits until the listener and all connections are closed, so the port can
    /// be bound again as soon as this returns.
    pub(crate) async fn stop(mut self) {
        self.stop.take();
        let _ = (&mut self.task).await;
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: Arc<str>,
    toxics: watch::Receiver<ToxicList>,
    mut stopped: oneshot::Receiver<()>,
) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut stopped => break,
            accepted = listener.accept() => match accepted {
                Ok((client, peer)) => {
                    tracing::debug!(%peer, %upstream, "accepted client");
                    conns.spawn(connection(client, upstream.clone(), toxics.clone()));
                }
                Err(e) => {
                    // Typically out of file descriptors: pause rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    drop(listener);
    // Aborting drops the sockets, which the peers see as EOF or reset, like a crashed host.
    conns.shutdown().await;
}

/// How one direction ended; the whole connection closes either way, as in Toxiproxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Close,
    Reset,
}

async fn connection(mut client: TcpStream, upstream: Arc<str>, toxics: watch::Receiver<ToxicList>) {
    let mut server = match TcpStream::connect(&*upstream).await {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(%upstream, error = %e, "upstream unreachable");
            return;
        }
    };
    // Toxiproxy (Go) sets TCP_NODELAY by default; latency measurements depend on it.
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let end = {
        let (cr, cw) = client.split();
        let (sr, sw) = server.split();
        // As in Toxiproxy, the end of one direction closes the other's source, which then
        // sees EOF and runs its own close path (slow_close) before the connection closes.
        let (close_up, up_closed) = oneshot::channel::<()>();
        let (close_down, down_closed) = oneshot::channel::<()>();
        let up = direction(cr, sw, Stream::Upstream, toxics.clone(), up_closed);
        let down = direction(sr, cw, Stream::Downstream, toxics, down_closed);
        tokio::pin!(up, down);
        tokio::select! {
            e = &mut up => match e {
                End::Reset => e,
                End::Close => { drop(close_down); down.await }
            },
            e = &mut down => match e {
                End::Reset => e,
                End::Close => { drop(close_up); up.await }
            },
        }
    };
    if end == End::Reset {
        let _ = client.set_zero_linger();
        let _ = server.set_zero_linger();
    }
}

/// Reads ahead on its own so that held data (latency) keeps its arrival time and delays do
/// not add up across chunks.
async fn direction<R, W>(
    mut src: R,
    dst: W,
    stream: Stream,
    toxics: watch::Receiver<ToxicList>,
    source_closed: oneshot::Receiver<()>,
) -> End
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (tx, rx) = mpsc::channel::<(Instant, Bytes)>(8);
    let reader = async move {
        let mut buf = BytesMut::new();
        loop {
            buf.reserve(READ_SIZE);
            match src.read_buf(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    if tx
                        .send((Instant::now(), buf.split().freeze()))
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
        drop(tx);
        std::future::pending::<End>().await
    };
    let mut pipe = Pipe {
        stream,
        toxics,
        dst,
        active: Vec::new(),
        drawn: HashMap::new(),
        timeouts: HashMap::new(),
        reset_at: None,
        passed: HashMap::new(),
        bw_next: None,
    };
    let ended = tokio::select! {
        e = reader => Some(e),
        e = pipe.run(rx) => Some(e),
        // Data still queued from a source closed by the peer direction is lost, as in Toxiproxy.
        _ = source_closed => None,
    };
    match ended {
        Some(end) => end,
        None => pipe.eof().await,
    }
}

/// Per-direction toxic state of one connection.
struct Pipe<W> {
    stream: Stream,
    toxics: watch::Receiver<ToxicList>,
    dst: W,
    /// Toxics of this stream that won their toxicity draw, in order.
    active: Vec<Toxic>,
    /// Toxicity draws, once per toxic (and version of it) per connection.
    drawn: HashMap<String, (Toxic, bool)>,
    /// Active timeout toxics and when they began to apply here.
    timeouts: HashMap<String, (Instant, u64)>,
    reset_at: Option<Instant>,
    /// Bytes written while each limit_data toxic was active.
    passed: HashMap<String, u64>,
    bw_next: Option<Instant>,
}

enum Event {
    Chunk(Option<(Instant, Bytes)>),
    Changed(bool),
    Deadline,
    Ready,
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => sleep_until(at).await,
        None => std::future::pending().await,
    }
}

impl<W: AsyncWrite + Unpin> Pipe<W> {
    async fn run(&mut self, mut rx: mpsc::Receiver<(Instant, Bytes)>) -> End {
        if let Err(e) = self.refresh() {
            return e;
        }
        loop {
            let deadline = self.deadline();
            let event = tokio::select! {
                c = rx.recv() => Event::Chunk(c),
                c = self.toxics.changed() => Event::Changed(c.is_ok()),
                _ = sleep_until_opt(deadline.map(|d| d.0)) => Event::Deadline,
            };
            let result = match event {
                Event::Chunk(Some((at, data))) => self.deliver(at, data).await,
                Event::Chunk(None) => return self.eof().await,
                Event::Changed(true) => self.refresh(),
                Event::Changed(false) => return End::Close,
                Event::Deadline | Event::Ready => return deadline.map_or(End::Close, |d| d.1),
            };
            if let Err(end) = result {
                return end;
            }
        }
    }

    /// Re-reads the toxic list. A timeout toxic that has gone closes the connection, as
    /// Toxiproxy does: the bytes it dropped would otherwise corrupt the stream.
    fn refresh(&mut self) -> Result<(), End> {
        let all = self.toxics.borrow_and_update().clone();
        let mine: Vec<&Toxic> = all.iter().filter(|t| t.stream == self.stream).collect();
        self.drawn.retain(|n, _| mine.iter().any(|t| &t.name == n));
        self.passed.retain(|n, _| mine.iter().any(|t| &t.name == n));
        let mut rng = rand::thread_rng();
        let mut active = Vec::new();
        for t in mine {
            // Toxiproxy draws again when a toxic is updated, so the draw is kept per version.
            let draw = match self.drawn.get(&t.name) {
                Some((seen, hit)) if seen == t => *hit,
                _ => {
                    let hit = t.toxicity >= 1.0 || rng.gen::<f32>() < t.toxicity;
                    self.drawn.insert(t.name.clone(), (t.clone(), hit));
                    hit
                }
            };
            if draw {
                active.push(t.clone());
            }
        }
        self.active = active;
        let now = Instant::now();
        let mut timeouts = HashMap::new();
        for t in &self.active {
            if let ToxicKind::Timeout { timeout } = t.kind {
                let since = match self.timeouts.get(&t.name) {
                    Some(&(since, ms)) if ms == timeout => since,
                    _ => now,
                };
                timeouts.insert(t.name.clone(), (since, timeout));
            }
        }
        let removed = |n: &String| !all.iter().any(|t| &t.name == n && t.stream == self.stream);
        if self.timeouts.keys().any(removed) {
            return Err(End::Close);
        }
        self.timeouts = timeouts;
        if !self
            .active
            .iter()
            .any(|t| matches!(t.kind, ToxicKind::ResetPeer { .. }))
        {
            self.reset_at = None;
        }
        Ok(())
    }

    /// The earliest forced end of this direction, if any.
    fn deadline(&self) -> Option<(Instant, End)> {
        let timeouts = self
            .timeouts
            .values()
            .filter(|(_, ms)| *ms > 0)
            .map(|(since, ms)| (*since + Duration::from_millis(*ms), End::Close));
        timeouts
            .chain(self.reset_at.map(|at| (at, End::Reset)))
            .min_by_key(|d| d.0)
    }

    async fn eof(&mut self) -> End {
        let delay = self
            .active
            .iter()
            .filter_map(|t| match t.kind {
                ToxicKind::SlowClose { delay } => Some(delay),
                _ => None,
            })
            .max();
        if let Some(ms) = delay {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        End::Close
    }

    /// Writes one chunk through the active toxics. The plan is rebuilt whenever the toxic
    /// list changes while data is held, so removing a toxic releases held data at once.
    async fn deliver(&mut self, read_at: Instant, mut data: Bytes) -> Result<(), End> {
        'plan: loop {
            let Some(plan) = self.plan(data.len()) else {
                // A timeout or reset_peer toxic drops the data on the floor.
                if let Some(timeout) = self.active.iter().find_map(|t| match t.kind {
                    ToxicKind::ResetPeer { timeout } => Some(timeout),
                    _ => None,
                }) {
                    let at = Instant::now() + Duration::from_millis(timeout);
                    self.reset_at.get_or_insert(at);
                }
                return Ok(());
            };
            let rate = self.bandwidth();
            for (offset, len) in plan.pieces {
                let mut ready = read_at + offset;
                if let Some(rate) = rate {
                    let start = self.bw_next.map_or(ready, |n| n.max(ready));
                    ready = start.max(Instant::now()) + cost(len, rate);
                }
                let deadline = self.deadline();
                let event = tokio::select! {
                    _ = sleep_until(ready) => Event::Ready,
                    c = self.toxics.changed() => Event::Changed(c.is_ok()),
                    _ = sleep_until_opt(deadline.map(|d| d.0)) => Event::Deadline,
                };
                match event {
                    Event::Changed(true) => {
                        self.refresh()?;
                        continue 'plan;
                    }
                    Event::Changed(false) => return Err(End::Close),
                    Event::Deadline => return Err(deadline.map_or(End::Close, |d| d.1)),
                    Event::Ready | Event::Chunk(_) => {}
                }
                if self.dst.write_all(&data[..len]).await.is_err() {
                    return Err(End::Close);
                }
                data.advance(len);
                if rate.is_some() {
                    self.bw_next = Some(ready);
                }
                for t in &self.active {
                    if matches!(t.kind, ToxicKind::LimitData { .. }) {
                        *self.passed.entry(t.name.clone()).or_insert(0) += len as u64;
                    }
                }
            }
            return if plan.close_after {
                Err(End::Close)
            } else {
                Ok(())
            };
        }
    }

    fn bandwidth(&self) -> Option<u64> {
        self.active
            .iter()
            .filter_map(|t| match t.kind {
                ToxicKind::Bandwidth { rate } if rate > 0 => Some(rate),
                _ => None,
            })
            .min()
    }

    /// Splits `len` bytes into timed pieces (offsets from arrival); `None` drops them.
    fn plan(&self, len: usize) -> Option<Plan> {
        let mut rng = rand::thread_rng();
        let mut pieces = vec![(Duration::ZERO, len)];
        let mut close_after = false;
        for t in &self.active {
            match t.kind {
                ToxicKind::Timeout { .. } | ToxicKind::ResetPeer { .. } => return None,
                ToxicKind::Latency { latency, jitter } => {
                    let ms = if jitter > 0 {
                        (latency + rng.gen_range(0..jitter.saturating_mul(2)))
                            .saturating_sub(jitter)
                    } else {
                        latency
                    };
                    for p in &mut pieces {
                        p.0 += Duration::from_millis(ms);
                    }
                }
                // Large chunks at a low rate go out in 100 ms slices rather than one burst.
                ToxicKind::Bandwidth { rate } if rate > 0 => {
                    let max = usize::try_from(rate.saturating_mul(100)).unwrap_or(usize::MAX);
                    pieces = split(&pieces, || max, Duration::ZERO);
                }
                ToxicKind::Slicer {
                    average_size,
                    size_variation,
                    delay,
                } => {
                    let var = size_variation.min(average_size);
                    let size = || {
                        let s = average_size - var + rng.gen_range(0..=var * 2);
                        usize::try_from(s.max(1)).unwrap_or(usize::MAX)
                    };
                    pieces = split(&pieces, size, Duration::from_micros(delay));
                }
                ToxicKind::LimitData { bytes } => {
                    let passed = self.passed.get(&t.name).copied().unwrap_or(0);
                    let mut left = bytes.saturating_sub(passed);
                    let total: u64 = pieces.iter().map(|p| p.1 as u64).sum();
                    close_after |= total >= left;
                    pieces.retain_mut(|p| {
                        let take = (p.1 as u64).min(left);
                        left -= take;
                        p.1 = take as usize;
                        take > 0
                    });
                }
                ToxicKind::Bandwidth { .. } | ToxicKind::SlowClose { .. } => {}
            }
        }
        Some(Plan {
            pieces,
            close_after,
        })
    }
}

struct Plan {
    /// (offset from arrival, length) in stream order.
    pieces: Vec<(Duration, usize)>,
    close_after: bool,
}

fn split(
    pieces: &[(Duration, usize)],
    mut size: impl FnMut() -> usize,
    gap: Duration,
) -> Vec<(Duration, usize)> {
    let mut out = Vec::new();
    for &(offset, len) in pieces {
        let mut left = len;
        let mut at = offset;
        while left > 0 {
            let n = size().clamp(1, left);
            out.push((at, n));
            left -= n;
            at += gap;
        }
    }
    out
}

/// Time to send `len` bytes at `rate` KB/s.
fn cost(len: usize, rate: u64) -> Duration {
    Duration::from_micros((len as u64).saturating_mul(1000) / rate.max(1))
}
