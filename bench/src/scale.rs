//! Decoding on random weights with an exact preset config (no download; Llama-3-8B by
//! default, any [`LlamaConfig::preset`]): ms per token against the memory-bandwidth ceiling,
//! ours (with and without fused projections and folded reductions) beside stock Burn (its matmul
//! and attention; optional), the bandwidth each projection shape streams at, the host and
//! device time of a decode forward and of a tree forward, and the cost of one Medusa
//! tree-verification step relative to a plain decode step.

use anyhow::Result;
use burn::tensor::{DType, Distribution, Int, Tensor, TensorData, backend::Backend};
use kernels::FlashAttentionBackend;
use medusa::{MedusaConfig, MedusaHeads, MedusaTree};
use model::{GenerationConfig, Llama, LlamaConfig, LoadOptions, TreeInput, generate};
use serde::Serialize;

use crate::timing::{Timing, time_device};

#[derive(Debug, Clone, Serialize)]
pub struct DecodeSpeed {
    pub label: String,
    pub ms_per_token: f64,
    pub tokens_per_s: f64,
    /// Measured tokens/s over the bandwidth ceiling (weight bytes per token / bandwidth).
    pub fraction_of_ceiling: f64,
}

/// One projection shape of the model, timed alone: ours against Burn's `linear`.
#[derive(Debug, Clone, Serialize)]
pub struct LinearSpeed {
    pub name: String,
    /// Rows of `x` (1: a decode step; the tree's node count: a verification step).
    pub rows: usize,
    pub k: usize,
    pub n: usize,
    /// How many such products one forward runs (layers).
    pub per_forward: usize,
    pub ours: Timing,
    /// Burn's `linear` (absent when the run skipped stock Burn).
    pub stock: Option<Timing>,
    /// Weight bytes over the median time.
    pub ours_gbps: f64,
    pub stock_gbps: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ScaleResult {
    pub preset: String,
    pub dtype: String,
    pub parameters: usize,
    pub weight_bytes_per_token: f64,
    /// Device copy bandwidth measured in the same run (bytes read + written per second).
    pub bandwidth_gbps: f64,
    pub ceiling_tokens_per_s: f64,
    pub prompt_tokens: usize,
    pub new_tokens: usize,
    pub decode: Vec<DecodeSpeed>,
    pub decode_step: Timing,
    /// One decode forward without reading anything back: its `host_ms` against `median_ms`
    /// says how much of a step the CPU spends dispatching.
    pub decode_forward: Timing,
    /// One RMSNorm of a single row (microseconds of device work) called back to back: what one
    /// kernel launch costs through Burn and CubeCL on this machine.
    pub launch: Timing,
    pub tree_step: Timing,
    /// `tree_step` with SwiGLU in its own launch (or the gate/up reduction's) before the down
    /// projection ([`kernels::set_mlp_fold`] off): what the fold saves a tree step.
    pub tree_step_swiglu_apart: Timing,
    /// One tree forward (hidden states of every node, no LM head, no read-back): `host_ms`
    /// against `median_ms`, as for `decode_forward`.
    pub tree_forward: Timing,
    pub tree_nodes: usize,
    pub medusa_heads: usize,
    /// The heads' forward for one position (residual blocks stacked, as Medusa's decoding runs
    /// them; per head in reports before 2026-12-07), top-k and read-back.
    pub medusa_heads_step: Timing,
    /// The projections alone, per shape.
    pub linear: Vec<LinearSpeed>,
    /// (tree step + heads) / decode step.
    pub tree_vs_decode: f64,
}

/// Uniform values in `[0, 1)` drawn in f32 on the device, rounded to `dtype`.
fn random<B: Backend, const D: usize>(
    shape: [usize; D],
    dtype: DType,
    device: &B::Device,
) -> Tensor<B, D> {
    Tensor::<B, D>::random(shape, Distribution::Default, (device, DType::F32)).cast(dtype)
}

/// Measures device copy bandwidth: an elementwise pass over 2 GiB of bf16 (read + write
/// counted).
///
/// The result must still be alive when the device syncs: Burn's fusion drops queued work whose
/// output nobody holds (measured: with the result discarded at once, this reported 280 TB/s).
/// Each call therefore syncs before letting go of its result; against a 2 GiB pass (~1 ms) the
/// sync adds about 1%, which lowers the measured bandwidth (and the ceiling) slightly.
pub fn bandwidth<B: FlashAttentionBackend>(device: &B::Device) -> f64 {
    let n = 1usize << 30;
    let x = random::<B, 1>([n], DType::BF16, device);
    let t = time_device::<B>(device, 2, 10, 5.0, || {
        let y = x.clone() * 1.0001;
        B::sync(device).expect("device sync");
        drop(y);
    });
    (2 * n * 2) as f64 / (t.median_ms / 1e3) / 1e9
}

/// Times each projection shape of `config` with `rows` input rows, ours and Burn's. The weights
/// rotate over enough copies (>= 256 MiB together) that a product never finds its matrix in L2
/// (50 MiB on an H100), as in a real forward where each matrix is read once.
fn linear_speeds<B: FlashAttentionBackend>(
    config: &LlamaConfig,
    dtype: DType,
    rows: usize,
    stock: bool,
    device: &B::Device,
) -> Vec<LinearSpeed> {
    let (h, d) = (config.hidden_size, config.head_dim());
    let (nh, nkv) = (config.num_attention_heads, config.num_kv_heads());
    let ffn = config.intermediate_size;
    let layers = config.num_hidden_layers;
    let shapes = [
        ("q/k/v (fused)", h, (nh + 2 * nkv) * d, layers),
        ("o", nh * d, h, layers),
        ("gate/up (fused)", h, 2 * ffn, layers),
        ("down", ffn, h, layers),
        ("LM head", h, config.vocab_size, 1),
    ];
    let elem = dtype.size();
    shapes
        .into_iter()
        .map(|(name, k, n, per_forward)| {
            let bytes = k * n * elem;
            let copies = (256usize << 20).div_ceil(bytes).clamp(2, 16);
            let weights: Vec<Tensor<B, 2>> =
                (0..copies).map(|_| random([k, n], dtype, device)).collect();
            let x = random([rows, k], dtype, device);
            let time = |on: bool| {
                kernels::set_kernels_enabled(on);
                let mut i = 0;
                time_device::<B>(device, 3, 15, 2.0, || {
                    let _ = kernels::linear(x.clone(), weights[i % copies].clone(), None);
                    i += 1;
                })
            };
            let ours = time(true);
            let stock = stock.then(|| time(false));
            kernels::set_kernels_enabled(true);
            let gbps = |t: &Timing| bytes as f64 / (t.median_ms / 1e3) / 1e9;
            LinearSpeed {
                name: name.into(),
                rows,
                k,
                n,
                per_forward,
                ours_gbps: gbps(&ours),
                stock_gbps: stock.as_ref().map(gbps),
                ours,
                stock,
            }
        })
        .collect()
}

/// What [`run`] times.
pub struct ScaleSettings<'a> {
    /// A [`LlamaConfig::preset`] name.
    pub preset: &'a str,
    pub dtype: DType,
    pub tree: &'a MedusaTree,
    /// Untrained Medusa heads whose forward is timed.
    pub num_heads: usize,
    pub new_tokens: usize,
    /// Also time stock Burn (its decode and projections).
    pub stock: bool,
}

pub fn run<B: FlashAttentionBackend>(
    settings: &ScaleSettings,
    device: &B::Device,
    progress: &crate::progress::Progress,
) -> Result<ScaleResult> {
    let ScaleSettings {
        preset,
        dtype,
        tree,
        num_heads,
        new_tokens,
        stock,
    } = *settings;
    let config = LlamaConfig::preset(preset)?;
    progress.set_message("scale: measuring bandwidth");
    let bandwidth_gbps = bandwidth::<B>(device);
    progress.set_message(format!("scale: random {preset} weights"));
    let options = LoadOptions::default()
        .with_dtype(dtype)
        .with_max_seq_len(1024);
    let model = Llama::<B>::random(config.clone(), 7, &options, device)?;
    let elem = dtype.size() as f64;
    let embed = (config.vocab_size * config.hidden_size) as f64;
    // The embedding lookup reads one row; the LM head (a separate matrix here even when tied)
    // reads all of it.
    let weight_bytes = (config.num_parameters() as f64
        - if config.tie_word_embeddings {
            0.0
        } else {
            embed
        })
        * elem;
    let ceiling = bandwidth_gbps * 1e9 / weight_bytes;

    // The setting: a 64-token prompt, then `new_tokens` (128 by default).
    let prompt_len = 64;
    let prompt: Vec<u32> = (0..prompt_len)
        .map(|i| (i * 7919 % config.vocab_size) as u32)
        .collect();
    let gen_config = GenerationConfig {
        max_new_tokens: new_tokens,
        ..Default::default()
    };
    let mut decode = Vec::new();
    // The same weights with q/k/v and gate/up as separate matrices: what fusing them gains.
    let apart = Llama::<B>::random(
        config.clone(),
        7,
        &options.clone().with_fuse_projections(false),
        device,
    )?;
    for (label, kernels_on, fold, mlp_fold, model) in [
        (
            "ours (CubeCL attention + linear kernels)",
            true,
            true,
            true,
            &model,
        ),
        (
            "ours, SwiGLU apart (its own launch, or the gate/up reduction's, before down_proj)",
            true,
            true,
            false,
            &model,
        ),
        (
            "ours, reductions apart (K-split sums finished before SwiGLU and the norms)",
            true,
            false,
            false,
            &model,
        ),
        (
            "ours, projections apart (q, k, v, gate, up unfused)",
            true,
            true,
            true,
            &apart,
        ),
        ("stock Burn (matmul + attention)", false, true, true, &model),
    ] {
        if !kernels_on && !stock {
            continue;
        }
        progress.set_message(format!("scale: decoding, {label}"));
        kernels::set_kernels_enabled(kernels_on);
        kernels::set_fold_reductions(fold);
        kernels::set_mlp_fold(mlp_fold);
        generate(model, &prompt, &gen_config, |_| {})?; // warm-up: compilation, autotune
        let out = generate(model, &prompt, &gen_config, |_| {})?;
        let per_token = out.decode.as_secs_f64() / (out.tokens.len() - 1) as f64;
        progress.set_message(format!(
            "scale: {label}: {:.2} ms/token ({:.1} tokens/s)",
            per_token * 1e3,
            1.0 / per_token
        ));
        decode.push(DecodeSpeed {
            label: label.into(),
            ms_per_token: per_token * 1e3,
            tokens_per_s: 1.0 / per_token,
            fraction_of_ceiling: (1.0 / per_token) / ceiling,
        });
    }
    kernels::set_kernels_enabled(true);
    kernels::set_fold_reductions(true);
    kernels::set_mlp_fold(true);
    drop(apart);

    progress.set_message("scale: projection shapes".to_string());
    let mut linear = linear_speeds::<B>(&config, dtype, 1, stock, device);
    linear.extend(linear_speeds::<B>(
        &config,
        dtype,
        tree.len(),
        stock,
        device,
    ));

    // One decode step vs one tree verification, both on a cache holding prompt + output.
    progress.set_message("scale: tree step vs decode step".to_string());
    let n = tree.len();
    let mut cache = model.new_cache(1, prompt_len + new_tokens + n + 1);
    model.forward(model.tokens(&prompt, 1), &mut cache)?;
    let filled: Vec<u32> = (0..new_tokens)
        .map(|i| (i * 31 % config.vocab_size) as u32)
        .collect();
    model.forward(model.tokens(&filled, 1), &mut cache)?;
    let len = cache.len();
    let one = model.tokens(&[42], 1);
    let decode_step = time_device::<B>(device, 3, 15, 0.0, || {
        let logits = model.forward(one.clone(), &mut cache).expect("decode step");
        let _ = model::generate::argmax(model::generate::last_logits(logits));
        cache.truncate(len);
    });
    let decode_forward = time_device::<B>(device, 3, 15, 0.0, || {
        let _ = model.forward(one.clone(), &mut cache).expect("decode step");
        cache.truncate(len);
    });
    let row = random::<B, 2>([1, config.hidden_size], dtype, device);
    let gain = random::<B, 1>([config.hidden_size], dtype, device);
    let launch = time_device::<B>(device, 3, 15, 5.0, || {
        let _ = kernels::rms_norm(row.clone(), gain.clone(), 1e-5);
    });
    let positions: Vec<i64> = tree
        .position_ids
        .iter()
        .map(|&d| (len + d) as i64)
        .collect();
    let tree_input = TreeInput {
        mask: Tensor::from_data(TensorData::new(tree.attn_mask.clone(), [n, n]), device),
        positions: Tensor::from_data(TensorData::new(positions, [n]), device),
    };
    let nodes = Tensor::<B, 2, Int>::from_data(
        TensorData::new(
            (0..n as i64).map(|i| i * 13 + 5).collect::<Vec<_>>(),
            [1, n],
        ),
        device,
    );
    let mut time_tree_step = || {
        time_device::<B>(device, 3, 15, 0.0, || {
            let hidden = model
                .forward_hidden(nodes.clone(), &mut cache, Some(&tree_input))
                .expect("tree step");
            let argmax = model.logits(hidden).argmax(2);
            let _ = model::generate::read_ints(argmax);
            cache.truncate(len);
        })
    };
    let tree_step = time_tree_step();
    let fold = kernels::mlp_fold();
    kernels::set_mlp_fold(false);
    let tree_step_swiglu_apart = time_tree_step();
    kernels::set_mlp_fold(fold);
    let tree_forward = time_device::<B>(device, 3, 15, 0.0, || {
        let _ = model
            .forward_hidden(nodes.clone(), &mut cache, Some(&tree_input))
            .expect("tree step");
        cache.truncate(len);
    });
    let heads = MedusaHeads::init(
        &MedusaConfig {
            num_heads,
            num_layers: 1,
            hidden_size: config.hidden_size,
            vocab_size: config.vocab_size,
            share_lm_head: false,
        },
        &model.module.lm_head,
    );
    // As Medusa's decoding runs them: the residual blocks of all heads stacked.
    let stacked = heads.stack_blocks();
    let h = random([1, 1, config.hidden_size], dtype, device);
    let medusa_heads_step = time_device::<B>(device, 3, 15, 0.0, || {
        let base = &model.module.lm_head;
        let logits = match &stacked {
            Some(stacked) => heads.forward_stacked(stacked, h.clone(), base),
            None => heads
                .forward(h.clone(), base)
                .reshape([num_heads, config.vocab_size]),
        };
        let idx = medusa::decode::top_k_indices(logits, medusa::tree::TOPK);
        let _ = model::generate::read_ints(idx);
    });
    Ok(ScaleResult {
        preset: preset.into(),
        dtype: crate::kernel::dtype_name(dtype).into(),
        parameters: config.num_parameters(),
        weight_bytes_per_token: weight_bytes,
        bandwidth_gbps,
        ceiling_tokens_per_s: ceiling,
        prompt_tokens: prompt_len,
        new_tokens,
        decode,
        tree_vs_decode: (tree_step.median_ms + medusa_heads_step.median_ms) / decode_step.median_ms,
        decode_step,
        decode_forward,
        launch,
        tree_step,
        tree_step_swiglu_apart,
        tree_forward,
        tree_nodes: n,
        medusa_heads: num_heads,
        medusa_heads_step,
        linear,
    })
}
