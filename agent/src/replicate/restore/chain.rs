//! Which replica files a restore needs and getting them: every file of a replica listed by
//! level, the plan (the newest snapshot at or before the target and the shortest chain that
//! continues it), the parallel download of that chain, and the two ends of a single file.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

use super::{is_small, Target};
use crate::replica::{FileInfo, ReplicaClient, SNAPSHOT_LEVEL};

/// Levels a restore may read, compacted ones first so chains are short.
const LEVELS: [u8; 5] = [SNAPSHOT_LEVEL, 3, 2, 1, 0];
/// Files downloaded at once.
const PARALLEL_DOWNLOADS: usize = 4;

/// Every file of a replica, by level.
pub fn list_all(replica: &dyn ReplicaClient) -> anyhow::Result<Vec<FileInfo>> {
    let mut files = Vec::new();
    for level in LEVELS {
        files.extend(
            replica
                .list(level)
                .with_context(|| format!("listing level {level} of {}", replica.url()))?,
        );
    }
    files.sort_by_key(|f| (f.max_txid, f.level));
    Ok(files)
}

/// The files to apply, in order, to reach `target`.
pub fn plan(files: &[FileInfo], target: Target) -> anyhow::Result<Vec<FileInfo>> {
    let Some(max) = files.iter().map(|f| f.max_txid).max() else {
        bail!("the replica holds no LTX files");
    };
    let target_txid = match target {
        Target::Latest => max,
        Target::Txid(t) => {
            if t == 0 || t > max {
                bail!("TXID {t} is not in the replica (it holds 1 to {max})");
            }
            t
        }
        Target::Time(when) => files
            .iter()
            .filter(|f| (f.level == 0 || f.level == SNAPSHOT_LEVEL) && f.created <= when)
            .map(|f| f.max_txid)
            .max()
            .context("no file in the replica is that old")?,
    };
    // Any file that starts at TXID 1 holds the whole database, whatever its level: Litestream
    // writes no level-9 snapshot in its first snapshot interval (a day), so its level-0 file
    // 1-1 is the only full copy until then.
    let snapshot = files
        .iter()
        .filter(|f| (f.level == SNAPSHOT_LEVEL || f.min_txid == 1) && f.max_txid <= target_txid)
        .max_by_key(|f| f.max_txid)
        .with_context(|| format!("no snapshot at or before TXID {target_txid}"))?;
    let mut chain = vec![snapshot.clone()];
    let mut at = snapshot.max_txid;
    while at < target_txid {
        let next = files
            .iter()
            .filter(|f| f.level != SNAPSHOT_LEVEL && f.min_txid == at + 1 && f.max_txid <= target_txid)
            .max_by_key(|f| f.max_txid)
            .with_context(|| format!("missing file in the chain: nothing in the replica starts at TXID {} (restoring to {target_txid})", at + 1))?;
        at = next.max_txid;
        chain.push(next.clone());
    }
    Ok(chain)
}

/// Downloads `chain` in parallel into files in `dir`, in order.
pub(super) fn download(
    replica: &dyn ReplicaClient,
    chain: &[FileInfo],
    dir: &Path,
    progress: &(dyn Fn(usize) + Sync),
) -> anyhow::Result<Vec<PathBuf>> {
    // Files of a local replica are read in place; others are downloaded into `dir`.
    let (paths, remote): (Vec<PathBuf>, Vec<bool>) = chain
        .iter()
        .enumerate()
        .map(
            |(i, f)| match replica.local_path(f.level, f.min_txid, f.max_txid) {
                Some(path) => (path, false),
                None => (dir.join(format!("{i:08}.ltx")), true),
            },
        )
        .unzip();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let done = std::sync::atomic::AtomicUsize::new(0);
    let fetched = remote.iter().filter(|r| **r).count();
    // Threads only when more than one file is fetched and there is enough to fetch.
    let threads = if fetched > 1 && !is_small(chain) {
        PARALLEL_DOWNLOADS.min(fetched)
    } else {
        1
    };
    let fetch = || -> anyhow::Result<()> {
        loop {
            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let Some(f) = chain.get(i) else { return Ok(()) };
            if remote[i] {
                let mut out = io::BufWriter::new(File::create(&paths[i])?);
                replica
                    .get(f.level, f.min_txid, f.max_txid, &mut out)
                    .with_context(|| {
                        format!(
                            "downloading {}",
                            replica.location(f.level, f.min_txid, f.max_txid)
                        )
                    })?;
                out.flush()?;
            }
            progress(done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1);
        }
    };
    std::thread::scope(|scope| -> anyhow::Result<()> {
        let workers: Vec<_> = (1..threads).map(|_| scope.spawn(fetch)).collect();
        // The calling thread fetches too: with one thread, nothing is started.
        let here = fetch();
        for worker in workers {
            worker
                .join()
                .map_err(|_| anyhow::anyhow!("download thread panicked"))??;
        }
        here
    })?;
    Ok(paths)
}

/// The header and trailer of one replica file: read in place from a directory replica,
/// downloaded (and all but both ends dropped on the way) from others.
pub fn head_and_tail(
    replica: &dyn ReplicaClient,
    file: &FileInfo,
) -> Result<(crate::ltx::Header, crate::ltx::Trailer), String> {
    use crate::ltx::{HEADER_SIZE, TRAILER_SIZE};
    let location = replica.location(file.level, file.min_txid, file.max_txid);
    let mut ends = Ends::default();
    match replica.local_path(file.level, file.min_txid, file.max_txid) {
        Some(path) => {
            use std::os::unix::fs::FileExt;
            let f = File::open(&path).map_err(|e| format!("{location}: {e}"))?;
            let len = f.metadata().map_err(|e| format!("{location}: {e}"))?.len();
            let mut head = [0; HEADER_SIZE];
            let mut tail = [0; TRAILER_SIZE];
            f.read_exact_at(&mut head, 0)
                .and_then(|()| f.read_exact_at(&mut tail, len.saturating_sub(TRAILER_SIZE as u64)))
                .map_err(|e| format!("{location}: {e}"))?;
            ends.head = head.to_vec();
            ends.tail = tail.to_vec();
        }
        None => replica
            .get(file.level, file.min_txid, file.max_txid, &mut ends)
            .map_err(|e| e.to_string())?,
    }
    let head: [u8; HEADER_SIZE] =
        ends.head.as_slice().try_into().map_err(|_| {
            format!("replica file {location} is corrupt: shorter than an LTX header")
        })?;
    let tail: [u8; TRAILER_SIZE] = ends
        .tail
        .as_slice()
        .try_into()
        .map_err(|_| format!("replica file {location} is corrupt: no trailer"))?;
    let header = crate::ltx::Header::decode(&head)
        .map_err(|e| format!("replica file {location} is corrupt: {e}"))?;
    Ok((header, crate::ltx::Trailer::decode(&tail)))
}

/// A sink keeping the first [`crate::ltx::HEADER_SIZE`] and last
/// [`crate::ltx::TRAILER_SIZE`] bytes written to it.
#[derive(Default)]
struct Ends {
    head: Vec<u8>,
    tail: Vec<u8>,
}

impl Write for Ends {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        use crate::ltx::{HEADER_SIZE, TRAILER_SIZE};
        let room = HEADER_SIZE.saturating_sub(self.head.len()).min(buf.len());
        self.head.extend_from_slice(&buf[..room]);
        self.tail.extend_from_slice(buf);
        let excess = self.tail.len().saturating_sub(TRAILER_SIZE);
        self.tail.drain(..excess);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    fn f(level: u8, min: u64, max: u64, secs: u64) -> FileInfo {
        FileInfo {
            level,
            min_txid: min,
            max_txid: max,
            size: 1,
            created: UNIX_EPOCH + Duration::from_secs(secs),
        }
    }

    #[test]
    fn plans_take_the_newest_snapshot_and_the_shortest_chain() {
        let files = vec![
            f(9, 1, 1, 1),
            f(0, 2, 2, 2),
            f(0, 3, 3, 3),
            f(1, 2, 4, 5),
            f(0, 4, 4, 4),
            f(0, 5, 5, 6),
            f(9, 1, 5, 7),
            f(0, 6, 6, 8),
        ];
        let names = |p: Vec<FileInfo>| {
            p.iter()
                .map(|f| (f.level, f.min_txid, f.max_txid))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            names(plan(&files, Target::Latest).unwrap()),
            [(9, 1, 5), (0, 6, 6)]
        );
        assert_eq!(
            names(plan(&files, Target::Txid(4)).unwrap()),
            [(9, 1, 1), (1, 2, 4)]
        );
        assert_eq!(
            names(plan(&files, Target::Txid(3)).unwrap()),
            [(9, 1, 1), (0, 2, 2), (0, 3, 3)]
        );
        assert_eq!(
            names(plan(&files, Target::Time(UNIX_EPOCH + Duration::from_secs(3))).unwrap()),
            [(9, 1, 1), (0, 2, 2), (0, 3, 3)]
        );
        assert!(plan(&files, Target::Txid(7))
            .unwrap_err()
            .to_string()
            .contains("TXID 7 is not in the replica"));
        let gap: Vec<FileInfo> = files
            .iter()
            .filter(|x| (x.level, x.min_txid) != (0, 3) && x.level != 1)
            .cloned()
            .collect();
        assert!(plan(&gap, Target::Txid(4))
            .unwrap_err()
            .to_string()
            .contains("nothing in the replica starts at TXID 3"));
        assert!(plan(&[], Target::Latest).is_err());
    }
}
