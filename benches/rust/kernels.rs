//! Criterion benches of confide's pure-Rust kernels, at the sizes the targets are stated for:
//! 1,235,496 float32 parameters (`SqueezeNet` 1.1) and 100,000.
//!
//! Every parallel kernel is measured twice: `all` runs on rayon's global pool (every core)
//! and `one` inside a one-thread rayon pool, which is what the "one core" targets in
//! benches/README.md refer to. The one-thread runs use `iter_custom` so that the pool is
//! entered once per sample, not once per iteration (`install` costs a cross-thread wake-up,
//! which would dominate the microsecond-scale Shamir benches).
//!
//! In-place kernels whose second application would do less work than the first (clipping:
//! an already clipped row is only measured, never rescaled) restore their input before each
//! iteration, outside the timed region. Masking and noise are applied repeatedly in place;
//! their cost does not depend on the data.

use std::hint::black_box;
use std::time::{Duration, Instant};

use confide_core::clip::{clip_l2, clip_rows};
use confide_core::noise::{Distribution, add_noise, discrete_gaussian, sample};
use confide_core::rng::SecureRng;
use confide_core::secagg::mask::{MaskSpec, apply_masks};
use confide_core::secagg::pack::pack_bits;
use confide_core::secagg::prg::{BATCH_BLOCKS, MaskDomain, MaskPrg};
use confide_core::secagg::quant::quantize;
use confide_core::secagg::shares::{combine, split};
use criterion::{BenchmarkGroup, BenchmarkId, Criterion, Throughput, measurement::WallTime};
use rayon::ThreadPool;

/// `SqueezeNet` 1.1 parameter count.
const SQUEEZENET: usize = 1_235_496;
/// The small size of the Python report.
const SMALL: usize = 100_000;
/// Rows of the per-example clipping matrix (a batch of 32 per-example gradients).
const CLIP_ROWS: usize = 32;
/// Ring width of the masking benches (u32 storage, full word: no range check needed).
const MASK_BITS: u32 = 32;
/// A ring narrower than the storage word: `apply_masks` must then range-check its input.
const NARROW_BITS: u32 = 24;
/// Quantization bits (the `quantize` target).
const QUANT_BITS: u32 = 16;
/// Bits per element of the packing bench: not byte aligned, the general case.
const PACK_BITS: u32 = 20;
/// Seeds of the "many masks" bench: one self mask plus 16 pairwise masks (`SecAgg+` with a
/// neighbourhood of 16).
const MANY_SEEDS: usize = 17;

/// The thread configuration a bench runs under.
#[derive(Clone, Copy)]
enum Threads<'a> {
    /// rayon's global pool (every core).
    All,
    /// A dedicated one-thread pool: the "one core" numbers.
    One(&'a ThreadPool),
}

impl Threads<'_> {
    fn label(self) -> &'static str {
        match self {
            Threads::All => "all",
            Threads::One(_) => "one",
        }
    }

    fn run<R: Send>(self, f: impl FnOnce() -> R + Send) -> R {
        match self {
            Threads::All => f(),
            Threads::One(pool) => pool.install(f),
        }
    }
}

/// Time `iters` calls of `f` (one pool entry for all of them).
fn time_loop(threads: Threads<'_>, iters: u64, mut f: impl FnMut() + Send) -> Duration {
    threads.run(move || {
        let start = Instant::now();
        for _ in 0..iters {
            f();
        }
        start.elapsed()
    })
}

/// Time `iters` calls of `f(state)`, calling `reset(state)` before each one, untimed.
fn time_reset<T: Send>(
    threads: Threads<'_>,
    iters: u64,
    state: &mut T,
    reset: impl Fn(&mut T) + Send,
    mut f: impl FnMut(&mut T) + Send,
) -> Duration {
    threads.run(move || {
        let mut total = Duration::ZERO;
        for _ in 0..iters {
            reset(state);
            let start = Instant::now();
            f(state);
            total += start.elapsed();
        }
        total
    })
}

/// Deterministic float32 "gradients" in [-1, 1) (a 64-bit LCG; the values do not matter to
/// any kernel's speed, only that they are finite and large enough to be clipped).
fn gradients(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((s >> 40) as f32 / (1u64 << 24) as f32).mul_add(2.0, -1.0)
        })
        .collect()
}

fn rng() -> SecureRng {
    SecureRng::from_seed(&[7u8; 32]).expect("32-byte seed")
}

fn seed(i: usize) -> [u8; 32] {
    let mut s = [0u8; 32];
    s[..8].copy_from_slice(&(i as u64).to_le_bytes());
    s
}

fn domain() -> MaskDomain {
    MaskDomain::new(b"bench-session", 1, "pair")
}

type Group<'c> = BenchmarkGroup<'c, WallTime>;

fn group<'c>(c: &'c mut Criterion, name: &str) -> Group<'c> {
    let mut g = c.benchmark_group(name);
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    g
}

/// Bench `f` as `id` under `threads`: each sample times all its iterations in one pool entry.
fn bench_loop(
    g: &mut Group<'_>,
    id: BenchmarkId,
    threads: Threads<'_>,
    mut f: impl FnMut() + Send,
) {
    g.bench_function(id, |b| {
        b.iter_custom(|iters| time_loop(threads, iters, &mut f));
    });
}

/// [`bench_loop`] for an in-place kernel: `reset(state)` restores its input before each call,
/// outside the timed region.
fn bench_reset<T: Send>(
    g: &mut Group<'_>,
    id: BenchmarkId,
    threads: Threads<'_>,
    state: &mut T,
    reset: impl Fn(&mut T) + Send + Sync,
    mut f: impl FnMut(&mut T) + Send,
) {
    g.bench_function(id, |b| {
        b.iter_custom(|iters| time_reset(threads, iters, state, &reset, &mut f));
    });
}

fn bench_clip(c: &mut Criterion, modes: &[Threads<'_>]) {
    let mut g = group(c, "clip_l2");
    let orig = gradients(SQUEEZENET, 1);
    g.throughput(Throughput::Bytes((SQUEEZENET * 4) as u64));
    for &t in modes {
        let mut x = orig.clone();
        bench_reset(
            &mut g,
            BenchmarkId::new(t.label(), SQUEEZENET),
            t,
            &mut x,
            |x| x.copy_from_slice(&orig),
            |x| {
                black_box(clip_l2(black_box(x), 1.0).expect("finite input"));
            },
        );
    }
    g.finish();

    // 32 x 1.2M = 158 MB: far beyond every cache, so this is a memory-bandwidth bench. The
    // target is relative to one copy of the matrix, measured here as `copy`.
    let n = CLIP_ROWS * SQUEEZENET;
    let mut g = group(c, "clip_rows_32x1235496");
    g.throughput(Throughput::Bytes((n * 4) as u64));
    let orig = gradients(n, 2);
    let mut x = orig.clone();
    for &t in modes {
        bench_reset(
            &mut g,
            BenchmarkId::from_parameter(t.label()),
            t,
            &mut x,
            |x| x.copy_from_slice(&orig),
            |x| {
                black_box(
                    clip_rows(black_box(x), CLIP_ROWS, SQUEEZENET, 1.0).expect("finite input"),
                );
            },
        );
    }
    g.bench_function("copy", |b| {
        b.iter(|| x.copy_from_slice(black_box(&orig)));
    });
    g.finish();
}

fn bench_noise(c: &mut Criterion, modes: &[Threads<'_>]) {
    let mut g = group(c, "gaussian_f32");
    g.throughput(Throughput::Elements(SQUEEZENET as u64));
    for &t in modes {
        let mut r = rng();
        bench_loop(&mut g, BenchmarkId::new(t.label(), SQUEEZENET), t, || {
            let v: Vec<f32> =
                sample(SQUEEZENET, Distribution::Gaussian, 1.0, &mut r).expect("sigma");
            black_box(v);
        });
    }
    g.finish();

    let mut g = group(c, "add_gaussian_noise_f32");
    g.throughput(Throughput::Elements(SQUEEZENET as u64));
    for &t in modes {
        let mut r = rng();
        let mut x = gradients(SQUEEZENET, 3);
        bench_loop(&mut g, BenchmarkId::new(t.label(), SQUEEZENET), t, || {
            add_noise(black_box(&mut x), Distribution::Gaussian, 1.0, &mut r)
                .expect("finite input");
        });
    }
    g.finish();

    // sigma = 1000 is a typical discrete-Gaussian scale in quantized units.
    let mut g = group(c, "discrete_gaussian_sigma1000");
    g.throughput(Throughput::Elements(SMALL as u64));
    for &t in modes {
        let mut r = rng();
        bench_loop(&mut g, BenchmarkId::new(t.label(), SMALL), t, || {
            black_box(discrete_gaussian(SMALL, 1000.0, &mut r).expect("sigma"));
        });
    }
    g.finish();
}

fn bench_quantize(c: &mut Criterion, modes: &[Threads<'_>]) {
    let mut g = group(c, "quantize_u32_16bit");
    for n in [SQUEEZENET, SMALL] {
        let x = gradients(n, 4);
        g.throughput(Throughput::Elements(n as u64));
        for &t in modes {
            let mut r = rng();
            bench_loop(&mut g, BenchmarkId::new(t.label(), n), t, || {
                let q: Vec<u32> = quantize(black_box(&x), 1.0, QUANT_BITS, &mut r).expect("params");
                black_box(q);
            });
        }
    }
    g.finish();
}

fn bench_masks(c: &mut Criterion, modes: &[Threads<'_>]) {
    let dom = domain();
    let one = [MaskSpec::new(&seed(0), false).expect("32 bytes")];
    let many: Vec<MaskSpec> = (0..MANY_SEEDS)
        .map(|i| MaskSpec::new(&seed(i), i % 2 == 1).expect("32 bytes"))
        .collect();

    // Throughput is mask bytes (4 per u32 element per seed), so criterion reports the
    // GB/s of the fused expand+add; the target is >= 5 GB/s on one core.
    let mut g = group(c, "apply_masks_1seed_u32");
    for n in [SQUEEZENET, SMALL] {
        g.throughput(Throughput::Bytes((n * 4) as u64));
        for &t in modes {
            let mut x: Vec<u32> = (0..n as u32).collect();
            bench_loop(&mut g, BenchmarkId::new(t.label(), n), t, || {
                apply_masks(black_box(&mut x), &one, MASK_BITS, &dom).expect("valid");
            });
        }
    }
    g.finish();

    // Same, in a 24-bit ring: identical mask work plus the input range check.
    let mut g = group(c, "apply_masks_1seed_u32_b24");
    g.throughput(Throughput::Bytes((SQUEEZENET * 4) as u64));
    for &t in modes {
        let mut x: Vec<u32> = (0..SQUEEZENET as u32).map(|v| v & 0xff_ffff).collect();
        bench_loop(&mut g, BenchmarkId::new(t.label(), SQUEEZENET), t, || {
            apply_masks(black_box(&mut x), &one, NARROW_BITS, &dom).expect("valid");
        });
    }
    g.finish();

    let mut g = group(c, "apply_masks_17seeds_u32");
    g.throughput(Throughput::Bytes((SQUEEZENET * 4 * MANY_SEEDS) as u64));
    for &t in modes {
        let mut x: Vec<u32> = (0..SQUEEZENET as u32).collect();
        bench_loop(&mut g, BenchmarkId::new(t.label(), SQUEEZENET), t, || {
            apply_masks(black_box(&mut x), &many, MASK_BITS, &dom).expect("valid");
        });
    }
    g.finish();

    // The ceiling of the fused kernel: the raw AES-128-CTR keystream of one mask, batch by
    // batch into a 1 KiB buffer, single-threaded, with no add.
    let mut g = group(c, "prg_keystream_aes128ctr");
    let bytes = SQUEEZENET * 4;
    g.throughput(Throughput::Bytes(bytes as u64));
    let prg = MaskPrg::new(&seed(0), &dom, MASK_BITS);
    let mut buf = [0u8; BATCH_BLOCKS * 16];
    g.bench_function(BenchmarkId::new("one", SQUEEZENET), |b| {
        b.iter(|| {
            let batches = bytes.div_ceil(buf.len()) as u64;
            for i in 0..batches {
                prg.blocks(i * BATCH_BLOCKS as u64, &mut buf);
                black_box(&buf);
            }
        });
    });
    g.finish();
}

fn bench_pack(c: &mut Criterion, modes: &[Threads<'_>]) {
    let mut g = group(c, "pack_bits_u32_20bit");
    for n in [SQUEEZENET, SMALL] {
        let x: Vec<u32> = (0..n as u32).map(|v| v & 0xf_ffff).collect();
        g.throughput(Throughput::Bytes((n * 4) as u64));
        for &t in modes {
            bench_loop(&mut g, BenchmarkId::new(t.label(), n), t, || {
                black_box(pack_bits(black_box(&x), PACK_BITS).expect("in range"));
            });
        }
    }
    g.finish();
}

fn bench_shamir(c: &mut Criterion, modes: &[Threads<'_>]) {
    let (n, t) = (100, 51);
    let secret = [0x5au8; 32];
    let mut g = group(c, "shamir_32B_n100_t51");
    for &th in modes {
        let mut r = rng();
        bench_loop(&mut g, BenchmarkId::new("split", th.label()), th, || {
            black_box(split(black_box(&secret), n, t, &mut r).expect("valid"));
        });
    }
    let shares = split(&secret, n, t, &mut rng()).expect("valid");
    // Any t shares will do: the last t, in reverse order (x = 100, 99, ..., 50).
    let some: Vec<_> = shares.iter().rev().take(t).cloned().collect();
    assert_eq!(combine(&some).expect("t shares"), secret);
    for &th in modes {
        bench_loop(&mut g, BenchmarkId::new("combine", th.label()), th, || {
            black_box(combine(black_box(&some)).expect("t shares"));
        });
    }
    g.finish();
}

fn kernels(c: &mut Criterion) {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .thread_name(|_| "bench-one-core".into())
        .build()
        .expect("a one-thread rayon pool");
    let modes = [Threads::One(&pool), Threads::All];
    bench_clip(c, &modes);
    bench_noise(c, &modes);
    bench_quantize(c, &modes);
    bench_masks(c, &modes);
    bench_pack(c, &modes);
    bench_shamir(c, &modes);
}

// What `criterion_group!` + `criterion_main!` expand to, written out because the macro's
// generated `pub fn` cannot carry the doc comment the workspace's `missing_docs` lint asks for.
fn main() {
    let mut c = Criterion::default().configure_from_args();
    kernels(&mut c);
    c.final_summary();
}
