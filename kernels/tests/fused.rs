//! The fused decoder ops (RMSNorm with and without the residual add, SwiGLU, RoPE, the KV-cache
//! writes and moves, top-k) against an independent reference on the host (f64 math, a host
//! copy or sort), on three backends: the unfused CubeCL backend
//! (kernels), Burn's alias for the runtime (kernels inside the fusion stream) and `Flex` (the
//! tensor-op reference path).
//!
//! # Running
//! - wgpu (default): `cargo test --release -p kernels --test fused`
//! - CUDA: `cargo test --release -p kernels --features cuda --test fused`
//!
//! Inputs are fresh seeded draws (never zeros), rounded to the tested dtype before the f64
//! reference sees them, and passed as views (column ranges of wider tensors, row slices of a
//! table) where the model passes views. Tolerances: relative L2 error ≤ 1e-5 for f32, ≤ 1e-2 for
//! f16/bf16.

use burn::tensor::{DType, Int, Tensor, TensorData, backend::Backend};
use burn_cubecl::CubeBackend;
use kernels::FusedOpsBackend;
use rand::{SeedableRng, rngs::StdRng};

mod common;

use common::{
    assert_close, draw, read, round_bf16, round_f16, round_f32, runtime, supports, tensor,
};
use runtime::{BoolElem, Device, Runtime};

type Cube = CubeBackend<Runtime, f32, i32, BoolElem>;
type Flex = burn::backend::Flex;

const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

fn rounding(dtype: DType) -> (fn(f32) -> f32, f64) {
    match dtype {
        DType::F32 => (round_f32, 1e-5),
        DType::F16 => (round_f16, 1e-2),
        DType::BF16 => (round_bf16, 1e-2),
        other => panic!("no test tolerance for {other:?}"),
    }
}

/// `data` (`rows × cols`) placed at columns `offset..offset + cols` of a `rows × (cols + pad)`
/// tensor filled with NaN elsewhere, returned as that column view reshaped to `shape`.
fn column_view<B: Backend, const D: usize>(
    data: &[f32],
    shape: [usize; D],
    offset: usize,
    pad: usize,
    dtype: DType,
    device: &B::Device,
) -> Tensor<B, D> {
    let cols = shape[D - 1];
    let rows = data.len() / cols;
    let wide = cols + pad;
    let mut full = vec![f32::NAN; rows * wide];
    for r in 0..rows {
        full[r * wide + offset..r * wide + offset + cols]
            .copy_from_slice(&data[r * cols..(r + 1) * cols]);
    }
    let mut wide_shape = shape;
    wide_shape[D - 1] = wide;
    tensor::<B, D>(&full, wide_shape, dtype, device).narrow(D - 1, offset, cols)
}

// ---------------------------------------------------------------------------------------------
// RMSNorm

fn rms_norm_case<B: FusedOpsBackend, const D: usize>(
    device: &B::Device,
    shape: [usize; D],
    residual: bool,
    dtype: DType,
) {
    let (round, tol) = rounding(dtype);
    let cols = shape[D - 1];
    let rows: usize = shape[..D - 1].iter().product();
    let mut rng = StdRng::seed_from_u64((rows * 31 + cols) as u64 + residual as u64);
    let x = draw(&mut rng, rows * cols, round);
    let r = draw(&mut rng, rows * cols, round);
    let gamma = draw(&mut rng, cols, round);
    let eps = 1e-5;

    // h rounded to the dtype as the add produces it; then the norm in f64.
    let h: Vec<f32> = if residual {
        x.iter().zip(&r).map(|(a, b)| round(a + b)).collect()
    } else {
        x.clone()
    };
    let mut expected = vec![0.0f64; rows * cols];
    for row in 0..rows {
        let hr = &h[row * cols..(row + 1) * cols];
        let ms = hr.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / cols as f64;
        let inv = 1.0 / (ms + eps).sqrt();
        for c in 0..cols {
            expected[row * cols + c] = hr[c] as f64 * inv * gamma[c] as f64;
        }
    }

    let xt = column_view::<B, D>(&x, shape, 3, 5, dtype, device);
    let gt = tensor::<B, 1>(&gamma, [cols], dtype, device);
    let what = format!("rms_norm {shape:?} residual={residual} {dtype:?}");
    if residual {
        let rt = tensor::<B, D>(&r, shape, dtype, device);
        let (sum, y) = kernels::add_rms_norm(xt, rt, gt, eps);
        assert_eq!(y.dtype(), dtype);
        let h64: Vec<f64> = h.iter().map(|&v| v as f64).collect();
        assert_close(&format!("{what} (sum)"), &read(sum), &h64, tol);
        assert_close(&what, &read(y), &expected, tol);
    } else {
        let y = kernels::rms_norm(xt, gt, eps);
        assert_eq!(y.dtype(), dtype);
        assert_close(&what, &read(y), &expected, tol);
    }
}

fn rms_norm_grid<B: FusedOpsBackend>(device: &B::Device, dtype: DType) {
    for residual in [false, true] {
        rms_norm_case::<B, 2>(device, [1, 576], residual, dtype);
        rms_norm_case::<B, 2>(device, [3, 1000], residual, dtype);
        rms_norm_case::<B, 3>(device, [2, 5, 64], residual, dtype);
        rms_norm_case::<B, 3>(device, [1, 1, 4096], residual, dtype);
    }
}

#[test]
fn rms_norm_kernel_matches_f64() {
    let device = Device::default();
    for dtype in DTYPES {
        if supports(dtype) {
            rms_norm_grid::<Cube>(&device, dtype);
        }
    }
}

#[test]
fn rms_norm_fusion_matches_f64() {
    let device = Device::default();
    rms_norm_grid::<runtime::Alias>(&device, DType::F32);
}

#[test]
fn rms_norm_reference_matches_f64() {
    for dtype in DTYPES {
        rms_norm_grid::<Flex>(&Default::default(), dtype);
    }
}

/// More rows than one grid dimension takes (65 535 on wgpu): the launch folds the grid.
#[test]
fn rms_norm_many_rows() {
    rms_norm_case::<Cube, 2>(&Device::default(), [70_000, 8], true, DType::F32);
}

// ---------------------------------------------------------------------------------------------
// SwiGLU

fn swiglu_case<B: FusedOpsBackend, const D: usize>(
    device: &B::Device,
    shape: [usize; D],
    dtype: DType,
) {
    let (round, tol) = rounding(dtype);
    let cols = shape[D - 1];
    let total: usize = shape.iter().product();
    let mut rng = StdRng::seed_from_u64(total as u64 * 7 + cols as u64);
    // Gate values over a wider range than [-1, 1) so that silu's tails are exercised.
    let gate: Vec<f32> = draw(&mut rng, total, round_f32)
        .into_iter()
        .map(|v| round(6.0 * v))
        .collect();
    let up = draw(&mut rng, total, round);
    let expected: Vec<f64> = gate
        .iter()
        .zip(&up)
        .map(|(&g, &u)| {
            let g = g as f64;
            g / (1.0 + (-g).exp()) * u as f64
        })
        .collect();
    // gate and up as the two column halves of one fused projection's output.
    let rows = total / cols;
    let mut fused = vec![0.0f32; 2 * total];
    for r in 0..rows {
        fused[2 * r * cols..(2 * r + 1) * cols].copy_from_slice(&gate[r * cols..(r + 1) * cols]);
        fused[(2 * r + 1) * cols..(2 * r + 2) * cols]
            .copy_from_slice(&up[r * cols..(r + 1) * cols]);
    }
    let mut wide = shape;
    wide[D - 1] = 2 * cols;
    let both = tensor::<B, D>(&fused, wide, dtype, device);
    let y = kernels::swiglu(
        both.clone().narrow(D - 1, 0, cols),
        both.narrow(D - 1, cols, cols),
    );
    assert_eq!(y.dims(), shape);
    assert_close(
        &format!("swiglu {shape:?} {dtype:?}"),
        &read(y),
        &expected,
        tol,
    );
}

fn swiglu_grid<B: FusedOpsBackend>(device: &B::Device, dtype: DType) {
    swiglu_case::<B, 2>(device, [1, 1536], dtype);
    swiglu_case::<B, 3>(device, [2, 3, 1000], dtype);
    swiglu_case::<B, 1>(device, [17], dtype);
}

#[test]
fn swiglu_kernel_matches_f64() {
    let device = Device::default();
    for dtype in DTYPES {
        if supports(dtype) {
            swiglu_grid::<Cube>(&device, dtype);
        }
    }
}

#[test]
fn swiglu_fusion_matches_f64() {
    swiglu_grid::<runtime::Alias>(&Device::default(), DType::F32);
}

#[test]
fn swiglu_reference_matches_f64() {
    for dtype in DTYPES {
        swiglu_grid::<Flex>(&Default::default(), dtype);
    }
}

/// More elements than 65 535 cubes of 256 threads: the launch folds the grid. (Separate
/// contiguous tensors: one fused buffer this large would pass lavapipe's 128 MiB binding limit.)
#[test]
fn swiglu_large_grid() {
    let device = Device::default();
    let n = 16_800_000;
    let gate: Vec<f32> = (0..n)
        .map(|i| ((i % 1000) as f32 - 499.5) / 100.0)
        .collect();
    let up: Vec<f32> = (0..n).map(|i| ((i % 7) as f32 + 1.0) / 7.0).collect();
    let expected: Vec<f64> = gate
        .iter()
        .zip(&up)
        .map(|(&g, &u)| g as f64 / (1.0 + (-g as f64).exp()) * u as f64)
        .collect();
    let y = kernels::swiglu(
        tensor::<Cube, 1>(&gate, [n], DType::F32, &device),
        tensor::<Cube, 1>(&up, [n], DType::F32, &device),
    );
    assert_close("swiglu [16.8M] F32", &read(y), &expected, 1e-5);
}

// ---------------------------------------------------------------------------------------------
// RoPE

struct RopeCase {
    batch: usize,
    seq: usize,
    heads: usize,
    rotated: usize,
    head_dim: usize,
    /// First row of the `cos`/`sin` table the call reads (the table is a slice).
    start: usize,
}

fn rope_case<B: FusedOpsBackend>(device: &B::Device, c: &RopeCase, dtype: DType) {
    let (round, tol) = rounding(dtype);
    let (b, s, h, d) = (c.batch, c.seq, c.heads, c.head_dim);
    let table_len = c.start + s + 3;
    let mut rng = StdRng::seed_from_u64((b * 1000 + s * 100 + h * 10 + d) as u64);
    let x = draw(&mut rng, b * s * h * d, round);
    let cos = draw(&mut rng, table_len * d, round);
    let sin = draw(&mut rng, table_len * d, round);
    let mut expected = vec![0.0f64; b * h * s * d];
    for bi in 0..b {
        for si in 0..s {
            for hi in 0..h {
                for i in 0..d {
                    let xin = |j: usize| x[((bi * s + si) * h + hi) * d + j] as f64;
                    let t = (c.start + si) * d + i;
                    let partner = (i + d / 2) % d;
                    expected[((bi * h + hi) * s + si) * d + i] = if hi < c.rotated {
                        xin(i) * cos[t] as f64 + xin(partner) * sin[t] as f64
                    } else {
                        xin(i)
                    };
                }
            }
        }
    }
    // x as the model has it: a projection's output [b, s, h·d] viewed as [b, s, h, d], here a
    // column range of a wider one.
    let xt = column_view::<B, 3>(&x, [b, s, h * d], 0, 2 * d, dtype, device).reshape([b, s, h, d]);
    let table = |v: &[f32]| {
        tensor::<B, 2>(v, [table_len, d], dtype, device).slice([c.start..c.start + s, 0..d])
    };
    let swap: Vec<i64> = (0..d as i64)
        .map(|i| (i + d as i64 / 2) % d as i64)
        .collect();
    let swap = Tensor::<B, 1, Int>::from_data(TensorData::new(swap, [d]), device);
    let y = kernels::rope(xt, table(&cos), table(&sin), swap, c.rotated);
    assert_eq!(y.dims(), [b, h, s, d]);
    assert_close(
        &format!(
            "rope b{b} s{s} h{h} rotated {} d{d} start {} {dtype:?}",
            c.rotated, c.start
        ),
        &read(y),
        &expected,
        tol,
    );
}

fn rope_grid<B: FusedOpsBackend>(device: &B::Device, dtype: DType) {
    let cases = [
        // SmolLM2's fused q/k/v at decode: 9 + 3 rotated heads, 3 value heads.
        RopeCase {
            batch: 1,
            seq: 1,
            heads: 15,
            rotated: 12,
            head_dim: 64,
            start: 7,
        },
        RopeCase {
            batch: 2,
            seq: 5,
            heads: 4,
            rotated: 3,
            head_dim: 128,
            start: 0,
        },
        // Every head rotated (q or k alone), a prefill of 17.
        RopeCase {
            batch: 1,
            seq: 17,
            heads: 3,
            rotated: 3,
            head_dim: 64,
            start: 2,
        },
    ];
    for c in &cases {
        rope_case::<B>(device, c, dtype);
    }
}

#[test]
fn rope_kernel_matches_f64() {
    let device = Device::default();
    for dtype in DTYPES {
        if supports(dtype) {
            rope_grid::<Cube>(&device, dtype);
        }
    }
}

#[test]
fn rope_fusion_matches_f64() {
    rope_grid::<runtime::Alias>(&Device::default(), DType::F32);
}

#[test]
fn rope_reference_matches_f64() {
    for dtype in DTYPES {
        rope_grid::<Flex>(&Default::default(), dtype);
    }
}

// ---------------------------------------------------------------------------------------------
// KV-cache append

fn cache_write_case<B: FusedOpsBackend>(device: &B::Device, dtype: DType) {
    let (round, _) = rounding(dtype);
    let (b, h, cap, d, n, start) = (2usize, 3usize, 10usize, 64usize, 3usize, 4usize);
    let mut rng = StdRng::seed_from_u64(99);
    let kc0 = draw(&mut rng, b * h * cap * d, round);
    let vc0 = draw(&mut rng, b * h * cap * d, round);
    // New keys/values as head ranges of a [b, 2h + 1, n, d] tensor (as rope's output is cut).
    let all = draw(&mut rng, b * (2 * h + 1) * n * d, round);
    let kc = tensor::<B, 4>(&kc0, [b, h, cap, d], dtype, device);
    let vc = tensor::<B, 4>(&vc0, [b, h, cap, d], dtype, device);
    let kept = kc.clone();
    let all_t = tensor::<B, 4>(&all, [b, 2 * h + 1, n, d], dtype, device);
    let k = all_t.clone().narrow(1, 1, h);
    let v = all_t.narrow(1, 1 + h, h);
    let (kc, vc) = kernels::cache_write(kc, vc, k, v, start);
    let expect = |cache: &[f32], head0: usize| -> Vec<f64> {
        let mut e: Vec<f64> = cache.iter().map(|&x| x as f64).collect();
        for bi in 0..b {
            for hi in 0..h {
                for t in 0..n {
                    for i in 0..d {
                        e[((bi * h + hi) * cap + start + t) * d + i] =
                            all[((bi * (2 * h + 1) + head0 + hi) * n + t) * d + i] as f64;
                    }
                }
            }
        }
        e
    };
    // Copies are exact: the error must be zero.
    assert_close("cache_write k", &read(kc), &expect(&kc0, 1), 0.0);
    assert_close("cache_write v", &read(vc), &expect(&vc0, 1 + h), 0.0);
    // A clone taken before the write still holds the old values (no write through a shared
    // buffer).
    let old: Vec<f64> = kc0.iter().map(|&x| x as f64).collect();
    assert_close("cache_write: untouched clone", &read(kept), &old, 0.0);
}

/// Medusa's commit of an accepted path: rows `src` to `dst..`, against a host copy of the
/// caches with the rows moved (read all, then write).
fn cache_gather_case<B: FusedOpsBackend>(device: &B::Device, dtype: DType) {
    let (round, _) = rounding(dtype);
    let (b, h, cap, d, dst) = (2usize, 3usize, 16usize, 64usize, 4usize);
    let mut rng = StdRng::seed_from_u64(7);
    let kc0 = draw(&mut rng, b * h * cap * d, round);
    let vc0 = draw(&mut rng, b * h * cap * d, round);
    // Paths of a tree: the root (dst + 0) and nodes at indices 2, 5, 9; then a path whose rows
    // overlap destinations that come after them (dst + 1 <- dst + 1, dst + 2 <- dst + 3); then
    // rows the in-place kernel cannot take (dst is written before it is read), which the
    // backends hand to select + slice_assign.
    for src in [
        vec![dst, dst + 2, dst + 5, dst + 9],
        vec![dst + 1, dst + 1, dst + 3],
        vec![dst + 3, dst],
    ] {
        let kc = tensor::<B, 4>(&kc0, [b, h, cap, d], dtype, device);
        let vc = tensor::<B, 4>(&vc0, [b, h, cap, d], dtype, device);
        let kept = vc.clone();
        let (kc, vc) = kernels::cache_gather(kc, vc, &src, dst);
        let expect = |cache: &[f32]| -> Vec<f64> {
            let mut e: Vec<f64> = cache.iter().map(|&x| x as f64).collect();
            for bh in 0..b * h {
                for (i, &r) in src.iter().enumerate() {
                    for c in 0..d {
                        e[(bh * cap + dst + i) * d + c] = cache[(bh * cap + r) * d + c] as f64;
                    }
                }
            }
            e
        };
        assert_close("cache_gather k", &read(kc), &expect(&kc0), 0.0);
        assert_close("cache_gather v", &read(vc), &expect(&vc0), 0.0);
        let old: Vec<f64> = vc0.iter().map(|&x| x as f64).collect();
        assert_close("cache_gather: untouched clone", &read(kept), &old, 0.0);
    }
    // A source row that an earlier destination would overwrite first is refused.
    assert!(kernels::cache_gather_supports(&[dst + 3, dst + 1], dst));
    assert!(!kernels::cache_gather_supports(&[dst + 3, dst], dst));
}

#[test]
fn cache_gather_kernel_is_exact() {
    let device = Device::default();
    for dtype in DTYPES {
        if supports(dtype) {
            cache_gather_case::<Cube>(&device, dtype);
        }
    }
}

#[test]
fn cache_gather_fusion_is_exact() {
    cache_gather_case::<runtime::Alias>(&Device::default(), DType::F32);
}

#[test]
fn cache_gather_reference_is_exact() {
    for dtype in DTYPES {
        cache_gather_case::<Flex>(&Default::default(), dtype);
    }
}

#[test]
fn cache_write_kernel_is_exact() {
    let device = Device::default();
    for dtype in DTYPES {
        if supports(dtype) {
            cache_write_case::<Cube>(&device, dtype);
        }
    }
}

#[test]
fn cache_write_fusion_is_exact() {
    cache_write_case::<runtime::Alias>(&Device::default(), DType::F32);
}

#[test]
fn cache_write_reference_is_exact() {
    for dtype in DTYPES {
        cache_write_case::<Flex>(&Default::default(), dtype);
    }
}

/// `kernels::top_k` against a host sort of the same (rounded) values: the `k` picked columns
/// hold the `k` largest values, largest first. With `exact_order` (the kernel), equal values
/// must also come lowest index first, so the indices equal a stable host sort's; the reference
/// picks among equal values as `argmax` does. Draws in f16/bf16 repeat values, so ties occur;
/// the last case is all ties but one.
fn top_k_case<B: FusedOpsBackend>(device: &B::Device, dtype: DType, exact_order: bool) {
    let (round, _) = rounding(dtype);
    let mut rng = StdRng::seed_from_u64(11);
    let cases = [
        (4, 49152, 10),
        (3, 37, 1),
        (2, 300, kernels::TOP_K_MAX),
        (5, 10, 10),
        // Rows over several segments of the two-pass kernel, the last one ragged (k = 32: 64
        // threads, segments of 1024), and one whose last segment holds fewer than k columns,
        // all ties but one, so that equal values meet across segments.
        (3, 5000, kernels::TOP_K_MAX),
        // As many rows as fill a GPU with a cube each: one pass even over long rows.
        (300, 2500, 5),
        (2, 2053, 10),
        (1, 513, 4),
    ];
    for (case, (rows, cols, k)) in cases.into_iter().enumerate() {
        let mut data = draw(&mut rng, rows * cols, round);
        if case == 1 {
            // Masked entries, as Medusa's reference path writes them.
            data[5] = f32::NEG_INFINITY;
            data[cols + 7] = f32::NEG_INFINITY;
        }
        if case == cases.len() - 1 {
            data.iter_mut().for_each(|v| *v = 0.25);
            data[400] = 0.5;
        }
        if case == cases.len() - 2 {
            data.iter_mut().for_each(|v| *v = 0.25);
            data[2050] = 0.5;
        }
        // A column view of a wider tensor (the kernel reads any row layout).
        let x = column_view::<B, 2>(&data, [rows, cols], 3, 5, dtype, device);
        let got: Vec<i64> = kernels::top_k(x, k)
            .into_data()
            .convert::<i64>()
            .to_vec()
            .unwrap();
        assert_eq!(got.len(), rows * k, "{dtype:?} {rows}x{cols} k={k}");
        for r in 0..rows {
            let row = &data[r * cols..(r + 1) * cols];
            let mut order: Vec<usize> = (0..cols).collect();
            order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
            let picked = &got[r * k..(r + 1) * k];
            let values: Vec<f32> = picked.iter().map(|&i| row[i as usize]).collect();
            let best: Vec<f32> = order[..k].iter().map(|&i| row[i]).collect();
            let what = format!("{dtype:?} {rows}x{cols} k={k} row {r}");
            assert_eq!(values, best, "{what}: values");
            let mut distinct = picked.to_vec();
            distinct.sort();
            distinct.dedup();
            assert_eq!(distinct.len(), k, "{what}: an index picked twice");
            if exact_order {
                let expected: Vec<i64> = order[..k].iter().map(|&i| i as i64).collect();
                assert_eq!(picked, expected, "{what}: indices");
            }
        }
    }
}

#[test]
fn top_k_kernel_matches_a_host_sort() {
    let device = Device::default();
    for dtype in DTYPES {
        if supports(dtype) {
            top_k_case::<Cube>(&device, dtype, true);
        }
    }
}

#[test]
fn top_k_fusion_matches_a_host_sort() {
    top_k_case::<runtime::Alias>(&Device::default(), DType::F32, true);
}

#[test]
fn top_k_reference_matches_a_host_sort() {
    for dtype in DTYPES {
        top_k_case::<Flex>(&Default::default(), dtype, false);
    }
}
