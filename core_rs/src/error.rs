//! Error types of the pure-Rust core: one `thiserror` enum per domain, wrapped by
//! [`CoreError`]. The Python layer maps `CoreError` to exceptions in exactly one place
//! (`py/errors.rs`). Messages always say what was expected and what was given.

use std::fmt;

use thiserror::Error;

/// A float formatted compactly for messages: plain decimal for moderate magnitudes,
/// scientific otherwise (`1e-251`, not 250 zeros).
#[derive(Clone, Copy, Debug)]
pub struct Num(pub f64);

impl fmt::Display for Num {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v = self.0;
        if v == 0.0 || !v.is_finite() || (1e-4..1e16).contains(&v.abs()) {
            write!(f, "{v}")
        } else {
            write!(f, "{v:e}")
        }
    }
}

/// Errors of the clipping kernels.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum ClipError {
    /// The clipping bound is not a finite positive number.
    #[error("max_norm must be a finite number > 0, got {}", Num(*.0))]
    InvalidMaxNorm(f64),
    /// The input holds NaN or +/-Inf (the L2 norm is not finite).
    #[error("x must hold only finite values, found {} at {location}", Num(*.value))]
    NonFinite {
        /// Where the first offending element is (e.g. "x[7]" or "x[3, 1] (row 3)").
        location: String,
        /// The offending element.
        value: f64,
    },
    /// A (batch, dim) buffer whose length is not batch * dim.
    #[error("expected a buffer of {expected} = rows * dim elements, got {got}")]
    Shape {
        /// Expected number of elements.
        expected: usize,
        /// Actual number of elements.
        got: usize,
    },
}

/// Errors of the noise samplers and the secure generator.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum NoiseError {
    /// A scale parameter (sigma, b) is not finite and >= 0 (or > 0 where required).
    #[error("{name} must be a finite number {requirement}, got {}", Num(*.value))]
    InvalidScale {
        /// Parameter name.
        name: &'static str,
        /// Human-readable requirement ("> 0", ">= 0").
        requirement: &'static str,
        /// The value given.
        value: f64,
    },
    /// Input array holds NaN or Inf where finite values are required.
    #[error("x must hold only finite values, found {} at index {index}", Num(*.value))]
    NonFinite {
        /// Index of the first offending element.
        index: usize,
        /// The offending value.
        value: f64,
    },
    /// A seed of the wrong length.
    #[error("seed must be exactly 32 bytes, got {0} bytes")]
    SeedLength(usize),
    /// The operating system's random source failed.
    #[error("the operating system's random source failed: {0}")]
    OsRandom(String),
    /// The parameters are outside the range the exact sampler supports.
    #[error("{0}")]
    Unsupported(String),
}

/// Errors of quantization, mask expansion and bit packing.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum MaskError {
    /// A bit width outside what the operation supports.
    #[error("{name} must be an integer in [{min}, {max}], got {value}")]
    InvalidBits {
        /// Parameter name.
        name: &'static str,
        /// Smallest allowed value.
        min: u32,
        /// Largest allowed value.
        max: u32,
        /// The value given.
        value: u32,
    },
    /// A valid ring bit width that the array's storage type cannot hold.
    #[error(
        "bits = {bits} needs numpy.uint64 storage, but {what} is numpy.uint{storage} (which holds at most {storage} bits): pass {what}.astype(numpy.uint64)"
    )]
    StorageTooNarrow {
        /// Which array.
        what: &'static str,
        /// The bit width asked for.
        bits: u32,
        /// Width of the storage type in bits.
        storage: u32,
    },
    /// An invalid real-valued parameter.
    #[error("{name} must be {requirement}, got {}", Num(*.value))]
    InvalidParameter {
        /// Parameter name.
        name: &'static str,
        /// Requirement.
        requirement: &'static str,
        /// The value given.
        value: f64,
    },
    /// NaN/Inf in a float input.
    #[error("x must hold only finite values, found {} at index {index}", Num(*.value))]
    NonFinite {
        /// Index of the first offending element.
        index: usize,
        /// The offending value.
        value: f64,
    },
    /// An integer input element that is not below 2^bits.
    #[error("element {index} is {value}, which does not fit in {bits} bits (expected < 2^{bits})")]
    OutOfRange {
        /// Index of the first offending element.
        index: usize,
        /// The offending value.
        value: u64,
        /// The bit width.
        bits: u32,
    },
    /// Lengths that do not agree.
    #[error("{what}: expected {expected}, got {got}")]
    Length {
        /// What was being checked.
        what: &'static str,
        /// Expected length.
        expected: usize,
        /// Actual length.
        got: usize,
    },
    /// A seed of the wrong length.
    #[error("mask seed must be exactly 32 bytes, got {0} bytes")]
    SeedLength(usize),
    /// An aggregate that cannot be the sum of `n` quantized vectors (wrapped or wrong n).
    #[error(
        "element {index} of the aggregate is {value}, larger than n * (2^bits - 1) = {max}: the sum wrapped around the modulus or n is wrong"
    )]
    Inconsistent {
        /// Index of the first offending element.
        index: usize,
        /// The offending value.
        value: u64,
        /// The largest value a sum of n quantized vectors can take.
        max: u128,
    },
}

/// Errors of Shamir secret sharing.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ShareError {
    /// Threshold / share-count combination that is not `1 <= t <= n <= 65535`.
    #[error("expected 1 <= t <= n <= 65535, got t = {t}, n = {n}")]
    InvalidThreshold {
        /// Threshold.
        t: usize,
        /// Number of shares.
        n: usize,
    },
    /// Secret of an unsupported length.
    #[error("secret must be between 1 and 1024 bytes, got {0} bytes")]
    SecretLength(usize),
    /// A malformed share encoding.
    #[error("malformed share {index}: {reason}")]
    Malformed {
        /// Position of the share in the input list.
        index: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// Shares that do not belong together (different threshold or secret length).
    #[error("share {index} does not match share 0: {reason}")]
    Mismatch {
        /// Position of the share in the input list.
        index: usize,
        /// What differs.
        reason: String,
    },
    /// Two shares with the same x-coordinate.
    #[error("shares {first} and {second} have the same x-coordinate {x}")]
    DuplicateX {
        /// Position of the first share.
        first: usize,
        /// Position of the second share.
        second: usize,
        /// The repeated x-coordinate.
        x: u16,
    },
    /// Shares that parse but reconstruct to an impossible value (corrupt or from
    /// different secrets).
    #[error("the shares are inconsistent: {0}")]
    Inconsistent(String),
    /// An empty list of shares (the threshold t is read from the shares themselves).
    #[error("reconstruction needs exactly t shares (t is recorded in each share), got none")]
    NoShares,
    /// Not exactly t shares.
    #[error("reconstruction uses exactly t = {t} shares, got {got}")]
    WrongCount {
        /// Threshold.
        t: usize,
        /// Number of shares given.
        got: usize,
    },
}

/// Any error of the core; the single type the Python layer maps to exceptions.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum CoreError {
    /// Clipping error.
    #[error(transparent)]
    Clip(#[from] ClipError),
    /// Noise error.
    #[error(transparent)]
    Noise(#[from] NoiseError),
    /// Secure-aggregation error.
    #[error(transparent)]
    Mask(#[from] MaskError),
    /// Secret-sharing error.
    #[error(transparent)]
    Share(#[from] ShareError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_say_expected_and_given() {
        let e: CoreError = ShareError::InvalidThreshold { t: 5, n: 3 }.into();
        assert_eq!(
            e.to_string(),
            "expected 1 <= t <= n <= 65535, got t = 5, n = 3"
        );
        let e: CoreError = NoiseError::InvalidScale {
            name: "sigma",
            requirement: "in [2^-10, 2^28]",
            value: 1e-251,
        }
        .into();
        assert_eq!(
            e.to_string(),
            "sigma must be a finite number in [2^-10, 2^28], got 1e-251"
        );
        assert_eq!(Num(0.5).to_string(), "0.5");
        assert_eq!(Num(1e300).to_string(), "1e300");
        assert_eq!(Num(f64::NAN).to_string(), "NaN");
        let e: CoreError = NoiseError::SeedLength(31).into();
        assert!(e.to_string().contains("exactly 32 bytes, got 31"));
    }
}
