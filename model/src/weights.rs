//! Where parameter tensors come from: safetensors checkpoints (single file or sharded) or a seeded
//! random initialisation (for timing models whose weights are not available).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fs::File,
    path::{Path, PathBuf},
};

use burn::tensor::{DType, Distribution, Tensor, TensorData, backend::Backend};
use memmap2::Mmap;
use safetensors::{Dtype as StDtype, SafeTensors};

use crate::error::{Error, Result};

/// A source of named parameter tensors, checked against the shape the model expects.
pub trait WeightSource<B: Backend> {
    /// The tensor `name` with exactly `shape`, converted to `dtype`, on `device`.
    fn load<const D: usize>(
        &mut self,
        name: &str,
        shape: [usize; D],
        kind: ParamKind,
    ) -> Result<Tensor<B, D>>;

    /// A linear layer's weight, stored `[d_out, d_in]` in checkpoints, returned transposed and
    /// contiguous as `[d_in, d_out]`.
    fn load_linear(&mut self, name: &str, d_out: usize, d_in: usize) -> Result<Tensor<B, 2>>;

    /// Whether the source holds `name` (used for optional tensors such as an untied `lm_head`).
    fn contains(&self, name: &str) -> bool;

    /// Called once every parameter was loaded: reports tensors the model did not use.
    fn finish(self) -> Result<()>;
}

/// What a parameter is, so random initialisation can pick a sensible distribution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamKind {
    /// Projection or embedding matrix: `N(0, 0.02²)` like Hugging Face's `initializer_range`.
    Matrix,
    /// Normalisation gain: ones.
    NormWeight,
    /// Bias: zeros.
    Bias,
}

struct ShardHeader {
    path: PathBuf,
    mmap: Mmap,
}

/// Tensors from one `model.safetensors` or the shards listed in `model.safetensors.index.json`,
/// memory-mapped and converted to the model's dtype on the way to the device.
pub struct SafetensorsWeights<B: Backend> {
    shards: Vec<ShardHeader>,
    /// Tensor name -> shard index.
    index: HashMap<String, usize>,
    used: BTreeSet<String>,
    /// Names that may be present without being used (e.g. `lm_head.weight` beside tied
    /// embeddings, or rotary buffers older exports saved).
    ignorable: Vec<String>,
    strict: bool,
    dtype: DType,
    device: B::Device,
}

impl<B: Backend> SafetensorsWeights<B> {
    /// Opens the checkpoint in `dir`: `model.safetensors.index.json` if present, else
    /// `model.safetensors`, else the single `*.safetensors` file in the folder.
    pub fn open_dir(dir: &Path, dtype: DType, device: &B::Device) -> Result<Self> {
        let index_path = dir.join("model.safetensors.index.json");
        let files = if index_path.exists() {
            let text =
                std::fs::read_to_string(&index_path).map_err(|e| Error::io(&index_path, e))?;
            let index: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| Error::Safetensors {
                    path: index_path.clone(),
                    message: format!("bad index JSON: {e}"),
                })?;
            let map = index
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| Error::Safetensors {
                    path: index_path.clone(),
                    message: "index has no \"weight_map\" object".into(),
                })?;
            let files: BTreeSet<PathBuf> = map
                .values()
                .filter_map(|v| v.as_str())
                .map(|f| dir.join(f))
                .collect();
            files.into_iter().collect()
        } else if dir.join("model.safetensors").exists() {
            vec![dir.join("model.safetensors")]
        } else {
            let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
                .map_err(|e| Error::io(dir, e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
                .collect();
            found.sort();
            if found.is_empty() {
                return Err(Error::io(
                    &dir.join("model.safetensors"),
                    std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        "no model.safetensors, model.safetensors.index.json or *.safetensors file",
                    ),
                ));
            }
            found
        };
        Self::open_files(&files, dtype, device)
    }

    /// Opens the given safetensors files as one checkpoint.
    pub fn open_files(files: &[PathBuf], dtype: DType, device: &B::Device) -> Result<Self> {
        let mut shards = Vec::new();
        let mut index = HashMap::new();
        for (i, path) in files.iter().enumerate() {
            let file = File::open(path).map_err(|e| Error::io(path, e))?;
            // SAFETY: the mapping is read-only and lives as long as `self`; checkpoints are not
            // expected to be modified while a model loads (the same contract as transformers).
            let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
            let st = SafeTensors::deserialize(&mmap).map_err(|e| Error::Safetensors {
                path: path.clone(),
                message: e.to_string(),
            })?;
            for name in st.names() {
                index.insert(name.to_string(), i);
            }
            shards.push(ShardHeader {
                path: path.clone(),
                mmap,
            });
        }
        Ok(Self {
            shards,
            index,
            used: BTreeSet::new(),
            ignorable: vec!["rotary_emb.inv_freq".into()],
            strict: true,
            dtype,
            device: device.clone(),
        })
    }

    /// Tolerate unused tensors whose name contains `pattern`.
    pub fn ignore(mut self, pattern: impl Into<String>) -> Self {
        self.ignorable.push(pattern.into());
        self
    }

    /// Whether unused tensors are an error (default) or silently skipped.
    pub fn strict(mut self, strict: bool) -> Self {
        self.strict = strict;
        self
    }

    /// Names and shapes of every tensor in the checkpoint.
    pub fn tensor_shapes(&self) -> BTreeMap<String, Vec<usize>> {
        let mut out = BTreeMap::new();
        for shard in &self.shards {
            if let Ok(st) = SafeTensors::deserialize(&shard.mmap) {
                for (name, view) in st.tensors() {
                    out.insert(name, view.shape().to_vec());
                }
            }
        }
        out
    }

    fn read(&self, name: &str, expected: &[usize]) -> Result<TensorData> {
        let &shard = self.index.get(name).ok_or_else(|| Error::MissingTensor {
            name: name.into(),
            searched: self
                .shards
                .iter()
                .map(|s| s.path.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        })?;
        let shard = &self.shards[shard];
        let st = SafeTensors::deserialize(&shard.mmap).map_err(|e| Error::Safetensors {
            path: shard.path.clone(),
            message: e.to_string(),
        })?;
        let view = st.tensor(name).map_err(|e| Error::Safetensors {
            path: shard.path.clone(),
            message: e.to_string(),
        })?;
        if view.shape() != expected {
            return Err(Error::Shape {
                name: name.into(),
                path: shard.path.clone(),
                expected: expected.to_vec(),
                found: view.shape().to_vec(),
            });
        }
        let dtype = match view.dtype() {
            StDtype::F32 => DType::F32,
            StDtype::F16 => DType::F16,
            StDtype::BF16 => DType::BF16,
            StDtype::F64 => DType::F64,
            other => {
                return Err(Error::Dtype {
                    name: name.into(),
                    path: shard.path.clone(),
                    dtype: format!("{other:?}"),
                });
            }
        };
        Ok(TensorData::from_bytes_vec(
            view.data().to_vec(),
            view.shape().to_vec(),
            dtype,
        ))
    }
}

impl<B: Backend> WeightSource<B> for SafetensorsWeights<B> {
    fn load<const D: usize>(
        &mut self,
        name: &str,
        shape: [usize; D],
        _kind: ParamKind,
    ) -> Result<Tensor<B, D>> {
        let data = self.read(name, &shape)?;
        self.used.insert(name.to_string());
        Ok(Tensor::from_data(data, (&self.device, self.dtype)))
    }

    fn load_linear(&mut self, name: &str, d_out: usize, d_in: usize) -> Result<Tensor<B, 2>> {
        let data = self.read(name, &[d_out, d_in])?.convert_dtype(self.dtype);
        self.used.insert(name.to_string());
        let bytes = transpose_bytes(data.as_bytes(), d_out, d_in, self.dtype.size());
        let data = TensorData::from_bytes_vec(bytes, [d_in, d_out], self.dtype);
        Ok(Tensor::from_data(data, (&self.device, self.dtype)))
    }

    fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    fn finish(self) -> Result<()> {
        if !self.strict {
            return Ok(());
        }
        let mut unused: Vec<String> = self
            .index
            .keys()
            .filter(|n| !self.used.contains(*n))
            .filter(|n| !self.ignorable.iter().any(|p| n.contains(p.as_str())))
            .cloned()
            .collect();
        if unused.is_empty() {
            Ok(())
        } else {
            unused.sort();
            Err(Error::UnexpectedTensors { names: unused })
        }
    }
}

/// Seeded random parameters generated on the device (nothing crosses the host), for timing
/// models whose weights cannot be downloaded. The function computed is meaningless; its cost is
/// that of the real model.
pub struct RandomWeights<B: Backend> {
    dtype: DType,
    device: B::Device,
}

impl<B: Backend> RandomWeights<B> {
    /// Seeds the backend's RNG on `device` with `seed` (for all later random ops too); parameters
    /// are created in `dtype`.
    pub fn new(seed: u64, dtype: DType, device: &B::Device) -> Self {
        B::seed(device, seed);
        Self {
            dtype,
            device: device.clone(),
        }
    }
}

impl<B: Backend> WeightSource<B> for RandomWeights<B> {
    fn load<const D: usize>(
        &mut self,
        _name: &str,
        shape: [usize; D],
        kind: ParamKind,
    ) -> Result<Tensor<B, D>> {
        let options = (&self.device, self.dtype);
        Ok(match kind {
            // Drawn in f32 and cast: not every backend's random kernels take bf16/f16 outputs.
            ParamKind::Matrix => Tensor::<B, D>::random(
                shape,
                Distribution::Normal(0.0, 0.02),
                (&self.device, DType::F32),
            )
            .cast(self.dtype),
            ParamKind::NormWeight => Tensor::ones(shape, options),
            ParamKind::Bias => Tensor::zeros(shape, options),
        })
    }

    fn load_linear(&mut self, name: &str, d_out: usize, d_in: usize) -> Result<Tensor<B, 2>> {
        self.load(name, [d_in, d_out], ParamKind::Matrix)
    }

    fn contains(&self, _name: &str) -> bool {
        false
    }

    fn finish(self) -> Result<()> {
        Ok(())
    }
}

/// Transposes a row-major `[rows, cols]` matrix of `elem`-byte elements.
fn transpose_bytes(src: &[u8], rows: usize, cols: usize, elem: usize) -> Vec<u8> {
    let mut out = vec![0u8; src.len()];
    // Blocked so that both the reads and the writes stay within a few cache lines.
    const BLOCK: usize = 32;
    for r0 in (0..rows).step_by(BLOCK) {
        for c0 in (0..cols).step_by(BLOCK) {
            for r in r0..(r0 + BLOCK).min(rows) {
                for c in c0..(c0 + BLOCK).min(cols) {
                    let s = (r * cols + c) * elem;
                    let d = (c * rows + r) * elem;
                    out[d..d + elem].copy_from_slice(&src[s..s + elem]);
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transposes_matrices() {
        let m: Vec<u8> = (0..6u8).collect(); // [[0,1,2],[3,4,5]] with 1-byte elements
        assert_eq!(transpose_bytes(&m, 2, 3, 1), vec![0, 3, 1, 4, 2, 5]);
        let m: Vec<u8> = (0..12u8).collect(); // 2x3 with 2-byte elements
        assert_eq!(
            transpose_bytes(&m, 2, 3, 2),
            vec![0, 1, 6, 7, 2, 3, 8, 9, 4, 5, 10, 11]
        );
    }
}
