//! Bindings of `crate::clip`. Clipping may borrow the array across the detached call
//! (`HOUSE_STYLE` B5): its inputs are not secrets and the result is written in place.

use numpy::{IntoPyArray, PyArray1, PyUntypedArrayMethods};
use pyo3::prelude::*;

use super::arrays::{contiguous, contiguous_mut, readonly1, readwrite_dyn};
use super::errors::{Kind, error};
use super::gil::run_detached;
use crate::clip;

const F32_1D: &str = "a 1-D numpy.float32 array";

/// L2 norm of a 1-D float32 array (accumulated in float64); NaN/Inf raise `NonFiniteError`.
#[pyfunction(name = "l2_norm")]
pub fn l2_norm_py(py: Python<'_>, x: &Bound<'_, PyAny>) -> PyResult<f64> {
    let arr = readonly1::<f32>(x, "x", F32_1D)?;
    let s = contiguous(&arr, "x")?;
    run_detached(py, || clip::checked_l2_norm(s))
}

/// Clip a 1-D float32 array in place to L2 norm `max_norm`; returns the pre-clip norm.
#[pyfunction(name = "clip_l2")]
pub fn clip_l2_py(py: Python<'_>, x: &Bound<'_, PyAny>, max_norm: f64) -> PyResult<f64> {
    let mut arr = readwrite_dyn::<f32>(x, "x", F32_1D)?;
    if arr.ndim() != 1 {
        return Err(error(
            Kind::ArrayType,
            format!(
                "x must be a 1-D numpy.float32 array, got {} dimensions",
                arr.ndim()
            ),
        ));
    }
    let s = contiguous_mut(&mut arr, "x")?;
    run_detached(py, || clip::clip_l2(s, max_norm))
}

/// Clip every row of a C-contiguous (batch, dim) float32 array in place; returns the
/// pre-clip row norms as float64.
#[pyfunction(name = "clip_rows")]
pub fn clip_rows_py<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    max_norm: f64,
) -> PyResult<Bound<'py, PyArray1<f64>>> {
    let mut arr = readwrite_dyn::<f32>(x, "x", "a 2-D numpy.float32 array of shape (batch, dim)")?;
    if arr.ndim() != 2 {
        return Err(error(
            Kind::ArrayType,
            format!(
                "x must be a 2-D numpy.float32 array of shape (batch, dim), got {} dimensions",
                arr.ndim()
            ),
        ));
    }
    let (rows, dim) = (arr.shape()[0], arr.shape()[1]);
    let s = contiguous_mut(&mut arr, "x")?;
    let norms = run_detached(py, || clip::clip_rows(s, rows, dim, max_norm))?;
    Ok(norms.into_pyarray(py))
}
