//! Preallocated key/value cache.
//!
//! Each layer owns two buffers `[batch, n_kv_heads, max_len, head_dim]` written at explicit
//! positions, so a decode step never reallocates or concatenates, and attention receives the
//! whole buffer plus the number of valid rows. Rolling back is just moving `len`; Medusa's
//! "commit the accepted path" is a gather of a few rows into the end of the prefix.

use burn::tensor::{DType, Tensor, backend::Backend};
use kernels::FusedOpsBackend;

/// Keys and values of one layer.
#[derive(Debug, Clone)]
pub struct LayerCache<B: Backend> {
    // `Option` so that writes can take the buffer by value: a uniquely owned tensor lets the
    // backend update it in place instead of copying the whole cache on every step.
    k: Option<Tensor<B, 4>>,
    v: Option<Tensor<B, 4>>,
}

impl<B: FusedOpsBackend> LayerCache<B> {
    /// Writes `k`/`v` (`[batch, n_kv, n, head_dim]`) at rows `start..start + n` and returns the
    /// full buffers for attention (one launch for both on CubeCL backends:
    /// [`kernels::cache_write`]).
    pub fn write(
        &mut self,
        start: usize,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
    ) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let (kc, vc) = kernels::cache_write(
            self.k.take().expect("cache buffer present"),
            self.v.take().expect("cache buffer present"),
            k,
            v,
            start,
        );
        self.k = Some(kc.clone());
        self.v = Some(vc.clone());
        (kc, vc)
    }

    /// Hands the buffers by value to `write` (an op that writes into them, in place when it
    /// holds their only reference, e.g. [`kernels::linear_rope_cache`]), keeps the buffers it
    /// returns beside `T`, and returns them for attention: `(T, keys, values)`.
    pub fn update<T>(
        &mut self,
        write: impl FnOnce(Tensor<B, 4>, Tensor<B, 4>) -> (T, Tensor<B, 4>, Tensor<B, 4>),
    ) -> (T, Tensor<B, 4>, Tensor<B, 4>) {
        let (out, kc, vc) = write(
            self.k.take().expect("cache buffer present"),
            self.v.take().expect("cache buffer present"),
        );
        self.k = Some(kc.clone());
        self.v = Some(vc.clone());
        (out, kc, vc)
    }
}

impl<B: Backend> LayerCache<B> {
    /// The full key buffer.
    pub fn keys(&self) -> Tensor<B, 4> {
        self.k.clone().expect("cache buffer present")
    }

    /// The full value buffer.
    pub fn values(&self) -> Tensor<B, 4> {
        self.v.clone().expect("cache buffer present")
    }
}

/// The key/value cache of a whole model: one [`LayerCache`] per layer and a shared length.
#[derive(Debug, Clone)]
pub struct KvCache<B: Backend> {
    layers: Vec<LayerCache<B>>,
    len: usize,
    max_len: usize,
}

impl<B: Backend> KvCache<B> {
    /// Allocates `num_layers` buffers of `[batch, n_kv_heads, max_len, head_dim]` in `dtype`.
    pub fn new(
        num_layers: usize,
        batch: usize,
        n_kv_heads: usize,
        max_len: usize,
        head_dim: usize,
        dtype: DType,
        device: &B::Device,
    ) -> Self {
        let shape = [batch, n_kv_heads, max_len, head_dim];
        let buffer = || Some(Tensor::<B, 4>::zeros(shape, (device, dtype)));
        let layers = (0..num_layers)
            .map(|_| LayerCache {
                k: buffer(),
                v: buffer(),
            })
            .collect();
        Self {
            layers,
            len: 0,
            max_len,
        }
    }

    /// Number of valid positions.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no position is valid yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Capacity in positions.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Number of layers, one [`LayerCache`] each.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// The cache of layer `layer`, mutably (panics when out of range).
    pub fn layer_mut(&mut self, layer: usize) -> &mut LayerCache<B> {
        &mut self.layers[layer]
    }

    /// The cache of layer `layer` (panics when out of range).
    pub fn layer(&self, layer: usize) -> &LayerCache<B> {
        &self.layers[layer]
    }

    /// Marks `n` more positions as valid (called once per forward, after every layer wrote).
    pub fn advance(&mut self, n: usize) {
        assert!(self.len + n <= self.max_len, "KV cache overflow");
        self.len += n;
    }

    /// Forgets everything from position `len` on (rollback after rejected speculation).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Empties the cache for a new sequence (the buffers are kept).
    pub fn reset(&mut self) {
        self.len = 0;
    }
}

impl<B: FusedOpsBackend> KvCache<B> {
    /// Moves the rows at absolute positions `positions` (ascending or not) to
    /// `dst_start..dst_start + positions.len()` in every layer, then sets the length to the end of
    /// that range. Medusa calls this with the accepted tree nodes' positions and `dst_start` = the
    /// prefix length, turning the accepted path into a contiguous continuation of the prefix.
    pub fn compact(&mut self, positions: &[usize], dst_start: usize) {
        let n = positions.len();
        assert!(dst_start + n <= self.max_len, "KV cache overflow");
        let identity = positions
            .iter()
            .enumerate()
            .all(|(i, &p)| p == dst_start + i);
        if n > 0 && !identity {
            // One launch per layer for keys and values on CubeCL backends (four with select +
            // slice_assign: 120 launches per accepting Medusa step on a 30-layer model).
            for layer in &mut self.layers {
                let (k, v) = kernels::cache_gather(
                    layer.k.take().expect("cache buffer present"),
                    layer.v.take().expect("cache buffer present"),
                    positions,
                    dst_start,
                );
                (layer.k, layer.v) = (Some(k), Some(v));
            }
        }
        self.len = dst_start + n;
    }
}
