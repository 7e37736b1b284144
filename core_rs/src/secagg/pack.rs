//! Bit-packed encoding of ring elements: `bits` bits per element, not a whole word.
//!
//! Layout: a little-endian bit stream; element `i` occupies bits `[i*bits, (i+1)*bits)` with
//! its least significant bit first. The encoding of `n` elements is exactly
//! `ceil(n * bits / 8)` bytes and the padding bits of the last byte are zero. Decoding checks
//! the length and rejects non-zero padding, so every vector has exactly one encoding.

use super::{Word, low_mask};
use crate::error::MaskError;
use crate::secagg::mask::{check_bits, check_range};

/// Number of bytes of the encoding of `n` elements of `bits` bits.
#[must_use]
pub fn packed_len(n: usize, bits: u32) -> usize {
    (n as u128 * u128::from(bits)).div_ceil(8) as usize
}

/// Pack `x` (every element < 2^bits) into `bits` bits per element.
///
/// # Errors
/// [`MaskError::InvalidBits`] or [`MaskError::OutOfRange`].
pub fn pack_bits<W: Word>(x: &[W], bits: u32) -> Result<Vec<u8>, MaskError> {
    check_bits::<W>(bits)?;
    check_range(x, bits)?;
    let len = packed_len(x.len(), bits);
    let mut out = vec![0u8; len];
    let mut pos = 0;
    if bits <= 32 {
        // u64 accumulator holding fewer than 32 pending bits before each element, so
        // `nacc + bits <= 63`; whole 32-bit words are flushed as 4 little-endian bytes.
        let mut acc: u64 = 0;
        let mut nacc: u32 = 0;
        for v in x {
            acc |= v.to_u64() << nacc;
            nacc += bits;
            if nacc >= 32 {
                out[pos..pos + 4].copy_from_slice(&(acc as u32).to_le_bytes());
                pos += 4;
                acc >>= 32;
                nacc -= 32;
            }
        }
        flush_tail(&mut out[pos..], u128::from(acc), nacc);
    } else {
        // Same with a u128 accumulator and 8-byte words (fewer than 64 pending bits).
        let mut acc: u128 = 0;
        let mut nacc: u32 = 0;
        for v in x {
            acc |= u128::from(v.to_u64()) << nacc;
            nacc += bits;
            if nacc >= 64 {
                out[pos..pos + 8].copy_from_slice(&(acc as u64).to_le_bytes());
                pos += 8;
                acc >>= 64;
                nacc -= 64;
            }
        }
        flush_tail(&mut out[pos..], acc, nacc);
    }
    Ok(out)
}

/// Write the last `nacc` pending bits of `acc` as `ceil(nacc / 8)` bytes (the rest of `out`).
fn flush_tail(out: &mut [u8], mut acc: u128, nacc: u32) {
    debug_assert_eq!(out.len(), nacc.div_ceil(8) as usize);
    for b in out {
        *b = acc as u8;
        acc >>= 8;
    }
}

/// Unpack `n` elements of `bits` bits from `data`.
///
/// # Errors
/// [`MaskError::InvalidBits`] for bits outside 1..=64, [`MaskError::Length`] when `data` is
/// not exactly `ceil(n * bits / 8)` bytes or its padding bits are not zero.
pub fn unpack_bits<W: Word>(data: &[u8], bits: u32, n: usize) -> Result<Vec<W>, MaskError> {
    check_bits::<W>(bits)?;
    let expected = packed_len(n, bits);
    if data.len() != expected {
        return Err(MaskError::Length {
            what: "packed data length in bytes",
            expected,
            got: data.len(),
        });
    }
    let used = n as u128 * u128::from(bits);
    let pad = (expected as u128 * 8 - used) as u32;
    if pad > 0 && (data[expected - 1] >> (8 - pad)) != 0 {
        return Err(MaskError::Length {
            what: "padding bits of the last byte set to 1 (count)",
            expected: 0,
            got: (data[expected - 1] >> (8 - pad)).count_ones() as usize,
        });
    }
    let m = low_mask(bits);
    let mut out = Vec::with_capacity(n);
    let mut acc: u128 = 0;
    let mut nacc: u32 = 0;
    let mut bytes = data.iter();
    for _ in 0..n {
        while nacc < bits {
            // Length was checked above, so the stream cannot run dry before n elements.
            let b = bytes.next().copied().unwrap_or(0);
            acc |= u128::from(b) << nacc;
            nacc += 8;
        }
        out.push(W::from_u64((acc as u64) & m));
        acc >>= bits;
        nacc -= bits;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_answer() {
        // 3-bit elements 1, 2, 7 -> bits 100 010 111 (LSB first) -> 0b11_010_001, 0b1.
        assert_eq!(
            pack_bits(&[1u32, 2, 7], 3).unwrap(),
            vec![0b1101_0001, 0b0000_0001]
        );
        assert_eq!(
            unpack_bits::<u32>(&[0b1101_0001, 1], 3, 3).unwrap(),
            vec![1, 2, 7]
        );
        assert_eq!(pack_bits(&[u64::MAX], 64).unwrap(), vec![0xff; 8]);
    }

    #[test]
    fn rejects_malformed() {
        assert!(matches!(
            pack_bits(&[8u32], 3),
            Err(MaskError::OutOfRange { .. })
        ));
        assert!(unpack_bits::<u32>(&[0, 0], 3, 3).is_ok());
        assert!(matches!(
            unpack_bits::<u32>(&[0], 3, 3),
            Err(MaskError::Length { .. })
        ));
        assert!(matches!(
            unpack_bits::<u32>(&[0, 0b10], 3, 3),
            Err(MaskError::Length { .. })
        ));
        assert!(matches!(
            unpack_bits::<u32>(&[0; 8], 33, 1),
            Err(MaskError::StorageTooNarrow { .. })
        ));
    }

    proptest! {
        #[test]
        fn roundtrip(bits in 1u32..=64, raw in prop::collection::vec(any::<u64>(), 0..300)) {
            let x: Vec<u64> = raw.iter().map(|v| v & low_mask(bits)).collect();
            let p = pack_bits(&x, bits).unwrap();
            prop_assert_eq!(p.len(), packed_len(x.len(), bits));
            prop_assert_eq!(unpack_bits::<u64>(&p, bits, x.len()).unwrap(), x);
        }
    }
}
