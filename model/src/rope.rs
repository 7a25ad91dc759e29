//! Rotary position embeddings (RoPE) in the "rotate half" convention of Hugging Face weights,
//! with Llama-3.1 frequency scaling.

use burn::tensor::{DType, Int, Tensor, TensorData, backend::Backend};

use crate::config::LlamaConfig;

/// Inverse frequencies `θ_i` (one per pair of dimensions), after `rope_scaling`.
///
/// Computed in f32 exactly like `transformers`' `_compute_default_rope_parameters` and
/// `_compute_llama3_parameters`, so positions match the reference bit for bit as far as possible.
pub fn inv_freq(config: &LlamaConfig) -> Vec<f32> {
    let dim = config.head_dim();
    let base = config.rope_theta as f32;
    let mut freqs: Vec<f32> = (0..dim / 2)
        .map(|i| 1.0 / base.powf((2 * i) as f32 / dim as f32))
        .collect();
    let Some(scaling) = &config.rope_scaling else {
        return freqs;
    };
    match scaling.rope_type.as_str() {
        "linear" => {
            let factor = scaling.factor.unwrap_or(1.0) as f32;
            freqs.iter_mut().for_each(|f| *f /= factor);
        }
        "llama3" => {
            // Validated at config load: all four fields are present.
            let factor = scaling.factor.unwrap_or(1.0) as f32;
            let low = scaling.low_freq_factor.unwrap_or(1.0) as f32;
            let high = scaling.high_freq_factor.unwrap_or(4.0) as f32;
            let old_len = scaling.original_max_position_embeddings.unwrap_or(8192) as f32;
            let low_freq_wavelen = old_len / low;
            let high_freq_wavelen = old_len / high;
            for f in freqs.iter_mut() {
                let wavelen = 2.0 * std::f32::consts::PI / *f;
                *f = if wavelen < high_freq_wavelen {
                    *f
                } else if wavelen > low_freq_wavelen {
                    *f / factor
                } else {
                    // Medium frequencies: interpolate between scaled and unscaled.
                    let smooth = (old_len / wavelen - low) / (high - low);
                    (1.0 - smooth) * *f / factor + smooth * *f
                };
            }
        }
        _ => {}
    }
    freqs
}

/// Precomputed `cos`/`sin` tables, `[max_len, head_dim]`, in the model's dtype.
#[derive(Debug, Clone)]
pub struct RopeTables<B: Backend> {
    cos: Tensor<B, 2>,
    sin: Tensor<B, 2>,
}

/// The `cos`/`sin` rows of one forward pass, `[q_len, head_dim]`.
#[derive(Debug, Clone)]
pub struct RopeRows<B: Backend> {
    pub cos: Tensor<B, 2>,
    pub sin: Tensor<B, 2>,
}

impl<B: Backend> RopeTables<B> {
    pub fn new(config: &LlamaConfig, max_len: usize, dtype: DType, device: &B::Device) -> Self {
        let freqs = inv_freq(config);
        let half = freqs.len();
        let dim = 2 * half;
        let mut cos = Vec::with_capacity(max_len * dim);
        let mut sin = Vec::with_capacity(max_len * dim);
        for pos in 0..max_len {
            // f32 product, as transformers computes `position_ids.float() @ inv_freq`.
            let angles: Vec<f32> = freqs.iter().map(|f| pos as f32 * f).collect();
            for _ in 0..2 {
                cos.extend(angles.iter().map(|a| a.cos()));
                sin.extend(angles.iter().map(|a| a.sin()));
            }
        }
        let table = |v: Vec<f32>| {
            Tensor::<B, 2>::from_data(TensorData::new(v, [max_len, dim]), (device, DType::F32))
                .cast(dtype)
        };
        Self {
            cos: table(cos),
            sin: table(sin),
        }
    }

    pub fn max_len(&self) -> usize {
        self.cos.dims()[0]
    }

    /// Rows for the contiguous positions `start..start + len` (no host upload).
    pub fn contiguous(&self, start: usize, len: usize) -> RopeRows<B> {
        let d = self.cos.dims()[1];
        RopeRows {
            cos: self.cos.clone().slice([start..start + len, 0..d]),
            sin: self.sin.clone().slice([start..start + len, 0..d]),
        }
    }

    /// Rows for explicit positions (Medusa's tree: prefix length + depth of each node).
    pub fn gather(&self, positions: Tensor<B, 1, Int>) -> RopeRows<B> {
        RopeRows {
            cos: self.cos.clone().select(0, positions.clone()),
            sin: self.sin.clone().select(0, positions),
        }
    }
}

/// `x * cos + rotate_half(x) * sin` for `x: [batch, heads, seq, head_dim]`.
pub fn apply_rope<B: Backend>(x: Tensor<B, 4>, rows: &RopeRows<B>) -> Tensor<B, 4> {
    let [b, h, s, d] = x.dims();
    let half = d / 2;
    let x1 = x.clone().slice([0..b, 0..h, 0..s, 0..half]);
    let x2 = x.clone().slice([0..b, 0..h, 0..s, half..d]);
    let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
    let cos = rows.cos.clone().reshape([1, 1, s, d]);
    let sin = rows.sin.clone().reshape([1, 1, s, d]);
    x * cos + rotated * sin
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RopeScaling;

    /// Llama-3.1 scaling against an independent f64 evaluation of the published formula
    /// (Meta's `apply_scaling` in `llama/model.py`): high frequencies untouched, low frequencies
    /// divided by `factor`, a linear blend in wavelength-space in between.
    #[test]
    fn llama31_scaling_matches_formula() {
        let mut c = LlamaConfig::llama3_8b();
        c.rope_scaling = Some(RopeScaling {
            rope_type: "llama3".into(),
            factor: Some(8.0),
            low_freq_factor: Some(1.0),
            high_freq_factor: Some(4.0),
            original_max_position_embeddings: Some(8192),
        });
        let got = inv_freq(&c);
        assert_eq!(got.len(), 64);
        let (mut high, mut low, mut mid) = (0, 0, 0);
        for (i, g) in got.iter().enumerate() {
            let f = 1.0 / 500_000f64.powf(2.0 * i as f64 / 128.0);
            let wavelen = 2.0 * std::f64::consts::PI / f;
            let expected = if wavelen < 8192.0 / 4.0 {
                high += 1;
                f
            } else if wavelen > 8192.0 {
                low += 1;
                f / 8.0
            } else {
                mid += 1;
                let smooth = (8192.0 / wavelen - 1.0) / 3.0;
                (1.0 - smooth) * f / 8.0 + smooth * f
            };
            let rel = ((*g as f64) - expected).abs() / expected;
            assert!(rel < 2e-6, "freq {i}: got {g}, expected {expected}");
        }
        // The three regimes are all exercised (counts follow from theta and head_dim).
        assert!(high > 0 && low > 0 && mid > 0, "{high} {low} {mid}");
    }
}
