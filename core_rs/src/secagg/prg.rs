//! Keyed PRG for secure-aggregation masks: AES-128 in counter mode.
//!
//! Key schedule: `key = HKDF-SHA256(salt = "confide/secagg/mask/v1", ikm = seed, info)` (16
//! bytes), with `info = be32(len(session)) || session || be64(round) || be32(len(purpose)) ||
//! purpose || u8(bits)`, so masks for different sessions, rounds, purposes (self mask vs
//! pairwise mask) or moduli are independent even under the same seed. Keystream block `j`
//! is `AES-128(key, be128(j))`. Element `i` of a mask mod 2^b is the little-endian word at
//! byte offset `4i` (b <= 32) or `8i` (b > 32) of the keystream, reduced to its low b bits;
//! since 2^b divides 2^32 (resp. 2^64) the reduction is *exactly* uniform. Any element range
//! can be generated directly (random access by block index), which the fused kernels use to
//! split a vector across threads without materialising the mask.

use aes::Aes128;
use aes::cipher::{Array, BlockCipherEncrypt, KeyInit};
use hkdf::Hkdf;
use sha2::Sha256;
use zeroize::Zeroize;

use crate::error::MaskError;

/// Blocks encrypted per batch (a multiple of the 8-block AES-NI pipeline).
pub const BATCH_BLOCKS: usize = 64;

/// One 16-byte AES block.
pub type Block = Array<u8, aes::cipher::consts::U16>;

/// Domain separation of a mask: which session, round and purpose it belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MaskDomain {
    /// Session identifier (e.g. a hash of all advertised keys).
    pub session: Vec<u8>,
    /// Round number.
    pub round: u64,
    /// Purpose tag, e.g. "self" or "pair".
    pub purpose: String,
}

impl MaskDomain {
    /// Build a domain.
    #[must_use]
    pub fn new(session: &[u8], round: u64, purpose: &str) -> Self {
        Self {
            session: session.to_vec(),
            round,
            purpose: purpose.to_owned(),
        }
    }

    fn info(&self, bits: u32) -> Vec<u8> {
        let mut info = Vec::with_capacity(self.session.len() + self.purpose.len() + 17);
        info.extend_from_slice(&(self.session.len() as u32).to_be_bytes());
        info.extend_from_slice(&self.session);
        info.extend_from_slice(&self.round.to_be_bytes());
        info.extend_from_slice(&(self.purpose.len() as u32).to_be_bytes());
        info.extend_from_slice(self.purpose.as_bytes());
        info.push(bits as u8);
        info
    }
}

/// Check a seed's length and copy it.
///
/// # Errors
/// [`MaskError::SeedLength`] unless exactly 32 bytes.
pub fn seed32(seed: &[u8]) -> Result<[u8; 32], MaskError> {
    seed.try_into()
        .map_err(|_| MaskError::SeedLength(seed.len()))
}

/// The AES-128-CTR mask generator for one (seed, domain, bits).
#[derive(Clone)]
pub struct MaskPrg {
    cipher: Aes128,
    /// Bytes per ring element in the keystream (4 or 8).
    pub word_bytes: usize,
}

impl MaskPrg {
    /// Derive the generator (see module docs for the key schedule).
    #[must_use]
    pub fn new(seed: &[u8; 32], domain: &MaskDomain, bits: u32) -> Self {
        let hk = Hkdf::<Sha256>::new(Some(b"confide/secagg/mask/v1"), seed);
        let mut key = [0u8; 16];
        hk.expand(&domain.info(bits), &mut key)
            .expect("16 bytes is a valid HKDF-SHA256 output length");
        let cipher = Aes128::new(&Array::from(key));
        key.zeroize();
        Self {
            cipher,
            word_bytes: if bits <= 32 { 4 } else { 8 },
        }
    }

    /// Keystream blocks `[first_block, first_block + blocks.len())`, encrypted in place in
    /// `blocks` (any previous content is overwritten). Read them as bytes with
    /// [`Array::slice_as_flattened`].
    #[inline]
    pub fn keystream_blocks(&self, first_block: u64, blocks: &mut [Block]) {
        for (j, b) in blocks.iter_mut().enumerate() {
            let ctr = u128::from(first_block) + j as u128;
            b.copy_from_slice(&ctr.to_be_bytes());
        }
        self.cipher.encrypt_blocks(blocks);
    }

    /// Keystream blocks `[first_block, first_block + out.len()/16)` into `out`
    /// (`out.len()` a multiple of 16, at most `BATCH_BLOCKS * 16`).
    #[inline]
    pub fn blocks(&self, first_block: u64, out: &mut [u8]) {
        let mut blocks = [Block::default(); BATCH_BLOCKS];
        let nb = out.len() / 16;
        self.keystream_blocks(first_block, &mut blocks[..nb]);
        out.copy_from_slice(&Array::slice_as_flattened(&blocks[..nb])[..nb * 16]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domains_separate() {
        let seed = [3u8; 32];
        let mut a = [0u8; 32];
        let mut b = [0u8; 32];
        MaskPrg::new(&seed, &MaskDomain::new(b"s", 1, "self"), 32).blocks(0, &mut a);
        MaskPrg::new(&seed, &MaskDomain::new(b"s", 1, "pair"), 32).blocks(0, &mut b);
        assert_ne!(a, b);
        MaskPrg::new(&seed, &MaskDomain::new(b"s", 2, "self"), 32).blocks(0, &mut b);
        assert_ne!(a, b);
        // Length prefixes: ("ab", "c") and ("a", "bc") must differ.
        MaskPrg::new(&seed, &MaskDomain::new(b"ab", 1, "c"), 32).blocks(0, &mut a);
        MaskPrg::new(&seed, &MaskDomain::new(b"a", 1, "bc"), 32).blocks(0, &mut b);
        assert_ne!(a, b);
    }
}
