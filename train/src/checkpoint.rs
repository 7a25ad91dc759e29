//! Training checkpoints: the heads, the optimizer state (AdamW moments and step counts, keyed by
//! parameter id) and the trainer's own state (step, loss history, fingerprint of the run) in one
//! file, written to a temporary name and renamed, so a kill at any moment leaves either the
//! previous checkpoint or the new one.
//!
//! Layout: a 16-byte magic, then three length-prefixed (u64 little-endian) sections: the state as
//! JSON, then the heads' and the optimizer's Burn records (named MessagePack, full precision, so
//! a resumed run continues from bit-identical values).

use std::{
    io::{BufReader, BufWriter, Read, Write},
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};
use burn::{
    module::AutodiffModule,
    optim::Optimizer,
    record::{FullPrecisionSettings, NamedMpkBytesRecorder, Recorder},
    tensor::backend::AutodiffBackend,
};
use serde::{Serialize, de::DeserializeOwned};

const MAGIC: &[u8; 16] = b"medusa-train-v1\n";

/// File name of the checkpoint inside the output folder.
pub const FILE: &str = "checkpoint.bin";

type Rec = NamedMpkBytesRecorder<FullPrecisionSettings>;

/// Writes `state`, `module` and `optim` to `path` atomically.
pub fn save<B, M, O, S>(path: &Path, state: &S, module: &M, optim: &O) -> Result<()>
where
    B: AutodiffBackend,
    M: AutodiffModule<B> + Clone,
    O: Optimizer<M, B>,
    S: Serialize,
{
    let recorder = Rec::default();
    let state = serde_json::to_vec(state)?;
    let module = Recorder::<B>::record(&recorder, module.clone().into_record(), ())
        .map_err(|e| anyhow::anyhow!("recording the heads: {e}"))?;
    let optim = Recorder::<B>::record(&recorder, optim.to_record(), ())
        .map_err(|e| anyhow::anyhow!("recording the optimizer: {e}"))?;

    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let tmp = tmp_path(path);
    let write = || -> std::io::Result<()> {
        let file = std::fs::File::create(&tmp)?;
        let mut out = BufWriter::new(file);
        out.write_all(MAGIC)?;
        for section in [&state, &module, &optim] {
            out.write_all(&(section.len() as u64).to_le_bytes())?;
            out.write_all(section)?;
        }
        out.into_inner().map_err(|e| e.into_error())?.sync_all()
    };
    write().with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

/// Reads a checkpoint written by [`save`] into freshly built `module` and `optim` (same shapes).
pub fn load<B, M, O, S>(path: &Path, module: M, optim: O, device: &B::Device) -> Result<(S, M, O)>
where
    B: AutodiffBackend,
    M: AutodiffModule<B>,
    O: Optimizer<M, B>,
    S: DeserializeOwned,
{
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut input = BufReader::new(file);
    let mut magic = [0u8; 16];
    input
        .read_exact(&mut magic)
        .with_context(|| format!("reading {}", path.display()))?;
    if &magic != MAGIC {
        bail!("{} is not a training checkpoint", path.display());
    }
    let mut section = || -> Result<Vec<u8>> {
        let mut len = [0u8; 8];
        input.read_exact(&mut len)?;
        let mut bytes = vec![0u8; u64::from_le_bytes(len) as usize];
        input.read_exact(&mut bytes)?;
        Ok(bytes)
    };
    let context = || format!("{} is truncated", path.display());
    let state = section().with_context(context)?;
    let module_bytes = section().with_context(context)?;
    let optim_bytes = section().with_context(context)?;

    let recorder = Rec::default();
    let state: S = serde_json::from_slice(&state)
        .with_context(|| format!("{}: bad trainer state", path.display()))?;
    let module_record = Recorder::<B>::load(&recorder, module_bytes, device)
        .map_err(|e| anyhow::anyhow!("{}: heads: {e}", path.display()))?;
    let optim_record = Recorder::<B>::load(&recorder, optim_bytes, device)
        .map_err(|e| anyhow::anyhow!("{}: optimizer: {e}", path.display()))?;
    Ok((
        state,
        module.load_record(module_record),
        optim.load_record(optim_record),
    ))
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp-{}", std::process::id()));
    path.with_file_name(name)
}
