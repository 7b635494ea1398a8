//! How a step reaches OUT: LTX files applied, or a fresh restore copied in; one transaction each.

use super::*;

impl Follower<'_> {
    /// The replica holds another history (`why`): OUT is restored afresh from it.
    pub(super) fn start_over(&mut self, why: &anyhow::Error) -> anyhow::Result<Step> {
        tracing::warn!(out = %self.output.display(), replica = %self.replica.url(), txid = self.txid, reason = %why, "the replica holds another history; restoring afresh");
        let all = restore::list_all(self.replica)?;
        self.restore_afresh(&all)
    }

    /// Applies `chain` (each file continuing the previous) in one transaction.
    pub(super) fn apply(&mut self, chain: &[FileInfo]) -> anyhow::Result<Step> {
        let mut files = Vec::with_capacity(chain.len());
        for f in chain {
            let mut bytes = Vec::new();
            self.replica
                .get(f.level, f.min_txid, f.max_txid, &mut bytes)
                .with_context(|| {
                    format!(
                        "downloading {}",
                        self.replica.location(f.level, f.min_txid, f.max_txid)
                    )
                })?;
            files.push(bytes);
        }
        let mut sums = self.sums.clone();
        let mut page1_normalized = self.page1_normalized;
        let mut pages = 0;
        let mut unchecked = false;
        self.begin()?;
        let written = (|| -> anyhow::Result<()> {
            let mut insert = self
                .conn
                .prepare_cached("INSERT INTO sqlite_dbpage(pgno, data) VALUES (?1, ?2)")?;
            let mut page = vec![0u8; self.page_size as usize];
            for (f, bytes) in chain.iter().zip(&files) {
                let location = self.replica.location(f.level, f.min_txid, f.max_txid);
                let corrupt = || format!("replica file {location} is corrupt");
                let mut decoder = Decoder::new(bytes.as_slice()).with_context(corrupt)?;
                let header = *decoder.header();
                ltx::check_header_against_len(&header, bytes.len() as u64).with_context(corrupt)?;
                if (header.min_txid, header.max_txid) != (f.min_txid, f.max_txid) {
                    bail!(
                        "replica file {location} is corrupt: its header says TXIDs {}-{}",
                        header.min_txid,
                        header.max_txid
                    );
                }
                if header.page_size != self.page_size {
                    bail!(
                        "replica file {location} has {}-byte pages, {} has {}: the source changed its page size; restore it afresh",
                        header.page_size,
                        self.output.display(),
                        self.page_size
                    );
                }
                let before = restore::database_checksum(&sums);
                if header.tracks_checksums() && header.pre_apply_checksum != before {
                    return Err(NewHistory(format!(
                        "replica file {location} does not continue {} at TXID {}: pre-apply checksum {:016x}, expected {before:016x}",
                        self.output.display(),
                        f.min_txid - 1,
                        header.pre_apply_checksum
                    ))
                    .into());
                }
                while let Some(pgno) = decoder.next_page(&mut page).with_context(corrupt)? {
                    if sums.len() < pgno as usize {
                        sums.resize(pgno as usize, 0);
                    }
                    sums[pgno as usize - 1] = decoder.page_checksum();
                    if pgno == 1 {
                        page1_normalized = normalized_page1_sum(&page);
                    }
                    insert.execute(rusqlite::params![pgno, page])?;
                    pages += 1;
                }
                // The file's checksum is verified here, before anything is committed.
                let trailer = decoder.finish().with_context(corrupt)?;
                sums.resize(header.commit as usize, 0);
                let after = restore::database_checksum(&sums);
                if header.tracks_checksums() && trailer.post_apply_checksum != after {
                    bail!(
                        "applying replica file {location} gives database checksum {after:016x}, not its post-apply checksum {:016x}",
                        trailer.post_apply_checksum
                    );
                }
                unchecked |= !header.tracks_checksums();
            }
            if sums.len() < self.sums.len() {
                // Pages past the new end go, as the last file's commit size says.
                self.conn.execute(
                    "INSERT INTO sqlite_dbpage(pgno, data) VALUES (?1, NULL)",
                    [sums.len() as i64 + 1],
                )?;
            }
            Ok(())
        })();
        let txid = chain.last().map_or(self.txid, |f| f.max_txid);
        self.commit(written, sums, page1_normalized, txid)?;
        self.confirmed = chain.last().cloned();
        self.unchecked |= unchecked;
        self.check_integrity()?;
        Ok(Step {
            txid,
            files: chain.len(),
            pages,
            kind: "applied",
            behind: false,
        })
    }

    /// Commits the open transaction when `written` succeeded (recording the new position
    /// first), else rolls it back.
    fn commit(
        &mut self,
        written: anyhow::Result<()>,
        sums: Vec<u64>,
        page1_normalized: u64,
        txid: u64,
    ) -> anyhow::Result<()> {
        let committed = written.and_then(|()| {
            self.save(Some(Mark {
                txid,
                checksum: restore::database_checksum(&sums),
                page1: sums.first().copied().unwrap_or(0),
                page1_normalized,
            }))?;
            self.conn.execute_batch("COMMIT")?;
            Ok(())
        });
        if let Err(e) = committed {
            let _ = self.conn.execute_batch("ROLLBACK");
            return Err(e);
        }
        self.sums = sums;
        self.page1_normalized = page1_normalized;
        self.txid = txid;
        self.data_version = self
            .conn
            .query_row("PRAGMA data_version", [], |r| r.get(0))?;
        self.save(None)
    }

    /// `PRAGMA integrity_check` on a fresh connection after steps no checksum vouched for.
    fn check_integrity(&mut self) -> anyhow::Result<()> {
        if !self.unchecked {
            return Ok(());
        }
        if let Err(e) = restore::integrity_check(&self.output) {
            return Err(Refused(format!(
                "{} at TXID {} (written from replica files without database checksums): {e:#}; stopping",
                self.output.display(),
                self.txid
            ))
            .into());
        }
        self.unchecked = false;
        Ok(())
    }

    /// Nothing continues OUT's TXID, or the replica holds another history: a verified
    /// restore of the replica's latest state beside OUT, copied into it in one transaction.
    pub(super) fn restore_afresh(&mut self, all: &[FileInfo]) -> anyhow::Result<Step> {
        let chain = restore::plan(all, Target::Latest)?;
        let parent = self
            .output
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        // Named after OUT, not this process: a follower killed here leaves it for the next
        // one to remove.
        let mut name = self.output.file_name().unwrap_or_default().to_os_string();
        name.push(".multidb-follow-fresh");
        let fresh = parent.join(name);
        let _ = std::fs::remove_file(&fresh);
        let restored = restore::restore(self.replica, Target::Latest, &fresh, false);
        let result = restored.and_then(|r| self.copy_from(&fresh, r.txid, chain.len()));
        let _ = std::fs::remove_file(&fresh);
        result
    }

    fn copy_from(&mut self, fresh: &Path, txid: u64, files: usize) -> anyhow::Result<Step> {
        let file = File::open(fresh).with_context(|| format!("opening {}", fresh.display()))?;
        let mut head = [0u8; 100];
        file.read_exact_at(&mut head, 0)?;
        let page_size = match u16::from_be_bytes([head[16], head[17]]) {
            1 => 65536,
            n => u32::from(n),
        };
        if page_size != self.page_size {
            return Err(Refused(format!(
                "the replica's new history has {page_size}-byte pages, {} has {}: follow cannot change a database's page size in place; restore it afresh",
                self.output.display(),
                self.page_size
            ))
            .into());
        }
        let count = (file.metadata()?.len() / u64::from(page_size)) as u32;
        let lock = ltx::lock_pgno(page_size);
        let mut sums = vec![0u64; count as usize];
        let mut page1_normalized = 0;
        self.begin()?;
        let written = (|| -> anyhow::Result<()> {
            let mut insert = self
                .conn
                .prepare_cached("INSERT INTO sqlite_dbpage(pgno, data) VALUES (?1, ?2)")?;
            let mut page = vec![0u8; page_size as usize];
            for pgno in (1..=count).filter(|p| *p != lock) {
                file.read_exact_at(&mut page, u64::from(pgno - 1) * u64::from(page_size))?;
                sums[pgno as usize - 1] = ltx::checksum_page(pgno, &page);
                if pgno == 1 {
                    page1_normalized = normalized_page1_sum(&page);
                }
                insert.execute(rusqlite::params![pgno, page])?;
            }
            if (count as usize) < self.sums.len() {
                self.conn.execute(
                    "INSERT INTO sqlite_dbpage(pgno, data) VALUES (?1, NULL)",
                    [i64::from(count) + 1],
                )?;
            }
            Ok(())
        })();
        self.commit(written, sums, page1_normalized, txid)?;
        self.confirmed = None;
        Ok(Step {
            txid,
            files,
            pages: count as usize,
            kind: "restored afresh",
            behind: false,
        })
    }
}
