//! Reading GGUF files (llama.cpp's format) and converting a Llama GGUF into a Hugging Face model
//! folder: `config.json`, `model.safetensors` (dequantised, Hugging Face tensor layout) and
//! `tokenizer.json` rebuilt from the GGUF vocabulary.
//!
//! Only what Llama-family GGUFs use is implemented: metadata of every GGUF value type, and tensors
//! in F32, F16, BF16, Q4_0, Q4_1 and Q8_0.

use std::{
    collections::BTreeMap,
    fs::File,
    path::{Path, PathBuf},
};

use half::{bf16, f16};
use memmap2::Mmap;
use serde_json::{Value, json};

use crate::{
    config::{LlamaConfig, TokenIds},
    error::{Error, Result},
};

const GGUF_MAGIC: &[u8; 4] = b"GGUF";

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    /// Unsigned 8-bit integer (GGUF value type 0).
    U8(u8),
    /// Signed 8-bit integer (type 1).
    I8(i8),
    /// Unsigned 16-bit integer (type 2).
    U16(u16),
    /// Signed 16-bit integer (type 3).
    I16(i16),
    /// Unsigned 32-bit integer (type 4).
    U32(u32),
    /// Signed 32-bit integer (type 5).
    I32(i32),
    /// Unsigned 64-bit integer (type 10).
    U64(u64),
    /// Signed 64-bit integer (type 11).
    I64(i64),
    /// 32-bit float (type 6).
    F32(f32),
    /// 64-bit float (type 12).
    F64(f64),
    /// Boolean, one byte (type 7).
    Bool(bool),
    /// UTF-8 string (type 8).
    String(String),
    /// Array of values of one type (type 9), e.g. the vocabulary in `tokenizer.ggml.tokens`.
    Array(Vec<GgufValue>),
}

impl GgufValue {
    /// The value as a `u64`, if it is a non-negative integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U8(v) => Some(v as u64),
            GgufValue::U16(v) => Some(v as u64),
            GgufValue::U32(v) => Some(v as u64),
            GgufValue::U64(v) => Some(v),
            GgufValue::I8(v) if v >= 0 => Some(v as u64),
            GgufValue::I16(v) if v >= 0 => Some(v as u64),
            GgufValue::I32(v) if v >= 0 => Some(v as u64),
            GgufValue::I64(v) if v >= 0 => Some(v as u64),
            _ => None,
        }
    }

    /// The value as an `f64`, if it is a float or a non-negative integer. An f32 goes through its
    /// shortest decimal form, so 1e-5 stays 1e-5.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            // Through the shortest decimal form, so 1e-5 stored as f32 reads back as 1e-5 (the
            // value the original config.json held) rather than 9.99999974e-6.
            GgufValue::F32(v) => v.to_string().parse().ok(),
            GgufValue::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    /// The string, if the value is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// The elements, if the value is an array.
    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// ggml tensor types this reader can dequantise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    /// 32-bit float (ggml type 0).
    F32,
    /// 16-bit IEEE float (ggml type 1).
    F16,
    /// bfloat16 (ggml type 30).
    BF16,
    /// Blocks of 32 4-bit values with an f16 scale `d`: `x = d * (q - 8)` (ggml type 2).
    Q4_0,
    /// Blocks of 32 4-bit values, f16 scale `d` and minimum `m`: `x = d * q + m` (ggml type 3).
    Q4_1,
    /// Blocks of 32 signed 8-bit values with an f16 scale `d`: `x = d * q` (ggml type 8).
    Q8_0,
}

impl GgmlType {
    fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            8 => GgmlType::Q8_0,
            30 => GgmlType::BF16,
            _ => return None,
        })
    }

    /// (elements per block, bytes per block)
    fn block(self) -> (usize, usize) {
        match self {
            GgmlType::F32 => (1, 4),
            GgmlType::F16 | GgmlType::BF16 => (1, 2),
            GgmlType::Q4_0 => (32, 18),
            GgmlType::Q4_1 => (32, 20),
            GgmlType::Q8_0 => (32, 34),
        }
    }
}

/// One tensor's header.
#[derive(Debug, Clone)]
pub struct GgufTensorInfo {
    /// GGUF tensor name, e.g. `blk.0.attn_q.weight`.
    pub name: String,
    /// Shape in PyTorch order (outermost first), i.e. GGUF's `ne` reversed.
    pub shape: Vec<usize>,
    /// Raw ggml type id; [`GgmlType`] lists those that can be dequantised.
    pub ggml_type: u32,
    /// Byte offset from the start of the data section.
    pub offset: u64,
}

/// A memory-mapped GGUF file.
pub struct GgufFile {
    path: PathBuf,
    mmap: Mmap,
    /// Header key/value pairs, e.g. `general.architecture` or `llama.context_length`.
    pub metadata: BTreeMap<String, GgufValue>,
    /// Tensor headers, in file order.
    pub tensors: Vec<GgufTensorInfo>,
    data_start: usize,
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> std::result::Result<&'a [u8], String> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        match end {
            Some(end) => {
                let s = &self.buf[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => Err(format!(
                "truncated: needed {n} bytes at offset {} of {}",
                self.pos,
                self.buf.len()
            )),
        }
    }
    fn u8(&mut self) -> std::result::Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> std::result::Result<u16, String> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().unwrap()))
    }
    fn u32(&mut self) -> std::result::Result<u32, String> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> std::result::Result<u64, String> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn string(&mut self) -> std::result::Result<String, String> {
        let len = self.u64()? as usize;
        let bytes = self.take(len)?;
        String::from_utf8(bytes.to_vec()).map_err(|e| format!("invalid UTF-8 string: {e}"))
    }
    fn value(&mut self, ty: u32) -> std::result::Result<GgufValue, String> {
        Ok(match ty {
            0 => GgufValue::U8(self.u8()?),
            1 => GgufValue::I8(self.u8()? as i8),
            2 => GgufValue::U16(self.u16()?),
            3 => GgufValue::I16(self.u16()? as i16),
            4 => GgufValue::U32(self.u32()?),
            5 => GgufValue::I32(self.u32()? as i32),
            6 => GgufValue::F32(f32::from_bits(self.u32()?)),
            7 => GgufValue::Bool(self.u8()? != 0),
            8 => GgufValue::String(self.string()?),
            9 => {
                let elem = self.u32()?;
                let n = self.u64()? as usize;
                // Guard against absurd counts from a corrupt header before allocating.
                if n > self.buf.len() {
                    return Err(format!("array of {n} elements cannot fit in the file"));
                }
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value(elem)?);
                }
                GgufValue::Array(items)
            }
            10 => GgufValue::U64(self.u64()?),
            11 => GgufValue::I64(self.u64()? as i64),
            12 => GgufValue::F64(f64::from_bits(self.u64()?)),
            other => return Err(format!("unknown metadata value type {other}")),
        })
    }
}

impl GgufFile {
    /// Maps and parses the header of a GGUF file (versions 2 and 3).
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: read-only mapping of a file we do not modify while it is mapped.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let err = |message: String| Error::Gguf {
            path: path.to_path_buf(),
            message,
        };
        let (metadata, tensors, data_start) = Self::parse(&mmap).map_err(err)?;
        let this = Self {
            path: path.to_path_buf(),
            mmap,
            metadata,
            tensors,
            data_start,
        };
        for t in &this.tensors {
            this.tensor_bytes(t)?; // validates type and bounds up front
        }
        Ok(this)
    }

    #[allow(clippy::type_complexity)]
    fn parse(
        buf: &[u8],
    ) -> std::result::Result<(BTreeMap<String, GgufValue>, Vec<GgufTensorInfo>, usize), String>
    {
        let mut c = Cursor { buf, pos: 0 };
        if c.take(4)? != GGUF_MAGIC {
            return Err("not a GGUF file (bad magic)".into());
        }
        let version = c.u32()?;
        if !(2..=3).contains(&version) {
            return Err(format!("unsupported GGUF version {version}"));
        }
        let n_tensors = c.u64()? as usize;
        let n_kv = c.u64()? as usize;
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = c.string()?;
            let ty = c.u32()?;
            let value = c.value(ty).map_err(|e| format!("metadata {key:?}: {e}"))?;
            metadata.insert(key, value);
        }
        let mut tensors = Vec::with_capacity(n_tensors.min(1 << 16));
        for _ in 0..n_tensors {
            let name = c.string()?;
            let n_dims = c.u32()? as usize;
            if n_dims > 4 {
                return Err(format!("tensor {name:?} has {n_dims} dimensions"));
            }
            let mut ne = Vec::with_capacity(n_dims);
            for _ in 0..n_dims {
                ne.push(c.u64()? as usize);
            }
            ne.reverse();
            let ggml_type = c.u32()?;
            let offset = c.u64()?;
            tensors.push(GgufTensorInfo {
                name,
                shape: ne,
                ggml_type,
                offset,
            });
        }
        let alignment = metadata
            .get("general.alignment")
            .and_then(GgufValue::as_u64)
            .unwrap_or(32) as usize;
        let data_start = c.pos.div_ceil(alignment) * alignment;
        Ok((metadata, tensors, data_start))
    }

    /// The header of the tensor named `name` (GGUF naming), if present.
    pub fn tensor(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    fn tensor_bytes(&self, t: &GgufTensorInfo) -> Result<(&[u8], GgmlType)> {
        let err = |message: String| Error::Gguf {
            path: self.path.clone(),
            message: format!("tensor {:?}: {message}", t.name),
        };
        let ty = GgmlType::from_id(t.ggml_type)
            .ok_or_else(|| err(format!("unsupported ggml type {}", t.ggml_type)))?;
        let n: usize = t.shape.iter().product();
        let (block, bytes) = ty.block();
        if !n.is_multiple_of(block) {
            return Err(err(format!(
                "{n} elements is not a multiple of block {block}"
            )));
        }
        let len = n / block * bytes;
        let start = self.data_start + t.offset as usize;
        let end = start + len;
        if end > self.mmap.len() {
            return Err(err(format!(
                "data {start}..{end} lies beyond the end of the file ({} bytes): truncated?",
                self.mmap.len()
            )));
        }
        Ok((&self.mmap[start..end], ty))
    }

    /// Dequantises a tensor to f32, in row-major order of [`GgufTensorInfo::shape`].
    pub fn dequantize(&self, t: &GgufTensorInfo) -> Result<Vec<f32>> {
        let (bytes, ty) = self.tensor_bytes(t)?;
        Ok(dequantize(bytes, ty))
    }
}

/// Dequantises raw ggml blocks.
pub fn dequantize(bytes: &[u8], ty: GgmlType) -> Vec<f32> {
    let f16_at = |b: &[u8]| f16::from_le_bytes([b[0], b[1]]).to_f32();
    match ty {
        GgmlType::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect(),
        GgmlType::F16 => bytes.chunks_exact(2).map(f16_at).collect(),
        GgmlType::BF16 => bytes
            .chunks_exact(2)
            .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        // Q4_0: f16 scale d, 16 bytes of nibbles; x = d * (q - 8). Low nibbles are elements
        // 0..16 of the block, high nibbles 16..32.
        GgmlType::Q4_0 => {
            let mut out = Vec::with_capacity(bytes.len() / 18 * 32);
            for block in bytes.chunks_exact(18) {
                let d = f16_at(&block[0..2]);
                let qs = &block[2..];
                out.extend(qs.iter().map(|q| d * ((q & 0x0F) as f32 - 8.0)));
                out.extend(qs.iter().map(|q| d * ((q >> 4) as f32 - 8.0)));
            }
            out
        }
        // Q4_1: f16 scale d, f16 minimum m, 16 bytes of nibbles; x = d * q + m.
        GgmlType::Q4_1 => {
            let mut out = Vec::with_capacity(bytes.len() / 20 * 32);
            for block in bytes.chunks_exact(20) {
                let d = f16_at(&block[0..2]);
                let m = f16_at(&block[2..4]);
                let qs = &block[4..];
                out.extend(qs.iter().map(|q| d * (q & 0x0F) as f32 + m));
                out.extend(qs.iter().map(|q| d * (q >> 4) as f32 + m));
            }
            out
        }
        // Q8_0: f16 scale d, 32 signed bytes; x = d * q.
        GgmlType::Q8_0 => {
            let mut out = Vec::with_capacity(bytes.len() / 34 * 32);
            for block in bytes.chunks_exact(34) {
                let d = f16_at(&block[0..2]);
                out.extend(block[2..].iter().map(|&q| d * (q as i8) as f32));
            }
            out
        }
    }
}

/// Undoes llama.cpp's RoPE permutation of Q/K rows. `convert_hf_to_gguf.py` reorders each head's
/// rows from Hugging Face's "rotate half" layout to interleaved pairs; within a head of `hd` rows,
/// GGUF row `2i + j` is Hugging Face row `j * hd/2 + i`.
pub fn unpermute_rope_rows(data: &[f32], n_head: usize, rows: usize, cols: usize) -> Vec<f32> {
    let hd = rows / n_head;
    let half = hd / 2;
    let mut out = vec![0.0; data.len()];
    for h in 0..n_head {
        for i in 0..half {
            for j in 0..2 {
                let src = h * hd + 2 * i + j;
                let dst = h * hd + j * half + i;
                out[dst * cols..(dst + 1) * cols]
                    .copy_from_slice(&data[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

/// Hugging Face name of a GGUF Llama tensor.
fn hf_name(gguf: &str) -> Option<String> {
    let fixed = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(n) = fixed {
        return Some(n.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, part) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let hf = match part {
        "attn_norm.weight" => "input_layernorm.weight",
        "attn_q.weight" => "self_attn.q_proj.weight",
        "attn_k.weight" => "self_attn.k_proj.weight",
        "attn_v.weight" => "self_attn.v_proj.weight",
        "attn_output.weight" => "self_attn.o_proj.weight",
        "ffn_norm.weight" => "post_attention_layernorm.weight",
        "ffn_gate.weight" => "mlp.gate_proj.weight",
        "ffn_up.weight" => "mlp.up_proj.weight",
        "ffn_down.weight" => "mlp.down_proj.weight",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}"))
}

/// What [`convert_to_hf`] produced.
#[derive(Debug, Clone)]
pub struct Converted {
    /// The model config, as written to `config.json`.
    pub config: LlamaConfig,
    /// Number of tensors written to `model.safetensors`.
    pub num_tensors: usize,
}

/// Converts a Llama-architecture GGUF into a Hugging Face folder at `out_dir` (which must not
/// exist yet; the folder is written under a temporary name and renamed at the end, so an
/// interrupted conversion never leaves a half-written model behind).
pub fn convert_to_hf(gguf_path: &Path, out_dir: &Path) -> Result<Converted> {
    let gguf = GgufFile::open(gguf_path)?;
    let err = |message: String| Error::Gguf {
        path: gguf_path.to_path_buf(),
        message,
    };
    let arch = gguf
        .metadata
        .get("general.architecture")
        .and_then(GgufValue::as_str)
        .unwrap_or("");
    if arch != "llama" {
        return Err(err(format!(
            "architecture {arch:?} is not supported (only \"llama\")"
        )));
    }
    let config = config_from_gguf(&gguf).map_err(err)?;
    let tokenizer = tokenizer_from_gguf(&gguf).map_err(err)?;

    let parent = out_dir.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    let tmp = parent.join(format!(
        ".{}.tmp-{}",
        out_dir
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("model"),
        std::process::id()
    ));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;

    // Tensors, dequantised to f32 in Hugging Face layout.
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for t in &gguf.tensors {
        let name =
            hf_name(&t.name).ok_or_else(|| err(format!("unexpected tensor {:?}", t.name)))?;
        let mut data = gguf.dequantize(t)?;
        let (rows, cols) = (t.shape[0], t.shape.get(1).copied().unwrap_or(1));
        if t.name.ends_with("attn_q.weight") {
            data = unpermute_rope_rows(&data, config.num_attention_heads, rows, cols);
        } else if t.name.ends_with("attn_k.weight") {
            data = unpermute_rope_rows(&data, config.num_kv_heads(), rows, cols);
        }
        tensors.push((name, t.shape.clone(), bytemuck_f32(&data)));
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(name, shape, bytes)| {
            let view =
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                    .expect("shape matches byte length by construction");
            (name.clone(), view)
        })
        .collect();
    let mut st_meta = std::collections::HashMap::new();
    st_meta.insert("format".to_string(), "pt".to_string());
    let st_path = tmp.join("model.safetensors");
    safetensors::serialize_to_file(views, Some(st_meta), &st_path).map_err(|e| {
        Error::Safetensors {
            path: st_path.clone(),
            message: e.to_string(),
        }
    })?;

    write_json(&tmp.join("config.json"), &config_json(&config))?;
    write_json(&tmp.join("tokenizer.json"), &tokenizer)?;
    let template = gguf
        .metadata
        .get("tokenizer.chat_template")
        .and_then(GgufValue::as_str);
    write_json(
        &tmp.join("tokenizer_config.json"),
        &tokenizer_config_json(&gguf, template),
    )?;
    write_json(
        &tmp.join("generation_config.json"),
        &json!({
            "bos_token_id": config.bos_token_id,
            "eos_token_id": config.eos_token_id,
        }),
    )?;

    if out_dir.exists() {
        std::fs::remove_dir_all(out_dir).map_err(|e| Error::io(out_dir, e))?;
    }
    std::fs::rename(&tmp, out_dir).map_err(|e| Error::io(out_dir, e))?;
    Ok(Converted {
        config,
        num_tensors: tensors.len(),
    })
}

fn bytemuck_f32(data: &[f32]) -> Vec<u8> {
    data.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn write_json(path: &Path, value: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).expect("JSON values serialise");
    std::fs::write(path, text).map_err(|e| Error::io(path, e))
}

fn config_from_gguf(g: &GgufFile) -> std::result::Result<LlamaConfig, String> {
    let get = |key: &str| {
        g.metadata
            .get(key)
            .ok_or_else(|| format!("metadata {key:?} is missing"))
    };
    let uint = |key: &str| -> std::result::Result<usize, String> {
        get(key)?
            .as_u64()
            .map(|v| v as usize)
            .ok_or_else(|| format!("metadata {key:?} is not an integer"))
    };
    let float = |key: &str| -> std::result::Result<f64, String> {
        get(key)?
            .as_f64()
            .ok_or_else(|| format!("metadata {key:?} is not a number"))
    };
    let n_vocab = match g
        .metadata
        .get("llama.vocab_size")
        .and_then(GgufValue::as_u64)
    {
        Some(v) => v as usize,
        None => get("tokenizer.ggml.tokens")?
            .as_array()
            .map(|a| a.len())
            .ok_or("tokenizer.ggml.tokens is not an array")?,
    };
    let hidden = uint("llama.embedding_length")?;
    let heads = uint("llama.attention.head_count")?;
    let tied = g.tensor("output.weight").is_none();
    let config = LlamaConfig {
        vocab_size: n_vocab,
        hidden_size: hidden,
        intermediate_size: uint("llama.feed_forward_length")?,
        num_hidden_layers: uint("llama.block_count")?,
        num_attention_heads: heads,
        num_key_value_heads: Some(uint("llama.attention.head_count_kv").unwrap_or(heads)),
        head_dim: Some(uint("llama.attention.key_length").unwrap_or(hidden / heads)),
        rms_norm_eps: float("llama.attention.layer_norm_rms_epsilon")?,
        rope_theta: float("llama.rope.freq_base").unwrap_or(10_000.0),
        rope_scaling: None,
        max_position_embeddings: uint("llama.context_length")?,
        tie_word_embeddings: tied,
        attention_bias: false,
        mlp_bias: false,
        hidden_act: "silu".into(),
        bos_token_id: uint("tokenizer.ggml.bos_token_id").ok().map(|v| v as u32),
        eos_token_id: uint("tokenizer.ggml.eos_token_id")
            .ok()
            .map(|v| TokenIds::One(v as u32)),
        model_type: Some("llama".into()),
        torch_dtype: Some("float32".into()),
    };
    config.validate().map_err(|e| e.to_string())?;
    Ok(config)
}

fn config_json(c: &LlamaConfig) -> Value {
    let mut v = serde_json::to_value(c).expect("config serialises");
    v["architectures"] = json!(["LlamaForCausalLM"]);
    v
}

/// Token types in `tokenizer.ggml.token_type` (llama.cpp's `llama_token_type`).
const TOKEN_TYPE_CONTROL: u64 = 3;
const TOKEN_TYPE_USER_DEFINED: u64 = 4;

/// Rebuilds a `tokenizers` JSON from the GGUF's byte-level BPE vocabulary and merges.
fn tokenizer_from_gguf(g: &GgufFile) -> std::result::Result<Value, String> {
    let get = |key: &str| {
        g.metadata
            .get(key)
            .ok_or_else(|| format!("metadata {key:?} is missing"))
    };
    let model = get("tokenizer.ggml.model")?.as_str().unwrap_or("");
    if model != "gpt2" {
        return Err(format!(
            "tokenizer model {model:?} is not supported (only byte-level BPE, \"gpt2\")"
        ));
    }
    let tokens: Vec<&str> = get("tokenizer.ggml.tokens")?
        .as_array()
        .ok_or("tokenizer.ggml.tokens is not an array")?
        .iter()
        .map(|v| v.as_str().ok_or("non-string token"))
        .collect::<std::result::Result<_, _>>()?;
    let merges: Vec<&str> = get("tokenizer.ggml.merges")?
        .as_array()
        .ok_or("tokenizer.ggml.merges is not an array")?
        .iter()
        .map(|v| v.as_str().ok_or("non-string merge"))
        .collect::<std::result::Result<_, _>>()?;
    let types: Vec<u64> = match g.metadata.get("tokenizer.ggml.token_type") {
        Some(v) => v
            .as_array()
            .ok_or("token_type is not an array")?
            .iter()
            .map(|t| t.as_u64().unwrap_or(1))
            .collect(),
        None => vec![1; tokens.len()],
    };
    let pre = g
        .metadata
        .get("tokenizer.ggml.pre")
        .and_then(GgufValue::as_str)
        .unwrap_or("default");
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    let pre_tokenizer = match pre {
        // SmolLM/SmolLM2 (and StarCoder): every digit is its own pre-token, then GPT-2 splitting.
        "smollm" | "starcoder" | "refact" => json!({
            "type": "Sequence",
            "pretokenizers": [{"type": "Digits", "individual_digits": true}, byte_level],
        }),
        "gpt2" | "default" => byte_level,
        "llama3" | "llama-bpe" => json!({
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT}, "behavior": "Isolated", "invert": false},
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false},
            ],
        }),
        other => return Err(format!("pre-tokenizer {other:?} is not supported")),
    };
    let vocab: serde_json::Map<String, Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.to_string(), json!(i)))
        .collect();
    let added: Vec<Value> = tokens
        .iter()
        .zip(&types)
        .enumerate()
        .filter(|(_, (_, ty))| matches!(**ty, TOKEN_TYPE_CONTROL | TOKEN_TYPE_USER_DEFINED))
        .map(|(i, (t, ty))| {
            json!({
                "id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                "normalized": false, "special": *ty == TOKEN_TYPE_CONTROL,
            })
        })
        .collect();
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": pre.starts_with("llama"),
            "vocab": vocab,
            "merges": merges,
        },
    }))
}

/// The pre-tokenizer split of Llama-3's `tokenizer.json`.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn tokenizer_config_json(g: &GgufFile, template: Option<&str>) -> Value {
    let token = |key: &str| -> Value {
        let id = g.metadata.get(key).and_then(GgufValue::as_u64);
        let tokens = g
            .metadata
            .get("tokenizer.ggml.tokens")
            .and_then(GgufValue::as_array);
        match (id, tokens) {
            (Some(id), Some(tokens)) => tokens
                .get(id as usize)
                .and_then(GgufValue::as_str)
                .map(|s| json!(s))
                .unwrap_or(Value::Null),
            _ => Value::Null,
        }
    };
    json!({
        "tokenizer_class": "GPT2Tokenizer",
        "bos_token": token("tokenizer.ggml.bos_token_id"),
        "eos_token": token("tokenizer.ggml.eos_token_id"),
        "unk_token": token("tokenizer.ggml.unknown_token_id"),
        "pad_token": token("tokenizer.ggml.padding_token_id"),
        "add_bos_token": false,
        "clean_up_tokenization_spaces": false,
        "model_max_length": 8192,
        "chat_template": template,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q4_1_dequantises_low_then_high_nibbles() {
        let mut block = Vec::new();
        block.extend(f16::from_f32(0.5).to_le_bytes());
        block.extend(f16::from_f32(-1.0).to_le_bytes());
        block.extend((0..16u8).map(|i| i | ((15 - i) << 4)));
        let out = dequantize(&block, GgmlType::Q4_1);
        assert_eq!(out.len(), 32);
        for i in 0..16 {
            assert_eq!(out[i], 0.5 * i as f32 - 1.0);
            assert_eq!(out[16 + i], 0.5 * (15 - i) as f32 - 1.0);
        }
    }

    #[test]
    fn q8_0_dequantises_signed_bytes() {
        let mut block = Vec::new();
        block.extend(f16::from_f32(0.25).to_le_bytes());
        block.extend((0..32).map(|i: i32| ((i - 16) as i8) as u8));
        let out = dequantize(&block, GgmlType::Q8_0);
        for (i, v) in out.iter().enumerate() {
            assert_eq!(*v, 0.25 * (i as f32 - 16.0));
        }
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        // llama.cpp: w.reshape(n_head, 2, hd/2, cols).swapaxes(1, 2).reshape(rows, cols)
        let (n_head, hd, cols) = (3, 8, 2);
        let rows = n_head * hd;
        let hf: Vec<f32> = (0..rows * cols).map(|v| v as f32).collect();
        let mut gguf = vec![0.0; hf.len()];
        for h in 0..n_head {
            for j in 0..2 {
                for i in 0..hd / 2 {
                    let src = h * hd + j * hd / 2 + i; // [h, j, i]
                    let dst = h * hd + i * 2 + j; // [h, i, j] after swapaxes
                    gguf[dst * cols..(dst + 1) * cols]
                        .copy_from_slice(&hf[src * cols..(src + 1) * cols]);
                }
            }
        }
        assert_eq!(unpermute_rope_rows(&gguf, n_head, rows, cols), hf);
    }

    #[test]
    fn rejects_non_gguf() {
        let dir = std::env::temp_dir().join(format!("gguf-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("x.gguf");
        std::fs::write(&p, b"not a gguf at all").unwrap();
        let e = GgufFile::open(&p).err().unwrap().to_string();
        assert!(e.contains("bad magic"), "{e}");
        std::fs::write(&p, b"GGUF\x03\x00\x00\x00\x01").unwrap();
        let e = GgufFile::open(&p).err().unwrap().to_string();
        assert!(e.contains("truncated"), "{e}");
    }
}
