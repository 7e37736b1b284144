//! The one place where core errors become Python exceptions.
//!
//! `ConfideError` is created with `create_exception!`; its subclasses also inherit from the
//! matching builtin (`ValueError`, `TypeError`, `OSError`) so that `except ValueError` keeps
//! working for callers who do not know confide's hierarchy. They are created once per
//! interpreter at module init (`type(name, (ConfideError, builtin), ...)`) and cached.
//!
//! Every class is registered under `confide.errors` (its `__module__`), the one public
//! hierarchy that also holds the federation, privacy and secure-aggregation errors; the
//! private extension module `confide._core` only exports them to it.

use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyOSError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyTuple, PyType};

use crate::error::{ClipError, CoreError, MaskError, NoiseError, ShareError};

create_exception!(
    confide.errors,
    ConfideError,
    PyException,
    "Base class of every error raised by confide."
);

/// The exception subclasses, in the order they are added to the module.
#[derive(Clone, Copy, Debug)]
pub enum Kind {
    /// Bad parameter value (sigma, bits, n, t, seed length, ...).
    InvalidArgument,
    /// Lengths or shapes that do not agree.
    Shape,
    /// Wrong dtype, not an ndarray, not contiguous, not writeable.
    ArrayType,
    /// NaN or Inf where finite values are required.
    NonFinite,
    /// Malformed, mismatched or inconsistent secret shares.
    Share,
    /// An aggregate that cannot be a valid sum (wrapped modulus, wrong n).
    Aggregate,
    /// The operating system's random source failed.
    RandomSource,
}

impl Kind {
    /// Every kind.
    pub const ALL: [Kind; 7] = [
        Kind::InvalidArgument,
        Kind::Shape,
        Kind::ArrayType,
        Kind::NonFinite,
        Kind::Share,
        Kind::Aggregate,
        Kind::RandomSource,
    ];

    fn spec(self) -> (&'static str, &'static str) {
        match self {
            Kind::InvalidArgument => (
                "InvalidArgumentError",
                "A parameter has an invalid value; the message says what was expected.",
            ),
            Kind::Shape => ("ShapeError", "Array lengths or shapes do not agree."),
            Kind::ArrayType => (
                "ArrayTypeError",
                "An array has the wrong dtype, rank or memory layout, or is not writeable.",
            ),
            Kind::NonFinite => (
                "NonFiniteError",
                "An input holds NaN or Inf where finite values are required.",
            ),
            Kind::Share => (
                "ShareError",
                "Secret shares are malformed, do not belong together, or are inconsistent.",
            ),
            Kind::Aggregate => (
                "AggregateError",
                "An aggregate cannot be a valid sum (the modulus wrapped or n is wrong).",
            ),
            Kind::RandomSource => (
                "RandomSourceError",
                "The operating system's random source failed.",
            ),
        }
    }

    fn cell(self) -> &'static PyOnceLock<Py<PyType>> {
        static CELLS: [PyOnceLock<Py<PyType>>; 7] = [
            PyOnceLock::new(),
            PyOnceLock::new(),
            PyOnceLock::new(),
            PyOnceLock::new(),
            PyOnceLock::new(),
            PyOnceLock::new(),
            PyOnceLock::new(),
        ];
        &CELLS[self as usize]
    }

    /// The Python class of this kind (created on first use).
    ///
    /// # Errors
    /// Only if creating the class fails (out of memory).
    pub fn class<'py>(self, py: Python<'py>) -> PyResult<Bound<'py, PyType>> {
        let ty = self
            .cell()
            .get_or_try_init(py, || -> PyResult<Py<PyType>> {
                let (name, doc) = self.spec();
                let builtin = match self {
                    Kind::ArrayType => py.get_type::<PyTypeError>(),
                    Kind::RandomSource => py.get_type::<PyOSError>(),
                    _ => py.get_type::<PyValueError>(),
                };
                let bases = PyTuple::new(py, [py.get_type::<ConfideError>(), builtin])?;
                let ns = PyDict::new(py);
                ns.set_item("__module__", "confide.errors")?;
                ns.set_item("__doc__", doc)?;
                let cls = py.get_type::<PyType>().call1((name, bases, ns))?;
                Ok(cls.cast_into::<PyType>()?.unbind())
            })?;
        Ok(ty.bind(py).clone())
    }

    /// Class name as exported from `confide._core`.
    #[must_use]
    pub fn name(self) -> &'static str {
        self.spec().0
    }
}

/// A `PyErr` of the given kind with `msg`.
#[must_use]
pub fn error(kind: Kind, msg: impl Into<String>) -> PyErr {
    let msg = msg.into();
    Python::attach(|py| match kind.class(py) {
        Ok(cls) => PyErr::from_type(cls, msg),
        Err(e) => e,
    })
}

fn kind_of(e: &CoreError) -> Kind {
    match e {
        CoreError::Clip(c) => match c {
            ClipError::InvalidMaxNorm(_) => Kind::InvalidArgument,
            ClipError::NonFinite { .. } => Kind::NonFinite,
            ClipError::Shape { .. } => Kind::Shape,
        },
        CoreError::Noise(n) => match n {
            NoiseError::InvalidScale { .. }
            | NoiseError::SeedLength(_)
            | NoiseError::Unsupported(_) => Kind::InvalidArgument,
            NoiseError::NonFinite { .. } => Kind::NonFinite,
            NoiseError::OsRandom(_) => Kind::RandomSource,
        },
        CoreError::Mask(m) => match m {
            MaskError::InvalidBits { .. }
            | MaskError::StorageTooNarrow { .. }
            | MaskError::InvalidParameter { .. }
            | MaskError::OutOfRange { .. }
            | MaskError::SeedLength(_) => Kind::InvalidArgument,
            MaskError::NonFinite { .. } => Kind::NonFinite,
            MaskError::Length { .. } => Kind::Shape,
            MaskError::Inconsistent { .. } => Kind::Aggregate,
        },
        CoreError::Share(s) => match s {
            ShareError::InvalidThreshold { .. } | ShareError::SecretLength(_) => {
                Kind::InvalidArgument
            }
            ShareError::Malformed { .. }
            | ShareError::Mismatch { .. }
            | ShareError::DuplicateX { .. }
            | ShareError::Inconsistent(_)
            | ShareError::WrongCount { .. }
            | ShareError::NoShares => Kind::Share,
        },
    }
}

impl From<CoreError> for PyErr {
    fn from(e: CoreError) -> PyErr {
        error(kind_of(&e), e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_variant_has_the_intended_kind() {
        let cases: Vec<(CoreError, &str)> = vec![
            (
                ClipError::InvalidMaxNorm(0.0).into(),
                "InvalidArgumentError",
            ),
            (
                ClipError::NonFinite {
                    location: "x[0]".into(),
                    value: f64::NAN,
                }
                .into(),
                "NonFiniteError",
            ),
            (
                ClipError::Shape {
                    expected: 1,
                    got: 2,
                }
                .into(),
                "ShapeError",
            ),
            (NoiseError::SeedLength(3).into(), "InvalidArgumentError"),
            (NoiseError::OsRandom("x".into()).into(), "RandomSourceError"),
            (
                MaskError::Inconsistent {
                    index: 0,
                    value: 1,
                    max: 0,
                }
                .into(),
                "AggregateError",
            ),
            (
                MaskError::Length {
                    what: "x",
                    expected: 1,
                    got: 2,
                }
                .into(),
                "ShapeError",
            ),
            (ShareError::WrongCount { t: 2, got: 1 }.into(), "ShareError"),
            (ShareError::NoShares.into(), "ShareError"),
            (
                MaskError::StorageTooNarrow {
                    what: "x",
                    bits: 40,
                    storage: 32,
                }
                .into(),
                "InvalidArgumentError",
            ),
            (
                ShareError::InvalidThreshold { t: 2, n: 1 }.into(),
                "InvalidArgumentError",
            ),
        ];
        for (e, name) in cases {
            assert_eq!(kind_of(&e).name(), name, "{e}");
        }
    }
}
