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

/// How a non-C-contiguous array is laid out, for error messages.
fn layout(flags_f: bool) -> &'static str {
    if flags_f {
        "an F-contiguous (column-major) array"
    } else {
        "a strided view (transposed, reversed or sliced)"
    }
}

/// The error for an array that is not C-contiguous (row-major, positive unit strides).
fn not_c_contiguous(name: &str, shape: &[usize], strides: &[isize], fortran: bool) -> PyErr {
    error(
        Kind::ArrayType,
        format!(
            "{name} must be C-contiguous (row-major), got {} of shape {shape:?} with strides \
             {strides:?} bytes: pass np.ascontiguousarray({name})",
            layout(fortran)
        ),
    )
}

/// The C-contiguous data of an array as a slice.
///
/// Only C order is accepted: rust-numpy's `as_slice` also accepts F-contiguous arrays, whose
/// memory order is not the logical (row-major) order that kernels interpreting rows or
/// reshaping their output rely on.
///
/// # Errors
/// `ArrayTypeError` for an array that is not C-contiguous.
pub fn contiguous<'a, T: Element, D: numpy::ndarray::Dimension>(
    arr: &'a numpy::PyReadonlyArray<'_, T, D>,
    name: &str,
) -> PyResult<&'a [T]> {
    if !arr.is_c_contiguous() {
        return Err(not_c_contiguous(
            name,
            arr.shape(),
            arr.strides(),
            arr.is_fortran_contiguous(),
        ));
    }
    arr.as_slice()
        .map_err(|_| not_c_contiguous(name, arr.shape(), arr.strides(), false))
}

/// The C-contiguous data of a writeable array as a mutable slice (C order only, see
/// [`contiguous`]).
///
/// # Errors
/// `ArrayTypeError` for an array that is not C-contiguous.
pub fn contiguous_mut<'a, T: Element, D: numpy::ndarray::Dimension>(
    arr: &'a mut numpy::PyReadwriteArray<'_, T, D>,
    name: &str,
) -> PyResult<&'a mut [T]> {
    let shape = arr.shape().to_vec();
    let strides = arr.strides().to_vec();
    if !arr.is_c_contiguous() {
        return Err(not_c_contiguous(
            name,
            &shape,
            &strides,
            arr.is_fortran_contiguous(),
        ));
    }
    arr.as_slice_mut()
        .map_err(|_| not_c_contiguous(name, &shape, &strides, false))
}

/// The elements of an array of any layout (C, F, negative or sliced strides) copied in
/// logical (row-major) order.
#[must_use]
pub fn logical_copy<T: Element + Copy, D: numpy::ndarray::Dimension>(
    arr: &numpy::PyReadonlyArray<'_, T, D>,
) -> Vec<T> {
    if arr.is_c_contiguous()
        && let Ok(s) = arr.as_slice()
    {
        return s.to_vec();
    }
    arr.as_array().iter().copied().collect()
}
