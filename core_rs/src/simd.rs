//! Runtime CPU-feature dispatch for the vectorisable kernels: the crate's only `unsafe`.
//!
//! The build target is baseline x86-64 (SSE2), so LLVM vectorises the numeric loops at most
//! two f64 lanes wide. Each kernel listed here is written once, as portable safe Rust marked
//! `#[inline(always)]` in its own module, and compiled a second time inside a
//! `#[target_feature]` wrapper for AVX2 (four f64 lanes) and once more for AVX-512 (eight).
//! The dispatcher picks the widest copy that `is_x86_feature_detected!` confirms on the
//! running CPU (std caches the CPUID result), and the portable copy otherwise and on every other architecture
//! (aarch64 included). Both copies are the same source compiled twice: results are
//! bit-identical (Rust never contracts `a * b + c` into an FMA), only the speed differs.
//!
//! Kernels dispatched here: `quant::quantize_chunk_lattice` (stochastic rounding) and
//! `mask::apply_segment_portable` (fused mask expansion and add; AES itself is dispatched by
//! the `aes` crate).
//!
//! Invariant for every `unsafe` block below: it only calls a `#[target_feature]` function,
//! and only after runtime detection has confirmed that feature on the running CPU.

use crate::rng::AesCtr;
use crate::secagg::Word;
use crate::secagg::mask::apply_segment_portable;
use crate::secagg::prg::MaskPrg;
use crate::secagg::quant::quantize_chunk_lattice;

/// Whether the running CPU supports AVX2 (cached by std after the first call).
#[inline]
#[must_use]
pub fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether the running CPU supports the AVX-512 subsets the kernels use (F, VL, DQ, BW).
#[inline]
#[must_use]
pub fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("avx512dq")
            && std::arch::is_x86_feature_detected!("avx512bw")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Defines a dispatcher `$name` and its two `#[target_feature]` copies (`$avx2`, `$avx512`)
/// of the portable kernel `$kernel`; all three take the same arguments. The copies only call
/// the kernel, so each is the kernel's source compiled for that vector width.
macro_rules! dispatched {
    (
        $(#[$doc:meta])*
        pub fn $name:ident / $avx2:ident / $avx512:ident <$w:ident: Word>
            ($($arg:ident: $ty:ty),* $(,)?) => $kernel:ident;
    ) => {
        $(#[$doc])*
        pub fn $name<$w: Word>($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            if has_avx512() {
                #[allow(unsafe_code)]
                // SAFETY: the AVX-512 copy only requires AVX-512 F/VL/DQ/BW, detected above.
                unsafe {
                    $avx512($($arg),*);
                }
                return;
            }
            #[cfg(target_arch = "x86_64")]
            if has_avx2() {
                #[allow(unsafe_code)]
                // SAFETY: the AVX2 copy only requires AVX2, detected on this CPU just above.
                unsafe {
                    $avx2($($arg),*);
                }
                return;
            }
            $kernel($($arg),*);
        }

        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2")]
        fn $avx2<$w: Word>($($arg: $ty),*) {
            $kernel($($arg),*);
        }

        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx512f,avx512vl,avx512dq,avx512bw")]
        fn $avx512<$w: Word>($($arg: $ty),*) {
            $kernel($($arg),*);
        }
    };
}

dispatched! {
    /// [`quantize_chunk_lattice`] on the widest vector unit available.
    pub fn quantize_chunk / quantize_chunk_avx2 / quantize_chunk_avx512 <W: Word>(
        o: &mut [W],
        xs: &[f32],
        r: f64,
        scale: f64,
        l: u64,
        stream: &mut AesCtr,
    ) => quantize_chunk_lattice;
}

dispatched! {
    /// [`apply_segment_portable`] (fused mask expansion and add) on the widest vector unit
    /// available.
    pub fn apply_segment / apply_segment_avx2 / apply_segment_avx512 <W: Word>(
        seg: &mut [W],
        first_elem: usize,
        prg: &MaskPrg,
        negate: bool,
        m: u64,
    ) => apply_segment_portable;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every compiled copy of the mask kernel the CPU can run gives the portable output.
    #[test]
    fn mask_copies_agree() {
        use crate::secagg::prg::MaskDomain;
        let dom = MaskDomain::new(b"s", 3, "pair");
        for (bits, negate) in [(32u32, false), (32, true), (20, false), (7, true)] {
            let prg = MaskPrg::new(&[9u8; 32], &dom, bits);
            let m = crate::secagg::low_mask(bits);
            let x: Vec<u32> = (0..5000u32)
                .map(|i| i.wrapping_mul(2_654_435_761) & m as u32)
                .collect();
            let mut portable = x.clone();
            apply_segment_portable(&mut portable, 4096, &prg, negate, m);
            let mut v64: Vec<u64> = x.iter().map(|&v| u64::from(v)).collect();
            apply_segment_portable(&mut v64, 4096, &prg, negate, m);
            assert!(v64.iter().zip(&portable).all(|(&a, &b)| a == u64::from(b)));
            #[cfg(target_arch = "x86_64")]
            {
                type Copy = unsafe fn(&mut [u32], usize, &MaskPrg, bool, u64);
                let copies: [(&str, bool, Copy); 2] = [
                    ("avx2", has_avx2(), apply_segment_avx2),
                    ("avx512", has_avx512(), apply_segment_avx512),
                ];
                for (name, _, copy) in copies.into_iter().filter(|c| c.1) {
                    let mut v = x.clone();
                    #[allow(unsafe_code)]
                    // SAFETY: only the copies whose features were detected on this CPU get here.
                    unsafe {
                        copy(&mut v, 4096, &prg, negate, m);
                    }
                    assert_eq!(v, portable, "{name}, bits {bits}");
                }
            }
        }
    }

    /// Every compiled copy the CPU can run gives the portable copy's output.
    #[test]
    fn all_copies_agree() {
        let key = [7u8; 32];
        let x: Vec<f32> = (0..3000).map(|i| ((i as f32) * 0.37).cos() * 2.0).collect();
        for bits in [1u32, 16, 32, 52] {
            let l = crate::secagg::low_mask(bits);
            let scale = l as f64 / 2.0;
            let mut portable = vec![0u64; x.len()];
            quantize_chunk_lattice(&mut portable, &x, 1.0, scale, l, &mut AesCtr::new(&key, 0));
            #[cfg(target_arch = "x86_64")]
            {
                type Copy = unsafe fn(&mut [u64], &[f32], f64, f64, u64, &mut AesCtr);
                let copies: [(&str, bool, Copy); 2] = [
                    ("avx2", has_avx2(), quantize_chunk_avx2),
                    ("avx512", has_avx512(), quantize_chunk_avx512),
                ];
                for (name, _, copy) in copies.into_iter().filter(|c| c.1) {
                    let mut v = vec![0u64; x.len()];
                    #[allow(unsafe_code)]
                    // SAFETY: only the copies whose features were detected on this CPU get here.
                    unsafe {
                        copy(&mut v, &x, 1.0, scale, l, &mut AesCtr::new(&key, 0));
                    }
                    assert_eq!(v, portable, "{name}, bits {bits}");
                }
            }
        }
    }
}
