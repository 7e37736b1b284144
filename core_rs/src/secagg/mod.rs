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
