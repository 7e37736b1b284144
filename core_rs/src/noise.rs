//! Differential-privacy noise: Gaussian and Laplace on float arrays, and an exact discrete
//! Gaussian sampler for integer (secure-aggregation) domains. All randomness comes from a
//! caller-supplied cryptographic generator (`R: RngCore + CryptoRng`); there is no global RNG.
//!
//! # Why not Box–Muller on floats
//! Mironov (CCS 2012) showed that adding textbook floating-point noise to a value `x` leaks
//! `x` through the low-order bits of the result: the set of floats that `x + noise` can take
//! depends on `x`. We use a *lattice* (snapping-style) construction instead. For scale
//! `sigma` let `gamma = 2^(floor(log2 sigma) - 32)` (an exact power of two) and
//! `s = sigma / gamma` in `[2^32, 2^33)`. The output is
//!
//! `y = gamma * (round(x / gamma) + K)`, with `K = round(s * G)` an integer,
//!
//! where `G` is a standard normal (Gaussian) or standard Laplace variate. `round(x/gamma)` is
//! a deterministic function of `x` alone; `K` is an exact integer below 2^53, so
//! `round(x/gamma) + K` is a mechanism on the integer lattice whose output set does not
//! depend on `x`. The floating-point addition is correctly rounded, i.e. a deterministic
//! function of the exact integer sum, and the multiplication by a power of two and the final
//! conversion to float32 are post-processing. No low-order bit carries information about `x`.
//!
//! Costs, stated (they are what an accountant should add; they are not hidden):
//! (1) snapping `x` to the lattice moves each coordinate by at most `gamma/2 <= sigma 2^-33`,
//! so an L2 sensitivity `C` becomes at most `C + sqrt(d) sigma 2^-33` (d = 10^7:
//! `C + 3.7e-7 sigma`). (2) `K` is not exactly a discrete Gaussian: `s*G` is computed in
//! f64 (resolution about 2^-16 at the largest magnitudes) and stochastically rounded, so
//! `P(K = k)` is the Gaussian density convolved with a triangle kernel and evaluated on a
//! grid; its ratio to the discrete Gaussian of variance `s^2` stays within `1 +/- 2^-30` for
//! `|k| <= 40 s` (a per-coordinate privacy-loss error of at most 2^-29; it adds up over
//! coordinates only in the worst case: d = 10^6 gives at most 0.002 in epsilon). The
//! mass beyond 40 s (below 2^-1000) is absorbed into delta. (3) `G` comes from a 256-layer
//! ziggurat (Marsaglia–Tsang 2000, 64 random bits per attempt, exact tail); Laplace uses
//! `-ln(U)` with a full-resolution uniform `U`, so the tail is resolved to 2^-52 everywhere.
//!
//! The discrete Gaussian sampler is the exact rejection sampler of Canonne, Kamath and
//! Steinke (`NeurIPS` 2020, Algorithm 3), run in exact rational arithmetic on u128.

use std::sync::OnceLock;

use rand_core::{CryptoRng, RngCore};
use rayon::prelude::*;

use crate::error::NoiseError;
use crate::rng::{AesCtr, SecureRng, open01_full, uniform_below_u128};
use crate::scan::first_failing;
use crate::secagg::mask::run_sequentially;

/// Elements per parallel chunk of the float samplers (each chunk has its own AES-CTR stream).
const FLOAT_CHUNK: usize = 1 << 15;
/// Elements per parallel chunk of the discrete Gaussian sampler.
const INT_CHUNK: usize = 1 << 12;
/// Smallest and largest accepted non-zero float noise scale (keeps gamma a normal f64).
const MIN_SCALE: f64 = 1e-250;
const MAX_SCALE: f64 = 1e250;

// ---------------------------------------------------------------- ziggurat (standard normal)

const ZIG_R: f64 = 3.654_152_885_361_009;
const ZIG_V: f64 = 0.004_928_673_233_99;

struct Ziggurat {
    x: [f64; 257],
    f: [f64; 257],
}

fn pdf(x: f64) -> f64 {
    (-0.5 * x * x).exp()
}

fn ziggurat() -> &'static Ziggurat {
    static TABLES: OnceLock<Ziggurat> = OnceLock::new();
    TABLES.get_or_init(|| {
        let mut x = [0.0f64; 257];
        x[0] = ZIG_V / pdf(ZIG_R);
        x[1] = ZIG_R;
        for i in 2..256 {
            let v = ZIG_V / x[i - 1] + pdf(x[i - 1]);
            x[i] = (-2.0 * v.ln()).sqrt();
        }
        x[256] = 0.0;
        let mut f = [0.0f64; 257];
        for i in 0..257 {
            f[i] = pdf(x[i]);
        }
        Ziggurat { x, f }
    })
}

/// One standard normal variate (ziggurat with an exact tail).
pub fn standard_normal<R: RngCore + CryptoRng>(rng: &mut R) -> f64 {
    normal_with(ziggurat(), rng)
}

/// [`standard_normal`] with the tables passed in: the rectangle test, which accepts ~99% of
/// draws, is inlined into the caller's loop; the rest of the algorithm is out of line.
// `always`: the per-element hot path of the lattice samplers must sit in their loop (it was an
// out-of-line call before); the cold remainder stays a separate function.
#[allow(clippy::inline_always)]
#[inline(always)]
fn normal_with<R: RngCore + CryptoRng>(z: &Ziggurat, rng: &mut R) -> f64 {
    let bits = rng.next_u64();
    let i = (bits & 0xff) as usize;
    // 53 bits disjoint from the 8 layer bits: u in [-1, 1).
    let u = (bits >> 11) as f64 * (1.0 / (1u64 << 52) as f64) - 1.0;
    let x = u * z.x[i];
    if x.abs() < z.x[i + 1] {
        return x;
    }
    normal_slow(z, rng, i, u, x)
}

/// The rest of a ziggurat attempt whose rectangle test failed (tail or wedge), then further
/// attempts: exactly the draws and tests of the textbook loop, in the same order.
#[cold]
#[inline(never)]
fn normal_slow<R: RngCore + CryptoRng>(
    z: &Ziggurat,
    rng: &mut R,
    mut i: usize,
    mut u: f64,
    mut x: f64,
) -> f64 {
    loop {
        if i == 0 {
            // Marsaglia's exact tail beyond R.
            loop {
                let a = -open01_full(rng).ln() / ZIG_R;
                let b = -open01_full(rng).ln();
                if 2.0 * b >= a * a {
                    return if u < 0.0 { -(ZIG_R + a) } else { ZIG_R + a };
                }
            }
        }
        let w = (rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64);
        if z.f[i + 1] + (z.f[i] - z.f[i + 1]) * w < pdf(x) {
            return x;
        }
        // Next attempt.
        let bits = rng.next_u64();
        i = (bits & 0xff) as usize;
        u = (bits >> 11) as f64 * (1.0 / (1u64 << 52) as f64) - 1.0;
        x = u * z.x[i];
        if x.abs() < z.x[i + 1] {
            return x;
        }
    }
}

/// One standard Laplace variate: a random sign times `-ln(U)`, `U` full-resolution in (0, 1].
pub fn standard_laplace<R: RngCore + CryptoRng>(rng: &mut R) -> f64 {
    let negative = rng.next_u32() & 1 == 1;
    let e = -open01_full(rng).ln();
    if negative { -e } else { e }
}

/// `floor(y)` for `|y| < 2^62` with a truncating conversion (one instruction at baseline
/// x86-64, where `f64::floor` is a libm call).
#[inline]
fn fast_floor(y: f64) -> f64 {
    let t = y as i64 as f64;
    if t > y { t - 1.0 } else { t }
}

/// `round(y)` (half away from zero, like `f64::round`) for any finite `y`; magnitudes of
/// 2^52 and more are already integers.
#[inline]
fn fast_round(y: f64) -> f64 {
    if y.abs() >= 4_503_599_627_370_496.0 {
        return y;
    }
    let t = y as i64 as f64; // trunc, exact here (never -0.0)
    let d = y - t; // exact
    // Selects of constants instead of branches: `d` is close to uniform for real inputs, so
    // branches would mispredict about half the time. `(t + 0.0) - 0.0 == t` bit for bit here.
    let up = if d >= 0.5 { 1.0 } else { 0.0 };
    let down = if d <= -0.5 { 1.0 } else { 0.0 };
    (t + up) - down
}

/// Unbiased stochastic rounding of `y` (|y| < 2^62) to an integer with 32 fresh random bits.
#[inline]
fn stochastic_round<R: RngCore>(rng: &mut R, y: f64) -> f64 {
    let fl = fast_floor(y);
    let fr = y - fl; // exact
    let w = f64::from(rng.next_u32()) * (1.0 / 4_294_967_296.0);
    if w < fr { fl + 1.0 } else { fl }
}

// ---------------------------------------------------------------- lattice mechanism

/// Float element types the samplers write.
pub trait NoiseFloat: Copy + Send + Sync + 'static {
    /// Widen to f64 (exact).
    fn to_f64(self) -> f64;
    /// Narrow from f64 (correctly rounded).
    fn from_f64(v: f64) -> Self;
}
impl NoiseFloat for f32 {
    fn to_f64(self) -> f64 {
        f64::from(self)
    }
    fn from_f64(v: f64) -> Self {
        v as f32
    }
}
impl NoiseFloat for f64 {
    fn to_f64(self) -> f64 {
        self
    }
    fn from_f64(v: f64) -> Self {
        v
    }
}

/// Which continuous variate drives the lattice noise.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Distribution {
    /// Gaussian with standard deviation `scale`.
    Gaussian,
    /// Laplace with scale `b = scale` (standard deviation `sqrt(2) b`).
    Laplace,
}

/// `floor(log2(v))` exactly, for a positive normal `v`: its unbiased binary exponent (the
/// float `log2().floor()` rounds up for `v` a few ulps below a power of two).
#[must_use]
pub fn exponent(v: f64) -> i32 {
    // Bits 52..63 of a positive f64 are its biased exponent (11 bits, bias 1023).
    ((v.to_bits() >> 52) & 0x7ff) as i32 - 1023
}

/// The lattice step `gamma = 2^(floor(log2 scale) - 32)` for a scale in [1e-250, 1e250]
/// (see module docs); an exact power of two, with `scale / gamma` in `[2^32, 2^33)`.
#[must_use]
pub fn lattice_step(scale: f64) -> f64 {
    2f64.powi(exponent(scale) - 32)
}

fn check_scale(name: &'static str, scale: f64) -> Result<(), NoiseError> {
    if scale.is_finite() && (scale == 0.0 || (MIN_SCALE..=MAX_SCALE).contains(&scale)) {
        Ok(())
    } else {
        Err(NoiseError::InvalidScale {
            name,
            requirement: "that is 0 or in [1e-250, 1e250]",
            value: scale,
        })
    }
}

fn check_finite<T: NoiseFloat>(x: &[T], inv_gamma: f64) -> Result<(), NoiseError> {
    // `inv_gamma` is a finite power of two, so `v * inv_gamma` is finite exactly when `v` is
    // finite and not too large for the lattice; the first failure says which.
    let Some(i) = first_failing(x, |v| (v.to_f64() * inv_gamma).is_finite()) else {
        return Ok(());
    };
    let v = x[i].to_f64();
    if v.is_finite() {
        Err(NoiseError::Unsupported(format!(
            "x[{i}] = {v} is too large relative to the noise scale to place on the noise lattice"
        )))
    } else {
        Err(NoiseError::NonFinite { index: i, value: v })
    }
}

/// Lattice noise on one chunk. `ZERO` means every element of `x` is known to be 0, so the
/// snapped input `round(x / gamma)` is 0 and is not computed (same output, see [`sample`]).
fn lattice_chunk<T: NoiseFloat, const ZERO: bool>(
    x: &mut [T],
    dist: Distribution,
    scale: f64,
    key: &[u8; 32],
    chunk: u64,
) {
    let gamma = lattice_step(scale);
    let inv_gamma = 1.0 / gamma; // exact: gamma is a power of two
    let s = scale * inv_gamma; // in [2^32, 2^33)
    let mut stream = AesCtr::at_chunk(key, chunk);
    match dist {
        Distribution::Gaussian => {
            let z = ziggurat();
            for v in x.iter_mut() {
                let g = normal_with(z, &mut stream);
                lattice_point::<T, ZERO>(v, g, s, gamma, inv_gamma, &mut stream);
            }
        }
        Distribution::Laplace => {
            for v in x.iter_mut() {
                let g = standard_laplace(&mut stream);
                lattice_point::<T, ZERO>(v, g, s, gamma, inv_gamma, &mut stream);
            }
        }
    }
}

/// `v <- gamma * (round(v / gamma) + K)` with `K` the stochastic rounding of `s * g`.
// `always`: the per-element body of the lattice loops; as a call it costs ~2x.
#[allow(clippy::inline_always)]
#[inline(always)]
fn lattice_point<T: NoiseFloat, const ZERO: bool>(
    v: &mut T,
    g: f64,
    s: f64,
    gamma: f64,
    inv_gamma: f64,
    stream: &mut AesCtr,
) {
    let k = stochastic_round(stream, s * g); // exact integer, |k| < 2^53
    let base = if ZERO {
        0.0
    } else {
        fast_round(v.to_f64() * inv_gamma)
    };
    *v = T::from_f64((base + k) * gamma);
}

/// Run [`lattice_chunk`] over `x` in chunks of [`FLOAT_CHUNK`], each with its own stream.
fn lattice_all<T: NoiseFloat, const ZERO: bool>(
    x: &mut [T],
    dist: Distribution,
    scale: f64,
    key: &[u8; 32],
) {
    let chunk =
        |(c, xs): (usize, &mut [T])| lattice_chunk::<T, ZERO>(xs, dist, scale, key, c as u64);
    if run_sequentially(x.len(), FLOAT_CHUNK) {
        x.chunks_mut(FLOAT_CHUNK).enumerate().for_each(chunk);
    } else {
        x.par_chunks_mut(FLOAT_CHUNK).enumerate().for_each(chunk);
    }
}

/// Add lattice noise of `scale` to every element of `x` in place (see module docs).
///
/// All elements are checked before any is written, so an error leaves `x` unchanged.
/// Output is a deterministic function of the generator's state, whatever the thread count.
///
/// # Errors
/// [`NoiseError::InvalidScale`] or [`NoiseError::NonFinite`] / [`NoiseError::Unsupported`]
/// for non-finite or out-of-range elements.
pub fn add_noise<T: NoiseFloat>(
    x: &mut [T],
    dist: Distribution,
    scale: f64,
    rng: &mut SecureRng,
) -> Result<(), NoiseError> {
    check_scale(scale_name(dist), scale)?;
    if scale == 0.0 {
        return check_finite(x, 1.0);
    }
    check_finite(x, 1.0 / lattice_step(scale))?;
    let key = rng.fork_key();
    lattice_all::<T, false>(x, dist, scale, &key);
    Ok(())
}

fn scale_name(dist: Distribution) -> &'static str {
    match dist {
        Distribution::Gaussian => "sigma",
        Distribution::Laplace => "scale",
    }
}

/// `n` fresh noise samples of `scale` (lattice construction around 0).
///
/// # Errors
/// [`NoiseError::InvalidScale`] for an invalid scale.
pub fn sample<T: NoiseFloat + Default>(
    n: usize,
    dist: Distribution,
    scale: f64,
    rng: &mut SecureRng,
) -> Result<Vec<T>, NoiseError> {
    // Exactly `add_noise` on a zero vector (same checks, same draws, same output), minus the
    // work that zeros make trivial: the finiteness pre-pass and the snapping of x.
    check_scale(scale_name(dist), scale)?;
    let mut out = vec![T::default(); n];
    if scale == 0.0 {
        return Ok(out);
    }
    let key = rng.fork_key();
    lattice_all::<T, true>(&mut out, dist, scale, &key);
    Ok(out)
}

// ---------------------------------------------------------------- exact discrete Gaussian

/// Bernoulli(num/den) exactly, for `num <= den`, `den >= 1`.
fn bernoulli_frac<R: RngCore + CryptoRng>(rng: &mut R, num: u128, den: u128) -> bool {
    uniform_below_u128(rng, den) < num
}

/// Bernoulli(exp(-num/den)) for `num/den` in [0, 1] (CKS20 Algorithm 1).
fn bernoulli_exp_le1<R: RngCore + CryptoRng>(rng: &mut R, num: u128, den: u128) -> bool {
    let mut k: u128 = 1;
    // A ~ Bernoulli(gamma / k). Overflow of den*k needs k > 2^15, probability < 1/(2^15)!.
    while let Some(dk) = den.checked_mul(k) {
        if !bernoulli_frac(rng, num, dk) {
            break;
        }
        k += 1;
    }
    k % 2 == 1
}

/// Bernoulli(exp(-num/den)) for any `num/den >= 0` (CKS20 Algorithm 1, general case).
fn bernoulli_exp<R: RngCore + CryptoRng>(rng: &mut R, num: u128, den: u128) -> bool {
    let whole = num / den;
    let mut i = 0u128;
    while i < whole {
        if !bernoulli_exp_le1(rng, 1, 1) {
            return false;
        }
        i += 1;
    }
    bernoulli_exp_le1(rng, num % den, den)
}

/// Exact rational parameters of a discrete Gaussian: `sigma^2 = a / b`, Laplace scale `t`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiscreteGaussianParams {
    /// Numerator of sigma^2.
    pub a: u128,
    /// Denominator of sigma^2 (a power of two).
    pub b: u128,
    /// Scale of the discrete Laplace proposal, floor(sigma) + 1.
    pub t: u128,
}

impl DiscreteGaussianParams {
    /// Parameters for `sigma` in [2^-10, 2^28]. sigma^2 is rounded *up* to a multiple of
    /// `1/b` with `b = 2^k` chosen so that at least 20 significant bits are kept; the sampler is
    /// exact for the rounded variance, which [`Self::variance`] returns (never below sigma^2).
    ///
    /// # Errors
    /// [`NoiseError::InvalidScale`] outside the supported range.
    pub fn new(sigma: f64) -> Result<Self, NoiseError> {
        if !(sigma.is_finite() && (2f64.powi(-10)..=2f64.powi(28)).contains(&sigma)) {
            return Err(NoiseError::InvalidScale {
                name: "sigma",
                requirement: "in [2^-10, 2^28]",
                value: sigma,
            });
        }
        let s2 = sigma * sigma;
        let k = (20 - exponent(s2)).clamp(0, 60);
        let b = 1u128 << k;
        let a = (s2 * b as f64).ceil() as u128;
        let t = sigma.floor() as u128 + 1;
        Ok(Self { a, b, t })
    }

    /// The variance parameter the sampler realises exactly, `a / b`.
    #[must_use]
    pub fn variance(&self) -> f64 {
        self.a as f64 / self.b as f64
    }
}

/// One exact discrete Gaussian sample (CKS20 Algorithm 3).
pub fn discrete_gaussian_one<R: RngCore + CryptoRng>(
    rng: &mut R,
    p: &DiscreteGaussianParams,
) -> i64 {
    let DiscreteGaussianParams { a, b, t } = *p;
    loop {
        // Discrete Laplace with scale t (CKS20 Algorithm 2).
        let u = uniform_below_u128(rng, t);
        if !bernoulli_exp_le1(rng, u, t) {
            continue;
        }
        let mut v: u128 = 0;
        while bernoulli_exp_le1(rng, 1, 1) {
            v += 1;
        }
        let Some(x) = v.checked_mul(t).and_then(|vt| vt.checked_add(u)) else {
            continue;
        };
        let negative = rng.next_u32() & 1 == 1;
        if negative && x == 0 {
            continue;
        }
        // Accept with probability exp(-(|Y| - sigma^2/t)^2 / (2 sigma^2))
        //   = exp(-(|Y| b t - a)^2 / (2 a b t^2)).
        let Some(ybt) = x.checked_mul(b).and_then(|v| v.checked_mul(t)) else {
            continue;
        };
        let diff = ybt.abs_diff(a);
        let (Some(num), Some(den)) = (
            diff.checked_mul(diff),
            a.checked_mul(b)
                .and_then(|v| v.checked_mul(t * t))
                .and_then(|v| v.checked_mul(2)),
        ) else {
            // Only reachable for |Y| so far in the tail that exp(-gamma) < exp(-2^15): reject.
            continue;
        };
        if bernoulli_exp(rng, num, den) {
            let Ok(y) = i64::try_from(x) else { continue };
            return if negative { -y } else { y };
        }
    }
}

/// `n` exact discrete Gaussian samples with parameter `sigma`; returns the samples and the
/// variance parameter actually realised (sigma^2 rounded up, see [`DiscreteGaussianParams`]).
///
/// # Errors
/// [`NoiseError::InvalidScale`] for sigma outside [2^-10, 2^28].
pub fn discrete_gaussian(
    n: usize,
    sigma: f64,
    rng: &mut SecureRng,
) -> Result<(Vec<i64>, f64), NoiseError> {
    let p = DiscreteGaussianParams::new(sigma)?;
    let key = rng.fork_key();
    let mut out = vec![0i64; n];
    out.par_chunks_mut(INT_CHUNK)
        .enumerate()
        .for_each(|(c, chunk)| {
            let mut stream = AesCtr::at_chunk(&key, c as u64);
            for v in chunk {
                *v = discrete_gaussian_one(&mut stream, &p);
            }
        });
    Ok((out, p.variance()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rng(b: u8) -> SecureRng {
        SecureRng::from_seed(&[b; 32]).unwrap()
    }

    fn mean_std(v: &[f64]) -> (f64, f64) {
        let n = v.len() as f64;
        let m = v.iter().sum::<f64>() / n;
        let var = v.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / (n - 1.0);
        (m, var.sqrt())
    }

    #[test]
    fn fast_rounding_matches_std() {
        let vals = [
            0.0,
            -0.0,
            0.5,
            -0.5,
            1.5,
            -1.5,
            2.5,
            0.499_999_999_999_999_94,
            -3.7,
            1e15 + 0.5,
            4.6e15,
            -9e18,
            1e300,
            -1e300,
            7.0,
        ];
        for v in vals {
            assert_eq!(fast_round(v), v.round(), "round {v}");
            if v.abs() < 4e18 {
                assert_eq!(fast_floor(v), v.floor(), "floor {v}");
            }
        }
    }

    #[test]
    fn lattice_step_is_exact_below_powers_of_two() {
        // Known answers: sigma = 2 - 2^-52 (one ulp below 2) has floor(log2) = 0, so gamma is
        // 2^-32 (f64 `log2().floor()` gives 1 and doubled the step).
        let below_two = f64::from_bits(2f64.to_bits() - 1);
        assert_eq!(lattice_step(below_two), 2f64.powi(-32));
        assert_eq!(lattice_step(2.0), 2f64.powi(-31));
        assert_eq!(lattice_step(1.0), 2f64.powi(-32));
        assert_eq!(lattice_step(0.75), 2f64.powi(-33));
        for e in -830..=830 {
            let p = 2f64.powi(e);
            if !(MIN_SCALE..=MAX_SCALE).contains(&p) {
                continue;
            }
            assert_eq!(lattice_step(p), 2f64.powi(e - 32), "2^{e}");
            for k in 1..=4u64 {
                let v = f64::from_bits(p.to_bits() - k);
                let g = lattice_step(v);
                assert_eq!(g, 2f64.powi(e - 33), "2^{e} - {k} ulp");
                let s = v / g;
                assert!((2f64.powi(32)..2f64.powi(33)).contains(&s), "s = {s}");
            }
        }
    }

    #[test]
    fn ziggurat_tables_are_consistent() {
        let z = ziggurat();
        // The recurrence must land close to 0 at the top layer.
        assert!(z.x[255] > 0.0 && z.x[255] < 0.3, "x[255] = {}", z.x[255]);
        for i in 1..256 {
            assert!(z.x[i] > z.x[i + 1]);
        }
    }

    #[test]
    fn gaussian_moments_fixed_seed() {
        let v: Vec<f64> = sample(1_000_000, Distribution::Gaussian, 2.0, &mut rng(1)).unwrap();
        let (m, s) = mean_std(&v);
        // Std error of the mean is 0.002; of the std ~0.0014.
        assert!(m.abs() < 0.01, "mean {m}");
        assert!((s / 2.0 - 1.0).abs() < 0.01, "std {s}");
        // Tail mass beyond 3 sigma: 0.0027.
        let tail = v.iter().filter(|x| x.abs() > 6.0).count() as f64 / 1e6;
        assert!((tail - 0.0027).abs() < 0.0003, "tail {tail}");
    }

    #[test]
    fn laplace_moments_fixed_seed() {
        let v: Vec<f64> = sample(1_000_000, Distribution::Laplace, 1.5, &mut rng(2)).unwrap();
        let (m, s) = mean_std(&v);
        assert!(m.abs() < 0.01, "mean {m}");
        assert!((s / (1.5 * 2f64.sqrt()) - 1.0).abs() < 0.01, "std {s}");
    }

    #[test]
    fn outputs_lie_on_the_lattice_whatever_x() {
        // The Mironov property: every output is an integer multiple of gamma.
        let sigma = 0.75;
        let gamma = lattice_step(sigma);
        let mut x: Vec<f64> = vec![0.1, 1.0 / 3.0, -2.5e-3, 1e-12, 12345.678];
        add_noise(&mut x, Distribution::Gaussian, sigma, &mut rng(3)).unwrap();
        for v in x {
            let q = v / gamma;
            assert_eq!(q, q.round(), "{v} is not on the lattice");
        }
    }

    #[test]
    fn deterministic_for_seed_and_zero_scale_is_identity() {
        let a: Vec<f32> = sample(100_000, Distribution::Gaussian, 1.0, &mut rng(4)).unwrap();
        let b: Vec<f32> = sample(100_000, Distribution::Gaussian, 1.0, &mut rng(4)).unwrap();
        assert_eq!(a, b);
        let mut x = vec![1.5f32, -2.0];
        add_noise(&mut x, Distribution::Gaussian, 0.0, &mut rng(4)).unwrap();
        assert_eq!(x, vec![1.5, -2.0]);
    }

    #[test]
    fn rejects_bad_input_without_writing() {
        let mut x = vec![1.0f32, f32::NAN];
        assert!(matches!(
            add_noise(&mut x, Distribution::Gaussian, 1.0, &mut rng(5)),
            Err(NoiseError::NonFinite { index: 1, .. })
        ));
        assert_eq!(x[0], 1.0);
        assert!(add_noise(&mut x, Distribution::Gaussian, -1.0, &mut rng(5)).is_err());
        assert!(add_noise(&mut x, Distribution::Laplace, f64::INFINITY, &mut rng(5)).is_err());
        // The blocked pre-check reports the first bad element, also past the first block.
        let mut y = vec![0.5f64; 5000];
        y[4000] = f64::INFINITY;
        y[2500] = f64::NAN;
        assert!(matches!(
            add_noise(&mut y, Distribution::Gaussian, 1.0, &mut rng(5)),
            Err(NoiseError::NonFinite { index: 2500, .. })
        ));
        y[2500] = 1e300; // finite, but 1e300 / gamma overflows
        let err = add_noise(&mut y, Distribution::Gaussian, 1e-20, &mut rng(5)).unwrap_err();
        assert!(err.to_string().contains("x[2500]"), "{err}");
        assert_eq!(y[0], 0.5);
        assert!(discrete_gaussian(10, 0.0, &mut rng(5)).is_err());
        assert!(discrete_gaussian(10, 1e9, &mut rng(5)).is_err());
    }

    fn exact_dg_variance(sigma2: f64) -> f64 {
        let (mut num, mut den) = (0.0, 0.0);
        let lim = (sigma2.sqrt() * 40.0) as i64 + 10;
        for k in -lim..=lim {
            let w = (-(k * k) as f64 / (2.0 * sigma2)).exp();
            num += (k * k) as f64 * w;
            den += w;
        }
        num / den
    }

    #[test]
    fn discrete_gaussian_variance_fixed_seed() {
        for (sigma, seed) in [(0.5, 6u8), (3.0, 7), (100.0, 8)] {
            let (v, var_param) = discrete_gaussian(200_000, sigma, &mut rng(seed)).unwrap();
            assert!(var_param >= sigma * sigma);
            let f: Vec<f64> = v.iter().map(|&x| x as f64).collect();
            let (m, s) = mean_std(&f);
            let expect = exact_dg_variance(var_param);
            // Relative std error of a variance estimate over 2e5 samples is ~0.32%.
            assert!(
                (s * s / expect - 1.0).abs() < 0.015,
                "sigma {sigma}: var {} vs {expect}",
                s * s
            );
            assert!(
                m.abs() < 5.0 * sigma / (200_000f64).sqrt() + 1e-9,
                "mean {m}"
            );
        }
    }

    #[test]
    fn discrete_gaussian_pmf_matches() {
        // Chi-square-style check of the pmf at sigma = 1.2 over the central values.
        let sigma = 1.2;
        let (v, var_param) = discrete_gaussian(300_000, sigma, &mut rng(9)).unwrap();
        let norm: f64 = (-60..=60)
            .map(|k: i64| (-(k * k) as f64 / (2.0 * var_param)).exp())
            .sum();
        for k in -3i64..=3 {
            let p = (-(k * k) as f64 / (2.0 * var_param)).exp() / norm;
            let got = v.iter().filter(|&&x| x == k).count() as f64 / 300_000.0;
            let se = (p * (1.0 - p) / 300_000.0).sqrt();
            assert!((got - p).abs() < 5.0 * se, "k={k}: {got} vs {p}");
        }
    }
}
