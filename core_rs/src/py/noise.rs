//! Bindings of `crate::rng` and `crate::noise`. Inputs are copied into owned memory before
//! the GIL is released (`HOUSE_STYLE` B5): another Python thread must not be able to change
//! what is being noised while the kernel runs.

use std::sync::Mutex;

use numpy::{IntoPyArray, PyArray1, PyArrayMethods, PyUntypedArray, PyUntypedArrayMethods};
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use super::arrays::{
    contiguous_mut, describe, is_array_of, logical_copy, readonly_dyn, readwrite_dyn,
};
use super::errors::{Kind, error};
use super::gil::run_detached;
use crate::noise::{self, Distribution, NoiseFloat};
use crate::rng::SecureRng;

/// A cryptographically secure generator (AES-256-CTR), from the OS or a 32-byte seed.
#[pyclass(frozen, name = "SecureRng", module = "confide._core")]
pub struct PySecureRng {
    inner: Mutex<SecureRng>,
    seeded: bool,
}

impl From<SecureRng> for PySecureRng {
    fn from(r: SecureRng) -> Self {
        let seeded = r.is_seeded();
        Self {
            inner: Mutex::new(r),
            seeded,
        }
    }
}

impl PySecureRng {
    /// Run `f` with exclusive access to the generator.
    pub fn with<T>(&self, f: impl FnOnce(&mut SecureRng) -> T) -> T {
        // A panic while holding the lock cannot leave the generator in a state that matters
        // for security (the worst case is skipped keystream), so poisoning is ignored.
        let mut g = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut g)
    }
}

#[pymethods]
impl PySecureRng {
    #[new]
    #[pyo3(signature = (seed=None))]
    fn new(py: Python<'_>, seed: Option<&Bound<'_, PyBytes>>) -> PyResult<Self> {
        let r = match seed {
            Some(s) => {
                let s = s.as_bytes().to_vec();
                run_detached(py, move || SecureRng::from_seed(&s))?
            }
            None => run_detached(py, SecureRng::from_os)?,
        };
        Ok(r.into())
    }

    /// True when built from an explicit seed (reproducible), False when keyed from the OS.
    #[getter]
    fn seeded(&self) -> bool {
        self.seeded
    }

    /// `n` uniformly random bytes.
    fn random_bytes<'py>(&self, py: Python<'py>, n: usize) -> PyResult<Bound<'py, PyBytes>> {
        let v = run_detached(py, || {
            let mut v = vec![0u8; n];
            self.with(|r| rand_core::RngCore::fill_bytes(r, &mut v));
            Ok::<_, crate::CoreError>(v)
        })?;
        Ok(PyBytes::new(py, &v))
    }

    fn __repr__(&self) -> &'static str {
        if self.seeded {
            "SecureRng(<seeded>)"
        } else {
            "SecureRng(<os>)"
        }
    }
}

fn distribution(kind: &str) -> PyResult<Distribution> {
    match kind {
        "gaussian" => Ok(Distribution::Gaussian),
        "laplace" => Ok(Distribution::Laplace),
        other => Err(error(
            Kind::InvalidArgument,
            format!("kind must be 'gaussian' or 'laplace', got {other:?}"),
        )),
    }
}

const FLOAT_ARR: &str = "a numpy.float32 or numpy.float64 array";

fn noised_copy<'py, T: NoiseFloat + numpy::Element>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    dist: Distribution,
    scale: f64,
    rng: &PySecureRng,
) -> PyResult<Bound<'py, PyUntypedArray>> {
    let arr = readonly_dyn::<T>(x, "x", FLOAT_ARR)?;
    let shape = arr.shape().to_vec();
    // Logical (row-major) order whatever the memory layout, so that the output, built
    // C-contiguous with the input's shape, holds each element's noised value in its place.
    let mut v = logical_copy(&arr);
    drop(arr);
    let v = run_detached(py, move || {
        rng.with(|r| noise::add_noise(&mut v, dist, scale, r))
            .map(|()| v)
    })?;
    let out = v.into_pyarray(py).reshape(shape)?;
    Ok(out.cast_into::<PyUntypedArray>()?)
}

fn noise_in_place<T: NoiseFloat + numpy::Element>(
    py: Python<'_>,
    x: &Bound<'_, PyAny>,
    dist: Distribution,
    scale: f64,
    rng: &PySecureRng,
) -> PyResult<()> {
    let mut arr = readwrite_dyn::<T>(x, "x", FLOAT_ARR)?;
    if arr.is_c_contiguous() {
        let s = contiguous_mut(&mut arr, "x")?;
        let mut v = s.to_vec();
        let v = run_detached(py, move || {
            rng.with(|r| noise::add_noise(&mut v, dist, scale, r))
                .map(|()| v)
        })?;
        s.copy_from_slice(&v);
    } else {
        // Any other layout (F order, negative or sliced strides): read and write back in
        // logical order, so element i gets the same noise as in a C-contiguous copy.
        let mut v: Vec<T> = arr.as_array().iter().copied().collect();
        let v = run_detached(py, move || {
            rng.with(|r| noise::add_noise(&mut v, dist, scale, r))
                .map(|()| v)
        })?;
        for (dst, src) in arr.as_array_mut().iter_mut().zip(v) {
            *dst = src;
        }
    }
    Ok(())
}

/// Return a copy of `x` (float32/float64, any shape) with lattice noise added.
#[pyfunction(name = "add_noise")]
pub fn add_noise_py<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    kind: &str,
    scale: f64,
    rng: &Bound<'py, PySecureRng>,
) -> PyResult<Bound<'py, PyUntypedArray>> {
    let dist = distribution(kind)?;
    if is_array_of::<f32>(x) {
        noised_copy::<f32>(py, x, dist, scale, rng.get())
    } else if is_array_of::<f64>(x) {
        noised_copy::<f64>(py, x, dist, scale, rng.get())
    } else {
        Err(error(
            Kind::ArrayType,
            format!("x must be {FLOAT_ARR}, got {}", describe(x)),
        ))
    }
}

/// Add lattice noise to `x` (float32/float64, any shape and memory layout, writeable) in place.
#[pyfunction(name = "add_noise_inplace")]
pub fn add_noise_inplace_py(
    py: Python<'_>,
    x: &Bound<'_, PyAny>,
    kind: &str,
    scale: f64,
    rng: &Bound<'_, PySecureRng>,
) -> PyResult<()> {
    let dist = distribution(kind)?;
    if is_array_of::<f32>(x) {
        noise_in_place::<f32>(py, x, dist, scale, rng.get())
    } else if is_array_of::<f64>(x) {
        noise_in_place::<f64>(py, x, dist, scale, rng.get())
    } else {
        Err(error(
            Kind::ArrayType,
            format!("x must be {FLOAT_ARR}, got {}", describe(x)),
        ))
    }
}

/// `n` fresh noise samples as a new float32 (or float64 when `double`) array.
#[pyfunction(name = "sample_noise")]
pub fn sample_noise_py<'py>(
    py: Python<'py>,
    n: usize,
    kind: &str,
    scale: f64,
    double: bool,
    rng: &Bound<'py, PySecureRng>,
) -> PyResult<Bound<'py, PyUntypedArray>> {
    let dist = distribution(kind)?;
    let rng = rng.get();
    if double {
        let v = run_detached(py, || rng.with(|r| noise::sample::<f64>(n, dist, scale, r)))?;
        Ok(v.into_pyarray(py).cast_into::<PyUntypedArray>()?)
    } else {
        let v = run_detached(py, || rng.with(|r| noise::sample::<f32>(n, dist, scale, r)))?;
        Ok(v.into_pyarray(py).cast_into::<PyUntypedArray>()?)
    }
}

/// `n` exact discrete Gaussian samples (int64) and the variance parameter realised.
#[pyfunction(name = "discrete_gaussian")]
pub fn discrete_gaussian_py<'py>(
    py: Python<'py>,
    n: usize,
    sigma: f64,
    rng: &Bound<'py, PySecureRng>,
) -> PyResult<(Bound<'py, PyArray1<i64>>, f64)> {
    let rng = rng.get();
    let (v, var) = run_detached(py, || rng.with(|r| noise::discrete_gaussian(n, sigma, r)))?;
    Ok((v.into_pyarray(py), var))
}
