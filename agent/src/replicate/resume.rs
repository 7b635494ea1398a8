//! Where a replicator starts: the replica's identity (whose history it holds), the saved
//! position or the replica's newest file, each verified against the database before it is
//! trusted; anything that does not verify is answered with a snapshot.

use super::*;
use crate::replica::IdentityMatch;

impl Replicator {
    /// Makes sure the replica holds this database's history: its identity object names this
    /// database, or there was none and this call created it (exclusively: of two writers
    /// racing for an empty location, one wins), or it names this tenant under another path
    /// (the same pattern fields: moved to another host or data root), and then it is rewritten
    /// to name this path, under the lease. Checked once per replicator, before its first write.
    pub(super) fn check_identity(&mut self) -> Result<(), ReplicateError> {
        if self.identity_checked {
            return Ok(());
        }
        let mine = self.name();
        let refuse = |holder: String| ReplicateError::Identity {
            db: mine.clone(),
            location: self.replica.url(),
            holder,
        };
        let body = crate::replica::identity_json(&mine, self.fields.as_ref());
        for _ in 0..2 {
            match self.replica.read_identity().map_err(self.replica_err())? {
                Some(bytes) => {
                    match crate::replica::identity_match(&bytes, &mine, self.fields.as_ref()) {
                        IdentityMatch::Same => {}
                        IdentityMatch::Moved { from } if self.replica.leased() => {
                            tracing::info!(db = %mine, from = %from, replica = %self.replica.url(), "the tenant moved here: its history continues");
                            self.replica
                                .replace_identity(&body)
                                .map_err(self.replica_err())?;
                            // Whatever this host saved belongs to an older stretch of history.
                            self.trust_saved = false;
                            if let Some(store) = &self.store {
                                if let Err(e) = store.forget(&mine, &self.replica.url()) {
                                    tracing::warn!(db = %mine, error = %e, "forgetting a stale saved position failed");
                                }
                            }
                        }
                        IdentityMatch::Moved { from } => return Err(refuse(from)),
                        IdentityMatch::Other { holder } => return Err(refuse(holder)),
                    }
                    self.identity_checked = true;
                    return Ok(());
                }
                None => {
                    if self
                        .replica
                        .create_identity(&body)
                        .map_err(self.replica_err())?
                    {
                        self.identity_checked = true;
                        return Ok(());
                    }
                }
            }
        }
        Err(refuse("an identity that keeps changing".into()))
    }

    /// Records the current position in the state database (best effort: the replica is the
    /// source of truth, a lost position only costs a replica read at the next start).
    pub(super) fn save_position(&self) {
        let (Some(store), Some(state)) = (&self.store, &self.state) else {
            return;
        };
        let position = crate::replicate::state::Position {
            txid: state.txid,
            page_size: state.page_size,
            db_pages: state.db_pages,
            wal: state.pos,
            db_checksum: state.db_checksum,
        };
        if let Err(e) = store.save(&self.name(), &self.replica.url(), &position) {
            tracing::warn!(db = %self.db_path.display(), error = %e, "saving the position failed");
        }
    }

    /// The saved position, verified against the database.
    pub(super) fn resume_from_store(
        &mut self,
        wal: Option<&(File, WalHeader)>,
    ) -> Result<Option<State>, ReplicateError> {
        let Some(store) = self.store.as_ref() else {
            return Ok(None);
        };
        if !self.trust_saved {
            // Deleted before the first write under the new lease: a crash or a lost lease
            // before this replicator saves a position of its own must not leave the old one
            // to be trusted by the next run, whose lease will then look like this host's.
            store
                .forget(&self.name(), &self.replica.url())
                .map_err(|e| ReplicateError::Io {
                    db: self.name(),
                    op: "forget a saved position another host's writes made stale",
                    error: std::io::Error::other(e.to_string()),
                })?;
            return Ok(None);
        }
        let saved = match store.load(&self.name(), &self.replica.url()) {
            Ok(Some(p)) => p,
            Ok(None) => return Ok(None),
            Err(e) => {
                tracing::warn!(db = %self.db_path.display(), error = %e, "reading the saved position failed");
                return Ok(None);
            }
        };
        let claim = Claim {
            txid: saved.txid,
            page_size: saved.page_size,
            db_pages: saved.db_pages,
            salts: (saved.wal.salt1, saved.wal.salt2),
            end: saved.wal.offset,
            checksum: saved.db_checksum,
        };
        let state = self.verify(wal, &claim)?;
        if state.is_some() {
            tracing::debug!(db = %self.db_path.display(), txid = saved.txid, "resumed from the state directory");
        }
        Ok(state)
    }

    /// Recovers the position from the replica's newest file, if the database still matches it.
    pub(super) fn recover(
        &mut self,
        wal: Option<&(File, WalHeader)>,
    ) -> Result<Recovery, ReplicateError> {
        let mut newest: Option<crate::replica::FileInfo> = None;
        for level in [0u8, 1, 2, 3, SNAPSHOT_LEVEL] {
            for file in self.replica.list(level).map_err(self.replica_err())? {
                if newest.as_ref().is_none_or(|n| file.max_txid > n.max_txid) {
                    newest = Some(file);
                }
            }
        }
        let Some(newest) = newest else {
            return Ok(Recovery::Empty);
        };
        let mut bytes = Vec::new();
        self.replica
            .get(newest.level, newest.min_txid, newest.max_txid, &mut bytes)
            .map_err(self.replica_err())?;
        let mut decoder = ltx::Decoder::new(bytes.as_slice())
            .map_err(self.ltx_err("decode newest replica file"))?;
        let header = *decoder.header();
        let mut scratch = vec![0u8; header.page_size as usize];
        while decoder
            .next_page(&mut scratch)
            .map_err(self.ltx_err("decode newest replica file"))?
            .is_some()
        {}
        let post_apply = decoder
            .finish()
            .map_err(self.ltx_err("decode newest replica file"))?
            .post_apply_checksum;
        let claim = Claim {
            txid: newest.max_txid,
            page_size: header.page_size,
            db_pages: header.commit,
            salts: (header.wal_salt1, header.wal_salt2),
            end: (header.wal_offset + header.wal_size) as u64,
            checksum: post_apply,
        };
        Ok(self
            .verify(wal, &claim)?
            .map_or(Recovery::Snapshot { after: claim.txid }, Recovery::Resume))
    }

    /// The state `claim` describes, if the database still matches it: the WAL generation it
    /// names reaches exactly its end and the database checksum there agrees, or (with no such
    /// WAL) the database file alone has that checksum.
    pub(super) fn verify(
        &mut self,
        wal: Option<&(File, WalHeader)>,
        claim: &Claim,
    ) -> Result<Option<State>, ReplicateError> {
        let txid = claim.txid;
        let end = claim.end;
        let same_generation =
            wal.filter(|(_, h)| (h.salt1, h.salt2) == claim.salts && end >= wal::WAL_HEADER_SIZE);
        let Some((file, wal_header)) = same_generation else {
            return self.recover_from_db_file(claim);
        };
        let mut scratch = Vec::new();
        let committed = wal::read_committed(file, wal_header, wal_header.start(), &mut scratch)
            .map_err(self.io_err("read WAL"))?;
        let Some(at) = committed.commits.iter().position(|p| p.offset == end) else {
            if end == wal::WAL_HEADER_SIZE {
                // A snapshot taken when the WAL held no frames.
                let resumed = self.recover_from_db_file(claim)?;
                return Ok(resumed.map(|s| State {
                    pos: wal_header.start(),
                    ..s
                }));
            }
            tracing::info!(db = %self.db_path.display(), txid, "WAL does not reach the replicated position");
            return Ok(None);
        };
        let pos = committed.commits[at];
        let mut overlay = BTreeMap::new();
        let mut pages = 0;
        for frame in committed.frames.iter().take_while(|f| f.data_offset < end) {
            overlay.insert(frame.pgno, frame.data_offset);
            if frame.commit != 0 {
                pages = frame.commit;
            }
        }
        overlay.retain(|p, _| *p <= pages);
        let (sums, checksum) =
            self.page_sums_of(claim.page_size, pages, Some(file), &overlay, None)?;
        if checksum != claim.checksum {
            tracing::info!(db = %self.db_path.display(), txid, "database differs from the replicated state");
            return Ok(None);
        }
        Ok(Some(State {
            txid,
            pos,
            page_size: claim.page_size,
            db_pages: pages,
            page_sums: sums,
            db_checksum: checksum,
        }))
    }

    /// With no usable WAL position, the database file itself may still equal the replica's
    /// newest state (the WAL was checkpointed after everything was replicated).
    pub(super) fn recover_from_db_file(
        &mut self,
        claim: &Claim,
    ) -> Result<Option<State>, ReplicateError> {
        let (page_size, pages) = self.db_file_geometry()?;
        if page_size != claim.page_size || pages != claim.db_pages {
            return Ok(None);
        }
        let (sums, checksum) = self.page_sums_of(page_size, pages, None, &BTreeMap::new(), None)?;
        if checksum != claim.checksum {
            return Ok(None);
        }
        Ok(Some(State {
            txid: claim.txid,
            pos: WalPosition::default(),
            page_size,
            db_pages: pages,
            page_sums: sums,
            db_checksum: checksum,
        }))
    }

    /// The page size and size in pages of the database file itself.
    pub(super) fn db_file_geometry(&self) -> Result<(u32, u32), ReplicateError> {
        let mut head = [0u8; 100];
        let len = self.db_file.size().map_err(self.io_err("stat database"))?;
        if len < 100 {
            return Ok((0, 0));
        }
        self.db_file
            .read_at(&mut head, 0)
            .map_err(self.io_err("read database header"))?;
        let page_size = match u16::from_be_bytes([head[16], head[17]]) {
            1 => 65536,
            n => u32::from(n),
        };
        if page_size == 0 {
            return Ok((0, 0));
        }
        Ok((page_size, (len / u64::from(page_size)) as u32))
    }

    /// Whether the database file alone equals the replicated state.
    pub(super) fn db_file_matches_state(&mut self) -> Result<bool, ReplicateError> {
        let state = self.state.as_ref().expect("called with a state");
        let (page_size, pages) = self.db_file_geometry()?;
        if page_size != state.page_size || pages != state.db_pages {
            return Ok(false);
        }
        let (_, checksum) = self.page_sums_of(page_size, pages, None, &BTreeMap::new(), None)?;
        Ok(checksum == self.state.as_ref().expect("checked").db_checksum)
    }
}
