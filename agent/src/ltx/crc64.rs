//! CRC-ISO-64 (Go's `crc64.ISO`), the format's one checksum, at memory speed.
//!
//! Each page is hashed twice by definition: into the file checksum (a running CRC over the
//! whole file) and into its page checksum (a CRC of its number, then its bytes). CRCs are
//! linear, so one pass serves both: [`raw`] hashes the page from a zero register, and
//! [`Crc64Digest::append`] moves a running register past the page (a multiplication by
//! x^(8·len) mod P, eight table lookups with [`Shift`]) before adding that CRC in.
//!
//! The pass folds 128 bytes at a time with carry-less multiplication (PCLMULQDQ, the method of
//! Intel's "Fast CRC Computation for Generic Polynomials Using PCLMULQDQ") where the CPU has
//! it, several times the speed of the slice-by-16 table of the `crc` crate, which stays the
//! fallback, finishes each pass and is the reference the tests hold the fold against.
//!
//! Registers here are raw: reflected (bit i is the coefficient of x^(63-i)) and without the
//! algorithm's initial value and final XOR (both all ones), which [`Crc64Digest`] applies.

use std::sync::OnceLock;

use crc::{Algorithm, Crc, Table, CRC_64_GO_ISO};

/// CRC-ISO-64 with a zero initial value and no final XOR: [`update_table`] sets the register.
static RAW_ISO: Algorithm<u64> = Algorithm {
    init: 0,
    xorout: 0,
    check: 0x46A5_A938_8A5B_EFFE,
    residue: 0,
    ..CRC_64_GO_ISO
};

static TABLE: Crc<u64, Table<16>> = Crc::<u64, Table<16>>::new(&RAW_ISO);

/// The generator polynomial x^64 + x^4 + x^3 + x + 1, reflected, its x^64 term implied.
const POLY_REFLECTED: u64 = 0xD800_0000_0000_0000;

/// A running CRC-ISO-64.
#[derive(Debug, Clone)]
pub struct Crc64Digest {
    register: u64,
}

impl Crc64Digest {
    pub fn new() -> Self {
        Crc64Digest { register: !0 }
    }

    pub fn update(&mut self, bytes: &[u8]) {
        self.register = update(self.register, bytes);
    }

    /// Hashes bytes already hashed on their own: `crc` is their [`raw`] CRC and `shift` was
    /// made for their length. The same as [`Crc64Digest::update`] with the bytes themselves.
    pub fn append(&mut self, crc: u64, shift: &Shift) {
        self.register = shift.apply(self.register) ^ crc;
    }

    pub fn finalize(self) -> u64 {
        !self.register
    }
}

/// The raw CRC of `bytes` from a zero register, for [`Crc64Digest::append`].
pub fn raw(bytes: &[u8]) -> u64 {
    update(0, bytes)
}

/// The raw register after hashing `bytes` from `register`.
fn update(register: u64, bytes: &[u8]) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if bytes.len() >= clmul::MIN_LEN && std::arch::is_x86_feature_detected!("pclmulqdq") {
        // SAFETY: the CPU has PCLMULQDQ, checked just above; SSE2 is part of x86_64.
        return unsafe { clmul::update(register, bytes) };
    }
    update_table(register, bytes)
}

/// The slice-by-16 table: the fallback, and the reference for the fold.
fn update_table(register: u64, bytes: &[u8]) -> u64 {
    // A reflected algorithm's initial value is given unreflected (the crate reflects it); with
    // no final XOR, `finalize` returns the register as it stands.
    let mut digest = TABLE.digest_with_initial(register.reverse_bits());
    digest.update(bytes);
    digest.finalize()
}

/// a·b mod P, both reflected (zlib's `multmodp`, 64 bits wide). `a` must not be zero.
fn multiply_mod_p(a: u64, mut b: u64) -> u64 {
    let mut m = 1u64 << 63;
    let mut product = 0;
    loop {
        if a & m != 0 {
            product ^= b;
            if a & (m - 1) == 0 {
                return product;
            }
        }
        m >>= 1;
        b = if b & 1 != 0 {
            (b >> 1) ^ POLY_REFLECTED
        } else {
            b >> 1
        };
    }
}

/// x^(8·len) mod P, reflected, by squaring.
fn x_pow_8n(len: usize) -> u64 {
    let mut result = 1u64 << 63; // x^0
    let mut square = 1u64 << 62; // x^1, squared at every bit of 8·len
    let mut n = (len as u128) * 8;
    while n != 0 {
        if n & 1 != 0 {
            result = multiply_mod_p(square, result);
        }
        square = multiply_mod_p(square, square);
        n >>= 1;
    }
    result
}

/// Moves a raw register past a fixed number of bytes, as if they were zeros: a linear map on
/// 64 bits, tabulated one byte of the register at a time.
#[derive(Debug)]
pub struct Shift {
    table: [[u64; 256]; 8],
}

impl Shift {
    pub fn new(len: usize) -> Self {
        let op = x_pow_8n(len);
        let mut table = [[0u64; 256]; 8];
        for (k, row) in table.iter_mut().enumerate() {
            for (byte, entry) in row.iter_mut().enumerate() {
                *entry = multiply_mod_p(op, (byte as u64) << (8 * k));
            }
        }
        Shift { table }
    }

    /// The shift over one page of a valid page size, made once per size and kept.
    pub fn page(page_size: u32) -> Option<&'static Shift> {
        static PAGES: [OnceLock<Shift>; 8] = [const { OnceLock::new() }; 8];
        if !super::is_valid_page_size(page_size) {
            return None;
        }
        let slot = PAGES
            .get((page_size.trailing_zeros() - super::MIN_PAGE_SIZE.trailing_zeros()) as usize)?;
        Some(slot.get_or_init(|| Shift::new(page_size as usize)))
    }

    pub fn apply(&self, register: u64) -> u64 {
        self.table
            .iter()
            .zip(register.to_le_bytes())
            .fold(0, |acc, (row, byte)| acc ^ row[usize::from(byte)])
    }
}

/// The fold. A 16-byte block loaded little-endian holds the higher-degree half of its
/// polynomial in the low lane, and `clmul` of two reflected values yields their reflected
/// product times x, so folding a block forward by D bits multiplies its low lane by
/// x^(D+63) mod P and its high lane by x^(D-1) mod P. What is left after the last fold is 16
/// bytes congruent to everything before it, which the table hashes from a zero register.
#[cfg(target_arch = "x86_64")]
mod clmul {
    use std::arch::x86_64::{
        __m128i, _mm_clmulepi64_si128, _mm_loadu_si128, _mm_set_epi64x, _mm_storeu_si128,
        _mm_xor_si128,
    };

    /// Below two blocks of eight lanes the table is as fast.
    pub const MIN_LEN: usize = 256;

    /// x^n mod P, reflected (bit i is the coefficient of x^(63-i)).
    const fn x_pow(n: u32) -> u64 {
        let mut normal = 1u64;
        let mut i = 0;
        while i < n {
            let carry = normal >> 63;
            normal <<= 1;
            if carry != 0 {
                normal ^= super::POLY_REFLECTED.reverse_bits();
            }
            i += 1;
        }
        normal.reverse_bits()
    }

    /// Multipliers folding a block forward by `bytes`: [low lane, high lane].
    const fn fold_by(bytes: u32) -> [u64; 2] {
        [x_pow(bytes * 8 + 63), x_pow(bytes * 8 - 1)]
    }

    /// Eight lanes of 16 bytes each fold onto the next 128 bytes.
    const FOLD_128: [u64; 2] = fold_by(128);
    /// Lane i folds onto lane 7, 16·(7-i) bytes on.
    const FOLD_TO_LAST: [[u64; 2]; 7] = [
        fold_by(112),
        fold_by(96),
        fold_by(80),
        fold_by(64),
        fold_by(48),
        fold_by(32),
        fold_by(16),
    ];

    /// # Safety
    /// The CPU must have PCLMULQDQ.
    #[target_feature(enable = "pclmulqdq")]
    unsafe fn fold(x: __m128i, [low, high]: [u64; 2]) -> __m128i {
        // Safe to call from Rust 1.87 on in a function with these features; the block keeps
        // the crate building with its MSRV.
        #[allow(unused_unsafe)]
        // SAFETY: the caller guarantees PCLMULQDQ; SSE2 is part of x86_64.
        unsafe {
            let k = _mm_set_epi64x(high as i64, low as i64);
            _mm_xor_si128(
                _mm_clmulepi64_si128::<0x00>(x, k),
                _mm_clmulepi64_si128::<0x11>(x, k),
            )
        }
    }

    /// # Safety
    /// The CPU must have PCLMULQDQ.
    #[target_feature(enable = "pclmulqdq")]
    pub unsafe fn update(register: u64, bytes: &[u8]) -> u64 {
        let (blocks, rest) = bytes.split_at(bytes.len() / 128 * 128);
        let mut chunks = blocks.chunks_exact(128);
        let Some(first) = chunks.next() else {
            return super::update_table(register, bytes);
        };
        // SAFETY: `first` is 128 bytes: eight unaligned 16-byte loads. The register joins the
        // first eight bytes, the highest-degree ones.
        let mut x: [__m128i; 8] = unsafe {
            let mut x = [_mm_set_epi64x(0, 0); 8];
            for (i, lane) in x.iter_mut().enumerate() {
                *lane = _mm_loadu_si128(first.as_ptr().add(16 * i).cast());
            }
            x[0] = _mm_xor_si128(x[0], _mm_set_epi64x(0, register as i64));
            x
        };
        for chunk in chunks {
            for (i, lane) in x.iter_mut().enumerate() {
                // SAFETY: `chunk` is 128 bytes and i < 8; the caller guarantees PCLMULQDQ.
                *lane = unsafe {
                    _mm_xor_si128(
                        fold(*lane, FOLD_128),
                        _mm_loadu_si128(chunk.as_ptr().add(16 * i).cast()),
                    )
                };
            }
        }
        let mut acc = x[7];
        for (lane, k) in x.iter().zip(FOLD_TO_LAST) {
            // SAFETY: the caller guarantees PCLMULQDQ.
            acc = unsafe { _mm_xor_si128(acc, fold(*lane, k)) };
        }
        let mut last = [0u8; 16];
        // SAFETY: `last` is 16 bytes: one unaligned store.
        unsafe { _mm_storeu_si128(last.as_mut_ptr().cast(), acc) };
        super::update_table(super::update_table(0, &last), rest)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::super::test_support::reference_crc64;
    use super::*;

    #[test]
    fn the_raw_algorithm_is_go_iso_without_its_init_and_xorout() {
        assert_eq!(TABLE.checksum(b"123456789"), RAW_ISO.check);
        let mut digest = Crc64Digest::new();
        digest.update(b"123456789");
        assert_eq!(digest.finalize(), CRC_64_GO_ISO.check);
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        /// Every length around the fold's block sizes, from any register.
        #[test]
        fn the_fold_equals_the_table(
            bytes in prop::collection::vec(any::<u8>(), 0..1200),
            register in any::<u64>(),
        ) {
            prop_assert_eq!(update(register, &bytes), update_table(register, &bytes));
            let mut digest = Crc64Digest::new();
            digest.update(&bytes);
            prop_assert_eq!(digest.finalize(), reference_crc64(&bytes));
        }

        #[test]
        fn appending_equals_hashing(
            head in prop::collection::vec(any::<u8>(), 0..300),
            tail in prop::collection::vec(any::<u8>(), 0..2000),
        ) {
            let mut whole = Crc64Digest::new();
            whole.update(&head);
            whole.update(&tail);
            let mut appended = Crc64Digest::new();
            appended.update(&head);
            appended.append(raw(&tail), &Shift::new(tail.len()));
            prop_assert_eq!(appended.finalize(), whole.finalize());
        }
    }

    #[test]
    fn page_shifts_move_the_register_past_a_page_of_zeros() {
        for page_size in [512u32, 4096, 65536] {
            let shift = Shift::page(page_size).unwrap();
            let zeros = vec![0u8; page_size as usize];
            for register in [1, !0, 0x8000_0000_0000_0001, 0x0123_4567_89AB_CDEF] {
                assert_eq!(shift.apply(register), update_table(register, &zeros));
            }
        }
        assert!(Shift::page(1000).is_none());
        assert!(Shift::page(1 << 17).is_none());
    }
}
