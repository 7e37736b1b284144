//! confide's Rust core: the hot and security-critical numeric kernels of the SDK.
//!
//! Pure Rust first: every module here is usable and tested without Python. The optional
//! `python` feature adds the thin `PyO3` layer in [`py`], the only place that mentions pyo3 or
//! numpy. Randomness comes exclusively from [`rng::SecureRng`] (AES-256-CTR keyed from the OS
//! or from an explicit 32-byte seed); there is no global RNG.

pub mod clip;
pub mod error;
pub mod noise;
pub mod rng;
pub mod scan;
pub mod secagg;
pub mod simd;

#[cfg(feature = "python")]
pub mod py;

pub use error::{ClipError, CoreError, MaskError, NoiseError, ShareError};
