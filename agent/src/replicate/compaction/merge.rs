//! Merging a TXID-contiguous run of replica files into one: inputs read in place or
//! downloaded into a scratch directory, merged with [`ltx::compact`], stored at the target
//! level with the inputs' mode, and a corrupt input named by its replica location.

use super::*;

/// A directory for one merge's temporary files, removed when dropped.
struct Scratch {
    dir: PathBuf,
}

impl Scratch {
    fn create(tmp_dir: &Path, level: u8, min: u64, max: u64) -> Result<Scratch, MaintainError> {
        // Unique per call: one temporary directory may serve many databases at once.
        static CALLS: AtomicU64 = AtomicU64::new(0);
        let dir = tmp_dir.join(format!(
            ".compact-{}-{}-{level}-{}",
            std::process::id(),
            CALLS.fetch_add(1, Ordering::Relaxed),
            crate::replica::file_name(min, max)
        ));
        let _ = fs::remove_dir_all(&dir);
        crate::replicate::state::private_dir(&dir)
            .map_err(local(&dir, "create temporary directory"))?;
        Ok(Scratch { dir })
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn local(path: &Path, op: &'static str) -> impl FnOnce(io::Error) -> MaintainError {
    let path = path.to_path_buf();
    move |source| MaintainError::Local {
        path,
        op,
        error: source,
    }
}

impl Maintenance<'_> {
    /// Merges `inputs`, a TXID-contiguous chain, into one file stored at `level`.
    pub(super) fn merge_and_put(
        &mut self,
        level: u8,
        inputs: &[FileInfo],
    ) -> Result<Written, MaintainError> {
        let (Some(first), Some(last)) = (inputs.first(), inputs.last()) else {
            return Err(MaintainError::Compact {
                location: self.replica.url(),
                error: LtxError::NoInputs,
            });
        };
        let (min, max) = (first.min_txid, last.max_txid);
        let target = self.replica.location(level, min, max);
        let scratch = Scratch::create(self.tmp_dir, level, min, max)?;
        let mode = self.copy_mode(first);
        let mut merged: Option<(PathBuf, ltx::Header)> = None;
        for (pass, batch) in inputs.chunks(MAX_OPEN_INPUTS - 1).enumerate() {
            // Where each input of this pass comes from, for errors.
            let mut sources = Vec::with_capacity(batch.len() + 1);
            let mut readers = Vec::with_capacity(batch.len() + 1);
            if let Some((path, _)) = &merged {
                sources.push(format!("{target} (partial merge)"));
                readers.push(File::open(path).map_err(local(path, "open"))?);
            }
            let mut downloaded = Vec::with_capacity(batch.len());
            for (i, f) in batch.iter().enumerate() {
                let path = scratch.dir.join(format!("input-{i}.ltx"));
                self.download(f, &path)?;
                sources.push(self.location(f));
                readers.push(File::open(&path).map_err(local(&path, "open"))?);
                downloaded.push(path);
            }
            let out_path = scratch.dir.join(format!("merged-{pass}.ltx"));
            let out =
                crate::replica::create_new(&out_path, mode).map_err(local(&out_path, "create"))?;
            let compacted = ltx::compact(readers, BufWriter::new(out))
                .map_err(|e| blame(e, &sources, &target))?;
            compacted
                .out
                .into_inner()
                .map_err(|e| e.into_error())
                .map_err(local(&out_path, "write"))?;
            // Disk use stays at one pass's inputs plus the partial result.
            downloaded.extend(merged.replace((out_path, compacted.header)).map(|(p, _)| p));
            for path in downloaded {
                let _ = fs::remove_file(path);
            }
        }
        let (merged, header) = merged.expect("at least one pass ran");
        // The name must say what the headers say, or restores would plan with a lie.
        if (header.min_txid, header.max_txid) != (min, max) {
            return Err(MaintainError::WrongRange {
                location: target,
                min: header.min_txid,
                max: header.max_txid,
            });
        }
        let bytes = fs::metadata(&merged).map_err(local(&merged, "stat"))?.len();
        self.replica
            .put(level, min, max, &merged)
            .map_err(|source| MaintainError::Upload {
                location: target.clone(),
                error: source,
            })?;
        if let Some(listed) = &mut self.listed[usize::from(level)] {
            listed.push(FileInfo {
                level,
                min_txid: min,
                max_txid: max,
                size: bytes,
                created: self.now,
            });
            listed.sort_by_key(|f| (f.min_txid, f.max_txid));
        }
        tracing::info!(replica = %self.replica.url(), level, min_txid = min, max_txid = max, inputs = inputs.len(), bytes, "compacted");
        Ok(Written {
            level,
            min_txid: min,
            max_txid: max,
            inputs: inputs.len(),
            bytes,
        })
    }

    /// The mode of a file made from `input`: the input's, when the replica is a local
    /// directory (its files carry their database's mode), else owner only.
    fn copy_mode(&self, input: &FileInfo) -> u32 {
        self.replica
            .local_path(input.level, input.min_txid, input.max_txid)
            .map_or(crate::replica::PRIVATE_MODE, |p| {
                crate::replica::copy_mode(&p)
            })
    }

    fn download(&self, f: &FileInfo, path: &Path) -> Result<(), MaintainError> {
        let mut out = BufWriter::new(File::create(path).map_err(local(path, "create"))?);
        self.replica
            .get(f.level, f.min_txid, f.max_txid, &mut out)
            .map_err(|source| MaintainError::Download {
                location: self.location(f),
                error: source,
            })?;
        out.flush().map_err(local(path, "write"))
    }
}

/// Names the replica file behind a compaction error when the error is about one input.
fn blame(e: LtxError, sources: &[String], target: &str) -> MaintainError {
    let index = match &e {
        LtxError::Input { index, .. }
        | LtxError::NonContiguous { index, .. }
        | LtxError::PageSizeMismatch { index, .. } => Some(*index),
        _ => None,
    };
    match (index.and_then(|i| sources.get(i)), e) {
        (Some(location), LtxError::Input { error: source, .. }) => MaintainError::Corrupt {
            location: location.clone(),
            error: *source,
        },
        (Some(location), source) => MaintainError::Corrupt {
            location: location.clone(),
            error: source,
        },
        (None, source) => MaintainError::Compact {
            location: target.to_string(),
            error: source,
        },
    }
}
