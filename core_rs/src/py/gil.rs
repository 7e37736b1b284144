//! The single helper that releases the GIL around a core computation and maps its error.
//! Wrappers never call `py.detach` themselves (`HOUSE_STYLE` B3).

use pyo3::marker::Ungil;
use pyo3::prelude::*;

use crate::error::CoreError;

/// Run `f` with the GIL released and turn a core error into the matching Python exception.
///
/// # Errors
/// The mapped `CoreError` returned by `f`.
pub fn run_detached<T, E, F>(py: Python<'_>, f: F) -> PyResult<T>
where
    F: Ungil + FnOnce() -> Result<T, E>,
    T: Send,
    E: Send + Into<CoreError>,
{
    py.detach(f).map_err(|e| PyErr::from(e.into()))
}
