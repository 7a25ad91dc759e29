//! [`FusedOpsBackend`] for `Fusion<B>`: each op is registered as a custom operation in the
//! fusion stream and runs the inner backend's kernel when the stream executes. With the kernels
//! off, the reference runs as ordinary (fusable) tensor ops.

use core::marker::PhantomData;

use burn::tensor::{
    DType, Shape,
    ops::{FloatTensor, IntTensor},
};
use burn_fusion::{
    Fusion, FusionBackend, FusionRuntime,
    stream::{Operation, OperationStreams},
};
use burn_ir::{CustomOpIr, HandleContainer, OperationIr, OperationOutput, TensorIr};

use super::{FusedOpsBackend, reference};

/// Which op a [`FusedOp`] runs, with its non-tensor arguments.
#[derive(Clone, Copy, Debug)]
enum Kind {
    /// RMSNorm of rank `rank`, with a residual add when the op has two outputs.
    RmsNorm {
        rank: usize,
        eps: f64,
    },
    SwiGlu {
        rank: usize,
    },
    /// Inputs `x, weight, residual, gamma` and a bias when there are five.
    LinearAddRmsNorm {
        eps: f64,
    },
    Rope {
        rotated: usize,
    },
    /// Inputs `x, weight, cos, sin, k_cache, v_cache`, a bias when there are eight, and
    /// `swap` last.
    LinearRopeCache {
        start: usize,
        n_heads: usize,
    },
    CacheWrite {
        start: usize,
    },
    /// Rows `src[..n]` (a fixed array keeps `Kind` `Copy`) to `dst_start..`.
    CacheGather {
        dst_start: usize,
        n: usize,
        src: [usize; super::CACHE_GATHER_MAX_ROWS],
    },
    /// One float input, one int output in `dtype`.
    TopK {
        k: usize,
        dtype: DType,
    },
}

#[derive(Clone, Debug)]
struct FusedOp<B> {
    desc: CustomOpIr,
    kind: Kind,
    _backend: PhantomData<B>,
}

/// Calls `$f::<D>` for the runtime rank `$rank` (the ops are generic over it).
macro_rules! by_rank {
    ($rank:expr, $f:ident ( $($arg:expr),* )) => {
        match $rank {
            1 => B::$f::<1>($($arg),*),
            2 => B::$f::<2>($($arg),*),
            3 => B::$f::<3>($($arg),*),
            4 => B::$f::<4>($($arg),*),
            5 => B::$f::<5>($($arg),*),
            r => panic!("fused ops: rank {r} is not supported (1 to 5)"),
        }
    };
}

impl<B: FusionBackend + FusedOpsBackend> Operation<B::FusionRuntime> for FusedOp<B> {
    fn execute(
        &self,
        handles: &mut HandleContainer<<B::FusionRuntime as FusionRuntime>::FusionHandle>,
    ) {
        let inputs = &self.desc.inputs;
        let outputs = &self.desc.outputs;
        let float = |h: &mut HandleContainer<_>, i: usize| h.get_float_tensor::<B>(&inputs[i]);
        match self.kind {
            Kind::RmsNorm { rank, eps } => {
                let x = float(handles, 0);
                let gamma = float(handles, 1);
                let residual = (inputs.len() > 2).then(|| float(handles, 2));
                let (sum, y) = by_rank!(rank, rms_norm(x, residual, gamma, eps));
                if let Some(sum) = sum {
                    handles.register_float_tensor::<B>(&outputs[1].id, sum);
                }
                handles.register_float_tensor::<B>(&outputs[0].id, y);
            }
            Kind::SwiGlu { rank } => {
                let gate = float(handles, 0);
                let up = float(handles, 1);
                let y = by_rank!(rank, swiglu(gate, up));
                handles.register_float_tensor::<B>(&outputs[0].id, y);
            }
            Kind::LinearAddRmsNorm { eps } => {
                let [x, w, residual, gamma] = [0, 1, 2, 3].map(|i| float(handles, i));
                let bias = (inputs.len() > 4).then(|| float(handles, 4));
                let (h, y) = B::linear_add_rms_norm(x, w, bias, residual, gamma, eps);
                handles.register_float_tensor::<B>(&outputs[0].id, h);
                handles.register_float_tensor::<B>(&outputs[1].id, y);
            }
            Kind::Rope { rotated } => {
                let x = float(handles, 0);
                let cos = float(handles, 1);
                let sin = float(handles, 2);
                let swap = handles.get_int_tensor::<B>(&inputs[3]);
                let y = B::rope(x, cos, sin, swap, rotated);
                handles.register_float_tensor::<B>(&outputs[0].id, y);
            }
            Kind::LinearRopeCache { start, n_heads } => {
                let [x, w, cos, sin, kc, vc] = [0, 1, 2, 3, 4, 5].map(|i| float(handles, i));
                let bias = (inputs.len() > 7).then(|| float(handles, 6));
                let swap = handles.get_int_tensor::<B>(&inputs[inputs.len() - 1]);
                let (q, kc, vc) =
                    B::linear_rope_cache(x, w, bias, cos, sin, swap, kc, vc, start, n_heads);
                handles.register_float_tensor::<B>(&outputs[0].id, q);
                handles.register_float_tensor::<B>(&outputs[1].id, kc);
                handles.register_float_tensor::<B>(&outputs[2].id, vc);
            }
            Kind::CacheWrite { start } => {
                let [kc, vc, k, v] = [0, 1, 2, 3].map(|i| float(handles, i));
                let (kc, vc) = B::cache_write(kc, vc, k, v, start);
                handles.register_float_tensor::<B>(&outputs[0].id, kc);
                handles.register_float_tensor::<B>(&outputs[1].id, vc);
            }
            Kind::CacheGather { dst_start, n, src } => {
                let [kc, vc] = [0, 1].map(|i| float(handles, i));
                let (kc, vc) = B::cache_gather(kc, vc, &src[..n], dst_start);
                handles.register_float_tensor::<B>(&outputs[0].id, kc);
                handles.register_float_tensor::<B>(&outputs[1].id, vc);
            }
            Kind::TopK { k, dtype } => {
                let idx = B::top_k(float(handles, 0), k, dtype);
                handles.register_int_tensor::<B>(&outputs[0].id, idx);
            }
        }
    }
}

/// Registers `kind` on `inputs` with outputs of `shapes` (in the dtype of the first input).
fn register<B: FusionBackend + FusedOpsBackend>(
    name: &'static str,
    kind: Kind,
    inputs: Vec<FloatTensor<Fusion<B>>>,
    int_input: Option<IntTensor<Fusion<B>>>,
    shapes: Vec<Shape>,
) -> Vec<FloatTensor<Fusion<B>>> {
    let dtype = inputs[0].dtype;
    register_as::<B>(name, kind, inputs, int_input, shapes, dtype)
}

/// [`register`] with outputs in `dtype`.
fn register_as<B: FusionBackend + FusedOpsBackend>(
    name: &'static str,
    kind: Kind,
    inputs: Vec<FloatTensor<Fusion<B>>>,
    int_input: Option<IntTensor<Fusion<B>>>,
    shapes: Vec<Shape>,
    dtype: DType,
) -> Vec<FloatTensor<Fusion<B>>> {
    let client = inputs[0].client.clone();
    let mut streams = OperationStreams::default();
    for t in &inputs {
        streams.tensor(t);
    }
    if let Some(t) = &int_input {
        streams.tensor(t);
    }
    let mut irs: Vec<TensorIr> = inputs.into_iter().map(|t| t.into_ir()).collect();
    if let Some(t) = int_input {
        irs.push(t.into_ir());
    }
    let outs: Vec<TensorIr> = shapes
        .into_iter()
        .map(|s| TensorIr::uninit(client.create_empty_handle(), s, dtype))
        .collect();
    let desc = CustomOpIr::new(name, &irs, &outs);
    client.register(
        streams,
        OperationIr::Custom(desc.clone()),
        FusedOp::<B> {
            desc,
            kind,
            _backend: PhantomData,
        },
    )
}

impl<B: FusionBackend + FusedOpsBackend> FusedOpsBackend for Fusion<B> {
    fn rms_norm<const D: usize>(
        x: FloatTensor<Self>,
        residual: Option<FloatTensor<Self>>,
        gamma: FloatTensor<Self>,
        eps: f64,
    ) -> (Option<FloatTensor<Self>>, FloatTensor<Self>) {
        if !crate::kernels_enabled() {
            return reference::rms_norm_prim::<Self, D>(x, residual, gamma, eps);
        }
        let shape = x.shape.clone();
        let with_sum = residual.is_some();
        let mut inputs = vec![x, gamma];
        inputs.extend(residual);
        let shapes = vec![shape; if with_sum { 2 } else { 1 }];
        let mut outs = register::<B>(
            "kernels::rms_norm",
            Kind::RmsNorm { rank: D, eps },
            inputs,
            None,
            shapes,
        )
        .into_iter();
        let y = outs.next().expect("normed output");
        (outs.next(), y)
    }

    fn swiglu<const D: usize>(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        if !crate::kernels_enabled() {
            return reference::swiglu_prim::<Self, D>(gate, up);
        }
        let shape = gate.shape.clone();
        register::<B>(
            "kernels::swiglu",
            Kind::SwiGlu { rank: D },
            vec![gate, up],
            None,
            vec![shape],
        )
        .output()
    }

    /// One custom operation running the inner backend's fused path (the K split's partial
    /// sums go straight into the norm there).
    fn linear_add_rms_norm(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
        residual: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        eps: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        if !crate::kernels_enabled() {
            return reference::linear_add_rms_norm_prim::<Self>(
                x, weight, bias, residual, gamma, eps,
            );
        }
        let shape = residual.shape.clone();
        let mut inputs = vec![x, weight, residual, gamma];
        inputs.extend(bias);
        let [h, y] = register::<B>(
            "kernels::linear_add_rms_norm",
            Kind::LinearAddRmsNorm { eps },
            inputs,
            None,
            vec![shape.clone(), shape],
        )
        .outputs();
        (h, y)
    }

    fn rope(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
        swap: IntTensor<Self>,
        rotated: usize,
    ) -> FloatTensor<Self> {
        if !crate::kernels_enabled() {
            return reference::rope_prim::<Self>(x, cos, sin, swap, rotated);
        }
        let [b, s, h, d] = x.shape.dims::<4>();
        register::<B>(
            "kernels::rope",
            Kind::Rope { rotated },
            vec![x, cos, sin],
            Some(swap),
            vec![Shape::new([b, h, s, d])],
        )
        .output()
    }

    /// One custom operation running the inner backend's fused path.
    fn linear_rope_cache(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
        swap: IntTensor<Self>,
        k_cache: FloatTensor<Self>,
        v_cache: FloatTensor<Self>,
        start: usize,
        n_heads: usize,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        if !crate::kernels_enabled() {
            return reference::linear_rope_cache_prim::<Self>(
                x, weight, bias, cos, sin, swap, k_cache, v_cache, start, n_heads,
            );
        }
        let [m, _] = x.shape.dims::<2>();
        let cache = k_cache.shape.clone();
        let [b, _, _, d] = cache.dims::<4>();
        let q = Shape::new([b, n_heads, m / b, d]);
        let mut inputs = vec![x, weight, cos, sin, k_cache, v_cache];
        inputs.extend(bias);
        let [q, kc, vc] = register::<B>(
            "kernels::linear_rope_cache",
            Kind::LinearRopeCache { start, n_heads },
            inputs,
            Some(swap),
            vec![q, cache.clone(), cache],
        )
        .outputs();
        (q, kc, vc)
    }

    fn cache_write(
        k_cache: FloatTensor<Self>,
        v_cache: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        start: usize,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        if !crate::kernels_enabled() {
            return reference::cache_write_prim::<Self>(k_cache, v_cache, k, v, start);
        }
        let shape = k_cache.shape.clone();
        let [kc, vc] = register::<B>(
            "kernels::cache_write",
            Kind::CacheWrite { start },
            vec![k_cache, v_cache, k, v],
            None,
            vec![shape.clone(), shape],
        )
        .outputs();
        (kc, vc)
    }

    fn cache_gather(
        k_cache: FloatTensor<Self>,
        v_cache: FloatTensor<Self>,
        src: &[usize],
        dst_start: usize,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        if !crate::kernels_enabled() || !super::cache_gather_supports(src, dst_start) {
            return reference::cache_gather_prim::<Self>(k_cache, v_cache, src, dst_start);
        }
        let mut rows = [0; super::CACHE_GATHER_MAX_ROWS];
        rows[..src.len()].copy_from_slice(src);
        let shape = k_cache.shape.clone();
        let [kc, vc] = register::<B>(
            "kernels::cache_gather",
            Kind::CacheGather {
                dst_start,
                n: src.len(),
                src: rows,
            },
            vec![k_cache, v_cache],
            None,
            vec![shape.clone(), shape],
        )
        .outputs();
        (kc, vc)
    }

    fn top_k(x: FloatTensor<Self>, k: usize, out_dtype: DType) -> IntTensor<Self> {
        if !crate::kernels_enabled() || k > super::TOP_K_MAX {
            return reference::top_k_prim::<Self>(x, k);
        }
        let rows = x.shape[0];
        let [idx] = register_as::<B>(
            "kernels::top_k",
            Kind::TopK {
                k,
                dtype: out_dtype,
            },
            vec![x],
            None,
            vec![Shape::new([rows, k])],
            out_dtype,
        )
        .outputs();
        idx
    }
}
