//! Rotary position embeddings (RoPE) in the "rotate half" convention of Hugging Face weights,
//! with Llama-3.1 frequency scaling.

use burn::tensor::{DType, Int, Tensor, TensorData, backend::Backend};
use kernels::FusedOpsBackend;

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
///
/// `sin` is stored with the sign of `rotate_half` folded in (negative in the first half of each
/// row), and `swap` indexes the other half of a row, so that [`apply_rope`] is
/// `x * cos + x[.., swap] * sin`: element-wise ops and a `select`, which Burn's fusion compiles
/// into one kernel. The textbook form (`cat(-x2, x1)`) costs a `cat`, which fusion cannot take:
/// two copy kernels and a fusion break per call, for q and for k in every layer.
#[derive(Debug, Clone)]
pub struct RopeTables<B: Backend> {
    cos: Tensor<B, 2>,
    sin: Tensor<B, 2>,
    swap: Tensor<B, 1, Int>,
}

/// The `cos`/`sin` rows of one forward pass, `[q_len, head_dim]`.
#[derive(Debug, Clone)]
pub struct RopeRows<B: Backend> {
    /// `cos` of each position's angles, `[q_len, head_dim]`.
    pub cos: Tensor<B, 2>,
    /// `sin` with `rotate_half`'s sign: `-sin` in the first half of each row.
    pub sin_signed: Tensor<B, 2>,
    /// `[head_dim]`: for each dimension, the one of the other half it rotates with.
    pub swap: Tensor<B, 1, Int>,
}

impl<B: Backend> RopeTables<B> {
    /// Tables for positions `0..max_len` from `config`'s `head_dim`, `rope_theta` and
    /// `rope_scaling`, in `dtype` on `device`.
    pub fn new(config: &LlamaConfig, max_len: usize, dtype: DType, device: &B::Device) -> Self {
        let freqs = inv_freq(config);
        let half = freqs.len();
        let dim = 2 * half;
        let mut cos = Vec::with_capacity(max_len * dim);
        let mut sin = Vec::with_capacity(max_len * dim);
        for pos in 0..max_len {
            // f32 product, as transformers computes `position_ids.float() @ inv_freq`.
            let angles: Vec<f32> = freqs.iter().map(|f| pos as f32 * f).collect();
            for sign in [-1.0f32, 1.0] {
                cos.extend(angles.iter().map(|a| a.cos()));
                sin.extend(angles.iter().map(|a| sign * a.sin()));
            }
        }
        let table = |v: Vec<f32>| {
            Tensor::<B, 2>::from_data(TensorData::new(v, [max_len, dim]), (device, DType::F32))
                .cast(dtype)
        };
        let swap: Vec<i64> = (0..dim as i64)
            .map(|i| (i + half as i64) % dim as i64)
            .collect();
        Self {
            cos: table(cos),
            sin: table(sin),
            swap: Tensor::from_data(TensorData::new(swap, [dim]), device),
        }
    }

    /// Number of positions the tables cover.
    pub fn max_len(&self) -> usize {
        self.cos.dims()[0]
    }

    /// Rows for the contiguous positions `start..start + len` (no host upload).
    pub fn contiguous(&self, start: usize, len: usize) -> RopeRows<B> {
        let d = self.cos.dims()[1];
        RopeRows {
            cos: self.cos.clone().slice([start..start + len, 0..d]),
            sin_signed: self.sin.clone().slice([start..start + len, 0..d]),
            swap: self.swap.clone(),
        }
    }

    /// Rows for explicit positions (Medusa's tree: prefix length + depth of each node).
    pub fn gather(&self, positions: Tensor<B, 1, Int>) -> RopeRows<B> {
        RopeRows {
            cos: self.cos.clone().select(0, positions.clone()),
            sin_signed: self.sin.clone().select(0, positions),
            swap: self.swap.clone(),
        }
    }
}

/// `x * cos + rotate_half(x) * sin` for `x: [batch, seq, heads, head_dim]` (a projection's
/// output split into heads), returned head-major `[batch, heads, seq, head_dim]`; only the first
/// `rotated` heads are rotated, the rest copied (the values of a fused q/k/v projection).
/// `rotate_half(x) = cat(-x2, x1)` is computed as `x * cos + x[.., swap] * sin_signed` (the same
/// values: negation is exact), in one kernel launch on CubeCL backends ([`kernels::rope`]).
pub fn apply_rope<B: FusedOpsBackend>(
    x: Tensor<B, 4>,
    rows: &RopeRows<B>,
    rotated: usize,
) -> Tensor<B, 4> {
    kernels::rope(
        x,
        rows.cos.clone(),
        rows.sin_signed.clone(),
        rows.swap.clone(),
        rotated,
    )
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

    /// `apply_rope` against the textbook rotate-half formula evaluated in f64 from the same
    /// inputs, for contiguous rows and for gathered (tree) positions.
    #[test]
    fn apply_rope_matches_rotate_half_in_f64() {
        type B = burn::backend::Flex;
        let device = Default::default();
        let mut c = LlamaConfig::smollm2_135m();
        c.head_dim = Some(8);
        let (d, half) = (8usize, 4usize);
        let tables = RopeTables::<B>::new(&c, 32, DType::F32, &device);
        let freqs = inv_freq(&c);
        let (b, h, s) = (1usize, 3usize, 4usize);
        let x: Vec<f32> = (0..b * h * s * d)
            .map(|i| ((i * 7919 % 113) as f32 / 56.0 - 1.0) + 0.01)
            .collect();
        let xt = Tensor::<B, 4>::from_data(TensorData::new(x.clone(), [b, h, s, d]), &device);
        let gathered = [9i64, 10, 10, 11];
        for (positions, rows) in [
            ([5i64, 6, 7, 8], tables.contiguous(5, s)),
            (
                gathered,
                tables.gather(Tensor::from_data(
                    TensorData::new(gathered.to_vec(), [s]),
                    &device,
                )),
            ),
        ] {
            let got: Vec<f32> = apply_rope(xt.clone().swap_dims(1, 2), &rows, h)
                .into_data()
                .to_vec()
                .unwrap();
            for hh in 0..h {
                for t in 0..s {
                    let at = |i: usize| x[(hh * s + t) * d + i] as f64;
                    for i in 0..d {
                        let angle = positions[t] as f64 * freqs[i % half] as f64;
                        let rotated = if i < half {
                            -at(i + half)
                        } else {
                            at(i - half)
                        };
                        let expected = at(i) * angle.cos() + rotated * angle.sin();
                        let g = got[(hh * s + t) * d + i] as f64;
                        assert!(
                            (g - expected).abs() < 1e-5,
                            "head {hh} pos {} dim {i}: {g} vs {expected}",
                            positions[t]
                        );
                    }
                }
            }
        }
    }
}
