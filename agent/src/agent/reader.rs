//! The ring reader: the only consumer of the commit ring. It turns records into events for
//! the scheduler, beats the agent's heart, and moves to a new ring when the scheduler made one
//! (the old file was deleted or replaced under the agent).

use super::*;

/// The ring reader: turns records into events, and moves to a new ring when the scheduler
/// sends one (the old file was deleted or replaced under the agent).
pub(super) fn spawn_ring_reader(
    ring: Arc<RingFile>,
    new_rings: Receiver<Arc<RingFile>>,
    events: Sender<Event>,
    stop: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("ring".into())
        .spawn(move || {
            let closed = std::cell::Cell::new(false);
            let mut ring = ring;
            loop {
                let mut next = None;
                read_ring(ring.ring(), &events, &closed, &metrics, || {
                    if let Ok(new) = new_rings.try_recv() {
                        next = Some(new);
                    }
                    stop.load(Ordering::Relaxed) || next.is_some()
                });
                match next {
                    Some(new) if !closed.get() => ring = new,
                    _ => return,
                }
            }
        })
}

fn read_ring(
    ring: layout::Ring<'_>,
    events: &Sender<Event>,
    closed: &std::cell::Cell<bool>,
    metrics: &Metrics,
    mut stop: impl FnMut() -> bool,
) {
    crate::agent::ring::read_loop(
        ring,
        |_, _| closed.get() || stop(),
        |record| {
            let event = match record {
                Record::Commit(c) => {
                    metrics.ring_commits.fetch_add(1, Ordering::Relaxed);
                    Event::Commit {
                        dev: c.dev,
                        ino: c.ino,
                        time_ns: c.time_ns,
                    }
                }
                Record::Register { dev, ino, path, .. } => Event::Register {
                    dev: *dev,
                    ino: *ino,
                    path: path.clone(),
                },
            };
            closed.set(events.send(event).is_err());
        },
    );
}
