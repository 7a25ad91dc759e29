//! Attention kernels against an independent f64 reference on the host.
//!
//! # Running
//! - wgpu (default): `cargo test --release -p kernels --test attention`
//! - CUDA: `cargo test --release -p kernels --features cuda --test attention`
//!
//! The same test grid runs on `CubeBackend<R, f32, i32, BT>` (and `Fusion` over it) for the
//! runtime selected at compile time (see [`runtime`]):
//!
//! - **wgpu** (default): `WgpuDevice::DefaultDevice`, which wgpu resolves to the best adapter of
//!   the platform's default graphics API (Vulkan on Linux). On a machine without a GPU that is
//!   Mesa's lavapipe (`apt-get install -y mesa-vulkan-drivers`): a software Vulkan driver on the
//!   CPU with 8-wide subgroups, 32 KiB of shared memory, f32 and f16 but no bf16. Nothing needs
//!   to be set; to pin a device anyway use cubecl's `CUBECL_WGPU_DEFAULT_DEVICE=Cpu` (or
//!   `DiscreteGpu(0)`, ...), and `WGPU_BACKEND=vulkan` is not needed. Tests for a dtype the
//!   device lacks (bf16 on lavapipe) print a note and return.
//! - **CUDA** (`--features cuda`): `CudaDevice` 0 (set `CUDA_VISIBLE_DEVICES` to pick another).
//!   The binary builds without a CUDA toolkit; the driver and NVRTC are loaded at run time.
//!   f16 and bf16 are required (a device without them fails the test instead of skipping), and
//!   the tensor-core path (`BURN_DECODE_CMMA`, on by default) is taken by the f16/bf16 prefill
//!   cases wherever the device supports it; `tensor_core_path_is_selected` checks that.
//!
//! Inputs are seeded random draws in [-2, 2); the unused capacity of the KV cache (rows
//! `kv_len..kv_cap`) is poisoned with NaN and ±1e30 so any read of it shows up in the output.
//! Tolerances: relative L2 error ‖out − ref‖ / ‖ref‖ ≤ 1e-4 for f32, ≤ 1e-2 for f16/bf16 (the
//! reference is computed from the inputs rounded to that dtype).

use std::time::Instant;

use burn::tensor::{DType, Tensor, TensorData, TensorPrimitive, backend::Backend};
use burn_cubecl::CubeBackend;
use cubecl::Runtime as _;
use kernels::{
    AttentionMask, FlashAttentionBackend, FlashAttentionOptions, cube::LaunchTuning,
    flash_attention, tree_mask_from_rows,
};
use rand::{Rng, SeedableRng, rngs::StdRng};

mod common;

use common::{rel_l2, round_bf16, round_f16, round_f32, runtime, supports};
use runtime::{BoolElem, Device, Runtime};

/// The unfused CubeCL backend on the test runtime.
type Cube = CubeBackend<Runtime, f32, i32, BoolElem>;

// ---------------------------------------------------------------------------------------------
// Problem description, inputs and the f64 reference.

#[derive(Clone)]
enum Mask {
    None,
    Causal,
    /// Row-major `[q_len, q_len]`, `true` = visible.
    Tree(Vec<bool>),
}

impl std::fmt::Debug for Mask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Mask::None => write!(f, "None"),
            Mask::Causal => write!(f, "Causal"),
            Mask::Tree(rows) => {
                let visible = rows.iter().filter(|&&b| b).count();
                write!(f, "Tree({visible}/{} visible)", rows.len())
            }
        }
    }
}

#[derive(Clone, Debug)]
struct Case {
    batch: usize,
    heads: usize,
    kv_heads: usize,
    q_len: usize,
    kv_len: usize,
    kv_cap: usize,
    head_dim: usize,
    mask: Mask,
    /// `None`: the default `1 / sqrt(head_dim)`.
    scale: Option<f32>,
    seed: u64,
}

impl Case {
    fn new(heads: usize, kv_heads: usize, q_len: usize, kv_len: usize, head_dim: usize) -> Self {
        Self {
            batch: 1,
            heads,
            kv_heads,
            q_len,
            kv_len,
            kv_cap: kv_len,
            head_dim,
            mask: Mask::None,
            scale: None,
            seed: (heads * 31 + kv_heads * 7 + q_len * 1_000 + kv_len * 13 + head_dim) as u64,
        }
    }
    fn batch(mut self, batch: usize) -> Self {
        self.batch = batch;
        self
    }
    fn cap(mut self, kv_cap: usize) -> Self {
        self.kv_cap = kv_cap;
        self
    }
    fn causal(mut self) -> Self {
        self.mask = Mask::Causal;
        self
    }
    fn scale(mut self, scale: f32) -> Self {
        self.scale = Some(scale);
        self
    }
    fn tree(mut self, rows: Vec<bool>) -> Self {
        self.mask = Mask::Tree(rows);
        self
    }
    fn q_shape(&self) -> [usize; 4] {
        [self.batch, self.heads, self.q_len, self.head_dim]
    }
    fn kv_shape(&self) -> [usize; 4] {
        [self.batch, self.kv_heads, self.kv_cap, self.head_dim]
    }
    fn options(&self) -> FlashAttentionOptions {
        let options = FlashAttentionOptions::new(self.head_dim, self.kv_len)
            .with_causal(matches!(self.mask, Mask::Causal));
        match self.scale {
            Some(scale) => options.with_scale(scale),
            None => options,
        }
    }
}

struct Inputs {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
}

/// Fresh seeded draws; rows `kv_len..kv_cap` of k/v poisoned. `round` maps each valid value to
/// what the device will see (identity for f32, round-trip through f16/bf16 otherwise).
fn make_inputs(case: &Case, round: fn(f32) -> f32) -> Inputs {
    let mut rng = StdRng::seed_from_u64(case.seed);
    let mut draw = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|_| round(rng.random_range(-2.0f32..2.0)))
            .collect()
    };
    let q = draw(case.q_shape().iter().product());
    let mut k = draw(case.kv_shape().iter().product());
    let mut v = draw(case.kv_shape().iter().product());
    let d = case.head_dim;
    for bh in 0..case.batch * case.kv_heads {
        for j in case.kv_len..case.kv_cap {
            for c in 0..d {
                let idx = (bh * case.kv_cap + j) * d + c;
                k[idx] = if (j + c) % 2 == 0 { f32::NAN } else { 1.0e30 };
                v[idx] = if (j + c) % 3 == 0 { -1.0e30 } else { f32::NAN };
            }
        }
    }
    Inputs { q, k, v }
}

fn visible(case: &Case, i: usize, j: usize) -> bool {
    let prefix = case.kv_len - case.q_len;
    if j >= case.kv_len {
        return false;
    }
    if j < prefix {
        return true;
    }
    let t = j - prefix;
    match &case.mask {
        Mask::None => true,
        Mask::Causal => t <= i,
        Mask::Tree(rows) => rows[i * case.q_len + t],
    }
}

/// Plain softmax attention in f64, straight from the definition.
fn reference(case: &Case, x: &Inputs) -> Vec<f64> {
    let (d, ql, cap) = (case.head_dim, case.q_len, case.kv_cap);
    let group = case.heads / case.kv_heads;
    let scale = case.scale.map_or(1.0 / (d as f64).sqrt(), f64::from);
    let mut out = vec![0.0f64; case.q_shape().iter().product()];
    let mut scores = vec![0.0f64; case.kv_len];
    for b in 0..case.batch {
        for h in 0..case.heads {
            let hk = h / group;
            let kv_base = (b * case.kv_heads + hk) * cap * d;
            for i in 0..ql {
                let q_base = ((b * case.heads + h) * ql + i) * d;
                let q = &x.q[q_base..q_base + d];
                let mut max = f64::NEG_INFINITY;
                for (j, s) in scores.iter_mut().enumerate() {
                    *s = if visible(case, i, j) {
                        let k = &x.k[kv_base + j * d..kv_base + (j + 1) * d];
                        let dot: f64 = q.iter().zip(k).map(|(&a, &b)| a as f64 * b as f64).sum();
                        dot * scale
                    } else {
                        f64::NEG_INFINITY
                    };
                    max = max.max(*s);
                }
                let mut sum = 0.0;
                for s in scores.iter_mut() {
                    *s = (*s - max).exp();
                    sum += *s;
                }
                let o = &mut out[q_base..q_base + d];
                for (j, &p) in scores.iter().enumerate() {
                    if p == 0.0 {
                        continue;
                    }
                    let vrow = &x.v[kv_base + j * d..kv_base + (j + 1) * d];
                    for (oc, &vc) in o.iter_mut().zip(vrow) {
                        *oc += p / sum * vc as f64;
                    }
                }
            }
        }
    }
    out
}

fn rounding(dtype: DType) -> (fn(f32) -> f32, f64) {
    match dtype {
        DType::F32 => (round_f32, 1e-4),
        DType::F16 => (round_f16, 1e-2),
        DType::BF16 => (round_bf16, 1e-2),
        other => panic!("no test tolerance for {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Running on a backend.

/// How a case is laid out on the device.
#[derive(Clone, Copy, Debug, Default)]
struct Layout {
    /// Pass K/V as a `[.., 0..kv_len, ..]` slice view of the cache (non-contiguous).
    kv_slice_view: bool,
    /// Build Q as `[b, q_len, h, d]` and swap to `[b, h, q_len, d]` (non-contiguous).
    q_transposed: bool,
    /// Build K/V rows `d + kv_row_pad` wide (poisoned padding) and pass the `..d` view: row
    /// strides that allow only narrower vectors.
    kv_row_pad: usize,
}

struct DeviceInputs<B: Backend> {
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    mask: AttentionMask<B>,
}

fn upload<B: Backend>(
    case: &Case,
    x: &Inputs,
    dtype: DType,
    layout: Layout,
    device: &B::Device,
) -> DeviceInputs<B> {
    let q = if layout.q_transposed {
        let [b, h, s, d] = case.q_shape();
        let mut t = vec![0.0f32; x.q.len()];
        for bi in 0..b {
            for hi in 0..h {
                for si in 0..s {
                    for di in 0..d {
                        t[((bi * s + si) * h + hi) * d + di] =
                            x.q[((bi * h + hi) * s + si) * d + di];
                    }
                }
            }
        }
        Tensor::<B, 4>::from_data(TensorData::new(t, [b, s, h, d]), device).swap_dims(1, 2)
    } else {
        Tensor::<B, 4>::from_data(TensorData::new(x.q.clone(), case.q_shape()), device)
    };
    let kv = |data: &Vec<f32>| {
        let pad = layout.kv_row_pad;
        let t =
            if pad == 0 {
                Tensor::<B, 4>::from_data(TensorData::new(data.clone(), case.kv_shape()), device)
            } else {
                let [b, h, cap, d] = case.kv_shape();
                let wide: Vec<f32> = data
                    .chunks(d)
                    .flat_map(|row| {
                        row.iter()
                            .copied()
                            .chain(std::iter::repeat_n(f32::NAN, pad))
                    })
                    .collect();
                Tensor::<B, 4>::from_data(TensorData::new(wide, [b, h, cap, d + pad]), device)
                    .slice([0..b, 0..h, 0..cap, 0..d])
            }
            .cast(dtype);
        if layout.kv_slice_view {
            let [b, h, _, d] = case.kv_shape();
            t.slice([0..b, 0..h, 0..case.kv_len, 0..d])
        } else {
            t
        }
    };
    let mask = match &case.mask {
        Mask::None => AttentionMask::None,
        Mask::Causal => AttentionMask::Causal,
        Mask::Tree(rows) => AttentionMask::Tree(tree_mask_from_rows(rows, case.q_len, device)),
    };
    DeviceInputs {
        q: q.cast(dtype),
        k: kv(&x.k),
        v: kv(&x.v),
        mask,
    }
}

fn read<B: Backend>(t: Tensor<B, 4>) -> Vec<f32> {
    t.cast(DType::F32).into_data().to_vec::<f32>().unwrap()
}

/// Runs `flash_attention` on backend `B` and checks it against the f64 reference.
fn check_backend<B: FlashAttentionBackend>(
    device: &B::Device,
    case: &Case,
    dtype: DType,
    layout: Layout,
) {
    let (round, tol) = rounding(dtype);
    let x = make_inputs(case, round);
    let expected = reference(case, &x);
    let inp = upload::<B>(case, &x, dtype, layout, device);
    let start = Instant::now();
    let out = flash_attention(inp.q, inp.k, inp.v, inp.mask, case.options());
    assert_eq!(out.dims(), case.q_shape());
    assert_eq!(out.dtype(), dtype, "output dtype must follow q");
    let got = read(out);
    let err = rel_l2(&got, &expected);
    println!(
        "{case:?} {dtype:?} {layout:?}: rel_l2 = {err:.2e} ({:.0?})",
        start.elapsed()
    );
    assert!(
        err <= tol,
        "rel L2 error {err:e} > {tol:e} for {case:?} {dtype:?}"
    );
}

/// Runs the CubeCL launcher directly with explicit tuning (forced splits, tiny shared memory).
fn check_tuned(case: &Case, dtype: DType, tuning: LaunchTuning) {
    check_tuned_layout(case, dtype, tuning, Layout::default());
}

fn check_tuned_layout(case: &Case, dtype: DType, tuning: LaunchTuning, layout: Layout) {
    let device = Device::default();
    let (round, tol) = rounding(dtype);
    let x = make_inputs(case, round);
    let expected = reference(case, &x);
    let inp = upload::<Cube>(case, &x, dtype, layout, &device);
    let mask = match inp.mask {
        AttentionMask::Tree(t) => {
            Some(kernels::cube::tree_mask_to_u32::<Runtime, f32, i32, BoolElem>(t.into_primitive()))
        }
        _ => None,
    };
    let out = kernels::cube::attention::<Runtime>(
        inp.q.into_primitive().tensor(),
        inp.k.into_primitive().tensor(),
        inp.v.into_primitive().tensor(),
        mask,
        case.options(),
        &tuning,
    );
    let got = read(Tensor::<Cube, 4>::from_primitive(TensorPrimitive::Float(
        out,
    )));
    let err = rel_l2(&got, &expected);
    println!("{case:?} {dtype:?} {tuning:?}: rel_l2 = {err:.2e}");
    assert!(
        err <= tol,
        "rel L2 error {err:e} > {tol:e} for {case:?} {tuning:?}"
    );
}

fn check(case: &Case, dtype: DType) {
    check_backend::<Cube>(&Device::default(), case, dtype, Layout::default());
}

// ---------------------------------------------------------------------------------------------
// Masks.

/// Medusa-style tree: node `i > 0` has a random parent `< i`; a node sees its ancestors and
/// itself.
fn ancestor_tree(n: usize, seed: u64) -> Vec<bool> {
    let mut rng = StdRng::seed_from_u64(seed);
    let parent: Vec<usize> = (0..n)
        .map(|i| if i == 0 { 0 } else { rng.random_range(0..i) })
        .collect();
    let mut rows = vec![false; n * n];
    for i in 0..n {
        let mut a = i;
        loop {
            rows[i * n + a] = true;
            if a == 0 {
                break;
            }
            a = parent[a];
        }
    }
    rows
}

/// Independent coin flips, with the diagonal visible so no row is fully masked.
fn random_mask(n: usize, seed: u64) -> Vec<bool> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n * n)
        .map(|e| e / n == e % n || rng.random_bool(0.5))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Tests: CubeCL kernel on the test runtime, f32.

#[test]
fn prefill_no_mask_short() {
    // q_len == kv_len == 1 and a ragged 17, through both GQA and MHA.
    check(&Case::new(2, 2, 1, 1, 64), DType::F32);
    check(&Case::new(3, 1, 17, 17, 64), DType::F32);
    check(&Case::new(4, 1, 17, 17, 128).batch(2), DType::F32);
}

#[test]
fn prefill_causal_seq_grid() {
    for (q, d, h, hk) in [
        (17, 64, 2, 2),
        (64, 128, 3, 1),
        (255, 64, 4, 1),
        (256, 128, 2, 2),
        (1000, 64, 1, 1),
    ] {
        check(&Case::new(h, hk, q, q, d).causal(), DType::F32);
    }
}

#[test]
fn prefill_causal_long_head_dim_128() {
    check(&Case::new(4, 1, 1000, 1000, 128).causal(), DType::F32);
}

#[test]
fn chunked_prefill_with_cache_offset_and_poisoned_capacity() {
    // 17 new tokens after a 283-token prefix, in a 512-row cache whose tail is NaN/1e30.
    check(&Case::new(4, 4, 17, 300, 64).cap(512).causal(), DType::F32);
    check(&Case::new(6, 2, 64, 200, 128).cap(256).causal(), DType::F32);
    check(&Case::new(3, 1, 255, 700, 64).cap(701).causal(), DType::F32);
}

#[test]
fn decode_single_token_long_cache() {
    // One query against 4096 keys, GQA 4, cache capacity poisoned past kv_len.
    check(&Case::new(8, 2, 1, 4096, 128).cap(4100), DType::F32);
    check(&Case::new(3, 1, 1, 4096, 64).cap(4096).batch(2), DType::F32);
    check(&Case::new(1, 1, 1, 1, 64), DType::F32);
}

#[test]
fn tree_masks() {
    // Medusa tree of 64 nodes after a prefix: 64 rows (decode config) and, with GQA 4, 256 rows
    // (prefill config, KV split when the grid is small).
    let tree = ancestor_tree(64, 7);
    check(
        &Case::new(2, 2, 64, 64 + 500, 64)
            .cap(600)
            .tree(tree.clone()),
        DType::F32,
    );
    check(&Case::new(4, 1, 64, 64 + 300, 128).tree(tree), DType::F32);
    // Ragged tree and random boolean masks, with and without prefix.
    check(
        &Case::new(3, 1, 17, 17 + 40, 64).tree(random_mask(17, 3)),
        DType::F32,
    );
    check(
        &Case::new(2, 2, 17, 17, 128).tree(ancestor_tree(17, 5)),
        DType::F32,
    );
    check(
        &Case::new(1, 1, 255, 255 + 1, 64).tree(random_mask(255, 11)),
        DType::F32,
    );
}

#[test]
fn odd_head_dims() {
    // Vector widths 4 (d = 80, 40 with a partial lane), 2 (d = 6) and 1 (d = 33).
    check(&Case::new(2, 1, 17, 40, 80).causal(), DType::F32);
    check(&Case::new(2, 2, 33, 33, 40).causal(), DType::F32);
    check(&Case::new(3, 3, 5, 70, 6).cap(80), DType::F32);
    check(&Case::new(2, 1, 70, 70, 33).causal(), DType::F32);
    check(&Case::new(2, 2, 1, 300, 33).cap(310), DType::F32);
}

#[test]
fn strided_views_are_honoured() {
    let device = Device::default();
    let layout = Layout {
        kv_slice_view: true,
        q_transposed: true,
        ..Default::default()
    };
    let case = Case::new(4, 2, 17, 100, 64).cap(128).causal();
    check_backend::<Cube>(&device, &case, DType::F32, layout);
    let case = Case::new(4, 4, 1, 333, 128).cap(400);
    check_backend::<Cube>(&device, &case, DType::F32, layout);
}

#[test]
fn forced_kv_splits() {
    // Split-KV with chunk boundaries inside the prefix, inside the new tokens and past the
    // causal end of some row blocks.
    let splits = |n| LaunchTuning {
        splits: Some(n),
        ..Default::default()
    };
    check_tuned(
        &Case::new(4, 1, 1, 1000, 64).cap(1024),
        DType::F32,
        splits(7),
    );
    check_tuned(
        &Case::new(2, 2, 256, 256, 64).causal(),
        DType::F32,
        splits(3),
    );
    check_tuned(
        &Case::new(4, 2, 17, 500, 128).causal(),
        DType::F32,
        splits(5),
    );
    check_tuned(
        &Case::new(2, 1, 33, 333, 64).tree(ancestor_tree(33, 1)),
        DType::F32,
        splits(4),
    );
    // No split at all for a decode shape.
    check_tuned(&Case::new(4, 1, 1, 2000, 128), DType::F32, splits(1));
}

/// The row blocks a small grid plans on a many-multiprocessor GPU (16 or 32 rows instead of
/// 64), forced here so the device running the tests (lavapipe reports few) takes them too:
/// the seed's shape, a causal ragged block, a tree with a prefix, GQA with a cache offset.
#[test]
fn forced_row_blocks() {
    for (block_q, splits) in [(16, None), (32, None), (8, None), (16, Some(2))] {
        let tuning = LaunchTuning {
            block_q: Some(block_q),
            splits,
            decode: Some(false),
            ..Default::default()
        };
        check_tuned(&Case::new(1, 1, 256, 256, 64), DType::F32, tuning);
        check_tuned(&Case::new(2, 2, 100, 100, 64).causal(), DType::F32, tuning);
        check_tuned(
            &Case::new(2, 1, 33, 333, 64).tree(ancestor_tree(33, 2)),
            DType::F32,
            tuning,
        );
        check_tuned(
            &Case::new(4, 2, 70, 300, 64).cap(320).causal(),
            DType::F32,
            tuning,
        );
    }
}

#[test]
fn small_shared_memory_configs() {
    // Force the planner down its list of tile sizes.
    for bytes in [16 * 1024, 8 * 1024] {
        let tuning = LaunchTuning {
            shared_memory: Some(bytes),
            ..Default::default()
        };
        check_tuned(&Case::new(2, 1, 100, 130, 128).causal(), DType::F32, tuning);
        check_tuned(&Case::new(2, 2, 3, 300, 64), DType::F32, tuning);
    }
    // Decode configuration for many rows and prefill configuration for a single row.
    let tuning = LaunchTuning {
        decode: Some(false),
        ..Default::default()
    };
    check_tuned(&Case::new(4, 4, 1, 700, 64), DType::F32, tuning);
    let tuning = LaunchTuning {
        decode: Some(true),
        ..Default::default()
    };
    check_tuned(&Case::new(4, 1, 40, 300, 64).causal(), DType::F32, tuning);
}

// ---------------------------------------------------------------------------------------------
// Half precision.

#[test]
fn f16_inputs() {
    if !supports(DType::F16) {
        return;
    }
    check(&Case::new(4, 1, 255, 255, 128).causal(), DType::F16);
    check(&Case::new(8, 2, 1, 4096, 128).cap(4100), DType::F16);
    check(
        &Case::new(2, 2, 64, 64 + 200, 64).tree(ancestor_tree(64, 2)),
        DType::F16,
    );
    check(&Case::new(3, 3, 17, 300, 64).cap(320).causal(), DType::F16);
}

#[test]
fn bf16_inputs() {
    if !supports(DType::BF16) {
        return;
    }
    check(&Case::new(4, 1, 255, 255, 128).causal(), DType::BF16);
    check(&Case::new(8, 2, 1, 4096, 128).cap(4100), DType::BF16);
    check(
        &Case::new(2, 2, 64, 64 + 200, 64).tree(ancestor_tree(64, 2)),
        DType::BF16,
    );
}

/// Scales other than `1 / sqrt(head_dim)`: larger and smaller positive ones, a tiny, a zero and
/// a negative one, causal and tree-masked, through whichever kernel the backend picks (on
/// CUDA the tensor-core ones for f16/bf16, elsewhere the SIMT kernel).
#[test]
fn custom_scales() {
    let dtypes = [DType::F32, DType::BF16, DType::F16];
    for dtype in dtypes.into_iter().filter(|&d| supports(d)) {
        for scale in [0.5f32, 0.01, 1e-9, 0.0, -0.125] {
            check(&Case::new(2, 1, 200, 200, 64).causal().scale(scale), dtype);
            check(
                &Case::new(2, 2, 64, 64 + 100, 128)
                    .tree(ancestor_tree(64, 5))
                    .scale(scale),
                dtype,
            );
        }
    }
}

/// Prefill shapes for f16 and bf16 that take the tensor-core kernels on CUDA (rows above the
/// decode configuration, `head_dim` a multiple of 16): causal, tree-masked and unmasked, GQA,
/// ragged row blocks, a cache offset with poisoned capacity, d = 64/80/96/128/256. On CUDA
/// each runs as selected (the register-level `mma` kernel for d = 64/96/128, else `wmma`),
/// with `mma` switched off (the `wmma` kernel), and with `mma` forced without and with KV
/// splits (for d = 80/256 those stay on `wmma`). Elsewhere (and with `BURN_DECODE_CMMA=0`)
/// they exercise the SIMT kernel in half precision.
/// Whether `tuning` sends `case` to the `mma` kernel with a KV split (its plan as the launch
/// makes it: `wmma` plan first, then the register-level one with 16-byte copies).
fn mma_split_selected(case: &Case, dtype: DType, tuning: &LaunchTuning) -> bool {
    use kernels::cube::{Problem, select_cmma, select_mma};
    let client = Runtime::client(&Device::default());
    let problem = |vector_size| Problem {
        batch_kv_heads: case.batch * case.kv_heads,
        group: case.heads / case.kv_heads,
        q_len: case.q_len,
        kv_len: case.kv_len,
        head_dim: case.head_dim,
        elem_size: dtype.size(),
        vector_size,
        causal: matches!(case.mask, Mask::Causal),
        tree: matches!(case.mask, Mask::Tree(_)),
    };
    let widest = |n: usize| {
        [8, 4, 2, 1]
            .into_iter()
            .find(|&v| v <= n && case.head_dim.is_multiple_of(v))
    };
    let Some(cmma) = select_cmma(&client, dtype, &problem(widest(4).unwrap()), tuning) else {
        return false;
    };
    select_mma(&client, dtype, &problem(widest(8).unwrap()), &cmma, tuning)
        .is_some_and(|mma| mma.config.partial)
}

fn half_prefill_grid(dtype: DType) {
    let cases = [
        Case::new(4, 1, 256, 256, 128).causal(),
        Case::new(2, 2, 256, 256, 64).causal(),
        Case::new(2, 2, 1000, 1000, 64).causal(),
        Case::new(4, 1, 1000, 1000, 128).causal(),
        Case::new(2, 1, 130, 130, 64),
        Case::new(2, 2, 100, 400, 128).cap(512).causal(),
        Case::new(4, 1, 64, 64 + 300, 128)
            .cap(400)
            .tree(ancestor_tree(64, 7)),
        Case::new(2, 2, 255, 256, 64).tree(random_mask(255, 11)),
        Case::new(1, 1, 200, 200, 64).tree(ancestor_tree(200, 3)),
        // SmolLM2's 256-node Medusa tree step (`--tree optimal:255`): 9 query / 3 KV heads,
        // d = 64, after a 600-token prefix in a longer cache.
        Case::new(9, 3, 256, 256 + 600, 64)
            .cap(1024)
            .tree(ancestor_tree(256, 13)),
        Case::new(2, 2, 128, 128, 96).causal(),
        Case::new(3, 1, 70, 90, 80).causal().batch(2),
        Case::new(1, 1, 130, 130, 256).causal(),
    ];
    let mut partial_mma_runs = 0;
    for case in &cases {
        check(case, dtype);
        if cfg!(feature = "cuda") {
            let wmma = LaunchTuning {
                register_mma: Some(false),
                ..Default::default()
            };
            check_tuned(case, dtype, wmma);
            // Forced without a KV split (which these small grids take where the cache is long
            // enough), the `mma` kernel writes final rows, with several (planes, m tiles per
            // plane, keys per tile).
            for (warps, m_tiles, block_k) in [(4, 1, 64), (8, 1, 64), (4, 2, 32), (4, 2, 64)] {
                let mma = LaunchTuning {
                    splits: Some(1),
                    register_mma: Some(true),
                    mma_warps: Some(warps),
                    mma_m_tiles: Some(m_tiles),
                    mma_block_k: Some(block_k),
                    ..Default::default()
                };
                check_tuned(case, dtype, mma);
            }
            // With one, partial rows and the combine: chunks of a multiple of 64 keys (the
            // `wmma` plan's tile), empty chunks for the first causal row blocks, and 128-key
            // tiles that cross a chunk's end.
            for (splits, warps, m_tiles, block_k) in
                [(2, 4, 1, 64), (3, 4, 1, 64), (3, 4, 2, 32), (3, 4, 1, 128)]
            {
                let mma = LaunchTuning {
                    splits: Some(splits),
                    register_mma: Some(true),
                    mma_warps: Some(warps),
                    mma_m_tiles: Some(m_tiles),
                    mma_block_k: Some(block_k),
                    ..Default::default()
                };
                partial_mma_runs += usize::from(mma_split_selected(case, dtype, &mma));
                check_tuned(case, dtype, mma);
            }
        }
    }
    // The split cases above must have run the `mma` kernel's partial path somewhere (not only
    // `wmma` or the SIMT kernel), else they would pass without testing it.
    if cfg!(feature = "cuda")
        && kernels::cube::mma_supported(&Runtime::client(&Device::default()), dtype)
        && kernels::cube::tensor_cores_enabled()
    {
        assert!(partial_mma_runs > 0, "no forced split ran the mma kernel");
        println!("{partial_mma_runs} forced splits ran the mma kernel's partial path");
    }
    // KV split inside the tensor-core kernel (partial outputs + combine).
    let splits = |n| LaunchTuning {
        splits: Some(n),
        ..Default::default()
    };
    check_tuned(&Case::new(2, 2, 256, 256, 64).causal(), dtype, splits(3));
    check_tuned(
        &Case::new(4, 1, 64, 64 + 500, 128).tree(ancestor_tree(64, 1)),
        dtype,
        splits(4),
    );
    // Strided views (K/V slices of a cache, transposed Q).
    check_backend::<Cube>(
        &Device::default(),
        &Case::new(4, 2, 100, 150, 64).cap(160).causal(),
        dtype,
        Layout {
            kv_slice_view: true,
            q_transposed: true,
            ..Default::default()
        },
    );
}

#[test]
fn f16_prefill_grid() {
    if supports(DType::F16) {
        half_prefill_grid(DType::F16);
    }
}

#[test]
fn bf16_prefill_grid() {
    if supports(DType::BF16) {
        half_prefill_grid(DType::BF16);
    }
}

/// The register-level kernel copies K/V with `cp.async` of 16 bytes where rows allow (every
/// other test), and of 8 or 4 bytes where K/V rows are views of wider rows (stride d + 4 or
/// d + 2: vectors of 4 or 2 elements), with poisoned padding beside each row.
#[cfg(feature = "cuda")]
#[test]
fn mma_narrow_copies() {
    let mma = LaunchTuning {
        splits: Some(1),
        register_mma: Some(true),
        ..Default::default()
    };
    for dtype in [DType::F16, DType::BF16] {
        for pad in [4, 2] {
            let layout = Layout {
                kv_row_pad: pad,
                ..Default::default()
            };
            check_tuned_layout(&Case::new(4, 2, 200, 260, 128).causal(), dtype, mma, layout);
            check_tuned_layout(&Case::new(2, 1, 130, 130, 64), dtype, mma, layout);
            check_tuned_layout(&Case::new(2, 2, 100, 100, 32).causal(), dtype, mma, layout);
        }
    }
}

/// On CUDA the f16/bf16 prefill shapes above run on tensor cores (unless `BURN_DECODE_CMMA=0`),
/// and decode shapes and f32 never do.
#[cfg(feature = "cuda")]
#[test]
fn tensor_core_path_is_selected() {
    use kernels::cube::{
        Problem, cmma_supported, mma_supported, select_cmma, select_mma, tensor_cores_enabled,
    };
    let client = Runtime::client(&Device::default());
    let problem = |q_len: usize, group: usize, head_dim: usize, elem_size: usize| Problem {
        batch_kv_heads: 2,
        group,
        q_len,
        kv_len: q_len + 100,
        head_dim,
        elem_size,
        vector_size: 4,
        causal: true,
        tree: false,
    };
    let tuning = LaunchTuning::default();
    for dtype in [DType::F16, DType::BF16] {
        assert!(
            cmma_supported(&client, dtype),
            "no 16x16x16 {dtype:?} cmma on this CUDA device"
        );
        for (q_len, group, d) in [(256, 1, 128), (1000, 1, 64), (64, 4, 128), (130, 1, 256)] {
            let plan = select_cmma(&client, dtype, &problem(q_len, group, d, 2), &tuning);
            println!("{dtype:?} q_len {q_len} group {group} d {d}: {plan:?}");
            assert_eq!(plan.is_some(), tensor_cores_enabled(), "{plan:?}");
            // The register-level kernel takes d = 64/128 (multiples of 32 up to 128), with the
            // `wmma` plan's KV split (which these small grids take where the cache allows).
            if let Some(cmma) = plan {
                let on = LaunchTuning {
                    register_mma: Some(true),
                    ..Default::default()
                };
                let mma = select_mma(&client, dtype, &problem(q_len, group, d, 2), &cmma, &on);
                println!("  mma: {mma:?}");
                let expected = mma_supported(&client, dtype) && d <= 128 && d % 32 == 0;
                assert_eq!(mma.is_some(), expected, "{mma:?}");
                if let Some(mma) = mma {
                    assert_eq!((mma.splits, mma.chunk_len), (cmma.splits, cmma.chunk_len));
                    assert_eq!(mma.config.partial, cmma.splits > 1);
                }
            }
        }
        // sm_70/75 report `wmma` but not m16n8k16 `mma`: there the `wmma` kernel stays.
        println!("{dtype:?}: m16n8k16 mma {}", mma_supported(&client, dtype));
        // Decode shapes keep the SIMT split-KV kernel.
        assert!(select_cmma(&client, dtype, &problem(1, 4, 128, 2), &tuning).is_none());
        // Forced off.
        let off = LaunchTuning {
            tensor_cores: Some(false),
            ..Default::default()
        };
        assert!(select_cmma(&client, dtype, &problem(256, 1, 128, 2), &off).is_none());
    }
    assert!(!cmma_supported(&client, DType::F32));
    assert!(
        select_cmma(&client, DType::F32, &problem(256, 1, 128, 4), &tuning).is_none(),
        "f32 must stay on the SIMT kernel"
    );
}

/// Throughput of the prefill kernels at b1 h32 n=8192 d=128 causal bf16 (the benchmark
/// shape), the two tensor-core kernels against SIMT, with the two outputs compared to each other (an f64
/// reference at this size would take minutes). Run with
/// `cargo test --release -p kernels --features cuda --test attention -- --ignored --nocapture`.
#[cfg(feature = "cuda")]
#[test]
#[ignore = "benchmark: run explicitly on a GPU"]
fn prefill_throughput() {
    // (name, tensor cores, mma, planes, m tiles, keys per tile)
    let variants = [
        ("mma 4x1 bk64", true, true, 4, 1, 64),
        ("mma 4x1 bk32", true, true, 4, 1, 32),
        ("mma 4x1 bk128", true, true, 4, 1, 128),
        ("mma 8x1 bk64", true, true, 8, 1, 64),
        ("mma 4x2 bk32", true, true, 4, 2, 32),
        ("mma 4x2 bk64", true, true, 4, 2, 64),
        ("mma 2x2 bk64", true, true, 2, 2, 64),
        ("wmma", true, false, 4, 1, 64),
        ("SIMT", false, false, 4, 1, 64),
    ];
    time_prefill(&Case::new(32, 32, 8192, 8192, 128).causal(), &variants);
    // A small grid (SmolLM2's 9 query / 3 KV heads at d = 64, one prompt): both tensor-core
    // kernels run it with a KV split.
    let small = [variants[0], variants[7], variants[8]];
    time_prefill(&Case::new(9, 3, 1024, 1024, 64).causal(), &small);
}

/// The seed's sizes (one head, f32, d = 64, no mask: the SIMT kernel) under forced row blocks
/// and KV splits against the planner's choice and Burn's naive attention on the same backend,
/// timed as the bench does: the median of single calls, each followed by a device sync.
/// `cargo test --release -p kernels --features cuda --test attention seed -- --ignored --nocapture`.
#[cfg(feature = "cuda")]
#[test]
#[ignore = "benchmark: run explicitly on a GPU"]
fn seed_throughput() {
    let device = Device::default();
    // (name, rows per cube, KV splits); `None` = the planner's choice.
    let variants: [(&str, Option<usize>, Option<usize>); 9] = [
        ("planned", None, None),
        ("bq64", Some(64), Some(1)),
        ("bq32", Some(32), Some(1)),
        ("bq16", Some(16), Some(1)),
        ("bq8", Some(8), Some(1)),
        ("bq16 split2", Some(16), Some(2)),
        ("bq16 split4", Some(16), Some(4)),
        ("bq32 split4", Some(32), Some(4)),
        ("bq64 split8", Some(64), Some(8)),
    ];
    for n in [64, 256] {
        let case = Case::new(1, 1, n, n, 64);
        let x = make_inputs(&case, round_f32);
        let expected = reference(&case, &x);
        let inp = upload::<Cube>(&case, &x, DType::F32, Layout::default(), &device);
        let median = |f: &mut dyn FnMut() -> Tensor<Cube, 4>| {
            let _ = f(); // compile + warm up
            Cube::sync(&device).unwrap();
            let mut times: Vec<f64> = (0..50)
                .map(|_| {
                    let start = Instant::now();
                    let _ = f();
                    Cube::sync(&device).unwrap();
                    start.elapsed().as_secs_f64() * 1e3
                })
                .collect();
            times.sort_by(f64::total_cmp);
            times[times.len() / 2]
        };
        let scale = case.options().scale;
        let naive = median(&mut || {
            let scores = inp.q.clone().matmul(inp.k.clone().swap_dims(2, 3)) * scale;
            burn::tensor::activation::softmax(scores, 3).matmul(inp.v.clone())
        });
        println!("seed n={n}: burn naive {naive:.4} ms");
        for (name, block_q, splits) in variants {
            // A forced block is a prefill configuration (64 rows or fewer plan as decode).
            let tuning = LaunchTuning {
                block_q,
                splits,
                decode: block_q.map(|_| false),
                ..Default::default()
            };
            let mut run = || {
                let out = kernels::cube::attention::<Runtime>(
                    inp.q.clone().into_primitive().tensor(),
                    inp.k.clone().into_primitive().tensor(),
                    inp.v.clone().into_primitive().tensor(),
                    None,
                    case.options(),
                    &tuning,
                );
                Tensor::<Cube, 4>::from_primitive(TensorPrimitive::Float(out))
            };
            let ms = median(&mut run);
            let err = rel_l2(&read(run()), &expected);
            println!(
                "seed n={n}: {name}: {ms:.4} ms, {:.2}x naive, rel_l2 {err:.1e}",
                naive / ms
            );
            assert!(err <= 1e-4, "{name}: rel L2 {err:e}");
        }
    }
}

#[cfg(feature = "cuda")]
/// Times `case` in bf16 under each variant (5 runs after a warm-up) and checks every output
/// against the last variant's.
fn time_prefill(case: &Case, variants: &[(&str, bool, bool, usize, usize, usize)]) {
    let device = Device::default();
    let mut rng = StdRng::seed_from_u64(42);
    let mut draw =
        |len: usize| -> Vec<f32> { (0..len).map(|_| rng.random_range(-2.0f32..2.0)).collect() };
    let (q_shape, kv_shape) = (case.q_shape(), case.kv_shape());
    let tensor = |data: Vec<f32>, shape: [usize; 4]| {
        Tensor::<Cube, 4>::from_data(TensorData::new(data, shape), &device).cast(DType::BF16)
    };
    let (q, k, v) = (
        tensor(draw(q_shape.iter().product()), q_shape),
        tensor(draw(kv_shape.iter().product()), kv_shape),
        tensor(draw(kv_shape.iter().product()), kv_shape),
    );
    // Causal: half of the n² score matrix, two products of 2·d flops per score.
    let [_, h, n, d] = q_shape;
    let flops = 4.0 * (n as f64) * (n as f64) / 2.0 * d as f64 * h as f64;
    println!("{case:?}");
    let mut outputs = Vec::new();
    for &(name, tensor_cores, register_mma, warps, m_tiles, block_k) in variants {
        let tuning = LaunchTuning {
            tensor_cores: Some(tensor_cores),
            register_mma: Some(register_mma),
            mma_warps: Some(warps),
            mma_m_tiles: Some(m_tiles),
            mma_block_k: Some(block_k),
            ..Default::default()
        };
        let run = || {
            let out = kernels::cube::attention::<Runtime>(
                q.clone().into_primitive().tensor(),
                k.clone().into_primitive().tensor(),
                v.clone().into_primitive().tensor(),
                None,
                case.options(),
                &tuning,
            );
            Tensor::<Cube, 4>::from_primitive(TensorPrimitive::Float(out))
        };
        let _ = run(); // compile + warm up
        Cube::sync(&device).unwrap();
        let reps = 5;
        let start = Instant::now();
        let mut out = None;
        for _ in 0..reps {
            out = Some(run());
        }
        Cube::sync(&device).unwrap();
        let secs = start.elapsed().as_secs_f64() / reps as f64;
        println!(
            "{name}: {:.3} ms, {:.1} TFLOP/s",
            secs * 1e3,
            flops / secs / 1e12
        );
        outputs.push(read(out.unwrap()));
    }
    let last = variants.len() - 1;
    let reference: Vec<f64> = outputs[last].iter().map(|&x| x as f64).collect();
    for (i, (name, ..)) in variants.iter().enumerate().take(last) {
        let err = rel_l2(&outputs[i], &reference);
        println!("{name} vs {}: rel_l2 = {err:.2e}", variants[last].0);
        assert!(
            err <= 1e-2,
            "{name} and {} outputs differ: {err:e}",
            variants[last].0
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Fusion and the reference path.

#[cfg(feature = "fusion")]
#[test]
fn fused_backend() {
    type Fused = burn_fusion::Fusion<Cube>;
    let device = Device::default();
    let cases = [
        Case::new(4, 1, 64, 64, 64).causal(),
        Case::new(2, 2, 17, 17 + 30, 128).tree(ancestor_tree(17, 9)),
        Case::new(8, 2, 1, 2048, 128).cap(2050),
    ];
    for case in &cases {
        check_backend::<Fused>(&device, case, DType::F32, Layout::default());
    }
    check_backend::<Fused>(
        &device,
        &Case::new(4, 2, 17, 100, 64).cap(128).causal(),
        DType::F32,
        Layout {
            kv_slice_view: true,
            q_transposed: true,
            ..Default::default()
        },
    );
    // Fused element-wise ops around the custom op.
    let case = Case::new(2, 2, 17, 17, 64).causal();
    let x = make_inputs(&case, round_f32);
    let expected = reference(&case, &x);
    let inp = upload::<Fused>(&case, &x, DType::F32, Layout::default(), &device);
    let q = (inp.q * 2.0) * 0.5;
    let out = flash_attention(q, inp.k, inp.v, inp.mask, case.options()) * 3.0 - 1.0;
    let got: Vec<f32> = read(out).iter().map(|&o| (o + 1.0) / 3.0).collect();
    let err = rel_l2(&got, &expected);
    assert!(err <= 1e-4, "fused chain: {err:e}");
}

/// `burn::backend::Wgpu` (or `burn::backend::Cuda` with `--features cuda`) is
/// `Fusion<CubeBackend<..>>` when Burn's `fusion` feature is on and the plain `CubeBackend`
/// otherwise; either way it must work.
#[test]
fn backend_alias() {
    let device = Device::default();
    let case = Case::new(4, 2, 33, 90, 64).cap(100).causal();
    check_backend::<runtime::Alias>(&device, &case, DType::F32, Layout::default());
}

#[cfg(feature = "flex")]
#[test]
fn flex_reference_path() {
    let device = Default::default();
    let tree = ancestor_tree(17, 4);
    for case in [
        Case::new(4, 2, 17, 60, 64).cap(64).causal(),
        Case::new(2, 1, 17, 17 + 20, 32).tree(tree),
        Case::new(3, 3, 1, 200, 64),
    ] {
        // The reference slices k/v to kv_len, so the poisoned tail is never touched.
        check_backend::<burn::backend::Flex>(&device, &case, DType::F32, Layout::default());
    }
}

/// Prints what the device reports (run with `--nocapture`); the planner reads the same. On CUDA
/// it also checks what the kernels rely on there: 32-wide planes and f16/bf16 support.
#[test]
fn device_properties() {
    let client = Runtime::client(&Device::default());
    let props = client.properties();
    let hw = &props.hardware;
    let f16 = props.supports_type(cubecl::ir::StorageType::from(DType::F16));
    let bf16 = props.supports_type(cubecl::ir::StorageType::from(DType::BF16));
    println!(
        "{} device: shared {} B, plane {}..{}, max units/cube {}, SMs {:?}, cpu cores {:?}, \
         max vector {}, f16 {f16}, bf16 {bf16}",
        runtime::NAME,
        hw.max_shared_memory_size,
        hw.plane_size_min,
        hw.plane_size_max,
        hw.max_units_per_cube,
        hw.num_streaming_multiprocessors,
        hw.num_cpu_cores,
        hw.max_vector_size,
    );
    if cfg!(feature = "cuda") {
        assert_eq!((hw.plane_size_min, hw.plane_size_max), (32, 32));
        assert!(f16 && bf16, "CUDA device without f16/bf16");
        assert!(hw.num_streaming_multiprocessors.is_some());
    }
}
