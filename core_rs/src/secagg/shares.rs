//! t-of-n Shamir secret sharing of short secrets (the 32-byte seeds of `SecAgg`) over the
//! prime field `GF(p)`, p = 2^61 - 1 (a Mersenne prime: reduction is two shifts and adds).
//!
//! A secret of `L` bytes (1..=1024) is cut into 7-byte big-endian chunks (each < 2^56 < p);
//! each chunk is the constant term of its own independent random polynomial of degree t-1
//! with coefficients uniform in `GF(p)` (rejection sampling from the secure generator), so any
//! t-1 shares are independent of the secret (perfect secrecy, per chunk and jointly). Share
//! `x` (1..=n) is the tuple of the polynomials' values at `x`.
//!
//! Encoding (all integers big-endian): `version (1 byte, = 1) || t (u16) || x (u16) ||
//! L (u16) || y_1 .. y_c (u64 each, < p)` with `c = ceil(L / 7)`. [`combine`] uses exactly t
//! shares, rejects duplicates, mixed thresholds or lengths, values >= p, and reconstructions
//! that cannot be a chunk of an L-byte secret (which catches most corrupted shares).

use rand_core::{CryptoRng, RngCore};
use zeroize::Zeroize;

use crate::error::ShareError;

/// The field modulus 2^61 - 1.
pub const P: u64 = (1 << 61) - 1;
const CHUNK: usize = 7;
const HEADER: usize = 7;
const VERSION: u8 = 1;

#[inline]
fn reduce(x: u128) -> u64 {
    // x < 2^122: fold twice.
    let r = (x & u128::from(P)) + (x >> 61);
    let r = (r & u128::from(P)) + (r >> 61);
    let r = r as u64;
    if r >= P { r - P } else { r }
}

#[inline]
fn mul(a: u64, b: u64) -> u64 {
    reduce(u128::from(a) * u128::from(b))
}

#[inline]
fn add(a: u64, b: u64) -> u64 {
    let r = a + b;
    if r >= P { r - P } else { r }
}

#[inline]
fn sub(a: u64, b: u64) -> u64 {
    if a >= b { a - b } else { a + P - b }
}

fn pow(mut a: u64, mut e: u64) -> u64 {
    let mut r = 1;
    while e > 0 {
        if e & 1 == 1 {
            r = mul(r, a);
        }
        a = mul(a, a);
        e >>= 1;
    }
    r
}

fn inv(a: u64) -> u64 {
    pow(a, P - 2)
}

fn uniform_field<R: RngCore + CryptoRng>(rng: &mut R) -> u64 {
    loop {
        let v = rng.next_u64() >> 3; // 61 bits
        if v < P {
            return v;
        }
    }
}

fn chunks_of(secret: &[u8]) -> Vec<u64> {
    secret
        .chunks(CHUNK)
        .map(|c| c.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b)))
        .collect()
}

/// A parsed share.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Share {
    /// Threshold the secret was split with.
    pub t: u16,
    /// x-coordinate, 1..=n.
    pub x: u16,
    /// Secret length in bytes.
    pub secret_len: u16,
    /// One field element per 7-byte chunk.
    pub y: Vec<u64>,
}

impl Share {
    /// Encode (see module docs).
    #[must_use]
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER + 8 * self.y.len());
        out.push(VERSION);
        out.extend_from_slice(&self.t.to_be_bytes());
        out.extend_from_slice(&self.x.to_be_bytes());
        out.extend_from_slice(&self.secret_len.to_be_bytes());
        for y in &self.y {
            out.extend_from_slice(&y.to_be_bytes());
        }
        out
    }

    /// Decode and validate one share; `index` names it in errors.
    ///
    /// # Errors
    /// [`ShareError::Malformed`] for a wrong version, length, zero t/x/L, or y >= p.
    pub fn from_bytes(b: &[u8], index: usize) -> Result<Self, ShareError> {
        let bad = |reason: String| ShareError::Malformed { index, reason };
        if b.len() < HEADER {
            return Err(bad(format!(
                "expected at least {HEADER} bytes, got {}",
                b.len()
            )));
        }
        if b[0] != VERSION {
            return Err(bad(format!("expected version {VERSION}, got {}", b[0])));
        }
        let t = u16::from_be_bytes([b[1], b[2]]);
        let x = u16::from_be_bytes([b[3], b[4]]);
        let secret_len = u16::from_be_bytes([b[5], b[6]]);
        if t == 0 || x == 0 || secret_len == 0 || secret_len > 1024 {
            return Err(bad(format!(
                "expected t >= 1, x >= 1 and 1 <= L <= 1024, got t = {t}, x = {x}, L = {secret_len}"
            )));
        }
        let c = usize::from(secret_len).div_ceil(CHUNK);
        if b.len() != HEADER + 8 * c {
            return Err(bad(format!(
                "expected {} bytes for a {secret_len}-byte secret, got {}",
                HEADER + 8 * c,
                b.len()
            )));
        }
        let mut y = Vec::with_capacity(c);
        for (k, w) in b[HEADER..].chunks_exact(8).enumerate() {
            let v = u64::from_be_bytes(w.try_into().expect("chunks_exact(8)"));
            if v >= P {
                return Err(bad(format!(
                    "value {k} is not a field element (>= 2^61 - 1)"
                )));
            }
            y.push(v);
        }
        Ok(Self {
            t,
            x,
            secret_len,
            y,
        })
    }
}

/// Split `secret` into `n` shares, any `t` of which reconstruct it.
///
/// # Errors
/// [`ShareError::InvalidThreshold`] unless `1 <= t <= n <= 65535`;
/// [`ShareError::SecretLength`] unless `1 <= secret.len() <= 1024`.
pub fn split<R: RngCore + CryptoRng>(
    secret: &[u8],
    n: usize,
    t: usize,
    rng: &mut R,
) -> Result<Vec<Share>, ShareError> {
    if !(1 <= t && t <= n && n <= 65535) {
        return Err(ShareError::InvalidThreshold { t, n });
    }
    if secret.is_empty() || secret.len() > 1024 {
        return Err(ShareError::SecretLength(secret.len()));
    }
    let mut chunks = chunks_of(secret);
    let mut shares: Vec<Share> = (1..=n)
        .map(|x| Share {
            t: t as u16,
            x: x as u16,
            secret_len: secret.len() as u16,
            y: Vec::with_capacity(chunks.len()),
        })
        .collect();
    let mut coeffs = vec![0u64; t];
    for &c in &chunks {
        coeffs[0] = c;
        for a in &mut coeffs[1..] {
            *a = uniform_field(rng);
        }
        for s in &mut shares {
            let x = u64::from(s.x);
            // Horner, highest degree first.
            let y = coeffs
                .iter()
                .rev()
                .fold(0u64, |acc, &a| add(mul(acc, x), a));
            s.y.push(y);
        }
    }
    coeffs.zeroize();
    chunks.zeroize();
    Ok(shares)
}

/// Lagrange interpolation at 0 of the points `(x_j, y_j[k])` for every chunk `k`
/// (no threshold checks; [`combine`] is the checked entry point).
#[must_use]
pub fn interpolate_at_zero(shares: &[Share]) -> Vec<u64> {
    let xs: Vec<u64> = shares.iter().map(|s| u64::from(s.x)).collect();
    let lambdas: Vec<u64> = (0..xs.len())
        .map(|j| {
            let (mut num, mut den) = (1u64, 1u64);
            for (m, &xm) in xs.iter().enumerate() {
                if m != j {
                    num = mul(num, xm);
                    den = mul(den, sub(xm, xs[j]));
                }
            }
            mul(num, inv(den))
        })
        .collect();
    let chunks = shares.first().map_or(0, |s| s.y.len());
    (0..chunks)
        .map(|k| {
            shares
                .iter()
                .zip(&lambdas)
                .fold(0u64, |acc, (s, &l)| add(acc, mul(s.y[k], l)))
        })
        .collect()
}

/// Reconstruct the secret from exactly `t` shares.
///
/// # Errors
/// [`ShareError::WrongCount`], [`ShareError::Mismatch`], [`ShareError::DuplicateX`],
/// [`ShareError::Inconsistent`] (see module docs).
pub fn combine(shares: &[Share]) -> Result<Vec<u8>, ShareError> {
    let Some(first) = shares.first() else {
        return Err(ShareError::NoShares);
    };
    for (i, s) in shares.iter().enumerate().skip(1) {
        if s.t != first.t {
            return Err(ShareError::Mismatch {
                index: i,
                reason: format!("threshold {} vs {}", s.t, first.t),
            });
        }
        if s.secret_len != first.secret_len || s.y.len() != first.y.len() {
            return Err(ShareError::Mismatch {
                index: i,
                reason: format!("secret length {} vs {}", s.secret_len, first.secret_len),
            });
        }
    }
    let t = usize::from(first.t);
    if shares.len() != t {
        return Err(ShareError::WrongCount {
            t,
            got: shares.len(),
        });
    }
    for i in 0..shares.len() {
        for j in 0..i {
            if shares[i].x == shares[j].x {
                return Err(ShareError::DuplicateX {
                    first: j,
                    second: i,
                    x: shares[i].x,
                });
            }
        }
    }
    let mut chunks = interpolate_at_zero(shares);
    let len = usize::from(first.secret_len);
    let mut out = Vec::with_capacity(len);
    for (k, &c) in chunks.iter().enumerate() {
        let nbytes = (len - k * CHUNK).min(CHUNK);
        if c >> (8 * nbytes) != 0 {
            out.zeroize();
            chunks.zeroize();
            return Err(ShareError::Inconsistent(format!(
                "chunk {k} reconstructs to a value wider than {nbytes} bytes"
            )));
        }
        out.extend_from_slice(&c.to_be_bytes()[8 - nbytes..]);
    }
    chunks.zeroize();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SecureRng;
    use proptest::prelude::*;

    fn rng(s: u8) -> SecureRng {
        SecureRng::from_seed(&[s; 32]).unwrap()
    }

    #[test]
    fn field_arithmetic() {
        assert_eq!(mul(P - 1, P - 1), 1);
        assert_eq!(mul(inv(12345), 12345), 1);
        assert_eq!(sub(0, 1), P - 1);
        assert_eq!(reduce(u128::from(P) * u128::from(P)), 0);
    }

    #[test]
    fn split_combine_and_errors() {
        let secret: Vec<u8> = (0u8..32).collect();
        let shares = split(&secret, 5, 3, &mut rng(1)).unwrap();
        assert_eq!(combine(&shares[1..4]).unwrap(), secret);
        assert_eq!(
            combine(&[shares[4].clone(), shares[0].clone(), shares[2].clone()]).unwrap(),
            secret
        );
        assert_eq!(combine(&[]), Err(ShareError::NoShares));
        assert!(matches!(
            combine(&shares[..2]),
            Err(ShareError::WrongCount { t: 3, got: 2 })
        ));
        assert!(matches!(
            combine(&shares[..4]),
            Err(ShareError::WrongCount { t: 3, got: 4 })
        ));
        let dup = [shares[0].clone(), shares[1].clone(), shares[0].clone()];
        assert!(matches!(
            combine(&dup),
            Err(ShareError::DuplicateX {
                first: 0,
                second: 2,
                x: 1
            })
        ));
        let other = split(&secret[..16], 5, 3, &mut rng(2)).unwrap();
        assert!(matches!(
            combine(&[shares[0].clone(), shares[1].clone(), other[2].clone()]),
            Err(ShareError::Mismatch { index: 2, .. })
        ));
        assert!(matches!(
            split(&secret, 3, 4, &mut rng(1)),
            Err(ShareError::InvalidThreshold { t: 4, n: 3 })
        ));
        assert!(matches!(
            split(&secret, 3, 0, &mut rng(1)),
            Err(ShareError::InvalidThreshold { .. })
        ));
        assert!(matches!(
            split(&[], 3, 2, &mut rng(1)),
            Err(ShareError::SecretLength(0))
        ));
        // A share corrupted in every chunk by a large offset is caught (a random corruption
        // of one chunk passes with probability 2^56 / p = 1/32; of all five, 2^-25).
        let mut bad = shares[..3].to_vec();
        for (k, y) in bad[1].y.iter_mut().enumerate() {
            *y = add(*y, 0x0123_4567_89ab_cdef ^ (k as u64 * 0x1111_1111_1111));
        }
        assert!(matches!(combine(&bad), Err(ShareError::Inconsistent(_))));
    }

    #[test]
    fn encoding_roundtrip_and_malformed() {
        let shares = split(&[7u8; 32], 3, 2, &mut rng(3)).unwrap();
        let b = shares[0].to_bytes();
        assert_eq!(b.len(), 7 + 8 * 5);
        assert_eq!(Share::from_bytes(&b, 0).unwrap(), shares[0]);
        assert!(Share::from_bytes(&b[..10], 0).is_err());
        let mut v = b.clone();
        v[0] = 2;
        assert!(Share::from_bytes(&v, 0).is_err());
        let mut v = b.clone();
        v[7..15].copy_from_slice(&u64::MAX.to_be_bytes());
        assert!(Share::from_bytes(&v, 0).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn any_t_shares_reconstruct(secret in prop::collection::vec(any::<u8>(), 1..80), n in 1usize..20, tf in 0.0f64..1.0, pick in any::<u64>(), seed in any::<[u8; 32]>()) {
            let t = 1 + ((n - 1) as f64 * tf) as usize;
            let mut r = SecureRng::from_seed(&seed).unwrap();
            let shares = split(&secret, n, t, &mut r).unwrap();
            // A pseudo-random subset of size t, in a pseudo-random order.
            let mut idx: Vec<usize> = (0..n).collect();
            let mut s = pick;
            for i in (1..n).rev() { s = s.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1); idx.swap(i, (s >> 33) as usize % (i + 1)); }
            let subset: Vec<Share> = idx[..t].iter().map(|&i| shares[i].clone()).collect();
            prop_assert_eq!(combine(&subset).unwrap(), secret);
        }

        #[test]
        fn t_minus_one_shares_are_consistent_with_every_secret(secret in any::<[u8; 32]>(), other in any::<[u8; 32]>(), n in 3usize..12, seed in any::<[u8; 32]>()) {
            prop_assume!(secret != other);
            let t = n / 2 + 1;
            let shares = split(&secret, n, t, &mut SecureRng::from_seed(&seed).unwrap()).unwrap();
            let known = &shares[..t - 1];
            // Interpolating t-1 shares does not give the secret...
            if t > 1 { prop_assert_ne!(interpolate_at_zero(known), chunks_of(&secret)); }
            // ...and for ANY other secret there is a degree t-1 polynomial through the known
            // shares and that secret: extend with the point (0, other) and evaluate at x_t.
            let mut pts = known.to_vec();
            pts.push(Share { t: t as u16, x: 0, secret_len: 32, y: chunks_of(&other) });
            let xt = u64::from(shares[t - 1].x);
            let forged_y: Vec<u64> = (0..5).map(|k| {
                // Lagrange evaluation at xt of the t points in `pts`.
                let xs: Vec<u64> = pts.iter().map(|s| u64::from(s.x)).collect();
                pts.iter().enumerate().fold(0u64, |acc, (j, s)| {
                    let (mut num, mut den) = (1u64, 1u64);
                    for (m, &xm) in xs.iter().enumerate() { if m != j { num = mul(num, sub(xt, xm)); den = mul(den, sub(xs[j], xm)); } }
                    add(acc, mul(s.y[k], mul(num, inv(den))))
                })
            }).collect();
            let mut forged = known.to_vec();
            forged.push(Share { t: t as u16, x: shares[t - 1].x, secret_len: 32, y: forged_y });
            prop_assert_eq!(combine(&forged).unwrap(), other.to_vec());
        }
    }
}
