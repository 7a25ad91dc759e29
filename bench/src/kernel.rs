//! Attention microbenchmark: Burn's naive reference (matmul–softmax–matmul), Burn's built-in
//! `attention` and this project's kernel, on the same inputs, with each one's error against an
//! f64 reference computed on the host printed beside its time.

use burn::tensor::{
    Bool, DType, Distribution, Tensor, TensorData, activation::softmax, backend::Backend,
    module::attention, ops::AttentionModuleOptions,
};
use kernels::{AttentionMask, FlashAttentionBackend, FlashAttentionOptions, flash_attention};
use serde::Serialize;

use crate::timing::{Timing, time_device};

/// One attention problem.
#[derive(Debug, Clone, Serialize)]
pub struct Case {
    pub name: String,
    pub batch: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub q_len: usize,
    pub kv_len: usize,
    pub head_dim: usize,
    pub causal: bool,
    pub dtype: String,
}

impl Case {
    #[allow(clippy::too_many_arguments)]
    fn new(
        name: &str,
        b: usize,
        h: usize,
        hkv: usize,
        q: usize,
        kv: usize,
        d: usize,
        causal: bool,
        dtype: DType,
    ) -> Self {
        Self {
            name: name.into(),
            batch: b,
            heads: h,
            kv_heads: hkv,
            q_len: q,
            kv_len: kv,
            head_dim: d,
            causal,
            dtype: dtype_name(dtype).into(),
        }
    }

    /// `(batch, heads, kv_heads, q_len, kv_len, head_dim)`.
    fn dims(&self) -> (usize, usize, usize, usize, usize, usize) {
        (
            self.batch,
            self.heads,
            self.kv_heads,
            self.q_len,
            self.kv_len,
            self.head_dim,
        )
    }

    fn dtype(&self) -> DType {
        match self.dtype.as_str() {
            "bf16" => DType::BF16,
            "f16" => DType::F16,
            _ => DType::F32,
        }
    }

    /// Multiply-adds of `QKᵀ` and `PV`, counting only visible pairs for causal prefill.
    pub fn flops(&self) -> f64 {
        let pairs = if self.causal && self.q_len == self.kv_len {
            (self.q_len * (self.q_len + 1) / 2) as f64
        } else {
            (self.q_len * self.kv_len) as f64
        };
        4.0 * (self.batch * self.heads * self.head_dim) as f64 * pairs
    }

    /// Bytes that must cross device memory at least once: Q, K, V read, O written.
    pub fn bytes(&self) -> f64 {
        let e = self.dtype().size() as f64;
        let q = (self.batch * self.heads * self.q_len * self.head_dim) as f64;
        let kv = (self.batch * self.kv_heads * self.kv_len * self.head_dim) as f64;
        e * (2.0 * q + 2.0 * kv)
    }
}

pub fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        DType::F32 => "f32",
        _ => "other",
    }
}

/// The cases of the kernels issue: the seed's sizes, large causal prefill, and decode.
pub fn cases(large: bool) -> Vec<Case> {
    let mut v = vec![
        Case::new("seed n=64", 1, 1, 1, 64, 64, 64, false, DType::F32),
        Case::new("seed n=256", 1, 1, 1, 256, 256, 64, false, DType::F32),
    ];
    if large {
        v.push(Case::new(
            "prefill n=2048",
            1,
            32,
            32,
            2048,
            2048,
            128,
            true,
            DType::BF16,
        ));
        v.push(Case::new(
            "prefill n=8192",
            1,
            32,
            32,
            8192,
            8192,
            128,
            true,
            DType::BF16,
        ));
        for kv in [1024, 8192, 32768] {
            // Llama-3-8B attention: 32 query heads over 8 KV heads.
            v.push(Case::new(
                &format!("decode kv={kv}"),
                1,
                32,
                8,
                1,
                kv,
                128,
                false,
                DType::BF16,
            ));
        }
    } else {
        v.push(Case::new(
            "prefill n=512",
            1,
            8,
            8,
            512,
            512,
            64,
            true,
            DType::F32,
        ));
        v.push(Case::new(
            "decode kv=2048",
            1,
            8,
            2,
            1,
            2048,
            64,
            false,
            DType::F32,
        ));
    }
    v
}

/// One implementation's result on one case.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub case: Case,
    pub implementation: String,
    pub timing: Option<Timing>,
    pub tflops: Option<f64>,
    pub gbps: Option<f64>,
    /// Speedup over Burn's naive reference on this case.
    pub speedup_vs_naive: Option<f64>,
    /// ‖out − ref‖ / ‖ref‖ against the host f64 reference (sampled rows).
    pub rel_err: Option<f64>,
    /// Why this row has no numbers (e.g. out of memory).
    pub note: Option<String>,
}

/// Burn's naive attention: full score matrix, softmax, product; K/V heads repeated for GQA.
pub fn naive<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    hidden: Option<Tensor<B, 4, Bool>>,
) -> Tensor<B, 4> {
    let [b, h, _, d] = q.dims();
    let [_, hkv, n, _] = k.dims();
    let repeat = |t: Tensor<B, 4>| {
        if h == hkv {
            t
        } else {
            t.unsqueeze_dim::<5>(2)
                .expand([b, hkv, h / hkv, n, d])
                .reshape([b, h, n, d])
        }
    };
    let mut scores = q.matmul(repeat(k).swap_dims(2, 3)) * (1.0 / (d as f64).sqrt());
    if let Some(mask) = hidden {
        scores = scores.mask_fill(mask, f32::NEG_INFINITY);
    }
    softmax(scores, 3).matmul(repeat(v))
}

fn causal_mask<B: Backend>(n: usize, device: &B::Device) -> Tensor<B, 4, Bool> {
    let hidden: Vec<bool> = (0..n).flat_map(|i| (0..n).map(move |j| j > i)).collect();
    Tensor::<B, 2, Bool>::from_data(TensorData::new(hidden, [n, n]), device).unsqueeze::<4>()
}

/// Attention in f64 on the host for a sample of query rows (all of them up to 64 per head, else
/// 64 evenly spaced ones, the last included): enough rows to catch a wrong tile or split, at a
/// host cost that stays in seconds at n = 8192.
struct HostReference {
    /// `(batch, head, query row)` of each sampled row.
    rows: Vec<(usize, usize, usize)>,
    /// `[rows.len(), head_dim]`.
    out: Vec<f64>,
    dims: [usize; 4],
}

impl HostReference {
    const ROWS_PER_HEAD: usize = 64;

    fn new<B: Backend>(case: &Case, q: &Tensor<B, 4>, k: &Tensor<B, 4>, v: &Tensor<B, 4>) -> Self {
        let (q, k, v) = (
            host_f32(q.clone()),
            host_f32(k.clone()),
            host_f32(v.clone()),
        );
        let (b, h, hkv, nq, nkv, d) = case.dims();
        let picked: Vec<usize> = if nq <= Self::ROWS_PER_HEAD {
            (0..nq).collect()
        } else {
            (0..Self::ROWS_PER_HEAD)
                .map(|i| i * (nq - 1) / (Self::ROWS_PER_HEAD - 1))
                .collect()
        };
        let scale = 1.0 / (d as f64).sqrt();
        let mut rows = Vec::new();
        let mut out = Vec::new();
        let mut scores = vec![0f64; nkv];
        for bi in 0..b {
            for hi in 0..h {
                // GQA: query head hi reads KV head hi / (h / hkv).
                let kv_head = hi / (h / hkv);
                let kv_base = (bi * hkv + kv_head) * nkv * d;
                for &i in &picked {
                    let qrow = &q[((bi * h + hi) * nq + i) * d..][..d];
                    // Causal: the query at i sits at absolute position i + nkv - nq.
                    let visible = if case.causal { i + nkv - nq + 1 } else { nkv };
                    let mut max = f64::NEG_INFINITY;
                    for (j, s) in scores[..visible].iter_mut().enumerate() {
                        let krow = &k[kv_base + j * d..][..d];
                        *s = qrow
                            .iter()
                            .zip(krow)
                            .map(|(&a, &b)| a as f64 * b as f64)
                            .sum::<f64>()
                            * scale;
                        max = max.max(*s);
                    }
                    let mut acc = vec![0f64; d];
                    let mut total = 0.0;
                    for (j, &s) in scores[..visible].iter().enumerate() {
                        let p = (s - max).exp();
                        total += p;
                        for (a, &x) in acc.iter_mut().zip(&v[kv_base + j * d..][..d]) {
                            *a += p * x as f64;
                        }
                    }
                    out.extend(acc.iter().map(|a| a / total));
                    rows.push((bi, hi, i));
                }
            }
        }
        Self {
            rows,
            out,
            dims: [b, h, nq, d],
        }
    }

    /// ‖out − ref‖ / ‖ref‖ over the sampled rows.
    fn rel_err<B: Backend>(&self, out: Tensor<B, 4>) -> f64 {
        let [_, h, nq, d] = self.dims;
        let got = host_f32(out);
        let (mut diff, mut norm) = (0f64, 0f64);
        for (r, &(bi, hi, i)) in self.rows.iter().enumerate() {
            let row = &got[((bi * h + hi) * nq + i) * d..][..d];
            for (&g, &want) in row.iter().zip(&self.out[r * d..(r + 1) * d]) {
                diff += (g as f64 - want).powi(2);
                norm += want * want;
            }
        }
        (diff / norm).sqrt()
    }
}

/// A tensor's values on the host, as f32 (exact for bf16/f16 inputs).
pub fn host_f32<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.cast(DType::F32)
        .into_data()
        .convert::<f32>()
        .to_vec()
        .expect("f32 data")
}

/// Runs every case with the three implementations.
pub fn run<B: FlashAttentionBackend>(
    device: &B::Device,
    cases: &[Case],
    warmup: usize,
    samples: usize,
    progress: &crate::progress::Progress,
) -> Vec<Row> {
    let mut rows = Vec::new();
    for case in cases {
        progress.set_message(format!("kernel: {}", case.name));
        let dtype = case.dtype();
        let (b, h, hkv, nq, nkv, d) = case.dims();
        // Fresh normal draws, rounded to the case's dtype.
        let draw = |shape: [usize; 4]| {
            Tensor::<B, 4>::random(shape, Distribution::Normal(0.0, 1.0), (device, DType::F32))
                .cast(dtype)
        };
        let q = draw([b, h, nq, d]);
        let k = draw([b, hkv, nkv, d]);
        let v = draw([b, hkv, nkv, d]);
        let hidden = (case.causal && nq > 1).then(|| causal_mask::<B>(nq, device));
        // The reference is computed on the host in f64 from the very same (rounded) inputs, so
        // it shares no code and no arithmetic with the implementations it checks.
        let reference = HostReference::new(case, &q, &k, &v);

        let mut time_one = |name: &str, f: &dyn Fn() -> Tensor<B, 4>| {
            let err = reference.rel_err(f());
            let timing = time_device::<B>(device, warmup, samples, 2.0, || {
                let _ = f();
            });
            let s = timing.median_ms / 1e3;
            rows.push(Row {
                case: case.clone(),
                implementation: name.into(),
                timing: Some(timing),
                tflops: Some(case.flops() / s / 1e12),
                gbps: Some(case.bytes() / s / 1e9),
                speedup_vs_naive: None,
                rel_err: Some(err),
                note: None,
            });
        };
        time_one("burn naive", &|| {
            naive(q.clone(), k.clone(), v.clone(), hidden.clone())
        });
        let builtin_ok = h == hkv;
        if builtin_ok {
            let opts = AttentionModuleOptions {
                scale: None,
                softcap: None,
                is_causal: case.causal,
            };
            time_one("burn attention", &|| {
                attention(q.clone(), k.clone(), v.clone(), None, None, opts)
            });
        }
        let mask = if case.causal {
            AttentionMask::Causal
        } else {
            AttentionMask::None
        };
        let options = FlashAttentionOptions::new(d, nkv);
        time_one("ours", &|| {
            flash_attention(q.clone(), k.clone(), v.clone(), mask.clone(), options)
        });
        let query_rows = nq * h / hkv;
        if dtype != DType::F32
            && query_rows > kernels::cube::DECODE_MAX_ROWS
            && kernels::register_mma()
        {
            // The previous tensor-core kernel (wmma, scores and output in shared memory) beside
            // the register-level one, in the same run. Where the register-level kernel does not
            // apply (not CUDA, a KV split, d = 256) both rows run the same kernel.
            struct Restore;
            impl Drop for Restore {
                fn drop(&mut self) {
                    kernels::set_register_mma(true);
                }
            }
            let _restore = Restore;
            kernels::set_register_mma(false);
            time_one("ours (wmma kernel)", &|| {
                flash_attention(q.clone(), k.clone(), v.clone(), mask.clone(), options)
            });
        }
        if !builtin_ok {
            // Burn's attention op takes equal head counts; repeat K/V heads for it, as a user
            // would have to.
            let rep = |t: &Tensor<B, 4>| {
                t.clone()
                    .unsqueeze_dim::<5>(2)
                    .expand([b, hkv, h / hkv, nkv, d])
                    .reshape([b, h, nkv, d])
            };
            let (kr, vr) = (rep(&k), rep(&v));
            let opts = AttentionModuleOptions {
                scale: None,
                softcap: None,
                is_causal: false,
            };
            time_one("burn attention (K/V repeated)", &|| {
                attention(q.clone(), kr.clone(), vr.clone(), None, None, opts)
            });
        }
        let base = rows
            .iter()
            .rev()
            .find(|r| r.case.name == case.name && r.implementation == "burn naive")
            .and_then(|r| r.timing.map(|t| t.median_ms));
        for r in rows.iter_mut().filter(|r| r.case.name == case.name) {
            r.speedup_vs_naive = match (base, r.timing) {
                (Some(b), Some(t)) => Some(b / t.median_ms),
                _ => None,
            };
        }
        progress.inc(1);
    }
    rows
}
