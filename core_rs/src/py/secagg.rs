//! Bindings of `crate::secagg`: quantization, mask expansion and fused masking, bit packing
//! and Shamir sharing. Seeds, secrets and masked vectors are copied into owned memory before
//! the GIL is released (`HOUSE_STYLE` B5); for `apply_masks` that owned copy is the new output
//! array itself (see `masked_copy`). Ring vectors are `numpy.uint32` when `bits <= 32` and
//! `numpy.uint64` otherwise.

use numpy::{IntoPyArray, PyArray1, PyArrayMethods, PyUntypedArray};
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use super::arrays::{contiguous, describe, is_array_of, readonly1};
use super::errors::{Kind, error};
use super::gil::run_detached;
use super::noise::PySecureRng;
use crate::secagg::mask::{self, MaskSpec};
use crate::secagg::prg::{MaskDomain, seed32};
use crate::secagg::{Word, pack, quant, shares};

const UINT_1D: &str = "a 1-D numpy.uint32 or numpy.uint64 array";
const F32_1D: &str = "a 1-D numpy.float32 array";

fn ring_array<'py, W: Word + numpy::Element>(
    py: Python<'py>,
    v: Vec<W>,
) -> PyResult<Bound<'py, PyUntypedArray>> {
    Ok(v.into_pyarray(py).cast_into::<PyUntypedArray>()?)
}

fn narrow(v: Vec<u64>, bits: u32) -> either_vec::RingVec {
    if bits <= 32 {
        either_vec::RingVec::U32(v.into_iter().map(|x| x as u32).collect())
    } else {
        either_vec::RingVec::U64(v)
    }
}

mod either_vec {
    /// A ring vector in its natural storage width.
    pub enum RingVec {
        U32(Vec<u32>),
        U64(Vec<u64>),
    }
}
use either_vec::RingVec;

fn to_py<'py>(py: Python<'py>, v: RingVec) -> PyResult<Bound<'py, PyUntypedArray>> {
    match v {
        RingVec::U32(v) => ring_array(py, v),
        RingVec::U64(v) => ring_array(py, v),
    }
}

/// Quantize a 1-D float32 array to uint32 integers in [0, 2^bits - 1] (bits in [1, 32]) with
/// stochastic rounding.
#[pyfunction(name = "quantize")]
pub fn quantize_py<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    clip_range: f64,
    bits: u32,
    rng: &Bound<'py, PySecureRng>,
) -> PyResult<Bound<'py, PyUntypedArray>> {
    let arr = readonly1::<f32>(x, "x", F32_1D)?;
    let v = contiguous(&arr, "x")?.to_vec();
    drop(arr);
    let rng = rng.get();
    // The quantizer is at most 32 bits wide (`quant` module docs), so its output is u32;
    // wider `bits` are rejected by `quantize` with the [1, 32] range.
    let q = run_detached(py, move || {
        rng.with(|r| quant::quantize::<u32>(&v, clip_range, bits, r))
    })?;
    ring_array(py, q)
}

/// Dequantize a sum of `n` quantized vectors to float32 (the mean when `mean`).
#[pyfunction(name = "dequantize")]
pub fn dequantize_py<'py>(
    py: Python<'py>,
    total: &Bound<'py, PyAny>,
    clip_range: f64,
    bits: u32,
    n: u64,
    mean: bool,
) -> PyResult<Bound<'py, PyArray1<f32>>> {
    let out = if is_array_of::<u32>(total) {
        let arr = readonly1::<u32>(total, "total", UINT_1D)?;
        let s = contiguous(&arr, "total")?;
        run_detached(py, || quant::dequantize(s, clip_range, bits, n, mean))?
    } else {
        let arr = readonly1::<u64>(total, "total", UINT_1D)?;
        let s = contiguous(&arr, "total")?;
        run_detached(py, || quant::dequantize(s, clip_range, bits, n, mean))?
    };
    Ok(out.into_pyarray(py))
}

/// The round number of a mask domain as a u64, with a typed error naming the parameter
/// (pyo3's own extraction raises a bare `OverflowError` for a negative or huge int).
fn round_u64(obj: &Bound<'_, PyAny>) -> PyResult<u64> {
    obj.extract::<u64>().map_err(|_| {
        let given = obj.repr().map_or_else(|_| describe(obj), |r| r.to_string());
        error(
            Kind::InvalidArgument,
            format!("round must be an int in [0, 2**64 - 1], got {given}"),
        )
    })
}

fn parse_masks(masks: Vec<(Vec<u8>, i64)>) -> PyResult<Vec<MaskSpec>> {
    masks
        .into_iter()
        .enumerate()
        .map(|(i, (seed, sign))| {
            let negate = match sign {
                1 => false,
                -1 => true,
                s => {
                    return Err(error(
                        Kind::InvalidArgument,
                        format!("masks[{i}] sign must be +1 or -1, got {s}"),
                    ));
                }
            };
            MaskSpec::new(&seed, negate)
                .map_err(|e| error(Kind::InvalidArgument, format!("masks[{i}]: {e}")))
        })
        .collect()
}

/// The mask of `seed` for `(session, round, purpose)` as `n` elements mod 2^bits.
#[pyfunction(name = "expand_mask")]
pub fn expand_mask_py<'py>(
    py: Python<'py>,
    seed: Vec<u8>,
    n: usize,
    bits: u32,
    session: Vec<u8>,
    round: &Bound<'py, PyAny>,
    purpose: String,
) -> PyResult<Bound<'py, PyUntypedArray>> {
    let round = round_u64(round)?;
    let v = run_detached(py, move || {
        let s = seed32(&seed)?;
        let domain = MaskDomain {
            session,
            round,
            purpose,
        };
        if bits <= 32 {
            // Expand straight into u32 storage (same elements as the u64 expansion, half the
            // memory traffic and no narrowing pass).
            let mut v = vec![0u32; n];
            let spec = [MaskSpec {
                seed: s,
                negate: false,
            }];
            mask::apply_masks(&mut v, &spec, bits, &domain)?;
            Ok::<_, crate::CoreError>(RingVec::U32(v))
        } else {
            Ok(narrow(mask::expand_mask(&s, n, bits, &domain)?, bits))
        }
    })?;
    to_py(py, v)
}

/// Return `x + sum(sign * mask(seed))` mod 2^bits as a new array of x's dtype.
#[pyfunction(name = "apply_masks")]
pub fn apply_masks_py<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    masks: Vec<(Vec<u8>, i64)>,
    bits: u32,
    session: Vec<u8>,
    round: &Bound<'py, PyAny>,
    purpose: String,
) -> PyResult<Bound<'py, PyUntypedArray>> {
    let round = round_u64(round)?;
    let specs = parse_masks(masks)?;
    let domain = MaskDomain {
        session,
        round,
        purpose,
    };
    if is_array_of::<u32>(x) {
        masked_copy::<u32>(py, x, &specs, bits, &domain)
    } else if is_array_of::<u64>(x) {
        masked_copy::<u64>(py, x, &specs, bits, &domain)
    } else {
        Err(error(
            Kind::ArrayType,
            format!("x must be {UINT_1D}, got {}", describe(x)),
        ))
    }
}

/// `apply_masks` for one storage width: copy `x` into a new numpy array while attached, then
/// mask that array in place while detached.
///
/// `HOUSE_STYLE` B5 asks for secure-aggregation inputs to be copied into owned memory before
/// the GIL is released, because another Python thread could otherwise change them under the
/// kernel. The array masked here is that copy: it is allocated by this call and no Python
/// object other than the local `out` refers to it until it is returned, so no other thread
/// can read or write it while we are detached. Masking it in place saves the second copy
/// (`Vec` -> numpy) and lets the output be the only allocation of the call. On error it is
/// simply dropped (`apply_masks` validates before writing anyway).
fn masked_copy<'py, W: Word + numpy::Element>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    specs: &[MaskSpec],
    bits: u32,
    domain: &MaskDomain,
) -> PyResult<Bound<'py, PyUntypedArray>> {
    let arr = readonly1::<W>(x, "x", UINT_1D)?;
    let out = PyArray1::<W>::from_slice(py, contiguous(&arr, "x")?);
    drop(arr);
    {
        let mut rw = out.try_readwrite().map_err(|e| {
            error(
                Kind::ArrayType,
                format!("internal: new array not writeable: {e}"),
            )
        })?;
        let v = rw
            .as_slice_mut()
            .map_err(|e| error(Kind::ArrayType, format!("internal: new array: {e}")))?;
        run_detached(py, move || mask::apply_masks(v, specs, bits, domain))?;
    }
    Ok(out.cast_into::<PyUntypedArray>()?)
}

/// Pack a uint32/uint64 array into `bits` bits per element.
#[pyfunction(name = "pack_bits")]
pub fn pack_bits_py<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    bits: u32,
) -> PyResult<Bound<'py, PyBytes>> {
    let out = if is_array_of::<u32>(x) {
        let arr = readonly1::<u32>(x, "x", UINT_1D)?;
        let s = contiguous(&arr, "x")?;
        run_detached(py, || pack::pack_bits(s, bits))?
    } else {
        let arr = readonly1::<u64>(x, "x", UINT_1D)?;
        let s = contiguous(&arr, "x")?;
        run_detached(py, || pack::pack_bits(s, bits))?
    };
    Ok(PyBytes::new(py, &out))
}

/// Unpack `n` elements of `bits` bits (uint32 when bits <= 32, else uint64).
#[pyfunction(name = "unpack_bits")]
pub fn unpack_bits_py<'py>(
    py: Python<'py>,
    data: Vec<u8>,
    bits: u32,
    n: usize,
) -> PyResult<Bound<'py, PyUntypedArray>> {
    if bits <= 32 {
        let v = run_detached(py, move || pack::unpack_bits::<u32>(&data, bits, n))?;
        ring_array(py, v)
    } else {
        let v = run_detached(py, move || pack::unpack_bits::<u64>(&data, bits, n))?;
        ring_array(py, v)
    }
}

/// Split `secret` into `n` Shamir shares with threshold `t`.
#[pyfunction(name = "shamir_split")]
pub fn shamir_split_py<'py>(
    py: Python<'py>,
    secret: Vec<u8>,
    n: usize,
    t: usize,
    rng: &Bound<'py, PySecureRng>,
) -> PyResult<Vec<Bound<'py, PyBytes>>> {
    let rng = rng.get();
    let mut secret = secret;
    let res = run_detached(py, || rng.with(|r| shares::split(&secret, n, t, r)));
    zeroize::Zeroize::zeroize(&mut secret);
    Ok(res?
        .iter()
        .map(|s| PyBytes::new(py, &s.to_bytes()))
        .collect())
}

/// Reconstruct a secret from exactly t shares.
#[pyfunction(name = "shamir_combine")]
pub fn shamir_combine_py<'py>(
    py: Python<'py>,
    shares_in: Vec<Vec<u8>>,
) -> PyResult<Bound<'py, PyBytes>> {
    let secret = run_detached(py, move || {
        let parsed: Result<Vec<shares::Share>, _> = shares_in
            .iter()
            .enumerate()
            .map(|(i, b)| shares::Share::from_bytes(b, i))
            .collect();
        shares::combine(&parsed?)
    })?;
    Ok(PyBytes::new(py, &secret))
}
