//! Host side of the fused ops on CubeCL tensors: checks, output buffers and launches.

use burn::tensor::{DType, Shape};
use burn_cubecl::{
    CubeRuntime, kernel::cast, ops::numeric::empty_device_contiguous_dtype, tensor::CubeTensor,
};
use cubecl::prelude::*;

use super::kernel::{
    SplitSumConfig, cache_gather_kernel, cache_write_kernel, rms_norm_kernel, rope_cache_kernel,
    rope_kernel, split_add_rms_norm_kernel, swiglu_kernel, top_k_kernel, top_k_merge_kernel,
    top_k_segments_kernel,
};
use crate::args::{array_arg, strided_arg, strided_out_arg, unused_arg, unused_strided_arg};
use crate::linear::launch::{LinearTuning, Product, SplitSums};

/// Threads per cube of every launch here (the portable floor allows 256).
const THREADS: usize = 256;
/// Most cubes along one grid dimension on every runtime (wgpu's limit).
const MAX_GRID: usize = 65_535;

/// Whether the kernels take tensors of `dtype`.
pub fn supported(dtype: DType) -> bool {
    matches!(dtype, DType::F32 | DType::F16 | DType::BF16)
}

/// A new contiguous tensor of `shape` in `dtype` on `like`'s device.
fn empty_like<R: CubeRuntime>(like: &CubeTensor<R>, shape: Shape, dtype: DType) -> CubeTensor<R> {
    empty_device_contiguous_dtype::<R>(like.client.clone(), like.device.clone(), shape, dtype)
}

/// `t` in `dtype` (a cast when it differs: a table or gain kept in another precision).
fn in_dtype<R: CubeRuntime>(t: CubeTensor<R>, dtype: DType) -> CubeTensor<R> {
    if t.dtype == dtype { t } else { cast(t, dtype) }
}

/// One thread per element: a grid of `ceil(total / THREADS)` cubes, folded into two
/// dimensions when it exceeds [`MAX_GRID`] (the kernels skip the tail).
fn elementwise_count(total: usize) -> CubeCount {
    let cubes = total.div_ceil(THREADS).max(1);
    let x = cubes.min(MAX_GRID);
    CubeCount::Static(x as u32, cubes.div_ceil(x) as u32, 1)
}

/// Threads of the row-per-cube RMSNorm launches, with or without a K split's partial sums to
/// add (clamped to the device's limit): many, because a split-sum cube reads the whole row's
/// partials (one cube per row of a decode step). Both kernels use the same count so that they
/// sum the row's squares in the same order: the split-sum norm then has the bits of the product
/// followed by the plain norm.
const NORM_THREADS: usize = 1024;

/// Threads of a row-per-cube RMSNorm launch: [`NORM_THREADS`], or the device's largest power of
/// two below.
fn threads_for<R: CubeRuntime>(t: &CubeTensor<R>) -> usize {
    threads_for_max(t, NORM_THREADS)
}

/// `most` threads, or the device's largest power of two below.
fn threads_for_max<R: CubeRuntime>(t: &CubeTensor<R>, most: usize) -> usize {
    let n = most
        .min(t.client.properties().hardware.max_units_per_cube as usize)
        .max(1);
    1 << (usize::BITS - 1 - n.leading_zeros())
}

/// One cube per row, folded into two grid dimensions past [`MAX_GRID`] rows.
fn row_count(rows: usize) -> CubeCount {
    let x = rows.clamp(1, MAX_GRID);
    CubeCount::Static(x as u32, rows.div_ceil(x) as u32, 1)
}

/// See [`super::FusedOpsBackend::rms_norm`].
pub fn rms_norm<R: CubeRuntime>(
    x: CubeTensor<R>,
    residual: Option<CubeTensor<R>>,
    gamma: CubeTensor<R>,
    eps: f64,
) -> (Option<CubeTensor<R>>, CubeTensor<R>) {
    let dtype = x.dtype;
    let shape = x.meta.shape().clone();
    let dims = shape.to_vec();
    let cols = *dims.last().expect("rms_norm: a tensor of rank >= 1");
    let rows: usize = dims[..dims.len() - 1].iter().product();
    let gamma = in_dtype(gamma, dtype);
    let residual = residual.map(|r| {
        assert_eq!(r.meta.shape().to_vec(), dims, "add_rms_norm: shapes differ");
        in_dtype(r, dtype)
    });
    let out = empty_like(&x, shape.clone(), dtype);
    let sum = residual
        .as_ref()
        .map(|_| empty_like(&x, shape.clone(), dtype));
    if rows == 0 || cols == 0 {
        return (sum, out);
    }
    let threads = threads_for(&x);
    // Unused bindings (no residual) are bound to `x` / `out`; the kernel never touches them.
    let (residual_arg, residual_at) = match &residual {
        Some(r) => strided_arg(r.clone()),
        None => unused_strided_arg(&x),
    };
    let sum_arg = array_arg(sum.clone().unwrap_or_else(|| out.clone()));
    let client = x.client.clone();
    let (x_arg, x_at) = strided_arg(x);
    let (gamma_arg, gamma_at) = strided_arg(gamma);
    assert!(
        rows * cols < u32::MAX as usize,
        "rms_norm: tensor too large"
    );
    unsafe {
        rms_norm_kernel::launch_unchecked::<R>(
            &client,
            row_count(rows),
            CubeDim::new_1d(threads as u32),
            x_arg,
            x_at,
            residual_arg,
            residual_at,
            gamma_arg,
            gamma_at,
            sum_arg,
            array_arg(out.clone()),
            rows as u32,
            cols as u32,
            eps as f32,
            threads,
            residual.is_some(),
            dtype.into(),
        );
    }
    (sum, out)
}

/// [`super::FusedOpsBackend::linear_add_rms_norm`] on CubeCL tensors: `x · w (+ bias)` through
/// the SIMT skinny kernel ([`crate::linear::launch::linear`]) or with `tensor_cores` the
/// tensor-core one ([`crate::linear::launch::linear_cmma`]), planned with `tuning`, then added
/// to `residual` (`[m, n]`) and normalised. Returns `(h, norm(h), fused)`, `fused` when the
/// product was split along K and the norm's kernel added its partial sums; otherwise the
/// product's output went through the `add_rms_norm` kernel.
///
/// # Panics
/// On inputs the chosen kernel does not take (see [`crate::linear::supported`] and
/// [`crate::linear::cmma_usable`]) or a residual of another shape.
#[allow(clippy::too_many_arguments)]
pub fn linear_add_rms_norm<R: CubeRuntime>(
    x: CubeTensor<R>,
    w: CubeTensor<R>,
    bias: Option<CubeTensor<R>>,
    residual: CubeTensor<R>,
    gamma: CubeTensor<R>,
    eps: f64,
    tensor_cores: bool,
    tuning: &LinearTuning,
) -> (CubeTensor<R>, CubeTensor<R>, bool) {
    let product = crate::linear::launch::product_on(tensor_cores, x, w, bias, tuning);
    let split = matches!(product, Product::Split(_));
    let (h, normed) = add_rms_norm_of(product, residual, gamma, eps);
    (h, normed, split)
}

/// `(h, norm(h))` with `h = residual + y` for a launched product `y`: the norm's kernel adds a
/// K split's partial sums itself ([`split_add_rms_norm`]); a finished product goes through
/// [`rms_norm`] with the residual.
fn add_rms_norm_of<R: CubeRuntime>(
    y: Product<R>,
    residual: CubeTensor<R>,
    gamma: CubeTensor<R>,
    eps: f64,
) -> (CubeTensor<R>, CubeTensor<R>) {
    match y {
        Product::Split(y) => split_add_rms_norm(y, residual, gamma, eps),
        Product::Done(y) => {
            let (h, normed) = rms_norm(residual, Some(y), gamma, eps);
            (h.expect("the sum of a residual add"), normed)
        }
    }
}

/// [`super::FusedOpsBackend::mlp_add_rms_norm`] on CubeCL tensors, through the SIMT skinny
/// kernel or with `tensor_cores` the tensor-core one: the fused gate/up product
/// `x · w_gate_up (+ bias)`, then the down projection, which computes SwiGLU of that product
/// (finished, or its K split's partial sums) while staging its input, then the residual add
/// and the RMSNorm (adding the down projection's partial sums where it splits, as
/// [`linear_add_rms_norm`]). Three launches where the two ops take four (the gate/up
/// product's reduction and SwiGLU were one launch, or SwiGLU alone without a split); the same
/// bits. Returns `(h, norm(h))`, both `[m, n]`.
///
/// # Panics
/// On inputs the chosen kernel does not take, a gate/up width that is not twice `w_down`'s
/// rows, or a residual of another shape.
#[allow(clippy::too_many_arguments)]
pub fn mlp_add_rms_norm<R: CubeRuntime>(
    x: CubeTensor<R>,
    w_gate_up: CubeTensor<R>,
    bias_gate_up: Option<CubeTensor<R>>,
    w_down: CubeTensor<R>,
    bias_down: Option<CubeTensor<R>>,
    residual: CubeTensor<R>,
    gamma: CubeTensor<R>,
    eps: f64,
    tensor_cores: bool,
    tuning: &LinearTuning,
) -> (CubeTensor<R>, CubeTensor<R>) {
    let [_, n2] = w_gate_up.meta.shape().dims::<2>();
    let [f, _] = w_down.meta.shape().dims::<2>();
    assert_eq!(
        n2,
        2 * f,
        "mlp_add_rms_norm: the gate/up weight has {n2} columns for a down projection of {f} rows"
    );
    let gate_up =
        crate::linear::launch::product_on(tensor_cores, x, w_gate_up, bias_gate_up, tuning);
    let y = crate::linear::launch::product_of_swiglu_on(
        tensor_cores,
        gate_up,
        w_down,
        bias_down,
        tuning,
    );
    add_rms_norm_of(y, residual, gamma, eps)
}

/// The compile-time shape of `y`'s partial sums for [`super::kernel::split_sum`].
fn sum_config<R: CubeRuntime>(y: &SplitSums<R>) -> SplitSumConfig {
    SplitSumConfig {
        splits: y.splits,
        split_lanes: y.reduce.split_lanes,
        bias: y.bias.is_some(),
    }
}

/// [`super::FusedOpsBackend::linear_rope_cache`] on CubeCL tensors: the fused q/k/v product
/// `x · w (+ bias)` (`x: [batch · seq, k]`, rows batch-major) through the SIMT skinny kernel or
/// with `tensor_cores` the tensor-core one, planned with `tuning`, then one kernel (adding the
/// partial sums when the product split along K) applies RoPE to the query and key heads and
/// writes queries to a new `q: [batch, n_heads, seq, head_dim]` and keys and values to rows
/// `start..start + seq` of the caches (`[batch, n_kv, capacity, head_dim]`, in place when
/// uniquely owned, as [`cache_write`] does). Returns `(q, k_cache, v_cache)`.
///
/// # Panics
/// On inputs the chosen kernel does not take, or a product whose width is not
/// `(n_heads + 2 · n_kv) · head_dim`.
#[allow(clippy::too_many_arguments)]
pub fn linear_rope_cache<R: CubeRuntime>(
    x: CubeTensor<R>,
    w: CubeTensor<R>,
    bias: Option<CubeTensor<R>>,
    cos: CubeTensor<R>,
    sin: CubeTensor<R>,
    k_cache: CubeTensor<R>,
    v_cache: CubeTensor<R>,
    start: usize,
    n_heads: usize,
    tensor_cores: bool,
    tuning: &LinearTuning,
) -> (CubeTensor<R>, CubeTensor<R>, CubeTensor<R>) {
    let product = crate::linear::launch::product_on(tensor_cores, x, w, bias, tuning);
    let (dtype, m, n) = match &product {
        Product::Done(y) => {
            let [m, n] = y.meta.shape().dims::<2>();
            (y.dtype, m, n)
        }
        Product::Split(y) => (y.dtype, y.m, y.n),
    };
    let shape = k_cache.meta.shape().to_vec();
    let [batch, n_kv, capacity, d]: [usize; 4] = shape.clone().try_into().unwrap_or_else(|_| {
        panic!("linear_rope_cache: the key cache must be [batch, n_kv, capacity, head_dim], got {shape:?}")
    });
    assert_eq!(
        v_cache.meta.shape().dims::<4>(),
        [batch, n_kv, capacity, d],
        "linear_rope_cache: key and value caches differ"
    );
    assert!(
        batch > 0 && m.is_multiple_of(batch) && n == (n_heads + 2 * n_kv) * d && d % 2 == 0,
        "linear_rope_cache: a [{m}, {n}] product does not hold {n_heads} query and 2 x {n_kv} \
         key/value heads of {d} for a batch of {batch}"
    );
    let seq = m / batch;
    for (name, t) in [("cos", &cos), ("sin", &sin)] {
        assert_eq!(
            t.meta.shape().to_vec(),
            [seq, d],
            "linear_rope_cache: {name} must be [{seq}, {d}]"
        );
    }
    assert!(
        start + seq <= capacity,
        "linear_rope_cache: rows {start}..{} do not fit a cache of {capacity}",
        start + seq
    );
    let (k_cache, v_cache) = (exclusive(k_cache), exclusive(v_cache));
    assert!(
        k_cache.meta.shape().iter().product::<usize>() < u32::MAX as usize,
        "linear_rope_cache: cache too large"
    );
    let cos = in_dtype(cos, dtype);
    let sin = in_dtype(sin, dtype);
    let q = empty_like(&k_cache, Shape::new([batch, n_heads, seq, d]), dtype);
    let total = m * n;
    let client = k_cache.client.clone();
    // A finished product is read where it lies; a split one as its partial sums (plus bias).
    let (partial_arg, product_arg, product_at, bias_arg, sums) = match product {
        Product::Done(y) => {
            let (y_arg, y_at) = strided_arg(y);
            let finished = SplitSumConfig {
                splits: 0,
                split_lanes: 1,
                bias: false,
            };
            (unused_arg(&q), y_arg, y_at, unused_arg(&q), finished)
        }
        Product::Split(y) => {
            let sums = sum_config(&y);
            let bias_arg = match &y.bias {
                Some(b) => array_arg(b.clone()),
                None => unused_arg(&q),
            };
            let (none, none_at) = unused_strided_arg(&q);
            (array_arg(y.partial), none, none_at, bias_arg, sums)
        }
    };
    let (cos_arg, cos_at) = strided_arg(cos);
    let (sin_arg, sin_at) = strided_arg(sin);
    let (k_cache_arg, k_cache_at) = strided_out_arg(k_cache.clone());
    let (v_cache_arg, v_cache_at) = strided_out_arg(v_cache.clone());
    unsafe {
        rope_cache_kernel::launch_unchecked::<R>(
            &client,
            elementwise_count(total),
            CubeDim::new_1d(THREADS as u32),
            partial_arg,
            product_arg,
            product_at,
            bias_arg,
            cos_arg,
            cos_at,
            sin_arg,
            sin_at,
            array_arg(q.clone()),
            k_cache_arg,
            k_cache_at,
            v_cache_arg,
            v_cache_at,
            batch as u32,
            seq as u32,
            n_heads as u32,
            n_kv as u32,
            d as u32,
            capacity as u32,
            start as u32,
            sums,
            dtype.into(),
        );
    }
    (q, k_cache, v_cache)
}

/// The RMSNorm after adding the skinny product held in `y`'s K-split partial sums to `x`
/// (`[m, n]`, the residual stream): returns `(h, norm(h))` with `h = x + y`, both `[m, n]`.
/// See [`super::FusedOpsBackend::linear_add_rms_norm`].
fn split_add_rms_norm<R: CubeRuntime>(
    y: SplitSums<R>,
    x: CubeTensor<R>,
    gamma: CubeTensor<R>,
    eps: f64,
) -> (CubeTensor<R>, CubeTensor<R>) {
    let dtype = y.dtype;
    let (rows, cols) = (y.m, y.n);
    assert_eq!(
        x.meta.shape().to_vec(),
        [rows, cols],
        "linear_add_rms_norm: the residual is not [{rows}, {cols}]"
    );
    assert_eq!(
        gamma.meta.shape().to_vec(),
        [cols],
        "linear_add_rms_norm: gamma must be [{cols}]"
    );
    let x = in_dtype(x, dtype);
    let gamma = in_dtype(gamma, dtype);
    let sum = empty_like(&x, Shape::new([rows, cols]), dtype);
    let out = empty_like(&x, Shape::new([rows, cols]), dtype);
    let threads = threads_for(&x);
    let sums = sum_config(&y);
    let client = x.client.clone();
    let bias_arg = match &y.bias {
        Some(b) => array_arg(b.clone()),
        None => unused_arg(&out),
    };
    let (x_arg, x_at) = strided_arg(x);
    let (gamma_arg, gamma_at) = strided_arg(gamma);
    unsafe {
        split_add_rms_norm_kernel::launch_unchecked::<R>(
            &client,
            row_count(rows),
            CubeDim::new_1d(threads as u32),
            array_arg(y.partial),
            bias_arg,
            x_arg,
            x_at,
            gamma_arg,
            gamma_at,
            array_arg(sum.clone()),
            array_arg(out.clone()),
            rows as u32,
            cols as u32,
            eps as f32,
            threads,
            sums,
            dtype.into(),
        );
    }
    (sum, out)
}

/// See [`super::FusedOpsBackend::swiglu`].
pub fn swiglu<R: CubeRuntime>(gate: CubeTensor<R>, up: CubeTensor<R>) -> CubeTensor<R> {
    let dtype = gate.dtype;
    let shape = gate.meta.shape().clone();
    assert_eq!(
        up.meta.shape().to_vec(),
        shape.to_vec(),
        "swiglu: shapes differ"
    );
    let up = in_dtype(up, dtype);
    let cols = *shape.last().expect("swiglu: a tensor of rank >= 1");
    let total: usize = shape.iter().product();
    let out = empty_like(&gate, shape, dtype);
    if total == 0 {
        return out;
    }
    assert!(total < u32::MAX as usize, "swiglu: tensor too large");
    let client = gate.client.clone();
    let (gate_arg, gate_at) = strided_arg(gate);
    let (up_arg, up_at) = strided_arg(up);
    unsafe {
        swiglu_kernel::launch_unchecked::<R>(
            &client,
            elementwise_count(total),
            CubeDim::new_1d(THREADS as u32),
            gate_arg,
            gate_at,
            up_arg,
            up_at,
            array_arg(out.clone()),
            (total / cols) as u32,
            cols as u32,
            dtype.into(),
        );
    }
    out
}

/// See [`super::FusedOpsBackend::rope`].
pub fn rope<R: CubeRuntime>(
    x: CubeTensor<R>,
    cos: CubeTensor<R>,
    sin: CubeTensor<R>,
    rotated: usize,
) -> CubeTensor<R> {
    let dtype = x.dtype;
    let [b, s, h, d] = x.meta.shape().dims::<4>();
    let cos = in_dtype(cos, dtype);
    let sin = in_dtype(sin, dtype);
    let out = empty_like(&x, Shape::new([b, h, s, d]), dtype);
    let total = b * s * h * d;
    if total == 0 {
        return out;
    }
    assert!(total < u32::MAX as usize, "rope: tensor too large");
    let client = x.client.clone();
    let (x_arg, x_at) = strided_arg(x);
    let (cos_arg, cos_at) = strided_arg(cos);
    let (sin_arg, sin_at) = strided_arg(sin);
    unsafe {
        rope_kernel::launch_unchecked::<R>(
            &client,
            elementwise_count(total),
            CubeDim::new_1d(THREADS as u32),
            x_arg,
            x_at,
            cos_arg,
            cos_at,
            sin_arg,
            sin_at,
            array_arg(out.clone()),
            b as u32,
            s as u32,
            h as u32,
            d as u32,
            rotated.min(h) as u32,
            dtype.into(),
        );
    }
    out
}

/// See [`super::FusedOpsBackend::cache_write`]. The caches are written in place when this call
/// holds their only reference, as Burn's `slice_assign` does; otherwise they are copied first.
pub fn cache_write<R: CubeRuntime>(
    k_cache: CubeTensor<R>,
    v_cache: CubeTensor<R>,
    k: CubeTensor<R>,
    v: CubeTensor<R>,
    start: usize,
) -> (CubeTensor<R>, CubeTensor<R>) {
    let dtype = k_cache.dtype;
    let [b, h, n, d] = k.meta.shape().dims::<4>();
    let (k_cache, v_cache) = (exclusive(k_cache), exclusive(v_cache));
    let (k, v) = (in_dtype(k, dtype), in_dtype(v, dtype));
    let total = b * h * n * d;
    if total == 0 {
        return (k_cache, v_cache);
    }
    assert!(
        k_cache.meta.shape().iter().product::<usize>() < u32::MAX as usize,
        "cache_write: cache too large"
    );
    let capacity = k_cache.meta.shape()[2];
    assert_eq!(
        v_cache.meta.shape()[2],
        capacity,
        "cache_write: key and value caches differ in length"
    );
    let client = k.client.clone();
    let (k_arg, k_at) = strided_arg(k);
    let (v_arg, v_at) = strided_arg(v);
    let (k_cache_arg, k_cache_at) = strided_out_arg(k_cache.clone());
    let (v_cache_arg, v_cache_at) = strided_out_arg(v_cache.clone());
    unsafe {
        cache_write_kernel::launch_unchecked::<R>(
            &client,
            elementwise_count(total),
            CubeDim::new_1d(THREADS as u32),
            k_arg,
            k_at,
            v_arg,
            v_at,
            k_cache_arg,
            k_cache_at,
            v_cache_arg,
            v_cache_at,
            (b * h * n) as u32,
            n as u32,
            d as u32,
            capacity as u32,
            start as u32,
            dtype.into(),
        );
    }
    (k_cache, v_cache)
}

/// See [`super::FusedOpsBackend::cache_gather`]; in place like [`cache_write`]. Only for rows
/// that [`super::cache_gather_supports`].
pub fn cache_gather<R: CubeRuntime>(
    k_cache: CubeTensor<R>,
    v_cache: CubeTensor<R>,
    src: &[usize],
    dst_start: usize,
) -> (CubeTensor<R>, CubeTensor<R>) {
    let dtype = k_cache.dtype;
    let [b, h, capacity, d] = k_cache.meta.shape().dims::<4>();
    let (k_cache, v_cache) = (exclusive(k_cache), exclusive(v_cache));
    let columns = b * h * d;
    if columns == 0 || src.is_empty() {
        return (k_cache, v_cache);
    }
    assert!(
        b * h * capacity * d < u32::MAX as usize,
        "cache_gather: cache too large"
    );
    let client = k_cache.client.clone();
    let rows: Vec<u8> = src.iter().flat_map(|&r| (r as u32).to_le_bytes()).collect();
    // SAFETY: the binding holds exactly `src.len()` u32 values.
    let src_arg = unsafe { ArrayArg::from_raw_parts(client.create_from_slice(&rows), src.len()) };
    let (k_cache_arg, k_cache_at) = strided_out_arg(k_cache.clone());
    let (v_cache_arg, v_cache_at) = strided_out_arg(v_cache.clone());
    unsafe {
        cache_gather_kernel::launch_unchecked::<R>(
            &client,
            elementwise_count(columns),
            CubeDim::new_1d(THREADS as u32),
            src_arg,
            k_cache_arg,
            k_cache_at,
            v_cache_arg,
            v_cache_at,
            columns as u32,
            src.len() as u32,
            d as u32,
            capacity as u32,
            dst_start as u32,
            dtype.into(),
        );
    }
    (k_cache, v_cache)
}

/// Shared memory one [`top_k_kernel`] cube may use for its threads' lists (the 16 KiB every
/// Vulkan and WebGPU device offers).
const TOP_K_SHARED_BYTES: usize = 16 * 1024;

/// Columns each thread of [`top_k_segments_kernel`] loads (all before comparing any).
const TOP_K_PER_THREAD: usize = 16;

/// From this many rows on, one cube per row already fills a GPU: [`top_k`] skips the
/// segmented pass.
const TOP_K_SEGMENTED_ROWS: usize = 256;

/// See [`super::FusedOpsBackend::top_k`]: `x: [rows, cols]` (any row layout), `1 <= k <=
/// cols`, `k <= super::TOP_K_MAX`; returns `[rows, k]` indices in `int_dtype`.
pub fn top_k<R: CubeRuntime>(x: CubeTensor<R>, k: usize, int_dtype: DType) -> CubeTensor<R> {
    let [rows, cols] = x.meta.shape().dims::<2>();
    assert!(
        (1..=super::TOP_K_MAX).contains(&k) && k <= cols,
        "top_k: k = {k} for rows of {cols} (at most {})",
        super::TOP_K_MAX
    );
    assert!(cols < u32::MAX as usize, "top_k: rows too long");
    let dtype = x.dtype;
    let out = empty_like(&x, Shape::new([rows, k]), int_dtype);
    if rows == 0 {
        return out;
    }
    // Each thread's list (value + index) lives in shared memory during the merge.
    let threads = threads_for_max(&x, (TOP_K_SHARED_BYTES / (8 * k)).clamp(1, 128));
    let client = x.client.clone();
    let segments = cols.div_ceil(threads * TOP_K_PER_THREAD);
    // Segments lie along the grid's first axis (at most 65535 cubes on every runtime).
    if segments == 1 || rows >= TOP_K_SEGMENTED_ROWS || segments > u16::MAX as usize {
        let (x_arg, x_at) = strided_arg(x);
        unsafe {
            top_k_kernel::launch_unchecked::<R>(
                &client,
                row_count(rows),
                CubeDim::new_1d(threads as u32),
                x_arg,
                x_at,
                array_arg(out.clone()),
                rows as u32,
                cols as u32,
                k,
                threads,
                [dtype.into(), int_dtype.into()],
            );
        }
        return out;
    }
    // Few long rows (Medusa's heads over a vocabulary): a cube per segment of each row, then
    // a cube per row merging the segments' lists.
    let candidates = segments * k;
    let seg_vals = empty_like(&x, Shape::new([rows, candidates]), DType::F32);
    let seg_idxs = empty_like(&x, Shape::new([rows, candidates]), DType::U32);
    let (x_arg, x_at) = strided_arg(x);
    unsafe {
        top_k_segments_kernel::launch_unchecked::<R>(
            &client,
            CubeCount::Static(segments as u32, rows as u32, 1),
            CubeDim::new_1d(threads as u32),
            x_arg,
            x_at,
            array_arg(seg_vals.clone()),
            array_arg(seg_idxs.clone()),
            cols as u32,
            k,
            threads,
            TOP_K_PER_THREAD,
            dtype.into(),
        );
        top_k_merge_kernel::launch_unchecked::<R>(
            &client,
            row_count(rows),
            CubeDim::new_1d(threads as u32),
            array_arg(seg_vals),
            array_arg(seg_idxs),
            array_arg(out.clone()),
            rows as u32,
            candidates as u32,
            k,
            threads,
            int_dtype.into(),
        );
    }
    out
}

/// `t` itself when this call holds its only reference (a KV cache written in place, as Burn's
/// `slice_assign` does), else a copy, so that no other holder sees the write.
fn exclusive<R: CubeRuntime>(t: CubeTensor<R>) -> CubeTensor<R> {
    if t.can_mut() && t.is_nonoverlapping() {
        t
    } else {
        t.copy()
    }
}
