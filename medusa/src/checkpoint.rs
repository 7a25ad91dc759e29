//! Medusa heads on disk in the published Medusa v1 layout (`medusa_lm_head.safetensors` with
//! `{h}.{l}.linear.weight`, `{h}.{l}.linear.bias`, `{h}.{L}.weight`, PyTorch `[out, in]`
//! matrices) plus a small `config.json`.
//!
//! Head and layer counts are inferred from the tensor names: published configs are known to
//! disagree with their weights.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

use burn::tensor::{DType, Tensor, backend::Backend};
use model::{SafetensorsWeights, WeightSource, llama::Proj};

use crate::{
    error::{MedusaError, Result},
    heads::{MedusaHead, MedusaHeads, ResBlock},
};

/// File name of the weights inside a heads folder.
pub const WEIGHTS_FILE: &str = "medusa_lm_head.safetensors";
/// File name of the config inside a heads folder.
pub const CONFIG_FILE: &str = "config.json";

/// Extra information stored beside the heads.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct HeadsMetadata {
    /// Base model the heads were trained on (hub id, folder or `default`).
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    /// Tree to decode with (paths), e.g. built from measured head accuracies.
    #[serde(default)]
    pub medusa_choices: Option<Vec<Vec<usize>>>,
    /// `accuracy[k][i]`: how often head `k + 1`'s rank-`i` candidate was the right token on
    /// held-out data, as measured by training. With it a decoder can build the best tree for
    /// another node budget ([`crate::MedusaTree::from_spec`] with `optimal:N`) without
    /// retraining.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub medusa_accuracy: Option<Vec<Vec<f64>>>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct ConfigFile {
    medusa_num_heads: usize,
    medusa_num_layers: usize,
    #[serde(default)]
    hidden_size: Option<usize>,
    #[serde(default)]
    vocab_size: Option<usize>,
    #[serde(default)]
    share_lm_head: bool,
    #[serde(flatten)]
    metadata: HeadsMetadata,
}

fn ckpt_err(path: &Path, message: impl Into<String>) -> MedusaError {
    MedusaError::Checkpoint {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// Writes heads into `dir` (created if needed). Each file is written to a temporary name and
/// renamed, so an interrupted save leaves the previous checkpoint intact.
pub fn save<B: Backend>(
    heads: &MedusaHeads<B>,
    dir: &Path,
    metadata: &HeadsMetadata,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|source| MedusaError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let config = heads.config();
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    let matrix = |t: Tensor<B, 2>| -> (Vec<usize>, Vec<u8>) {
        // Stored [in, out] in memory; the published layout is PyTorch's [out, in].
        let t = t.transpose();
        let shape = t.dims().to_vec();
        (
            shape,
            f32_bytes(t.cast(DType::F32).into_data().to_vec().expect("f32")),
        )
    };
    for (h, head) in heads.heads.iter().enumerate() {
        for (l, block) in head.blocks.iter().enumerate() {
            let (shape, bytes) = matrix(block.linear.weight.val());
            tensors.push((format!("{h}.{l}.linear.weight"), shape, bytes));
            if let Some(bias) = &block.linear.bias {
                let b = bias.val();
                let shape = b.dims().to_vec();
                let bytes = f32_bytes(b.cast(DType::F32).into_data().to_vec().expect("f32"));
                tensors.push((format!("{h}.{l}.linear.bias"), shape, bytes));
            }
        }
        if let Some(lm_head) = &head.lm_head {
            let (shape, bytes) = matrix(lm_head.weight.val());
            tensors.push((format!("{h}.{}.weight", head.blocks.len()), shape, bytes));
        }
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(n, s, b)| {
            let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                .expect("consistent by construction");
            (n.clone(), view)
        })
        .collect();
    let weights = dir.join(WEIGHTS_FILE);
    let tmp = tmp_path(&weights);
    safetensors::serialize_to_file(views, None, &tmp)
        .map_err(|e| ckpt_err(&weights, e.to_string()))?;
    rename(&tmp, &weights)?;

    let file = ConfigFile {
        medusa_num_heads: config.num_heads,
        medusa_num_layers: config.num_layers,
        hidden_size: Some(config.hidden_size),
        vocab_size: Some(config.vocab_size),
        share_lm_head: config.share_lm_head,
        metadata: metadata.clone(),
    };
    let path = dir.join(CONFIG_FILE);
    let tmp = tmp_path(&path);
    std::fs::write(
        &tmp,
        serde_json::to_string_pretty(&file).expect("serialises"),
    )
    .map_err(|source| MedusaError::Io {
        path: tmp.clone(),
        source,
    })?;
    rename(&tmp, &path)
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp-{}", std::process::id()));
    path.with_file_name(name)
}

fn rename(from: &Path, to: &Path) -> Result<()> {
    std::fs::rename(from, to).map_err(|source| MedusaError::Io {
        path: to.to_path_buf(),
        source,
    })
}

fn f32_bytes(v: Vec<f32>) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Loads heads from a folder (`medusa_lm_head.safetensors` [+ `config.json`]) or a
/// `.safetensors` file, checking them against the base model's `hidden_size` and `vocab_size`.
pub fn load<B: Backend>(
    path: &Path,
    hidden_size: usize,
    vocab_size: usize,
    dtype: DType,
    device: &B::Device,
) -> Result<(MedusaHeads<B>, HeadsMetadata)> {
    let (weights_path, config_path) = if path.is_dir() {
        (path.join(WEIGHTS_FILE), Some(path.join(CONFIG_FILE)))
    } else {
        (path.to_path_buf(), None)
    };
    if !weights_path.is_file() {
        return Err(ckpt_err(
            path,
            format!(
                "no heads there: expected a folder holding {WEIGHTS_FILE} (as `cargo run -p \
                 train` writes) or a .safetensors file"
            ),
        ));
    }
    let metadata = match config_path.filter(|p| p.is_file()) {
        Some(p) => {
            let text = std::fs::read_to_string(&p).map_err(|source| MedusaError::Io {
                path: p.clone(),
                source,
            })?;
            let file: ConfigFile = serde_json::from_str(&text)
                .map_err(|e| ckpt_err(&p, format!("bad config: {e}")))?;
            file.metadata
        }
        None => HeadsMetadata::default(),
    };
    let mut src =
        SafetensorsWeights::<B>::open_files(std::slice::from_ref(&weights_path), dtype, device)?;
    let shapes = src.tensor_shapes();

    // Infer K and L from the names ({h}.{l}.linear.weight, {h}.{L}.weight).
    let mut head_ids = BTreeSet::new();
    for name in shapes.keys() {
        let h = name
            .split('.')
            .next()
            .and_then(|h| h.parse::<usize>().ok())
            .ok_or_else(|| ckpt_err(&weights_path, format!("unexpected tensor {name:?}")))?;
        head_ids.insert(h);
    }
    let num_heads = head_ids.len();
    if num_heads == 0 || head_ids.iter().copied().ne(0..num_heads) {
        return Err(ckpt_err(
            &weights_path,
            format!("head indices must be 0..K, found {head_ids:?}"),
        ));
    }
    let num_layers = (0..)
        .take_while(|l| shapes.contains_key(&format!("0.{l}.linear.weight")))
        .count();
    let share_lm_head = !shapes.contains_key(&format!("0.{num_layers}.weight"));
    if let Some(found) = shapes.get("0.0.linear.weight")
        && found[1] != hidden_size
    {
        return Err(ckpt_err(
            &weights_path,
            format!(
                "heads have hidden size {} but the base model has {hidden_size}",
                found[1]
            ),
        ));
    }
    if let Some(found) = shapes.get(&format!("0.{num_layers}.weight"))
        && found[0] != vocab_size
    {
        return Err(ckpt_err(
            &weights_path,
            format!(
                "heads have vocabulary {} but the base model has {vocab_size}",
                found[0]
            ),
        ));
    }
    let mut heads = Vec::with_capacity(num_heads);
    for h in 0..num_heads {
        let mut blocks = Vec::with_capacity(num_layers);
        for l in 0..num_layers {
            let linear = Proj::load(
                &mut src,
                &format!("{h}.{l}.linear"),
                hidden_size,
                hidden_size,
                true,
            )?;
            blocks.push(ResBlock { linear });
        }
        let lm_head = if share_lm_head {
            None
        } else {
            Some(Proj::load(
                &mut src,
                &format!("{h}.{num_layers}"),
                hidden_size,
                vocab_size,
                false,
            )?)
        };
        heads.push(MedusaHead { blocks, lm_head });
    }
    src.finish()?;
    Ok((MedusaHeads { heads }, metadata))
}
