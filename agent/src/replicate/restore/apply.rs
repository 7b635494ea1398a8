//! Writing a restore: the decoding side turns each LTX file's pages into runs of consecutive
//! pages and keeps their checksums, the writing side (another core, for all but a small
//! restore) writes the runs where they belong and keeps the kernel's writeback going, so a
//! restore runs at close to the speed of copying the file.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::ltx::{self, Decoder};
use crate::replica::FileInfo;

/// Pages travel from the decoding thread to the writing thread in runs of consecutive pages.
pub(super) enum Chunk {
    /// Pages `start`.. in the first `len` bytes of `data`.
    Run {
        start: u32,
        page_size: usize,
        data: Vec<u8>,
        len: usize,
    },
    /// A file ended: the database is now `commit` pages long.
    End { commit: u32, page_size: u32 },
}

/// The largest run handed over (and written) at once; a multiple of every page size. Larger
/// writes are fewer calls, but on the 2-core VM the restore is measured on (Linux 6.18, ext4)
/// the kernel copied them into the page cache far more slowly at times: 1 MiB runs made a
/// 1 GiB restore up to twice as slow, 4 MiB ones three to four times; 128 to 512 KiB measured
/// alike.
pub(super) const RUN_BYTES: usize = 512 * 1024;
/// A restore whose replica files hold at most this many bytes is small: it runs on the calling
/// thread alone (no download, writing or fsync threads), in runs of [`SMALL_RUN_BYTES`].
/// Starting those threads cost more than the whole restore of a few-KiB database, which is
/// what `restore --all` mostly meets.
const SMALL_RESTORE_BYTES: u64 = 1 << 20;
pub(super) const SMALL_RUN_BYTES: usize = 64 * 1024;

pub(super) fn is_small(chain: &[FileInfo]) -> bool {
    chain.iter().map(|f| f.size).sum::<u64>() <= SMALL_RESTORE_BYTES
}

/// Runs in flight between the two threads (bounded: memory stays a few MiB).
pub(super) const RUNS_IN_FLIGHT: usize = 4;
/// Input buffered per LTX file: few read calls, and most payloads decompress straight out of
/// the buffer rather than being copied out first.
const INPUT_BUFFER: usize = 256 * 1024;
/// Written bytes after which the kernel is asked to start writing them back, so the disk works
/// while pages are still decoded and the closing fsync finds little left to do. Without it a
/// restore smaller than the dirty-page threshold (10% of memory by default) reaches the disk
/// only at that fsync: a 1 GiB restore took 750 ms rather than 570 ms. 8 and 32 MiB measured
/// alike, 128 MiB started too late.
const WRITEBACK_BYTES: usize = 8 << 20;

/// The decoding side: decodes pages straight into runs (one write per run rather than per
/// page), keeps their checksums and hands the runs to [`write_runs`] on the other core.
pub(super) struct Applier<'a> {
    sink: Sink<'a>,
    page_size: usize,
    /// [`RUN_BYTES`] long ([`SMALL_RUN_BYTES`] for a small restore); the first `filled`
    /// bytes hold pages `run_start`...
    run: Vec<u8>,
    filled: usize,
    run_start: u32,
    /// Page checksums of the database as applied so far (index pgno-1; 0 for none).
    pub(super) sums: Vec<u64>,
    /// The database's size in pages after the files applied so far.
    db_pages: u32,
}

/// Where an [`Applier`]'s runs go.
pub(super) enum Sink<'a> {
    /// To [`write_runs`] on another thread, and buffers back for reuse.
    Thread {
        tx: std::sync::mpsc::SyncSender<Chunk>,
        spare: std::sync::mpsc::Receiver<Vec<u8>>,
    },
    /// Written here: a small restore, where starting threads would cost more than the
    /// overlap saves. The buffer of the last run written is kept for the next.
    Direct {
        out: &'a File,
        spare: Option<Vec<u8>>,
    },
}

fn writer_gone() -> io::Error {
    io::Error::other("the restore's writing thread stopped")
}

impl<'a> Applier<'a> {
    /// An applier handing runs of up to `run_bytes` to `sink`.
    pub(super) fn new(sink: Sink<'a>, run_bytes: usize) -> Applier<'a> {
        Applier {
            sink,
            page_size: 0,
            run: vec![0; run_bytes],
            filled: 0,
            run_start: 0,
            sums: Vec::new(),
            db_pages: 0,
        }
    }

    /// Room for the next page, at the end of the current run.
    fn slot(&mut self, page_size: usize) -> io::Result<&mut [u8]> {
        if page_size != self.page_size || self.filled + page_size > self.run.len() {
            self.flush()?;
            self.page_size = page_size;
        }
        Ok(&mut self.run[self.filled..self.filled + page_size])
    }

    /// The slot now holds page `pgno`, whose page checksum is `sum`.
    fn commit(&mut self, pgno: u32, sum: u64) -> io::Result<()> {
        let page_size = self.page_size;
        if self.filled == 0 {
            self.run_start = pgno;
        } else if pgno != self.run_start + (self.filled / page_size) as u32 {
            // Not the next page: the run ends before it and a new one starts with it.
            let mut fresh = self.fresh_run();
            fresh[..page_size].copy_from_slice(&self.run[self.filled..self.filled + page_size]);
            let run = std::mem::replace(&mut self.run, fresh);
            self.send_run(run)?;
            self.run_start = pgno;
        }
        self.filled += page_size;
        let index = (pgno - 1) as usize;
        if self.sums.len() <= index {
            self.sums.resize(index + 1, 0);
        }
        self.sums[index] = sum;
        Ok(())
    }

    fn fresh_run(&mut self) -> Vec<u8> {
        let len = self.run.len();
        let spare = match &mut self.sink {
            Sink::Thread { spare, .. } => spare.try_recv().ok(),
            Sink::Direct { spare, .. } => spare.take(),
        };
        spare.unwrap_or_else(|| vec![0; len])
    }

    fn send_run(&mut self, data: Vec<u8>) -> io::Result<()> {
        let len = std::mem::take(&mut self.filled);
        match &mut self.sink {
            Sink::Thread { tx, .. } => {
                let chunk = Chunk::Run {
                    start: self.run_start,
                    page_size: self.page_size,
                    data,
                    len,
                };
                tx.send(chunk).map_err(|_| writer_gone())
            }
            Sink::Direct { out, spare } => {
                let offset = u64::from(self.run_start - 1) * self.page_size as u64;
                out.write_all_at(&data[..len], offset)?;
                *spare = Some(data);
                Ok(())
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.filled == 0 {
            return Ok(());
        }
        let fresh = self.fresh_run();
        let run = std::mem::replace(&mut self.run, fresh);
        self.send_run(run)
    }

    fn end_file(&mut self, commit: u32, page_size: u32) -> io::Result<()> {
        self.flush()?;
        self.sums.truncate(commit as usize);
        self.db_pages = commit;
        match &self.sink {
            Sink::Thread { tx, .. } => tx
                .send(Chunk::End { commit, page_size })
                .map_err(|_| writer_gone()),
            Sink::Direct { out, .. } => out.set_len(u64::from(commit) * u64::from(page_size)),
        }
    }
}

/// The writing side: writes each run where it belongs and keeps writeback going.
pub(super) fn write_runs(
    out: &File,
    rx: std::sync::mpsc::Receiver<Chunk>,
    spare: std::sync::mpsc::SyncSender<Vec<u8>>,
) -> io::Result<()> {
    // Starting writeback blocks while the disk's queue is full, so a third thread does it and
    // the writes never wait for it; a kick it has not yet taken covers later writes too.
    let (kick, kicks) = std::sync::mpsc::sync_channel::<()>(1);
    std::thread::scope(|scope| {
        scope.spawn(move || {
            for () in kicks {
                start_writeback(out);
            }
        });
        let mut unsynced = 0;
        let written = (|| {
            for chunk in rx {
                match chunk {
                    Chunk::Run {
                        start,
                        page_size,
                        data,
                        len,
                    } => {
                        out.write_all_at(&data[..len], u64::from(start - 1) * page_size as u64)?;
                        unsynced += len;
                        if unsynced >= WRITEBACK_BYTES {
                            let _ = kick.try_send(());
                            unsynced = 0;
                        }
                        let _ = spare.try_send(data);
                    }
                    Chunk::End { commit, page_size } => {
                        out.set_len(u64::from(commit) * u64::from(page_size))?;
                    }
                }
            }
            Ok(())
        })();
        drop(kick);
        written
    })
}

/// Asks the kernel to start writing `file`'s dirty pages back, without waiting. Only a hint:
/// the fsync at the end reports any failure.
#[cfg(target_os = "linux")]
fn start_writeback(file: &File) {
    use std::os::fd::AsRawFd;
    // SAFETY: the descriptor is open for the duration of the call; no memory is passed.
    unsafe { libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
}

#[cfg(not(target_os = "linux"))]
fn start_writeback(_file: &File) {}

/// The database checksum of a set of page checksums.
pub(crate) fn database_checksum(sums: &[u64]) -> u64 {
    sums.iter()
        .filter(|s| **s != 0)
        .fold(ltx::EMPTY_DATABASE_CHECKSUM, |c, s| {
            ltx::toggle_page_checksum(c, *s)
        })
}

/// Applies one downloaded file; returns its header and post-apply checksum. The outer error is
/// a local I/O failure, the inner one a corrupt file.
pub(super) fn apply(
    path: &Path,
    applier: &mut Applier<'_>,
) -> io::Result<Result<(ltx::Header, u64), ltx::LtxError>> {
    let file = File::open(path)?;
    let len = file.metadata()?.len();
    let mut decoder = match Decoder::with_capacity(INPUT_BUFFER, file) {
        Ok(d) => d,
        Err(e) => return Ok(Err(e)),
    };
    let header = *decoder.header();
    // Numbers from the file size what is allocated and written (a page checksum per page,
    // the database's length): each must be justified by the file's length first. A file
    // may add to the database at most the pages it can hold.
    if let Err(e) = ltx::check_header_against_len(&header, len) {
        return Ok(Err(e));
    }
    let max_pages = ltx::max_pages_in(len);
    let growth = u64::from(header.commit).saturating_sub(u64::from(applier.db_pages));
    if growth > max_pages {
        return Ok(Err(ltx::LtxError::TooLarge {
            what: format!(
                "header grows the database from {} to {} pages",
                applier.db_pages, header.commit
            ),
            len,
            max_pages,
        }));
    }
    loop {
        let slot = applier.slot(header.page_size as usize)?;
        match decoder.next_page(slot) {
            Ok(Some(pgno)) => applier.commit(pgno, decoder.page_checksum())?,
            Ok(None) => break,
            Err(e) => return Ok(Err(e)),
        }
    }
    let trailer = match decoder.finish() {
        Ok(t) => t,
        Err(e) => return Ok(Err(e)),
    };
    applier.end_file(header.commit, header.page_size)?;
    Ok(Ok((header, trailer.post_apply_checksum)))
}
