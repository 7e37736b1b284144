//! L2 clipping of one vector and of every row of a (batch, dim) matrix.
//!
//! Invariants: after a successful clip the L2 norm of the result, computed exactly, is at
//! most `max_norm`, for every finite input and every finite `max_norm > 0`. The scale factor
//! is shrunk by 2^-20 relative to `max_norm / norm` to absorb float32 rounding of the factor
//! and of the scaled elements (the bias this introduces is below 1e-6 relative). That margin
//! suffices while the float32 factor is a normal number and every product's absolute
//! rounding error (at most 2^-150, subnormal results) is negligible against `max_norm`, i.e.
//! `factor >= 2^-126` and `max_norm >= sqrt(dim) * 2^-126`. Outside that range (a huge row or
//! a tiny bound) each element is scaled in f64 by the unrounded factor and rounded *toward
//! zero* to float32, so no element grows and the bound holds unconditionally (the result may
//! then be much smaller than `max_norm`, down to all zeros when `max_norm` is below the
//! smallest float32). Norms are accumulated in f64; a vector whose f64 norm is within that
//! sum's rounding error (`(n + 4) 2^-52` relative) of the bound is tested again with a
//! compensated (double-double) sum of squares, so one whose true norm exceeds the bound by
//! less than the f64 error is still clipped. Inputs with NaN or Inf are rejected
//! *before* anything is written, so a failed call leaves the data intact.

use rayon::prelude::*;

use crate::error::ClipError;

/// Relative safety margin on the clipping factor (see module docs).
const SHRINK: f64 = 1.0 - 1.0 / (1u64 << 20) as f64;

fn check_max_norm(max_norm: f64) -> Result<(), ClipError> {
    if max_norm.is_finite() && max_norm > 0.0 {
        Ok(())
    } else {
        Err(ClipError::InvalidMaxNorm(max_norm))
    }
}

/// The error for a vector whose norm is not finite: names the first NaN/Inf element.
/// `row` is `Some(i)` for row `i` of a matrix (the element is then `x[i, j]`).
fn non_finite(x: &[f32], row: Option<usize>) -> ClipError {
    let j = x.iter().position(|v| !v.is_finite()).unwrap_or(0);
    let value = x.get(j).map_or(f64::NAN, |&v| f64::from(v));
    let location = match row {
        Some(i) => format!("x[{i}, {j}] (row {i})"),
        None => format!("x[{j}]"),
    };
    ClipError::NonFinite { location, value }
}

/// L2 norm of a float32 vector, accumulated in f64, rejecting NaN/Inf.
///
/// # Errors
/// [`ClipError::NonFinite`] naming the first NaN/Inf element.
pub fn checked_l2_norm(x: &[f32]) -> Result<f64, ClipError> {
    let norm = l2_norm(x);
    // Squares of finite float32 values are at most 2^256, so the f64 sum cannot overflow:
    // a non-finite norm means a non-finite element.
    if norm.is_finite() {
        Ok(norm)
    } else {
        Err(non_finite(x, None))
    }
}

/// L2 norm of a float32 vector, accumulated in f64 with four independent lanes (NaN or Inf
/// when an element is; see [`checked_l2_norm`]).
#[must_use]
pub fn l2_norm(x: &[f32]) -> f64 {
    let mut acc = [0.0f64; 4];
    let chunks = x.chunks_exact(4);
    let rem = chunks.remainder();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            // Plain multiply-add, not `mul_add`: without FMA in the baseline target that is a
            // libm call per element.
            let v = f64::from(v);
            *a += v * v;
        }
    }
    let mut s = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    for &v in rem {
        let v = f64::from(v);
        s += v * v;
    }
    s.sqrt()
}

/// `2^-126`, the smallest normal float32.
const MIN_NORMAL: f64 = 1.175_494_350_822_287_5e-38;

/// `t` rounded to float32 toward zero (`|result| <= |t|`), for finite `t`.
#[inline]
fn to_f32_toward_zero(t: f64) -> f32 {
    let r = t as f32;
    if f64::from(r).abs() > t.abs() {
        // r != 0 here, and decrementing the bits of a nonzero float moves it one ulp
        // toward zero whatever its sign.
        f32::from_bits(r.to_bits() - 1)
    } else {
        r
    }
}

/// `a + b` as an unevaluated double-double `(sum, error)`, exactly (Knuth's `TwoSum`).
#[inline]
fn two_sum(a: f64, b: f64) -> (f64, f64) {
    let s = a + b;
    let z = s - a;
    (s, (a - (s - z)) + (b - z))
}

/// Whether `sum(x_i^2) > c^2`, decided in double-double arithmetic: the squares of float32
/// values are exact doubles, their sum is compensated (error about `n^2 2^-106` relative
/// instead of `n 2^-53`) and `c^2` is split exactly with a fused multiply-add. Used only when
/// the plain f64 norm is within its own rounding error of the bound, where it cannot decide.
fn sum_of_squares_exceeds(x: &[f32], c: f64) -> bool {
    let (mut hi, mut lo) = (0.0f64, 0.0f64);
    for &v in x {
        let v = f64::from(v);
        let (s, e) = two_sum(hi, v * v);
        hi = s;
        lo += e;
    }
    let c2 = c * c;
    let c2_err = c.mul_add(c, -c2);
    (hi - c2) + (lo - c2_err) > 0.0
}

/// Whether `x` (plain f64 norm `norm`) must be clipped to `max_norm`: surely when
/// `norm > max_norm`; near the bound, where the f64 norm's relative error (at most
/// `(n + 1) 2^-53`) could hide an excess, by the compensated comparison above.
fn exceeds(x: &[f32], norm: f64, max_norm: f64) -> bool {
    if norm > max_norm {
        return true;
    }
    let margin = (x.len() as f64 + 4.0) * f64::EPSILON;
    norm >= max_norm * (1.0 - margin) && sum_of_squares_exceeds(x, max_norm)
}

fn scale(x: &mut [f32], norm: f64, max_norm: f64) {
    if exceeds(x, norm, max_norm) {
        let f = max_norm / norm * SHRINK;
        // The float32 fast path is exact to the 2^-20 margin only in the normal range (see
        // module docs); `sqrt(dim) * 2^-126 <= max_norm` keeps the subnormal products'
        // absolute errors below it.
        let normal = f >= MIN_NORMAL && (x.len() as f64).sqrt() * MIN_NORMAL <= max_norm;
        if normal {
            let f = f as f32;
            for v in x.iter_mut() {
                *v *= f;
            }
        } else {
            for v in x.iter_mut() {
                *v = to_f32_toward_zero(f64::from(*v) * f);
            }
        }
    }
}

/// Clip `x` in place to L2 norm at most `max_norm`; returns the norm before clipping.
///
/// # Errors
/// [`ClipError::InvalidMaxNorm`] for a non-finite or non-positive bound and
/// [`ClipError::NonFinite`] when `x` holds NaN/Inf (then `x` is left unchanged).
pub fn clip_l2(x: &mut [f32], max_norm: f64) -> Result<f64, ClipError> {
    check_max_norm(max_norm)?;
    let norm = checked_l2_norm(x)?;
    scale(x, norm, max_norm);
    Ok(norm)
}

/// Clip every row of a row-major (rows, dim) matrix in place; returns the pre-clip norms.
///
/// Rows are processed in parallel. All norms are computed and checked before any row is
/// written, so an error leaves the whole matrix unchanged.
///
/// # Errors
/// [`ClipError::Shape`] when `data.len() != rows * dim`, plus the errors of [`clip_l2`].
pub fn clip_rows(
    data: &mut [f32],
    rows: usize,
    dim: usize,
    max_norm: f64,
) -> Result<Vec<f64>, ClipError> {
    check_max_norm(max_norm)?;
    let expected = rows.checked_mul(dim).ok_or(ClipError::Shape {
        expected: usize::MAX,
        got: data.len(),
    })?;
    if expected != data.len() {
        return Err(ClipError::Shape {
            expected,
            got: data.len(),
        });
    }
    if dim == 0 {
        return Ok(vec![0.0; rows]);
    }
    let norms: Vec<f64> = data.par_chunks(dim).map(l2_norm).collect();
    if let Some(i) = norms.iter().position(|n| !n.is_finite()) {
        return Err(non_finite(&data[i * dim..(i + 1) * dim], Some(i)));
    }
    data.par_chunks_mut(dim)
        .zip(norms.par_iter())
        .for_each(|(row, &n)| scale(row, n, max_norm));
    Ok(norms)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn exact_norm(x: &[f32]) -> f64 {
        x.iter()
            .map(|&v| f64::from(v) * f64::from(v))
            .sum::<f64>()
            .sqrt()
    }

    #[test]
    fn known_answer() {
        let mut x = vec![3.0f32, 4.0];
        let n = clip_l2(&mut x, 1.0).unwrap();
        assert!((n - 5.0).abs() < 1e-12);
        assert!((f64::from(x[0]) - 0.6).abs() < 1e-5 && (f64::from(x[1]) - 0.8).abs() < 1e-5);
        // Below the bound: untouched.
        let mut y = vec![0.3f32, 0.4];
        clip_l2(&mut y, 1.0).unwrap();
        assert_eq!(y, vec![0.3, 0.4]);
    }

    #[test]
    fn rejects_bad_input_without_writing() {
        let mut x = vec![1.0f32, f32::NAN, 3.0];
        assert!(matches!(
            clip_l2(&mut x, 1.0),
            Err(ClipError::NonFinite { .. })
        ));
        assert_eq!(x[0], 1.0);
        assert!(matches!(
            clip_l2(&mut x, 0.0),
            Err(ClipError::InvalidMaxNorm(_))
        ));
        assert!(matches!(
            clip_l2(&mut x, f64::NAN),
            Err(ClipError::InvalidMaxNorm(_))
        ));
        let mut m = vec![10.0f32, 0.0, 0.0, f32::INFINITY];
        let err = clip_rows(&mut m, 2, 2, 1.0).unwrap_err();
        assert!(err.to_string().contains("x[1, 1] (row 1)"), "{err}");
        assert!(err.to_string().contains("inf"), "{err}");
        let err = clip_l2(&mut [0.0, 1.0, f32::NAN], 1.0).unwrap_err();
        assert!(err.to_string().contains("found NaN at x[2]"), "{err}");
        assert!(matches!(
            checked_l2_norm(&[f32::INFINITY]),
            Err(ClipError::NonFinite { .. })
        ));
        assert_eq!(
            m[0], 10.0,
            "row 0 must not be clipped when row 1 is invalid"
        );
        assert!(matches!(
            clip_rows(&mut m, 3, 2, 1.0),
            Err(ClipError::Shape {
                expected: 6,
                got: 4
            })
        ));
    }

    /// `||x||_2 <= c`, decided conservatively (true only when it certainly holds): the
    /// elements are scaled by 2^150 (exact) so that their squares are exact normal f64s, and
    /// the summation error is charged against the bound.
    fn exactly_within(x: &[f32], c: f64) -> bool {
        if c < f64::from(f32::from_bits(1)) {
            // Below the smallest float32: only the zero vector is within the bound.
            return x.iter().all(|&v| v == 0.0);
        }
        let s = if c > 1e200 { 1.0 } else { 2f64.powi(150) };
        let sum: f64 = x
            .iter()
            .map(|&v| {
                let t = f64::from(v) * s;
                t * t
            })
            .sum();
        let n = x.len() as f64;
        let cs = c * s;
        sum * (1.0 + (2.0 * n + 4.0) * 2f64.powi(-53)) <= cs * cs * (1.0 - 2f64.powi(-51))
    }

    #[test]
    fn tiny_factor_and_subnormal_bounds_hold() {
        // norm / max_norm > 2^126: the float32 factor would be subnormal (issue: 1.96x).
        let mut huge = vec![3.0e37f32; 257];
        clip_l2(&mut huge, 1e-3).unwrap();
        assert!(exact_norm(&huge) <= 1e-3, "{}", exact_norm(&huge));
        assert!(exact_norm(&huge) > 0.99e-3, "clipped far below the bound");
        for c in [1e-45, 3e-45, 1e-44, 1e-40, 1e-39, 1e-38, 5e-324, 1e-300] {
            for dim in [1usize, 3, 100] {
                for v in [1.0f32, 1e-3, 1e-38, 3.0e38] {
                    let mut x = vec![v; dim];
                    clip_l2(&mut x, c).unwrap();
                    assert!(exactly_within(&x, c), "c {c} dim {dim} v {v}: {x:?}");
                }
            }
        }
    }

    #[test]
    fn excess_hidden_by_f64_rounding_is_clipped() {
        // Four lanes of [1, t, t, t] with t^2 = 2^-54: every `+ t^2` rounds away in f64, so
        // the computed norm is exactly 2 while the true norm is 2 (1 + 1.5 2^-54) > 2.
        let t = 2f32.powi(-27);
        let mut x = vec![1.0f32; 4];
        x.extend([t; 12]);
        assert_eq!(l2_norm(&x), 2.0);
        assert!(
            !exactly_within(&x, 2.0),
            "the input itself exceeds the bound"
        );
        let pre = clip_l2(&mut x, 2.0).unwrap();
        assert_eq!(pre, 2.0);
        assert!(exactly_within(&x, 2.0));
        let mut m = [vec![1.0f32; 4], vec![t; 12]].concat().repeat(2);
        clip_rows(&mut m, 2, 16, 2.0).unwrap();
        assert!(exactly_within(&m[..16], 2.0) && exactly_within(&m[16..], 2.0));
        // Just under the bound: left untouched.
        let mut y = vec![1.0f32; 4];
        clip_l2(&mut y, 2.0).unwrap();
        assert_eq!(y, vec![1.0; 4]);
    }

    proptest! {
        #[test]
        fn bound_holds_for_any_finite_input(
            x in prop::collection::vec(any::<f32>().prop_filter("finite", |v| v.is_finite()), 1..64),
            c_bits in 1u64..0x7FF0_0000_0000_0000,
        ) {
            // Every positive finite f64 bit pattern: subnormal, tiny, normal and huge bounds.
            let c = f64::from_bits(c_bits);
            let mut y = x.clone();
            let pre = clip_l2(&mut y, c).unwrap();
            prop_assert!(exactly_within(&y, c), "c {} pre {} -> {}", c, pre, exact_norm(&y));
            if pre < c * (1.0 - 1e-9) { prop_assert_eq!(&y, &x); }
        }

        #[test]
        fn clipped_norm_never_exceeds_bound(x in prop::collection::vec(-1e6f32..1e6, 0..300), c in 1e-3f64..1e3) {
            let mut y = x.clone();
            let pre = clip_l2(&mut y, c).unwrap();
            prop_assert!((pre - exact_norm(&x)).abs() <= 1e-9 * pre.max(1.0));
            prop_assert!(exact_norm(&y) <= c);
            if pre < c * (1.0 - 1e-9) { prop_assert_eq!(&y, &x); }
        }

        #[test]
        fn rows_match_single_vector(rows in 1usize..8, dim in 1usize..50, c in 0.1f64..10.0, seed in any::<u64>()) {
            let mut s = seed;
            let mut data: Vec<f32> = (0..rows * dim).map(|_| {
                s = s.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 8.0
            }).collect();
            let mut expect = data.clone();
            let norms = clip_rows(&mut data, rows, dim, c).unwrap();
            for (r, chunk) in expect.chunks_mut(dim).enumerate() {
                let n = clip_l2(chunk, c).unwrap();
                prop_assert_eq!(n, norms[r]);
                prop_assert!(exact_norm(&data[r*dim..(r+1)*dim]) <= c);
            }
            prop_assert_eq!(data, expect);
        }
    }
}
