//! L2 clipping of one vector and of every row of a (batch, dim) matrix.
//!
//! Invariants: after a successful clip the L2 norm of the result, computed exactly, is at
//! most `max_norm` (the scale factor is shrunk by 2^-20 relative to `max_norm / norm` to
//! absorb float32 rounding of the scaled elements, so the bound holds strictly; the bias
//! this introduces is below 1e-6 relative). Norms are accumulated in f64. Inputs with NaN or
//! Inf are rejected *before* anything is written, so a failed call leaves the data intact.

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

/// L2 norm of a float32 vector, accumulated in f64 with four independent lanes.
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

fn scale(x: &mut [f32], norm: f64, max_norm: f64) {
    if norm > max_norm {
        let f = (max_norm / norm * SHRINK) as f32;
        for v in x.iter_mut() {
            *v *= f;
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
    let norm = l2_norm(x);
    if !norm.is_finite() {
        return Err(ClipError::NonFinite {
            what: "x".into(),
            norm,
        });
    }
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
    if let Some((i, &norm)) = norms.iter().enumerate().find(|(_, n)| !n.is_finite()) {
        return Err(ClipError::NonFinite {
            what: format!("row {i}"),
            norm,
        });
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
        assert!(err.to_string().contains("row 1"));
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

    proptest! {
        #[test]
        fn clipped_norm_never_exceeds_bound(x in prop::collection::vec(-1e6f32..1e6, 0..300), c in 1e-3f64..1e3) {
            let mut y = x.clone();
            let pre = clip_l2(&mut y, c).unwrap();
            prop_assert!((pre - exact_norm(&x)).abs() <= 1e-9 * pre.max(1.0));
            prop_assert!(exact_norm(&y) <= c);
            if pre <= c { prop_assert_eq!(&y, &x); }
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
