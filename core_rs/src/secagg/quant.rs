//! Fixed-point quantization for secure aggregation, with unbiased stochastic rounding.
//!
//! `q = sround((clip(x, -r, r) + r) * L / (2r))` with `L = 2^bits - 1` levels above zero, so
//! every `q` is in `[0, L]`; `bits` is in `[1, 32]` (see below). With `y` the scaled value,
//! rounding up happens with probability equal to the fractional part of `y` to within 2^-32
//! (32 random bits from the secure generator), so `E[q] = y` and the dequantized value is
//! unbiased for inputs inside the clipping range, up to the floating-point error of `y`
//! itself: `y` is computed in f64 with three correctly rounded operations (`c + r`,
//! `L / (2r)`, the product), so it is within `3 * 2^-53 * L < 2^(bits - 51)` steps of the
//! exact value. Hence the bias of one element is below `2^(bits - 51) + 2^-32` steps
//! (`2^-19` steps at 32 bits, `2^-35` at 16) and its error below `1 + 2^(bits - 51)` steps.
//! One step is `2r / L = r / (2^(bits-1) - 1/2)`, i.e. `r / 2^(bits-1)` times
//! `1 / (1 - 2^-bits)` (the price of having a level exactly at both `-r` and `+r`, which
//! keeps the rounding unbiased over the whole range).
//!
//! Why at most 32 bits: the f64 error above grows as `2^(bits - 51)` steps, so wider
//! quantizers would be biased (0.01 to 0.1 step at 48..52 bits) and beyond 52 bits `y` no
//! longer resolves a step at all (deterministic rounding, errors of many steps). The `SecAgg+`
//! parameters cap `quant_bits` at 32 as well; the *ring* (mask, packing, sum) may still be
//! up to 64 bits wide.
//!
//! A sum of `n` quantized vectors is at most `n * L`; the caller picks a ring modulus 2^B with
//! `B >= bits + ceil(log2 n)` so that the sum cannot wrap. [`dequantize`] checks only what
//! the sum itself can show: it rejects an element above `n * L` (a wrapped sum that landed
//! there, or a wrong `n`); a sum that wrapped to a value at most `n * L` is indistinguishable
//! from a valid one, which is why the ring width is fixed from `n` before any masking.

use rayon::prelude::*;

use super::Word;
use super::mask::run_sequentially;
use crate::error::MaskError;
use crate::rng::{AesCtr, SecureRng};
use crate::scan::first_failing;

const CHUNK: usize = 1 << 15;

fn levels(bits: u32) -> u64 {
    super::low_mask(bits)
}

/// Widest quantizer supported (see module docs).
pub const MAX_QUANT_BITS: u32 = 32;

fn check_params(clip_range: f64, bits: u32) -> Result<(), MaskError> {
    if !(clip_range.is_finite() && clip_range > 0.0) {
        return Err(MaskError::InvalidParameter {
            name: "clip_range",
            requirement: "a finite number > 0",
            value: clip_range,
        });
    }
    if !(1..=MAX_QUANT_BITS).contains(&bits) {
        return Err(MaskError::InvalidBits {
            name: "bits",
            min: 1,
            max: MAX_QUANT_BITS,
            value: bits,
        });
    }
    Ok(())
}

/// Quantize `x` to integers in `[0, 2^bits - 1]`, `1 <= bits <= 32` (see module docs).
///
/// # Errors
/// [`MaskError::InvalidParameter`], [`MaskError::InvalidBits`] (bits outside `[1, 32]`),
/// [`MaskError::NonFinite`].
pub fn quantize<W: Word>(
    x: &[f32],
    clip_range: f64,
    bits: u32,
    rng: &mut SecureRng,
) -> Result<Vec<W>, MaskError> {
    check_params(clip_range, bits)?;
    if let Some(index) = first_failing(x, f32::is_finite) {
        return Err(MaskError::NonFinite {
            index,
            value: f64::from(x[index]),
        });
    }
    let l = levels(bits);
    let scale = l as f64 / (2.0 * clip_range);
    let key = rng.fork_key();
    let mut out = vec![W::default(); x.len()];
    let chunk = |(c, (o, xs)): (usize, (&mut [W], &[f32]))| {
        let mut stream = AesCtr::at_chunk(&key, c as u64);
        crate::simd::quantize_chunk(o, xs, clip_range, scale, l, &mut stream);
    };
    if run_sequentially(x.len(), CHUNK) {
        out.chunks_mut(CHUNK)
            .zip(x.chunks(CHUNK))
            .enumerate()
            .for_each(chunk);
    } else {
        out.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK))
            .enumerate()
            .for_each(chunk);
    }
    Ok(out)
}

/// `2^52`: for `0 <= y < 2^52`, `y + 2^52` is `round(y) + 2^52` exactly (the spacing of
/// doubles in `[2^52, 2^53)` is 1), and its low 52 mantissa bits are `round(y)` as an integer.
const TWO52: f64 = 4_503_599_627_370_496.0;

/// Quantize one chunk (`bits <= 32`; the arithmetic is valid up to 52 bits, where every
/// scaled value is below 2^52 and adding 2^52 rounds it to an integer exactly), with the same arithmetic and the same random words as
/// [`quantize_chunk`] (bit-identical output), but written without float<->int conversions so
/// that it vectorises: `floor(y)` comes from the 2^52 rounding trick above (round, then step
/// down when the rounded value exceeds `y`), and the integer result is read from the bits of
/// `y + 2^52` instead of converting `floor(y)` back. The result is capped at `L` as well:
/// `(2r) * (L / 2r)` can round to a hair above `L`, and then a tiny fractional part could
/// otherwise round it up to `L + 1`.
///
/// Compiled three times (portable, AVX2, AVX-512) and dispatched at run time by [`crate::simd`].
#[inline(always)]
pub(crate) fn quantize_chunk_lattice<W: Word>(
    o: &mut [W],
    xs: &[f32],
    r: f64,
    scale: f64,
    l: u64,
    stream: &mut AesCtr,
) {
    const INV_2_32: f64 = 1.0 / 4_294_967_296.0;
    const LOW52: u64 = (1 << 52) - 1;
    let mut rnd = [0u8; 1024];
    for (qs, vs) in o.chunks_mut(256).zip(xs.chunks(256)) {
        stream.fill(&mut rnd[..qs.len() * 4]);
        for ((q, &v), w) in qs.iter_mut().zip(vs).zip(rnd.chunks_exact(4)) {
            // clamp(v, -r, r) for the (checked) finite inputs, as compare-selects that map
            // to single min/max instructions.
            let v = f64::from(v);
            let c = if v < -r {
                -r
            } else if v > r {
                r
            } else {
                v
            };
            let y = (c + r) * scale; // in [0, L]
            let t = y + TWO52;
            let rounded = t - TWO52; // round(y), exact
            let down = rounded > y;
            let fl = if down { rounded - 1.0 } else { rounded }; // floor(y)
            // 32 random bits: the rounding probability is exact to 2^-32 of a step.
            let u = f64::from(u32::from_le_bytes([w[0], w[1], w[2], w[3]])) * INV_2_32;
            let up = u < y - fl;
            // Wrapping ops: no overflow-check branches in the vector loop (`down` implies
            // `round(y) >= 1`, and the sum is at most L + 1 < 2^53, so nothing wraps).
            let qv = (t.to_bits() & LOW52)
                .wrapping_sub(u64::from(down))
                .wrapping_add(u64::from(up));
            *q = W::from_u64(qv.min(l));
        }
    }
}

/// The reference kernel that [`quantize_chunk_lattice`] is tested against: the textbook
/// conversions. Random words are drawn 256 at a time, as there. `SMALL` (bits <= 62) uses the
/// signed conversions.
#[cfg(test)]
fn quantize_chunk<W: Word, const SMALL: bool>(
    o: &mut [W],
    xs: &[f32],
    r: f64,
    scale: f64,
    l: u64,
    stream: &mut AesCtr,
) {
    let mut rnd = [0u8; 1024];
    for (qs, vs) in o.chunks_mut(256).zip(xs.chunks(256)) {
        stream.fill(&mut rnd[..qs.len() * 4]);
        for ((q, &v), w) in qs.iter_mut().zip(vs).zip(rnd.chunks_exact(4)) {
            let y = (f64::from(v).clamp(-r, r) + r) * scale; // in [0, L]
            let fl = if SMALL {
                y as i64 as f64
            } else {
                y as u64 as f64
            }; // floor: y >= 0
            // 32 random bits: the rounding probability is exact to 2^-32 of a step.
            let u =
                f64::from(u32::from_le_bytes([w[0], w[1], w[2], w[3]])) * (1.0 / 4_294_967_296.0);
            let rounded = if u < y - fl { fl + 1.0 } else { fl };
            // `as` saturates; capped at L like `quantize_chunk_lattice`: `(2r) * (L / 2r)`
            // can round above L, and the rounding up could then give L + 1 (out of range).
            let qv = if SMALL {
                rounded as i64 as u64
            } else {
                rounded as u64
            };
            *q = W::from_u64(qv.min(l));
        }
    }
}

/// Map a sum of `n` quantized vectors back to floats: the sum of the inputs, or their
/// mean when `mean` is true.
///
/// # Errors
/// [`MaskError::InvalidParameter`] / [`MaskError::InvalidBits`] (the quantizer's `bits`,
/// in `[1, 32]`) for bad parameters and [`MaskError::Inconsistent`] for an element above
/// `n * (2^bits - 1)` (the only wrap this can detect, see module docs).
pub fn dequantize<W: Word>(
    sum: &[W],
    clip_range: f64,
    bits: u32,
    n: u64,
    mean: bool,
) -> Result<Vec<f32>, MaskError> {
    check_params(clip_range, bits)?;
    if n == 0 {
        return Err(MaskError::InvalidParameter {
            name: "n",
            requirement: "an integer >= 1",
            value: 0.0,
        });
    }
    let l = levels(bits);
    let max = u128::from(n) * u128::from(l);
    if let Some(index) = sum.iter().position(|v| u128::from(v.to_u64()) > max) {
        return Err(MaskError::Inconsistent {
            index,
            value: sum[index].to_u64(),
            max,
        });
    }
    let step = 2.0 * clip_range / l as f64;
    let offset = n as f64 * clip_range;
    let div = if mean { n as f64 } else { 1.0 };
    Ok(sum
        .par_iter()
        .map(|&s| ((s.to_u64() as f64 * step - offset) / div) as f32)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn stochastic_rounding_is_unbiased() {
        // 0.3 of the way between two levels: mean of 10^6 draws within 5 standard errors.
        let bits = 4;
        let r = 1.0;
        let step = 2.0 * r / 15.0;
        let x = (-r + 7.3 * step) as f32;
        let q: Vec<u32> = quantize(
            &vec![x; 1_000_000],
            r,
            bits,
            &mut SecureRng::from_seed(&[1; 32]).unwrap(),
        )
        .unwrap();
        let m = q.iter().map(|&v| f64::from(v)).sum::<f64>() / 1e6;
        let se = (0.3f64 * 0.7 / 1e6).sqrt();
        assert!((m - 7.3).abs() < 5.0 * se + 1e-6, "mean level {m}");
        assert!(q.iter().all(|&v| v == 7 || v == 8));
    }

    #[test]
    fn sum_roundtrip_and_wrap_detection() {
        let mut rng = SecureRng::from_seed(&[2; 32]).unwrap();
        let xs = [vec![0.5f32, -1.0, 2.0], vec![-0.25f32, 1.0, -3.0]];
        let qs: Vec<Vec<u64>> = xs
            .iter()
            .map(|x| quantize(x, 1.0, 20, &mut rng).unwrap())
            .collect();
        let s: Vec<u64> = (0..3).map(|i| qs[0][i] + qs[1][i]).collect();
        let mean = dequantize(&s, 1.0, 20, 2, true).unwrap();
        let expect = [0.125f32, 0.0, 0.0]; // 2.0 and -3.0 clip to 1 and -1
        for (a, b) in mean.iter().zip(expect) {
            assert!((a - b).abs() < 2e-6, "{a} vs {b}");
        }
        let bad = vec![2 * ((1u64 << 20) - 1) + 1];
        assert!(matches!(
            dequantize(&bad, 1.0, 20, 2, true),
            Err(MaskError::Inconsistent { .. })
        ));
        assert!(quantize::<u32>(&[f32::NAN], 1.0, 8, &mut rng).is_err());
        let mut x = vec![0.25f32; 5000];
        x[4500] = f32::NAN;
        x[2049] = f32::NEG_INFINITY;
        assert!(matches!(
            quantize::<u32>(&x, 1.0, 8, &mut rng),
            Err(MaskError::NonFinite { index: 2049, .. })
        ));
        assert!(quantize::<u32>(&[1.0], 1.0, 33, &mut rng).is_err());
        let err = quantize::<u64>(&[1.0], 1.0, 40, &mut rng).unwrap_err();
        assert_eq!(
            err.to_string(),
            "bits must be an integer in [1, 32], got 40"
        );
        assert!(quantize::<u32>(&[1.0], 1.0, 0, &mut rng).is_err());
        assert!(dequantize(&[0u64], 1.0, 33, 1, false).is_err());
        assert!(quantize::<u32>(&[1.0], 0.0, 8, &mut rng).is_err());
    }

    /// The vectorisable kernel (both of its compiled copies) draws the same words and returns
    /// exactly what the reference conversion-based kernel returns, except that it never
    /// exceeds `L`.
    #[test]
    fn lattice_kernel_matches_reference() {
        let key = [42u8; 32];
        let mut x: Vec<f32> = (0..5000)
            .map(|i| ((i as f32) * 0.618_034).sin() * 1.7)
            .collect();
        x.extend([
            0.0,
            -0.0,
            1.0,
            -1.0,
            1.5,
            -1.5,
            f32::MAX,
            f32::MIN,
            1e-30,
            -1e-30,
        ]);
        for bits in [1u32, 2, 8, 16, 20, 31, 32, 33, 40, 52] {
            for r in [1.0f64, 0.37, 1e-3] {
                let l = levels(bits);
                let scale = l as f64 / (2.0 * r);
                let mut expect = vec![0u64; x.len()];
                let mut fast = vec![0u64; x.len()];
                let mut disp = vec![0u64; x.len()];
                quantize_chunk::<u64, true>(
                    &mut expect,
                    &x,
                    r,
                    scale,
                    l,
                    &mut AesCtr::new(&key, 0),
                );
                quantize_chunk_lattice(&mut fast, &x, r, scale, l, &mut AesCtr::new(&key, 0));
                crate::simd::quantize_chunk(&mut disp, &x, r, scale, l, &mut AesCtr::new(&key, 0));
                let capped: Vec<u64> = expect.iter().map(|&q| q.min(l)).collect();
                assert_eq!(fast, capped, "bits {bits} r {r}");
                assert_eq!(disp, capped, "bits {bits} r {r} (dispatched)");
                if bits <= 32 {
                    let mut f32s = vec![0u32; x.len()];
                    crate::simd::quantize_chunk(
                        &mut f32s,
                        &x,
                        r,
                        scale,
                        l,
                        &mut AesCtr::new(&key, 0),
                    );
                    assert!(f32s.iter().zip(&capped).all(|(&a, &b)| u64::from(a) == b));
                }
            }
        }
    }

    proptest! {
        #[test]
        fn error_bounded_by_step(bits in 2u32..=32, r in 0.01f64..100.0, x in prop::collection::vec(-200f32..200.0, 1..200), seed in any::<[u8; 32]>()) {
            let mut rng = SecureRng::from_seed(&seed).unwrap();
            let q: Vec<u64> = quantize(&x, r, bits, &mut rng).unwrap();
            let back = dequantize(&q, r, bits, 1, false).unwrap();
            let bound = 2.0 * r / (2f64.powi(bits as i32) - 1.0);
            for (a, b) in x.iter().zip(&back) {
                let clipped = f64::from(*a).clamp(-r, r);
                // One quantization step, plus float32 rounding of the output.
                prop_assert!((clipped - f64::from(*b)).abs() <= bound * (1.0 + 1e-9) + r * 1.2e-7);
            }
        }
    }
}
