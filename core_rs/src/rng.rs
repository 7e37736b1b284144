//! The core's only source of randomness: AES-256 in counter mode.
//!
//! [`SecureRng`] is keyed either from the operating system (`getrandom`) or from an explicit
//! 32-byte seed (reproducible tests and known-answer vectors). The AES key is
//! `SHA-256("confide/secure-rng/v1" || seed)`, the counter is a 128-bit big-endian block
//! index starting at 0, and the keystream is consumed strictly in order, so a seed fixes
//! every output bit. There is no global or thread-local generator anywhere in the crate.
//!
//! Bulk kernels that run on several threads call [`SecureRng::fork_key`] once (32 bytes
//! drawn from the parent stream) and give chunk `c` of their output the independent stream
//! [`AesCtr::at_chunk`]`(key, c)`, which starts at block `c * 2^64`. Output therefore does not
//! depend on the number of threads. Keys are zeroized on drop.

use aes::Aes256;
use aes::cipher::{Array, BlockCipherEncrypt, KeyInit};
use rand_core::{CryptoRng, RngCore};
use sha2::{Digest, Sha256};
use zeroize::Zeroize;

use crate::error::NoiseError;

/// Number of AES blocks produced per refill; a multiple of 8 so AES-NI pipelines fully.
const BUF_BLOCKS: usize = 64;
const BUF_BYTES: usize = BUF_BLOCKS * 16;

type Block = Array<u8, aes::cipher::consts::U16>;

/// AES-256-CTR keystream generator with a 1 KiB buffer.
///
/// The counter blocks are encrypted in place and read back as bytes straight from that
/// buffer (no second copy per refill).
pub struct AesCtr {
    cipher: Aes256,
    counter: u128,
    blocks: [Block; BUF_BLOCKS],
    pos: usize,
}

impl AesCtr {
    /// Keystream of `key` starting at block `start_block`.
    #[must_use]
    pub fn new(key: &[u8; 32], start_block: u128) -> Self {
        Self {
            cipher: Aes256::new(&Array::from(*key)),
            counter: start_block,
            blocks: [Block::default(); BUF_BLOCKS],
            pos: BUF_BYTES,
        }
    }

    /// The stream for chunk `chunk` of a parallel kernel (starts at block `chunk * 2^64`).
    #[must_use]
    pub fn at_chunk(key: &[u8; 32], chunk: u64) -> Self {
        Self::new(key, u128::from(chunk) << 64)
    }

    fn refill(&mut self) {
        for b in &mut self.blocks {
            b.copy_from_slice(&self.counter.to_be_bytes());
            self.counter = self.counter.wrapping_add(1);
        }
        self.cipher.encrypt_blocks(&mut self.blocks);
        self.pos = 0;
    }

    /// The keystream buffer as bytes (valid from `pos` on after a refill).
    #[inline]
    fn buf(&self) -> &[u8] {
        Array::slice_as_flattened(&self.blocks)
    }

    /// Next 64 uniformly random bits.
    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        if self.pos + 8 > BUF_BYTES {
            self.refill();
        }
        let mut w = [0u8; 8];
        w.copy_from_slice(&self.buf()[self.pos..self.pos + 8]);
        self.pos += 8;
        u64::from_le_bytes(w)
    }

    /// Next 32 uniformly random bits.
    #[inline]
    pub fn next_u32(&mut self) -> u32 {
        if self.pos + 4 > BUF_BYTES {
            self.refill();
        }
        let mut w = [0u8; 4];
        w.copy_from_slice(&self.buf()[self.pos..self.pos + 4]);
        self.pos += 4;
        u32::from_le_bytes(w)
    }

    /// Fill `dest` with keystream bytes.
    pub fn fill(&mut self, dest: &mut [u8]) {
        let mut off = 0;
        while off < dest.len() {
            if self.pos == BUF_BYTES {
                self.refill();
            }
            let n = (BUF_BYTES - self.pos).min(dest.len() - off);
            dest[off..off + n].copy_from_slice(&self.buf()[self.pos..self.pos + n]);
            self.pos += n;
            off += n;
        }
    }
}

impl Drop for AesCtr {
    fn drop(&mut self) {
        for b in &mut self.blocks {
            b.as_mut_slice().zeroize();
        }
        // The Aes256 key schedule is zeroized by aes's own `zeroize` feature.
    }
}

impl RngCore for AesCtr {
    fn next_u32(&mut self) -> u32 {
        AesCtr::next_u32(self)
    }
    fn next_u64(&mut self) -> u64 {
        AesCtr::next_u64(self)
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        self.fill(dest);
    }
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand_core::Error> {
        self.fill(dest);
        Ok(())
    }
}

impl CryptoRng for AesCtr {}

/// The cryptographically secure generator handed to every sampler.
pub struct SecureRng {
    stream: AesCtr,
    seeded: bool,
}

impl SecureRng {
    /// Generator keyed from an explicit 32-byte seed (reproducible).
    ///
    /// # Errors
    /// [`NoiseError::SeedLength`] if `seed` is not 32 bytes.
    pub fn from_seed(seed: &[u8]) -> Result<Self, NoiseError> {
        let seed: &[u8; 32] = seed
            .try_into()
            .map_err(|_| NoiseError::SeedLength(seed.len()))?;
        let mut h = Sha256::new();
        h.update(b"confide/secure-rng/v1");
        h.update(seed);
        let mut key: [u8; 32] = h.finalize().into();
        let stream = AesCtr::new(&key, 0);
        key.zeroize();
        Ok(Self {
            stream,
            seeded: true,
        })
    }

    /// Generator keyed from 32 bytes of operating-system randomness.
    ///
    /// # Errors
    /// [`NoiseError::OsRandom`] if the OS source fails.
    pub fn from_os() -> Result<Self, NoiseError> {
        let mut seed = [0u8; 32];
        getrandom::getrandom(&mut seed).map_err(|e| NoiseError::OsRandom(e.to_string()))?;
        let mut rng = Self::from_seed(&seed)?;
        seed.zeroize();
        rng.seeded = false;
        Ok(rng)
    }

    /// Whether this generator was built from an explicit seed (reproducible) or the OS.
    #[must_use]
    pub fn is_seeded(&self) -> bool {
        self.seeded
    }

    /// Draw a fresh 32-byte key for the per-chunk streams of a parallel kernel.
    pub fn fork_key(&mut self) -> [u8; 32] {
        let mut k = [0u8; 32];
        self.stream.fill(&mut k);
        k
    }
}

impl RngCore for SecureRng {
    fn next_u32(&mut self) -> u32 {
        self.stream.next_u32()
    }
    fn next_u64(&mut self) -> u64 {
        self.stream.next_u64()
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        self.stream.fill(dest);
    }
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand_core::Error> {
        self.stream.fill(dest);
        Ok(())
    }
}

impl CryptoRng for SecureRng {}

/// A uniform f64 in (0, 1] with full floating-point resolution at every magnitude: the
/// binary exponent is geometric (leading zeros of fresh 64-bit words) and the 52-bit
/// mantissa is fresh, so `-ln(U)` is resolved to about 2^-52 absolute even deep in the tail
/// (a plain 53-bit fixed-point `U` resolves `-ln(U)` only to `2^-53 e^{-ln U}`).
#[must_use]
pub fn open01_full<R: RngCore>(rng: &mut R) -> f64 {
    let mut zeros: i32 = 0;
    loop {
        let w = rng.next_u64();
        if w != 0 {
            zeros += w.leading_zeros() as i32;
            break;
        }
        zeros += 64;
        if zeros >= 1000 {
            break; // probability 2^-1000; U is then ~2^-1000, still a normal f64
        }
    }
    let m = rng.next_u64() >> 12; // 52 bits
    // U in [2^-(zeros+1), 2^-zeros): mantissa 1.m, exponent -(zeros+1).
    (1.0 + m as f64 * (1.0 / (1u64 << 52) as f64)) * 2f64.powi(-(zeros + 1))
}

/// Uniform integer in `[0, bound)` by rejection (exactly uniform), for `bound >= 1`.
pub fn uniform_below_u128<R: RngCore + CryptoRng>(rng: &mut R, bound: u128) -> u128 {
    debug_assert!(bound >= 1);
    if bound == 1 {
        return 0;
    }
    let bits = 128 - (bound - 1).leading_zeros();
    let mask = if bits == 128 {
        u128::MAX
    } else {
        (1u128 << bits) - 1
    };
    loop {
        let v = ((u128::from(rng.next_u64()) << 64) | u128::from(rng.next_u64())) & mask;
        if v < bound {
            return v;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_fixes_stream_and_seeds_differ() {
        let mut a = SecureRng::from_seed(&[7u8; 32]).unwrap();
        let mut b = SecureRng::from_seed(&[7u8; 32]).unwrap();
        let mut c = SecureRng::from_seed(&[8u8; 32]).unwrap();
        let xa: Vec<u64> = (0..300).map(|_| a.next_u64()).collect();
        let xb: Vec<u64> = (0..300).map(|_| b.next_u64()).collect();
        let xc: Vec<u64> = (0..300).map(|_| c.next_u64()).collect();
        assert_eq!(xa, xb);
        assert_ne!(xa, xc);
        assert!(a.is_seeded());
        assert!(!SecureRng::from_os().unwrap().is_seeded());
        assert!(matches!(
            SecureRng::from_seed(&[0u8; 31]),
            Err(NoiseError::SeedLength(31))
        ));
    }

    #[test]
    fn aes_ctr_matches_fips197_style_block() {
        // Block 0 of AES-256-CTR is AES-256(key, 0^128). FIPS-197 C.3 gives the
        // encryption of 00112233..ff under key 000102..1f; check that via the raw cipher
        // and that our stream uses big-endian block counters from `start_block`.
        let key: [u8; 32] = core::array::from_fn(|i| i as u8);
        let pt: [u8; 16] = core::array::from_fn(|i| (i as u8) * 0x11);
        let mut s = AesCtr::new(&key, u128::from_be_bytes(pt));
        let mut out = [0u8; 16];
        s.fill(&mut out);
        let expected = [
            0x8e, 0xa2, 0xb7, 0xca, 0x51, 0x67, 0x45, 0xbf, 0xea, 0xfc, 0x49, 0x90, 0x4b, 0x49,
            0x60, 0x89,
        ];
        assert_eq!(out, expected);
    }

    #[test]
    fn uniform_below_is_in_range() {
        let mut r = SecureRng::from_seed(&[1u8; 32]).unwrap();
        for b in [1u128, 2, 3, 7, 1000, u128::MAX] {
            for _ in 0..100 {
                assert!(uniform_below_u128(&mut r, b) < b);
            }
        }
    }
}
