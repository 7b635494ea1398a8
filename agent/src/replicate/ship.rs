//! Writing LTX files: one level-0 file of the pages a sync's frames changed, or a level-9
//! snapshot of the whole database; each streamed through a temporary file, checksummed page
//! by page, and uploaded before the position moves.

use super::*;

impl Replicator {
    /// Writes one level-0 file with the pages the committed frames changed.
    pub(super) fn incremental(
        &mut self,
        wal_file: &File,
        header: &WalHeader,
        committed: wal::Committed,
    ) -> Result<Synced, ReplicateError> {
        let mut state = self.state.clone().expect("incremental needs a state");
        let page_size = state.page_size;
        let lock = ltx::lock_pgno(page_size);
        let new_pages = committed.db_pages;
        // Latest frame of each page, in page order.
        let mut latest: BTreeMap<u32, u64> = BTreeMap::new();
        for frame in &committed.frames {
            if frame.pgno != 0 && frame.pgno <= new_pages && frame.pgno != lock {
                latest.insert(frame.pgno, frame.data_offset);
            }
        }
        let txid = state.txid + 1;
        let ltx_header = Header {
            page_size,
            commit: new_pages,
            min_txid: txid,
            max_txid: txid,
            timestamp_ms: ltx::unix_millis(SystemTime::now()),
            pre_apply_checksum: state.db_checksum,
            wal_offset: state.pos.offset as i64,
            wal_size: (committed.end.offset - state.pos.offset) as i64,
            wal_salt1: header.salt1,
            wal_salt2: header.salt2,
            ..Header::default()
        };
        let (tmp, mut encoder) = self.create_ltx(ltx_header)?;
        let old_pages = state.db_pages;
        if new_pages < old_pages {
            // Truncated pages leave the database checksum.
            for sum in state.page_sums[new_pages as usize..]
                .iter()
                .filter(|s| **s != 0)
            {
                state.db_checksum = ltx::toggle_page_checksum(state.db_checksum, *sum);
            }
        }
        state.page_sums.resize(new_pages as usize, 0);
        let mut page = std::mem::take(&mut self.page);
        page.resize(page_size as usize, 0);
        let mut written = 0;
        let mut write = |pgno: u32, page: &[u8], state: &mut State| -> Result<(), ltx::LtxError> {
            encoder.write_page(pgno, page)?;
            let sum = ltx::checksum_page(pgno, page);
            let slot = &mut state.page_sums[(pgno - 1) as usize];
            if pgno <= old_pages && *slot != 0 {
                state.db_checksum = ltx::toggle_page_checksum(state.db_checksum, *slot);
            }
            state.db_checksum = ltx::toggle_page_checksum(state.db_checksum, sum);
            *slot = sum;
            written += 1;
            Ok(())
        };
        let result = (|| -> Result<(), ReplicateError> {
            // Pages past the old end that no frame carries (rare: growth without a write)
            // are taken from the database file so the replica matches it exactly.
            let mut grown = (old_pages + 1..=new_pages)
                .filter(|p| *p != lock && !latest.contains_key(p))
                .peekable();
            let mut changed = latest.iter().peekable();
            loop {
                let next_changed = changed.peek().map(|(p, _)| **p);
                let next_grown = grown.peek().copied();
                let pgno = match (next_changed, next_grown) {
                    (None, None) => break,
                    (Some(c), Some(g)) => c.min(g),
                    (Some(c), None) => c,
                    (None, Some(g)) => g,
                };
                if next_changed == Some(pgno) {
                    let (_, offset) = changed.next().expect("peeked");
                    wal_file
                        .read_exact_at(&mut page, *offset)
                        .map_err(self.io_err("read WAL page"))?;
                } else {
                    grown.next();
                    self.read_db_page(pgno, &mut page)?;
                }
                write(pgno, &page, &mut state).map_err(self.staged_err("encode", &tmp))?;
            }
            Ok(())
        })();
        self.page = page;
        result?;
        let bytes = self.upload(0, encoder, tmp, state.db_checksum)?;
        state.txid = txid;
        state.pos = committed.end;
        state.db_pages = new_pages;
        self.state = Some(state);
        Ok(Synced {
            txid,
            level: 0,
            pages: written,
            bytes,
            snapshot_reason: None,
            wal_offset: committed.end.offset,
        })
    }

    /// Starts an LTX file in the temporary directory.
    pub(super) fn create_ltx(
        &self,
        mut header: Header,
    ) -> Result<(Staged, Encoder<BufWriter<File>>), ReplicateError> {
        if self.litestream_compatible {
            header.flags |= ltx::HEADER_FLAG_NO_CHECKSUM;
            header.pre_apply_checksum = 0;
        }
        // Unique per file: the agent's replicators share one temporary directory, and two
        // databases often reach the same TXID at the same moment.
        static FILES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let tmp = self.tmp_dir.join(format!(
            "{}-{}-{:016x}.ltx.tmp",
            std::process::id(),
            FILES.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            header.max_txid
        ));
        // The file becomes the replica's (a rename): it gets the database's mode from the
        // start, and is never a name someone else planted.
        let mode = crate::replica::copy_mode(&self.db_path);
        let out = BufWriter::new(
            crate::replica::create_new(&tmp, mode).map_err(self.io_err("create temporary LTX"))?,
        );
        let tmp = Staged(tmp);
        let encoder = Encoder::new(out, header).map_err(self.staged_err("encode", &tmp))?;
        Ok((tmp, encoder))
    }

    /// Finishes the file, syncs it and stores it in the replica at `level`; the temporary
    /// file is gone afterwards either way (the guard is dropped here). Returns the file's
    /// size.
    pub(super) fn upload(
        &self,
        level: u8,
        encoder: Encoder<BufWriter<File>>,
        tmp: Staged,
        post_apply: u64,
    ) -> Result<u64, ReplicateError> {
        let header = *encoder.header();
        let post_apply = (!self.litestream_compatible).then_some(post_apply);
        let (out, _) = encoder
            .finish(post_apply)
            .map_err(self.staged_err("finish", &tmp))?;
        let bytes = finish_file(out, &tmp)
            .map_err(|e| self.io_err("write temporary LTX")(naming(e, &tmp)))?;
        self.replica
            .put(level, header.min_txid, header.max_txid, &tmp)
            .map_err(self.replica_err())?;
        Ok(bytes)
    }

    pub(super) fn read_db_page(&self, pgno: u32, page: &mut [u8]) -> Result<(), ReplicateError> {
        let offset = u64::from(pgno - 1) * page.len() as u64;
        // Past the end the page reads as zeros, as SQLite would.
        self.db_file
            .read_at(page, offset)
            .map_err(self.io_err("read database page"))?;
        Ok(())
    }

    /// Checksums of every page of the state made of the database file overlaid with `overlay`
    /// (page → offset of its data in `wal`), streaming the pages into `encoder` if given.
    pub(super) fn page_sums_of(
        &mut self,
        page_size: u32,
        pages: u32,
        wal: Option<&File>,
        overlay: &BTreeMap<u32, u64>,
        mut encoder: Option<&mut Encoder<BufWriter<File>>>,
    ) -> Result<(Vec<u64>, u64), ReplicateError> {
        let lock = ltx::lock_pgno(page_size);
        let mut sums = vec![0u64; pages as usize];
        let mut checksum = ltx::EMPTY_DATABASE_CHECKSUM;
        let mut page = vec![0u8; page_size as usize];
        for pgno in 1..=pages {
            if pgno == lock {
                continue;
            }
            match (overlay.get(&pgno), wal) {
                (Some(offset), Some(wal)) => wal
                    .read_exact_at(&mut page, *offset)
                    .map_err(self.io_err("read WAL page"))?,
                _ => self.read_db_page(pgno, &mut page)?,
            }
            let sum = ltx::checksum_page(pgno, &page);
            sums[(pgno - 1) as usize] = sum;
            checksum = ltx::toggle_page_checksum(checksum, sum);
            if let Some(encoder) = encoder.as_mut() {
                encoder
                    .write_page(pgno, &page)
                    .map_err(self.ltx_err("encode snapshot"))?;
            }
        }
        Ok((sums, checksum))
    }

    /// Writes a level-9 snapshot of the current state as TXID `txid`.
    pub(super) fn snapshot(
        &mut self,
        wal: Option<&(File, WalHeader)>,
        txid: u64,
        reason: &'static str,
    ) -> Result<Synced, ReplicateError> {
        let started = Instant::now();
        let (mut page_size, mut pages) = self.db_file_geometry()?;
        let mut overlay = BTreeMap::new();
        let mut pos = WalPosition::default();
        if let Some((file, header)) = wal {
            let mut scratch = std::mem::take(&mut self.page);
            let committed = wal::read_committed(file, header, header.start(), &mut scratch)
                .map_err(self.io_err("read WAL"));
            self.page = scratch;
            let committed = committed?;
            pos = committed.end;
            if !committed.frames.is_empty() {
                page_size = header.page_size;
                pages = committed.db_pages;
                for frame in &committed.frames {
                    if frame.pgno <= pages {
                        overlay.insert(frame.pgno, frame.data_offset);
                    }
                }
            } else {
                page_size = header.page_size;
            }
        }
        if page_size == 0 || pages == 0 {
            return Err(ReplicateError::Io {
                db: self.name(),
                op: "snapshot",
                error: io::Error::new(
                    io::ErrorKind::InvalidData,
                    "the database is empty (no pages)",
                ),
            });
        }
        let header = Header {
            page_size,
            commit: pages,
            min_txid: 1,
            max_txid: txid,
            timestamp_ms: ltx::unix_millis(SystemTime::now()),
            wal_offset: pos.offset as i64,
            wal_size: 0,
            wal_salt1: pos.salt1,
            wal_salt2: pos.salt2,
            ..Header::default()
        };
        let (tmp, mut encoder) = self.create_ltx(header)?;
        let wal_file = wal.map(|(f, _)| f);
        let (sums, checksum) = self
            .page_sums_of(page_size, pages, wal_file, &overlay, Some(&mut encoder))
            .map_err(|e| e.naming_staged(&tmp))?;
        let bytes = self.upload(SNAPSHOT_LEVEL, encoder, tmp, checksum)?;
        self.state = Some(State {
            txid,
            pos,
            page_size,
            db_pages: pages,
            page_sums: sums,
            db_checksum: checksum,
        });
        tracing::info!(db = %self.db_path.display(), txid, pages, bytes, ms = started.elapsed().as_millis() as u64, reason, "snapshot");
        Ok(Synced {
            txid,
            level: SNAPSHOT_LEVEL,
            pages: pages as usize,
            bytes,
            snapshot_reason: Some(reason),
            wal_offset: pos.offset,
        })
    }
}

/// A temporary LTX file being written, removed when dropped: a sync that fails half-way
/// (a full disk, a page that cannot be read) leaves nothing behind in the temporary
/// directory, where each retry would otherwise add another partial file. After a directory
/// replica's `put` renamed it into place there is nothing left to remove.
pub(super) struct Staged(PathBuf);

impl std::ops::Deref for Staged {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
