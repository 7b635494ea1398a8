//! What the fuzz targets share with the seed maker (`examples/make_seeds.rs`): the byte
//! layout of the ring target's input, so seeds are rings that real producers wrote.

/// The ring target's input: a ring's geometry, the header words a producer or a corrupter
/// can move, a path to register afterwards, and the raw bytes of its slots and status table.
///
/// Encoded as: `mode` (bits 0-2: slots = 2 << n; bit 3: open the ring from header bytes
/// rather than initialising it), then either 16 bytes `head`, `tail` (LE) or, in open mode,
/// [`HEADER_BYTES`] header bytes; then a LE u16 path length and the path; then slot and
/// status bytes, copied from the first slot on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RingInput<'a> {
    pub slots: u32,
    pub header: Header<'a>,
    pub path: &'a [u8],
    pub body: &'a [u8],
}

/// How the header is set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Header<'a> {
    /// `Ring::init`, then these producer and consumer positions.
    Positions { head: u64, tail: u64 },
    /// The first bytes of the header, as a file would hold them; the ring is then opened.
    Raw(&'a [u8]),
}

/// Header bytes an open-mode input supplies: every field up to and past the counters.
pub const HEADER_BYTES: usize = 192;
/// Status entries of every ring the target makes: enough for a probe window to wrap.
pub const STATUS_ENTRIES: u32 = 8;

impl<'a> RingInput<'a> {
    pub fn decode(data: &'a [u8]) -> Option<RingInput<'a>> {
        let (&mode, rest) = data.split_first()?;
        let slots = 2u32 << (mode & 7);
        let (header, rest) = if mode & 8 == 0 {
            let (words, rest) = rest.split_at_checked(16)?;
            let head = u64::from_le_bytes(words[..8].try_into().ok()?);
            let tail = u64::from_le_bytes(words[8..].try_into().ok()?);
            (Header::Positions { head, tail }, rest)
        } else {
            let (raw, rest) = rest.split_at_checked(HEADER_BYTES)?;
            (Header::Raw(raw), rest)
        };
        let (len, rest) = rest.split_at_checked(2)?;
        let len = usize::from(u16::from_le_bytes([len[0], len[1]]));
        let (path, body) = rest.split_at_checked(len.min(rest.len()))?;
        Some(RingInput {
            slots,
            header,
            path,
            body,
        })
    }

    pub fn encode(&self) -> Vec<u8> {
        let shift = self.slots.trailing_zeros().saturating_sub(1) as u8 & 7;
        let mut out = Vec::new();
        match &self.header {
            Header::Positions { head, tail } => {
                out.push(shift);
                out.extend_from_slice(&head.to_le_bytes());
                out.extend_from_slice(&tail.to_le_bytes());
            }
            Header::Raw(raw) => {
                out.push(shift | 8);
                let mut fixed = [0u8; HEADER_BYTES];
                let n = raw.len().min(HEADER_BYTES);
                fixed[..n].copy_from_slice(&raw[..n]);
                out.extend_from_slice(&fixed);
            }
        }
        let len = u16::try_from(self.path.len()).unwrap_or(u16::MAX);
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&self.path[..usize::from(len)]);
        out.extend_from_slice(self.body);
        out
    }
}
