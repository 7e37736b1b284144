//! Fused mask application: `x <- x +/- PRG(seed_j) (mod 2^b)` for many seeds in one pass.
//!
//! The vector is split into segments processed in parallel; each segment generates, for each
//! seed, exactly the keystream blocks that cover it (random access by block index) into a
//! 1 KiB stack buffer and adds them in place. No mask-sized temporary is ever allocated.
//! Inputs are validated (every element < 2^b, storage wide enough, seeds 32 bytes) before
//! anything is written, so an error leaves `x` unchanged.

use rayon::prelude::*;

use aes::cipher::Array;

use super::prg::{BATCH_BLOCKS, Block, MaskDomain, MaskPrg, seed32};
use super::{Word, low_mask};
use crate::error::MaskError;
use crate::scan::first_failing;

/// Elements per parallel segment; a multiple of both 256 (u32 words per batch) and 128.
const SEGMENT: usize = 1 << 14;

/// One mask to apply: its seed and whether it is subtracted.
#[derive(Clone)]
pub struct MaskSpec {
    /// 32-byte seed.
    pub seed: [u8; 32],
    /// Subtract instead of add.
    pub negate: bool,
}

impl MaskSpec {
    /// Validate a seed and build a spec.
    ///
    /// # Errors
    /// [`MaskError::SeedLength`] unless the seed is 32 bytes.
    pub fn new(seed: &[u8], negate: bool) -> Result<Self, MaskError> {
        Ok(Self {
            seed: seed32(seed)?,
            negate,
        })
    }
}

impl Drop for MaskSpec {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.seed);
    }
}

/// Check a ring bit width (`1 <= bits <= 64`) and then against the storage type.
///
/// # Errors
/// [`MaskError::InvalidBits`] unless `1 <= bits <= 64`; [`MaskError::StorageTooNarrow`]
/// when `bits > W::BITS` (a valid width that needs u64 storage).
pub fn check_bits<W: Word>(bits: u32) -> Result<(), MaskError> {
    if !(1..=64).contains(&bits) {
        Err(MaskError::InvalidBits {
            name: "bits",
            min: 1,
            max: 64,
            value: bits,
        })
    } else if bits > W::BITS {
        Err(MaskError::StorageTooNarrow {
            what: "x",
            bits,
            storage: W::BITS,
        })
    } else {
        Ok(())
    }
}

/// Check that every element is below 2^bits.
///
/// # Errors
/// [`MaskError::OutOfRange`] for the first element that is not.
pub fn check_range<W: Word>(x: &[W], bits: u32) -> Result<(), MaskError> {
    if bits >= W::BITS {
        return Ok(());
    }
    let m = low_mask(bits);
    // `v <= m` for a low mask `m` is `v & !m == 0`, which vectorises better.
    match first_failing(x, |v| v.to_u64() & !m == 0) {
        Some(index) => Err(MaskError::OutOfRange {
            index,
            value: x[index].to_u64(),
            bits,
        }),
        None => Ok(()),
    }
}

/// Whether a data-parallel kernel over `n` elements in chunks of `chunk` should run on the
/// calling thread: a single chunk or a one-thread pool gains nothing from rayon, and entering
/// the pool from outside costs a cross-thread wake-up (~0.1 ms) per call.
#[must_use]
pub fn run_sequentially(n: usize, chunk: usize) -> bool {
    n <= chunk || rayon::current_num_threads() <= 1
}

/// Add one seed's mask to one segment: keystream batches of `BATCH_BLOCKS` blocks, each added
/// straight from the buffer it was encrypted in. Compiled once per vector width and
/// dispatched at run time by [`crate::simd::apply_segment`] (same result from every copy).
#[allow(clippy::inline_always)]
#[inline(always)]
pub(crate) fn apply_segment_portable<W: Word>(
    seg: &mut [W],
    first_elem: usize,
    prg: &MaskPrg,
    negate: bool,
    m: u64,
) {
    let wb = prg.word_bytes;
    let per_batch = BATCH_BLOCKS * 16 / wb;
    // The keystream is encrypted in place in this buffer and added straight from it.
    let mut blocks = [Block::default(); BATCH_BLOCKS];
    for (bi, part) in seg.chunks_mut(per_batch).enumerate() {
        let elem0 = first_elem + bi * per_batch;
        let first_block = (elem0 * wb / 16) as u64;
        let nbytes = part.len() * wb;
        let nblocks = nbytes.div_ceil(16);
        prg.keystream_blocks(first_block, &mut blocks[..nblocks]);
        let ks = &Array::slice_as_flattened(&blocks[..nblocks])[..nbytes];
        W::add_keystream(part, ks, wb, negate, m);
    }
}

/// Add (or subtract) the masks of every seed in `masks` to `x` in place, mod 2^bits.
///
/// # Errors
/// [`MaskError::InvalidBits`] or [`MaskError::OutOfRange`]; `x` is then unchanged.
pub fn apply_masks<W: Word>(
    x: &mut [W],
    masks: &[MaskSpec],
    bits: u32,
    domain: &MaskDomain,
) -> Result<(), MaskError> {
    check_bits::<W>(bits)?;
    check_range(x, bits)?;
    let m = low_mask(bits);
    let prgs: Vec<(MaskPrg, bool)> = masks
        .iter()
        .map(|s| (MaskPrg::new(&s.seed, domain, bits), s.negate))
        .collect();
    let segment = |(si, seg): (usize, &mut [W])| {
        for (prg, negate) in &prgs {
            crate::simd::apply_segment(seg, si * SEGMENT, prg, *negate, m);
        }
    };
    if run_sequentially(x.len(), SEGMENT) {
        x.chunks_mut(SEGMENT).enumerate().for_each(segment);
    } else {
        x.par_chunks_mut(SEGMENT).enumerate().for_each(segment);
    }
    Ok(())
}

/// The mask of one seed as a vector of `n` ring elements (for tests and vectors).
///
/// # Errors
/// [`MaskError::InvalidBits`] unless `1 <= bits <= 64`.
pub fn expand_mask(
    seed: &[u8; 32],
    n: usize,
    bits: u32,
    domain: &MaskDomain,
) -> Result<Vec<u64>, MaskError> {
    let mut out = vec![0u64; n];
    apply_masks(
        &mut out,
        &[MaskSpec {
            seed: *seed,
            negate: false,
        }],
        bits,
        domain,
    )?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn dom() -> MaskDomain {
        MaskDomain::new(b"session", 7, "self")
    }

    #[test]
    fn expansion_is_random_access_consistent() {
        // The mask of a long vector equals the concatenation of independently generated parts:
        // the segment split must not change the output.
        let seed = [9u8; 32];
        for bits in [1, 7, 32, 33, 64] {
            let full = expand_mask(&seed, 3 * SEGMENT + 17, bits, &dom()).unwrap();
            let short = expand_mask(&seed, 300, bits, &dom()).unwrap();
            assert_eq!(&full[..300], &short[..]);
            assert!(full.iter().all(|&v| v <= low_mask(bits)));
        }
    }

    #[test]
    fn u32_and_u64_storage_agree() {
        let seed = [5u8; 32];
        let mut a = vec![1u32; 1000];
        let mut b = vec![1u64; 1000];
        let spec = [MaskSpec::new(&seed, false).unwrap()];
        apply_masks(&mut a, &spec, 20, &dom()).unwrap();
        apply_masks(&mut b, &spec, 20, &dom()).unwrap();
        assert_eq!(a.iter().map(|&v| u64::from(v)).collect::<Vec<_>>(), b);
    }

    #[test]
    fn rejects_bad_input_without_writing() {
        let mut x = vec![0u32, 300];
        let spec = [MaskSpec::new(&[1u8; 32], false).unwrap()];
        assert!(matches!(
            apply_masks(&mut x, &spec, 8, &dom()),
            Err(MaskError::OutOfRange {
                index: 1,
                value: 300,
                bits: 8
            })
        ));
        assert_eq!(x, vec![0, 300]);
        // The blocked range check reports the first offending element past the first block.
        let mut y = vec![1u32; 5000];
        y[4100] = 1 << 9;
        y[3000] = 1 << 8;
        assert!(matches!(
            apply_masks(&mut y, &spec, 8, &dom()),
            Err(MaskError::OutOfRange {
                index: 3000,
                value: 256,
                bits: 8
            })
        ));
        assert!(matches!(
            apply_masks(&mut x, &spec, 33, &dom()),
            Err(MaskError::StorageTooNarrow {
                bits: 33,
                storage: 32,
                ..
            })
        ));
        assert!(matches!(
            apply_masks(&mut x, &spec, 0, &dom()),
            Err(MaskError::InvalidBits { .. })
        ));
        assert!(matches!(
            MaskSpec::new(&[0u8; 16], false),
            Err(MaskError::SeedLength(16))
        ));
    }

    #[test]
    fn low_bits_are_uniform() {
        // Chi-square on the 16 residues mod 16 of 2^16 mask elements (df = 15; the 1e-6
        // critical value is ~ 52.6). Fixed seed, so this cannot flake.
        let v = expand_mask(&[11u8; 32], 1 << 16, 32, &dom()).unwrap();
        let mut counts = [0f64; 16];
        for x in v {
            counts[(x & 15) as usize] += 1.0;
        }
        let e = (1 << 16) as f64 / 16.0;
        let chi2: f64 = counts.iter().map(|c| (c - e) * (c - e) / e).sum();
        assert!(chi2 < 52.6, "chi2 = {chi2}");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn masks_cancel(bits in 1u32..=64, n in 0usize..2000, seeds in prop::collection::vec(any::<[u8; 32]>(), 1..6), x0 in any::<u64>()) {
            let m = low_mask(bits);
            let x: Vec<u64> = (0..n as u64).map(|i| (x0 ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15)) & m).collect();
            let mut y = x.clone();
            let add: Vec<MaskSpec> = seeds.iter().map(|s| MaskSpec::new(s, false).unwrap()).collect();
            let sub: Vec<MaskSpec> = seeds.iter().map(|s| MaskSpec::new(s, true).unwrap()).collect();
            apply_masks(&mut y, &add, bits, &dom()).unwrap();
            if n > 64 && bits > 8 { prop_assert_ne!(&y, &x); }
            apply_masks(&mut y, &sub, bits, &dom()).unwrap();
            prop_assert_eq!(y, x);
        }

        #[test]
        fn pairwise_masks_cancel_in_the_sum(bits in 1u32..=32, n in 1usize..500, clients in 2usize..6) {
            // Client i adds +PRG(s_ij) for j > i and -PRG(s_ji) for j < i; the sum over all
            // clients of the masked zero vectors is zero mod 2^b.
            let m = low_mask(bits);
            let seed = |i: usize, j: usize| { let mut s = [0u8; 32]; s[0] = i as u8; s[1] = j as u8; s };
            let mut total = vec![0u64; n];
            for i in 0..clients {
                let specs: Vec<MaskSpec> = (0..clients).filter(|&j| j != i).map(|j| {
                    let (a, b) = if i < j { (i, j) } else { (j, i) };
                    MaskSpec::new(&seed(a, b), j < i).unwrap()
                }).collect();
                let mut y = vec![0u32; n];
                apply_masks(&mut y, &specs, bits, &dom()).unwrap();
                for (t, v) in total.iter_mut().zip(&y) { *t = t.wrapping_add(u64::from(*v)) & m; }
            }
            prop_assert!(total.iter().all(|&v| v == 0));
        }
    }
}
