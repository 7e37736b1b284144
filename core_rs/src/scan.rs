//! Validation scans shared by the kernels that must reject bad input before writing.
//!
//! Sequential on purpose: a memory-bound scan, where rayon's `position_first` costs ~50x
//! more. Blocks of 1024 are AND-reduced on the predicate (vectorised, no early exit); only a
//! block holding a failing element is searched element by element.

const BLOCK: usize = 1024;

/// Index of the first element of `x` for which `ok` is false, if any.
#[inline]
pub fn first_failing<T: Copy>(x: &[T], ok: impl Fn(T) -> bool) -> Option<usize> {
    for (bi, block) in x.chunks(BLOCK).enumerate() {
        if !block.iter().fold(true, |a, &v| a & ok(v)) {
            return block.iter().position(|&v| !ok(v)).map(|j| bi * BLOCK + j);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_first_failure_across_blocks() {
        let mut x = vec![1u32; 3000];
        assert_eq!(first_failing(&x, |v| v == 1), None);
        x[2500] = 7;
        x[2999] = 7;
        assert_eq!(first_failing(&x, |v| v == 1), Some(2500));
        x[3] = 0;
        assert_eq!(first_failing(&x, |v| v == 1), Some(3));
        assert_eq!(first_failing::<u32>(&[], |_| false), None);
    }
}
