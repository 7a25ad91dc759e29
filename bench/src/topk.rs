//! Medusa's candidates come from the top-k tokens of each head's logits. This probe times the
//! three ways to get them on a CubeCL backend, on the shapes a tree step has (one row per head,
//! a vocabulary per row): [`kernels::top_k`] (one or two launches), Burn's own `argtopk` (an autotuned
//! reduction), and `k` rounds of argmax and masking the winner (the portable reference). If
//! Burn's is as fast, the hand-written kernel has no reason to exist on CubeCL backends.

use burn::tensor::{DType, Distribution, Int, Tensor};
use kernels::FusedOpsBackend;
use serde::Serialize;

use crate::{
    kernel::{dtype_name, host_f32},
    timing::time_device,
};

#[derive(Debug, Clone, Serialize)]
pub struct TopKRow {
    pub rows: usize,
    pub cols: usize,
    pub k: usize,
    pub dtype: String,
    pub implementation: String,
    pub median_us: f64,
    pub host_us: f64,
    /// Whether the values at the returned indices equal the host sort's top `k`, row by row and
    /// in order (values, not indices: bf16 draws tie often, and a tie may go either way), with
    /// no index returned twice in a row.
    pub agrees: bool,
}

/// The shapes timed: Medusa's four heads (and one, for a single head's typical acceptance) over
/// SmolLM2's and Llama-3's vocabularies, k = 10 as in the default trees.
fn shapes() -> [(usize, usize, usize); 3] {
    [(4, 49152, 10), (1, 49152, 10), (4, 128256, 10)]
}

/// The top `k` values of each row, largest first, by a host sort.
fn host_top_values(values: &[f32], cols: usize, k: usize) -> Vec<f32> {
    values
        .chunks(cols)
        .flat_map(|row| {
            let mut row = row.to_vec();
            row.sort_by(|a, b| b.total_cmp(a));
            row.truncate(k);
            row
        })
        .collect()
}

/// One way to compute the top-k indices of a fixed input.
type TopK<'a, B> = &'a dyn Fn() -> Tensor<B, 2, Int>;

/// Times each implementation on each shape in f32 and bf16.
pub fn compare<B: FusedOpsBackend>(device: &B::Device) -> Vec<TopKRow> {
    let mut rows = Vec::new();
    for (r, cols, k) in shapes() {
        for dtype in [DType::F32, DType::BF16] {
            let x = Tensor::<B, 2>::random([r, cols], Distribution::Normal(0.0, 1.0), device)
                .cast(dtype);
            let want = host_top_values(&host_f32(x.clone()), cols, k);
            let ways: [(&str, TopK<'_, B>); 3] = [
                ("kernels::top_k", &|| kernels::top_k(x.clone(), k)),
                ("burn argtopk", &|| x.clone().argtopk(k, 1)),
                ("argmax-and-mask rounds", &|| {
                    kernels::fused::reference::top_k(x.clone(), k)
                }),
            ];
            for (name, f) in ways {
                // One implementation failing (Burn's argtopk is young) must not cost the others'
                // numbers: record it as disagreeing, with no time.
                let run = || {
                    let indices = f();
                    let distinct = host_f32(indices.clone().float()).chunks(k).all(|row| {
                        let mut row = row.to_vec();
                        row.sort_by(f32::total_cmp);
                        row.windows(2).all(|w| w[0] != w[1])
                    });
                    let got = host_f32(x.clone().gather(1, indices));
                    let timing = time_device::<B>(device, 3, 9, 2.0, || {
                        let _ = f();
                    });
                    (distinct && got == want, timing)
                };
                let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(run));
                let (implementation, agrees, median_us, host_us) = match outcome {
                    Ok((agrees, t)) => (name.into(), agrees, t.median_ms * 1e3, t.host_ms * 1e3),
                    Err(_) => (format!("{name} (panicked)"), false, f64::NAN, f64::NAN),
                };
                rows.push(TopKRow {
                    rows: r,
                    cols,
                    k,
                    dtype: dtype_name(dtype).into(),
                    implementation,
                    median_us,
                    host_us,
                    agrees,
                });
            }
        }
    }
    rows
}

pub fn markdown(rows: &[TopKRow], device: &str) -> String {
    let mut s = format!(
        "## Top-k of each row ({device})\n\n| rows × cols, k | dtype | implementation | µs | host µs \
         | agrees with a host sort |\n|---|---|---|---:|---:|---|\n"
    );
    for r in rows {
        s += &format!(
            "| {} × {}, {} | {} | {} | {:.1} | {:.1} | {} |\n",
            r.rows,
            r.cols,
            r.k,
            r.dtype,
            r.implementation,
            r.median_us,
            r.host_us,
            if r.agrees { "yes" } else { "**no**" }
        );
    }
    s
}
