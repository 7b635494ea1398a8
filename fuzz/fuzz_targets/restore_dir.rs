//! Restore over a file replica whose directory holds arbitrary files: listing, planning and
//! the restore itself (decode, apply, checksums, integrity check) must end in a database or
//! an error, never a panic, a hang or an allocation the files do not justify, and must leave
//! nothing behind but the restored database.
//!
//! Input: a target byte, then entries `level, name, mtime, contents`:
//! - target: `t % 3` is latest, a TXID (`t / 3`) or a time (`t / 3` seconds after the epoch);
//! - level: one of 9, 3, 2, 1, 0 (others are listed by no one and ignored);
//! - name: a length byte; 0 is followed by two bytes `min`, `max` naming the canonical
//!   `<min:016x>-<max:016x>.ltx`, anything else by that many bytes of raw file name;
//! - mtime: seconds after the epoch, one byte;
//! - contents: a little-endian u16 length and that many bytes.
#![no_main]

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use libfuzzer_sys::fuzz_target;
use multidb_agent::replica::file::FileReplica;
use multidb_agent::replica::{file_name, SNAPSHOT_LEVEL};
use multidb_agent::replicate::restore::{self, Target};

const LEVELS: [u8; 5] = [SNAPSHOT_LEVEL, 3, 2, 1, 0];

struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
    fn byte(&mut self) -> Option<u8> {
        let (first, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(*first)
    }

    fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        let n = n.min(self.0.len());
        let (taken, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(taken)
    }
}

/// A scratch directory on tmpfs when there is one: restores fsync.
fn scratch() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    let base = if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    tempfile::Builder::new()
        .prefix("multidb-fuzz-")
        .tempdir_in(base)
        .expect("a scratch directory")
}

fn write_files(input: &mut Input<'_>, root: &Path) {
    while let Some(level) = input.byte() {
        let level = LEVELS[usize::from(level) % LEVELS.len()];
        let Some(name_len) = input.byte() else { return };
        let name = if name_len == 0 {
            let (Some(min), Some(max)) = (input.byte(), input.byte()) else {
                return;
            };
            file_name(u64::from(min), u64::from(max))
        } else {
            let Some(raw) = input.bytes(usize::from(name_len)) else {
                return;
            };
            // A name of one path component, as a directory listing yields.
            let name: String = String::from_utf8_lossy(raw)
                .chars()
                .filter(|c| *c != '/' && *c != '\0')
                .collect();
            // NAME_MAX: the lossy conversion can lengthen a name past what a directory holds.
            if matches!(name.as_str(), "" | "." | "..") || name.len() > 255 {
                continue;
            }
            name
        };
        let mtime = UNIX_EPOCH + Duration::from_secs(u64::from(input.byte().unwrap_or(0)));
        let len = match (input.byte(), input.byte()) {
            (Some(lo), Some(hi)) => usize::from(u16::from_le_bytes([lo, hi])),
            _ => 0,
        };
        let contents = input.bytes(len).unwrap_or_default();
        let dir = root.join("ltx").join(level.to_string());
        std::fs::create_dir_all(&dir).expect("level directory");
        let path = dir.join(name);
        std::fs::write(&path, contents).expect("replica file");
        let file = std::fs::File::options()
            .write(true)
            .open(&path)
            .expect("replica file");
        file.set_modified(mtime).expect("mtime");
    }
}

fn entries(dir: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("output directory")
        .map(|e| e.expect("entry").path())
        .collect();
    found.sort();
    found
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let Some(target) = input.byte() else { return };
    let target = match target % 3 {
        0 => Target::Latest,
        1 => Target::Txid(u64::from(target / 3)),
        _ => Target::Time(SystemTime::UNIX_EPOCH + Duration::from_secs(u64::from(target / 3))),
    };
    let dir = scratch();
    let root = dir.path().join("replica");
    write_files(&mut input, &root);
    let replica = FileReplica::new(root);

    let files = restore::list_all(&replica).expect("listing a readable directory");
    let Ok(chain) = restore::plan(&files, target) else {
        return;
    };
    let first = chain.first().expect("a plan holds at least the snapshot");
    assert!(
        first.level == SNAPSHOT_LEVEL || first.min_txid == 1,
        "{chain:?}"
    );
    for pair in chain.windows(2) {
        assert_eq!(pair[1].min_txid, pair[0].max_txid + 1, "{chain:?}");
    }
    if let Target::Txid(txid) = target {
        assert_eq!(chain.last().map(|f| f.max_txid), Some(txid));
    }

    let out_dir = dir.path().join("out");
    std::fs::create_dir(&out_dir).expect("output directory");
    let output = out_dir.join("restored.db");
    let restored = restore::restore(&replica, target, &output, false);
    let expected = if restored.is_ok() {
        vec![output]
    } else {
        Vec::new()
    };
    assert_eq!(entries(&out_dir), expected, "restore left files behind");
});
