//! Secure-aggregation kernels (`SecAgg` / `SecAgg+`).
//!
//! Threat model: the server and up to a configured fraction of clients are honest-but-curious
//! or malicious; masks must be computationally indistinguishable from uniform to anyone who
//! does not hold the seed. All arithmetic on masked data is in the ring Z_(2^b), `1 <= b <= 64`,
//! with explicit wrapping; values are stored as u32 (b <= 32) or u64 words and are always
//! reduced below 2^b. Nothing here allocates a full-size temporary for a mask.

pub mod mask;
pub mod pack;
pub mod prg;
pub mod quant;
pub mod shares;

/// Unsigned storage words for ring elements.
pub trait Word: Copy + Send + Sync + Default + PartialEq + std::fmt::Debug + 'static {
    /// Width of the storage type in bits.
    const BITS: u32;
    /// Widen to u64.
    fn to_u64(self) -> u64;
    /// Narrow from u64 (the caller guarantees the value fits).
    fn from_u64(v: u64) -> Self;
    /// `part[i] = (part[i] +/- word_i(ks)) & m` where `word_i` is the i-th little-endian word of
    /// `word_bytes` (4 or 8) bytes of keystream `ks`. Written as plain loops over fixed-width
    /// words so that the compiler vectorises them.
    fn add_keystream(part: &mut [Self], ks: &[u8], word_bytes: usize, negate: bool, m: u64);
}

#[inline]
fn le32(w: &[u8]) -> u32 {
    u32::from_le_bytes([w[0], w[1], w[2], w[3]])
}

#[inline]
fn le64(w: &[u8]) -> u64 {
    u64::from_le_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]])
}

impl Word for u32 {
    const BITS: u32 = 32;
    #[inline]
    fn to_u64(self) -> u64 {
        u64::from(self)
    }
    #[inline]
    fn from_u64(v: u64) -> Self {
        v as u32
    }
    #[inline]
    fn add_keystream(part: &mut [Self], ks: &[u8], word_bytes: usize, negate: bool, m: u64) {
        debug_assert_eq!(word_bytes, 4, "u32 storage implies bits <= 32");
        let m = m as u32;
        if negate {
            for (v, w) in part.iter_mut().zip(ks.chunks_exact(4)) {
                *v = v.wrapping_sub(le32(w)) & m;
            }
        } else {
            for (v, w) in part.iter_mut().zip(ks.chunks_exact(4)) {
                *v = v.wrapping_add(le32(w)) & m;
            }
        }
    }
}

impl Word for u64 {
    const BITS: u32 = 64;
    #[inline]
    fn to_u64(self) -> u64 {
        self
    }
    #[inline]
    fn from_u64(v: u64) -> Self {
        v
    }
    #[inline]
    fn add_keystream(part: &mut [Self], ks: &[u8], word_bytes: usize, negate: bool, m: u64) {
        match (word_bytes, negate) {
            (4, false) => part
                .iter_mut()
                .zip(ks.chunks_exact(4))
                .for_each(|(v, w)| *v = v.wrapping_add(u64::from(le32(w))) & m),
            (4, true) => part
                .iter_mut()
                .zip(ks.chunks_exact(4))
                .for_each(|(v, w)| *v = v.wrapping_sub(u64::from(le32(w))) & m),
            (_, false) => part
                .iter_mut()
                .zip(ks.chunks_exact(8))
                .for_each(|(v, w)| *v = v.wrapping_add(le64(w)) & m),
            (_, true) => part
                .iter_mut()
                .zip(ks.chunks_exact(8))
                .for_each(|(v, w)| *v = v.wrapping_sub(le64(w)) & m),
        }
    }
}

/// `2^bits - 1` for `1 <= bits <= 64`.
#[inline]
#[must_use]
pub fn low_mask(bits: u32) -> u64 {
    if bits >= 64 {
        u64::MAX
    } else {
        (1u64 << bits) - 1
    }
}
