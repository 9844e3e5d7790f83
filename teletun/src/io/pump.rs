//! Pump threads: move packets from a source to a sink, batch by batch, until
//! stopped or until either side fails.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;

use super::batch::PacketBatch;
use super::sys::{self, StopSignal};
use super::{PacketSink, PacketSource};
use crate::proto::packet;

/// Counters for one direction of a data plane.
#[derive(Debug, Default)]
pub struct DirectionStats {
    /// Packets delivered to the sink.
    pub packets: AtomicU64,
    /// Bytes delivered to the sink.
    pub bytes: AtomicU64,
    /// Packets dropped because they are not well-formed IP packets.
    pub malformed: AtomicU64,
    /// Packets the sink refused (too large, rejected by the kernel, failed decryption, …).
    pub refused: AtomicU64,
}

impl DirectionStats {
    fn add(counter: &AtomicU64, n: usize) {
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// One line for logs.
    pub fn summary(&self) -> String {
        format!(
            "{} packets, {} bytes, {} malformed, {} refused",
            self.packets.load(Ordering::Relaxed),
            self.bytes.load(Ordering::Relaxed),
            self.malformed.load(Ordering::Relaxed),
            self.refused.load(Ordering::Relaxed)
        )
    }
}

/// Why a pump ended.
#[derive(Debug)]
pub struct PumpExit {
    /// The pump's name, e.g. "tun→udp".
    pub name: &'static str,
    /// `Ok` when stopped on request.
    pub result: io::Result<()>,
}

/// Runs `source → sink` on a new thread. Every packet is checked with
/// [`packet::inspect`] when `check_packets` is set; failures are dropped and
/// counted. When the pump ends it reports on `exits`, then sets `stop` (so its
/// sibling ends too, and reports after it).
pub fn spawn<S, K>(
    name: &'static str,
    mut source: S,
    mut sink: K,
    check_packets: bool,
    stats: Arc<DirectionStats>,
    stop: Arc<StopSignal>,
    exits: tokio::sync::mpsc::UnboundedSender<PumpExit>,
) -> io::Result<thread::JoinHandle<()>>
where
    S: PacketSource + Send + 'static,
    K: PacketSink + Send + 'static,
{
    thread::Builder::new().name(name.into()).spawn(move || {
        let result = run(&mut source, &mut sink, check_packets, &stats, &stop);
        // Report first, then stop the siblings: the first report says why.
        let _ = exits.send(PumpExit { name, result });
        stop.stop();
    })
}

fn run<S: PacketSource, K: PacketSink>(
    source: &mut S,
    sink: &mut K,
    check_packets: bool,
    stats: &DirectionStats,
    stop: &StopSignal,
) -> io::Result<()> {
    let mut batch = PacketBatch::new();
    let fds = [source.fd(), stop.fd()];
    loop {
        match sys::wait(&fds, libc::POLLIN, None)? {
            Some(1) => return Ok(()),
            Some(_) => {}
            None => continue,
        }
        // Drain the source before polling again: one poll per burst, not per batch.
        loop {
            batch.clear();
            if source.recv(&mut batch)? == 0 {
                break;
            }
            if check_packets {
                let before = batch.len();
                batch.retain(|p, _| packet::inspect(p).is_ok());
                DirectionStats::add(&stats.malformed, before - batch.len());
            }
            if batch.is_empty() {
                continue;
            }
            let refused = sink.send(&batch)?;
            DirectionStats::add(&stats.refused, refused);
            DirectionStats::add(&stats.packets, batch.len() - refused);
            DirectionStats::add(&stats.bytes, batch.iter().map(<[u8]>::len).sum());
            if stop.is_stopped() {
                return Ok(());
            }
        }
    }
}

/// Two pumps, one per direction, that stop together.
pub struct DataPlane {
    stop: Arc<StopSignal>,
    threads: Vec<thread::JoinHandle<()>>,
    exits: tokio::sync::mpsc::UnboundedReceiver<PumpExit>,
    exits_tx: tokio::sync::mpsc::UnboundedSender<PumpExit>,
    /// Towards the peer ("outbound" from this role's local side).
    pub outbound: Arc<DirectionStats>,
    /// From the peer.
    pub inbound: Arc<DirectionStats>,
}

/// One direction of a [`DataPlane`]: a name, a source, a sink, and whether to
/// check packets.
pub struct Direction<S, K> {
    /// Thread name, e.g. "tun→dtls".
    pub name: &'static str,
    /// Where packets come from.
    pub source: S,
    /// Where they go.
    pub sink: K,
    /// Drop (and count) packets that are not well-formed IP.
    pub check_packets: bool,
}

impl DataPlane {
    /// Starts both directions.
    pub fn start<S1, K1, S2, K2>(outbound: Direction<S1, K1>, inbound: Direction<S2, K2>) -> io::Result<Self>
    where
        S1: PacketSource + Send + 'static,
        K1: PacketSink + Send + 'static,
        S2: PacketSource + Send + 'static,
        K2: PacketSink + Send + 'static,
    {
        let stop = Arc::new(StopSignal::new()?);
        let (tx, exits) = tokio::sync::mpsc::unbounded_channel();
        let out_stats = Arc::new(DirectionStats::default());
        let in_stats = Arc::new(DirectionStats::default());
        let mut threads = Vec::new();
        threads.push(spawn(
            outbound.name,
            outbound.source,
            outbound.sink,
            outbound.check_packets,
            out_stats.clone(),
            stop.clone(),
            tx.clone(),
        )?);
        match spawn(
            inbound.name,
            inbound.source,
            inbound.sink,
            inbound.check_packets,
            in_stats.clone(),
            stop.clone(),
            tx.clone(),
        ) {
            Ok(t) => threads.push(t),
            Err(e) => {
                stop.stop();
                for t in threads {
                    let _ = t.join();
                }
                return Err(e);
            }
        }
        Ok(DataPlane {
            stop,
            threads,
            exits,
            exits_tx: tx,
            outbound: out_stats,
            inbound: in_stats,
        })
    }

    /// Runs `task` on its own thread as part of this data plane: it gets the
    /// stop signal, and its end (error or not) ends the data plane like a
    /// pump's would. Used for the DTLS heartbeat.
    pub fn spawn_task<F>(&mut self, name: &'static str, task: F) -> io::Result<()>
    where
        F: FnOnce(&StopSignal) -> io::Result<()> + Send + 'static,
    {
        let stop = self.stop.clone();
        let exits = self.exits_tx.clone();
        let t = thread::Builder::new().name(name.into()).spawn(move || {
            let result = task(&stop);
            let _ = exits.send(PumpExit { name, result });
            stop.stop();
        })?;
        self.threads.push(t);
        Ok(())
    }

    /// Waits until a pump ends (it failed, or its peer closed).
    pub async fn ended(&mut self) -> PumpExit {
        match self.exits.recv().await {
            Some(exit) => exit,
            None => PumpExit {
                name: "data plane",
                result: Ok(()),
            },
        }
    }

    /// Stops both pumps and waits for their threads.
    pub fn stop(self) {
        self.stop.stop();
        for t in self.threads {
            let _ = t.join();
        }
    }
}
