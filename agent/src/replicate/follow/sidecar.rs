//! The resume sidecar `OUT.multidb-follow`: what it records, its write, the start that reads it.

use super::*;

/// Where the follower records how far OUT is.
pub fn sidecar_path(output: &Path) -> PathBuf {
    let mut p = output.as_os_str().to_owned();
    p.push(".multidb-follow");
    PathBuf::from(p)
}

/// OUT at one TXID: its database checksum as the source had it, and page 1's checksum as
/// the source had it and with the bytes SQLite rewrites on commit left out.
///
/// SQLite sets page 1's change counter (bytes 24-27), its copy (92-95) and its own version
/// (96-99) whenever a transaction writes page 1, from OUT's previous counter, whatever the
/// page written says; the source's counter moved once per source transaction, OUT's once
/// per step. So OUT's page 1 equals the source's but for those bytes, and a restart checks
/// page 1 without them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Mark {
    pub(super) txid: u64,
    pub(super) checksum: u64,
    pub(super) page1: u64,
    pub(super) page1_normalized: u64,
}

/// The sidecar's content: OUT is `at`, or, after a crash during the commit of the step in
/// `pending`, at that one.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Position {
    replica: String,
    at: Mark,
    pending: Option<Mark>,
}

impl Mark {
    fn encode(&self) -> String {
        format!(
            "{} {:016x} {:016x} {:016x}",
            self.txid, self.checksum, self.page1, self.page1_normalized
        )
    }

    fn decode(text: &str) -> Option<Mark> {
        let mut parts = text.split(' ');
        let txid = parts.next()?.parse().ok()?;
        let mut next = || u64::from_str_radix(parts.next()?, 16).ok();
        let mark = Mark {
            txid,
            checksum: next()?,
            page1: next()?,
            page1_normalized: next()?,
        };
        parts.next().is_none().then_some(mark)
    }
}

impl Position {
    fn encode(&self) -> String {
        let mut text = format!("replica {}\nat {}\n", self.replica, self.at.encode());
        if let Some(pending) = self.pending {
            text.push_str(&format!("pending {}\n", pending.encode()));
        }
        text
    }

    fn decode(text: &str) -> Option<Position> {
        let (mut replica, mut at, mut pending) = (None, None, None);
        for line in text.lines() {
            let (key, value) = line.split_once(' ')?;
            match key {
                "replica" => replica = Some(value.to_string()),
                "at" => at = Some(Mark::decode(value)?),
                "pending" => pending = Some(Mark::decode(value)?),
                _ => return None,
            }
        }
        Some(Position {
            replica: replica?,
            at: at?,
            pending,
        })
    }
}

impl<'a> Follower<'a> {
    /// Restores OUT, or resumes it when a previous follower made it and it is unchanged.
    pub(super) fn start(
        replica: &'a dyn ReplicaClient,
        output: &Path,
        mode: u32,
    ) -> anyhow::Result<(Follower<'a>, Step)> {
        let sidecar = sidecar_path(output);
        if output.exists() {
            let saved = std::fs::read_to_string(&sidecar)
                .ok()
                .and_then(|t| Position::decode(&t));
            let Some(saved) = saved else {
                return Err(Refused(format!(
                    "{} exists and {} does not say `restore --follow` made it; refusing to write into it (remove it to restore afresh)",
                    output.display(),
                    sidecar.display()
                ))
                .into());
            };
            if saved.replica != replica.url() {
                return Err(Refused(format!(
                    "{} follows {}, not {}",
                    output.display(),
                    saved.replica,
                    replica.url()
                ))
                .into());
            }
            let mut follower = Follower::open(replica, output, 0)?;
            // OUT is at a mark when page 1 matches it but for the counter bytes and the
            // other pages with the source's page 1 give the mark's checksum.
            let at_mark = |mark: &Mark| {
                let mut sums = follower.sums.clone();
                if let Some(first) = sums.first_mut() {
                    *first = mark.page1;
                }
                (follower.page1_normalized == mark.page1_normalized
                    && restore::database_checksum(&sums) == mark.checksum)
                    .then_some(sums)
            };
            let found = [Some(saved.at), saved.pending]
                .into_iter()
                .flatten()
                .find_map(|mark| at_mark(&mark).map(|sums| (mark, sums)));
            let Some((mark, sums)) = found else {
                return Err(Refused(format!(
                    "{} was changed by something other than `restore --follow` since it reached TXID {} (its pages do not have the database checksum {:016x} recorded then); refusing to write into it (remove it and {} to restore afresh)",
                    output.display(),
                    saved.at.txid,
                    saved.at.checksum,
                    sidecar.display()
                ))
                .into());
            };
            let txid = mark.txid;
            follower.sums = sums;
            follower.txid = txid;
            follower.save(None)?;
            let step = Step {
                txid,
                files: 0,
                pages: 0,
                kind: "resumed",
                behind: false,
            };
            return Ok((follower, step));
        }
        let restored = restore::restore_with_mode(replica, Target::Latest, output, false, mode)?;
        let follower = Follower::open(replica, output, restored.txid)?;
        follower.save(None)?;
        let step = Step {
            txid: restored.txid,
            files: restored.files,
            pages: restored.pages as usize,
            kind: "restored",
            behind: false,
        };
        Ok((follower, step))
    }

    /// Records the position, and the one `pending` describes, atomically (temporary file,
    /// fsync, rename).
    pub(super) fn save(&self, pending: Option<Mark>) -> anyhow::Result<()> {
        let position = Position {
            replica: self.replica.url(),
            at: self.mark(),
            pending,
        };
        let path = sidecar_path(&self.output);
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let _ = std::fs::remove_file(&tmp);
        let write = || -> std::io::Result<()> {
            let file = crate::replica::create_new(&tmp, crate::replica::PRIVATE_MODE)?;
            file.write_all_at(position.encode().as_bytes(), 0)?;
            file.sync_all()?;
            std::fs::rename(&tmp, &path)
        };
        write().with_context(|| format!("writing {}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_round_trip_and_reject_other_text() {
        let mark = |txid| Mark {
            txid,
            checksum: 0x8000_0000_0000_00ff,
            page1: 7,
            page1_normalized: 9,
        };
        let p = Position {
            replica: "file:///r/x y".into(),
            at: mark(42),
            pending: Some(mark(43)),
        };
        assert_eq!(Position::decode(&p.encode()), Some(p.clone()));
        let settled = Position { pending: None, ..p };
        assert_eq!(Position::decode(&settled.encode()), Some(settled));
        assert_eq!(Position::decode("at 1 00 00 00\n"), None);
        assert_eq!(Position::decode("replica x\nat one 00 00 00\n"), None);
        assert_eq!(Position::decode("replica x\nat 1 00 00\n"), None);
    }
}
