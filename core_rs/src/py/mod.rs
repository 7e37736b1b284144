//! The `PyO3` layer: the only code that mentions pyo3 or numpy (compiled with feature
//! `python`). Every wrapper extracts its arguments while attached, runs the pure kernel
//! through [`gil::run_detached`], and converts the result (`HOUSE_STYLE` B2/B3).

// The `///` docs of wrappers become Python docstrings, so their errors are documented on the
// Python side (python/confide/*.py), not in rustdoc `# Errors` sections; and naming the
// `'py` lifetime explicitly is the PyO3 convention that keeps signatures readable.
#![allow(clippy::missing_errors_doc, clippy::elidable_lifetime_names)]

pub mod arrays;
pub mod clip;
pub mod errors;
pub mod gil;
pub mod noise;
pub mod secagg;

use pyo3::prelude::*;

/// The private extension module `confide._core`; user code imports `confide` instead.
#[pymodule]
pub mod _core {
    #[pymodule_export]
    use super::clip::{clip_l2_py, clip_rows_py, l2_norm_py};
    #[pymodule_export]
    use super::errors::ConfideError;
    #[pymodule_export]
    use super::noise::{
        PySecureRng, add_noise_inplace_py, add_noise_py, discrete_gaussian_py, sample_noise_py,
    };
    #[pymodule_export]
    use super::secagg::{
        apply_masks_py, dequantize_py, expand_mask_py, pack_bits_py, quantize_py,
        shamir_combine_py, shamir_split_py, unpack_bits_py,
    };

    use super::errors::Kind;
    use pyo3::prelude::*;

    #[pymodule_init]
    fn init(m: &Bound<'_, PyModule>) -> PyResult<()> {
        m.add("__version__", env!("CARGO_PKG_VERSION"))?;
        for kind in Kind::ALL {
            m.add(kind.name(), kind.class(m.py())?)?;
        }
        Ok(())
    }
}
