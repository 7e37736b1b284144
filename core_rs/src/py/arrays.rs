//! Extraction of numpy arrays with typed, descriptive errors (dtype, rank, layout,
//! writeability), shared by every wrapper.

use numpy::{
    Element, PyArray1, PyArrayDyn, PyArrayMethods, PyReadonlyArray1, PyReadonlyArrayDyn,
    PyReadwriteArrayDyn, PyUntypedArrayMethods,
};
use pyo3::prelude::*;

use super::errors::{Kind, error};

/// "float64 ndarray of shape (3, 4)" or the Python type name of a non-array.
#[must_use]
pub fn describe(obj: &Bound<'_, PyAny>) -> String {
    match (obj.getattr("dtype"), obj.getattr("shape")) {
        (Ok(d), Ok(s)) => format!(
            "{} ndarray of shape {}",
            d.str().map_or_else(|_| "?".into(), |s| s.to_string()),
            s.str().map_or_else(|_| "?".into(), |s| s.to_string())
        ),
        _ => format!(
            "an object of type {}",
            obj.get_type()
                .name()
                .map_or_else(|_| "?".into(), |n| n.to_string())
        ),
    }
}

fn type_error(name: &str, expected: &str, obj: &Bound<'_, PyAny>) -> PyErr {
    error(
        Kind::ArrayType,
        format!("{name} must be {expected}, got {}", describe(obj)),
    )
}

/// Borrow `obj` as a 1-D array of `T`, read-only.
///
/// # Errors
/// `ArrayTypeError` naming what was expected and given.
pub fn readonly1<'py, T: Element>(
    obj: &Bound<'py, PyAny>,
    name: &str,
    expected: &str,
) -> PyResult<PyReadonlyArray1<'py, T>> {
    let arr = obj
        .cast::<PyArray1<T>>()
        .map_err(|_| type_error(name, expected, obj))?;
    arr.try_readonly()
        .map_err(|e| error(Kind::ArrayType, format!("{name} cannot be borrowed: {e}")))
}

/// Borrow `obj` as an N-D array of `T`, read-only.
///
/// # Errors
/// `ArrayTypeError` naming what was expected and given.
pub fn readonly_dyn<'py, T: Element>(
    obj: &Bound<'py, PyAny>,
    name: &str,
    expected: &str,
) -> PyResult<PyReadonlyArrayDyn<'py, T>> {
    let arr = obj
        .cast::<PyArrayDyn<T>>()
        .map_err(|_| type_error(name, expected, obj))?;
    arr.try_readonly()
        .map_err(|e| error(Kind::ArrayType, format!("{name} cannot be borrowed: {e}")))
}

/// Borrow `obj` as a writeable N-D array of `T`.
///
/// # Errors
/// `ArrayTypeError` for a wrong dtype or a read-only / already borrowed array.
pub fn readwrite_dyn<'py, T: Element>(
    obj: &Bound<'py, PyAny>,
    name: &str,
    expected: &str,
) -> PyResult<PyReadwriteArrayDyn<'py, T>> {
    let arr = obj
        .cast::<PyArrayDyn<T>>()
        .map_err(|_| type_error(name, expected, obj))?;
    arr.try_readwrite().map_err(|e| {
        error(
            Kind::ArrayType,
            format!("{name} must be a writeable array that is not borrowed elsewhere: {e}"),
        )
    })
}

/// Whether `obj` is an ndarray of element type `T` (any rank).
#[must_use]
pub fn is_array_of<T: Element>(obj: &Bound<'_, PyAny>) -> bool {
    obj.cast::<PyArrayDyn<T>>().is_ok()
}

/// The C-contiguous data of an array as a slice.
///
/// # Errors
/// `ArrayTypeError` for a non-contiguous array.
pub fn contiguous<'a, T: Element, D: numpy::ndarray::Dimension>(
    arr: &'a numpy::PyReadonlyArray<'_, T, D>,
    name: &str,
) -> PyResult<&'a [T]> {
    arr.as_slice().map_err(|_| {
        error(Kind::ArrayType, format!("{name} must be C-contiguous, got a strided view of shape {:?} (use numpy.ascontiguousarray)", arr.shape()))
    })
}

/// The C-contiguous data of a writeable array as a mutable slice.
///
/// # Errors
/// `ArrayTypeError` for a non-contiguous array.
pub fn contiguous_mut<'a, T: Element, D: numpy::ndarray::Dimension>(
    arr: &'a mut numpy::PyReadwriteArray<'_, T, D>,
    name: &str,
) -> PyResult<&'a mut [T]> {
    let shape = arr.shape().to_vec();
    arr.as_slice_mut().map_err(|_| {
        error(Kind::ArrayType, format!("{name} must be C-contiguous, got a strided view of shape {shape:?} (use numpy.ascontiguousarray)"))
    })
}
