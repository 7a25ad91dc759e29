//! Registers, spills and occupancy of the CUDA kernels CubeCL compiled, read from its PTX cache.
//!
//! NVRTC (what CubeCL compiles with) reports no register counts, and the GPU machine has no CUDA
//! toolkit (no `ptxas -v`, no `cuobjdump`). The driver's own PTX compiler does report them: this
//! tool loads every cached PTX module with the JIT's verbose info log and asks the driver for each
//! kernel's registers, local memory and resident blocks per multiprocessor.
//!
//! ```text
//! cargo build --release -p bench --example ptx_info
//! ptx_info <cubecl cache folder, e.g. $BURN_DECODE_CACHE/cubecl> [entry-name filter]
//! ```

use std::ffi::{CStr, CString, c_int, c_uint, c_void};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use ciborium::Value;
use cudarc::driver::sys;

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let root = PathBuf::from(
        args.next()
            .context("usage: ptx_info <cache folder> [filter]")?,
    );
    let filter = args.next().unwrap_or_default();

    let mut modules = Vec::new();
    for chunk in find_chunks(&root)? {
        modules.extend(read_chunk(&chunk)?);
    }
    modules.retain(|m| m.entry.contains(&filter));
    if modules.is_empty() {
        bail!(
            "no cached PTX entry matching {filter:?} under {}",
            root.display()
        );
    }

    // The driver's compute cache would serve modules compiled before, without a JIT log.
    // SAFETY: no other thread exists yet.
    unsafe { std::env::set_var("CUDA_CACHE_DISABLE", "1") };
    // SAFETY: plain driver calls on one thread; every pointer handed over outlives the call.
    unsafe {
        if !sys::is_culib_present() {
            bail!("no CUDA driver on this machine (libcuda not found)");
        }
        check(sys::cuInit(0), "cuInit")?;
        let mut device = 0;
        check(sys::cuDeviceGet(&mut device, 0), "cuDeviceGet")?;
        let mut context = std::ptr::null_mut();
        check(
            sys::cuDevicePrimaryCtxRetain(&mut context, device),
            "cuDevicePrimaryCtxRetain",
        )?;
        check(sys::cuCtxSetCurrent(context), "cuCtxSetCurrent")?;
    }
    for module in &modules {
        report(module)?;
    }
    Ok(())
}

/// One cached kernel: entry point, dynamic shared memory it launches with, and its PTX.
struct CachedPtx {
    entry: String,
    shared_bytes: usize,
    ptx: Vec<u8>,
}

fn find_chunks(root: &Path) -> Result<Vec<PathBuf>> {
    let mut chunks = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in
            std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))?
        {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "cbor")
                && path.components().any(|c| c.as_os_str() == "ptx")
            {
                chunks.push(path);
            }
        }
    }
    Ok(chunks)
}

/// A chunk is a sequence of CBOR `{key, value: {entrypoint_name, shared_mem_bytes, ptx}}` records
/// (cubecl-common's compilation cache with cubecl-cuda's `PtxCacheEntry`).
fn read_chunk(path: &Path) -> Result<Vec<CachedPtx>> {
    let data = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let mut cursor = std::io::Cursor::new(data);
    let mut out = Vec::new();
    while (cursor.position() as usize) < cursor.get_ref().len() {
        // A record cut short (a process killed while appending) ends the chunk, as in CubeCL.
        let record: Value = match ciborium::de::from_reader(&mut cursor) {
            Ok(record) => record,
            Err(err) => {
                eprintln!("{}: stopping at a damaged record ({err})", path.display());
                break;
            }
        };
        let value = field(&record, "value").context("record without a value")?;
        let entry = field(value, "entrypoint_name")
            .and_then(Value::as_text)
            .context("record without an entry point")?
            .to_string();
        let shared_bytes = field(value, "shared_mem_bytes")
            .and_then(Value::as_integer)
            .and_then(|i| usize::try_from(i).ok())
            .unwrap_or(0);
        // `c_char` is signed on x86_64 and unsigned on aarch64: take either.
        let mut ptx = Vec::new();
        for v in field(value, "ptx")
            .and_then(Value::as_array)
            .context("record without PTX")?
        {
            let c = v.as_integer().and_then(|i| i16::try_from(i).ok());
            match c {
                Some(c @ -128..=255) => ptx.push(c as u8),
                _ => bail!("{}: a PTX byte out of range ({v:?})", path.display()),
            }
        }
        if ptx.last() != Some(&0) {
            ptx.push(0);
        }
        out.push(CachedPtx {
            entry,
            shared_bytes,
            ptx,
        });
    }
    Ok(out)
}

fn field<'a>(map: &'a Value, name: &str) -> Option<&'a Value> {
    map.as_map()?
        .iter()
        .find(|(k, _)| k.as_text() == Some(name))
        .map(|(_, v)| v)
}

/// Threads per block from the PTX's `.maxntid`/`.reqntid` directive (CubeCL writes one).
fn block_threads(ptx: &str) -> c_int {
    ptx.lines()
        .find_map(|l| {
            let l = l.trim();
            let rest = l
                .strip_prefix(".maxntid")
                .or_else(|| l.strip_prefix(".reqntid"))?;
            Some(
                rest.split(',')
                    .map(|d| d.trim().parse::<c_int>().unwrap_or(1))
                    .product(),
            )
        })
        .unwrap_or(128)
}

/// Loads one module with the JIT's verbose log and prints its kernel's resources (the CUDA
/// context is current on this thread).
fn report(module: &CachedPtx) -> Result<()> {
    const LOG: usize = 1 << 16;
    let mut info = vec![0u8; LOG];
    let mut error = vec![0u8; LOG];
    let mut options = [
        sys::CUjit_option::CU_JIT_INFO_LOG_BUFFER,
        sys::CUjit_option::CU_JIT_INFO_LOG_BUFFER_SIZE_BYTES,
        sys::CUjit_option::CU_JIT_ERROR_LOG_BUFFER,
        sys::CUjit_option::CU_JIT_ERROR_LOG_BUFFER_SIZE_BYTES,
        sys::CUjit_option::CU_JIT_LOG_VERBOSE,
    ];
    // The driver reads sizes and flags from the pointer values themselves.
    let mut values: [*mut c_void; 5] = [
        info.as_mut_ptr().cast(),
        std::ptr::without_provenance_mut(LOG),
        error.as_mut_ptr().cast(),
        std::ptr::without_provenance_mut(LOG),
        std::ptr::without_provenance_mut(1),
    ];
    let mut handle = std::ptr::null_mut();
    let loaded = unsafe {
        sys::cuModuleLoadDataEx(
            &mut handle,
            module.ptx.as_ptr().cast(),
            options.len() as c_uint,
            options.as_mut_ptr(),
            values.as_mut_ptr(),
        )
    };
    println!(
        "== {} (dynamic shared {} B)",
        module.entry, module.shared_bytes
    );
    for line in text(&info).lines().filter(|l| !l.trim().is_empty()) {
        println!("   {line}");
    }
    if loaded != sys::cudaError_enum::CUDA_SUCCESS {
        println!("   load failed: {loaded:?} {}", text(&error));
        return Ok(());
    }
    let name = CString::new(module.entry.as_str())?;
    let mut function = std::ptr::null_mut();
    check(
        unsafe { sys::cuModuleGetFunction(&mut function, handle, name.as_ptr()) },
        "cuModuleGetFunction",
    )?;
    let attribute = |a: sys::CUfunction_attribute| -> Result<c_int> {
        let mut v = 0;
        check(
            unsafe { sys::cuFuncGetAttribute(&mut v, a, function) },
            "cuFuncGetAttribute",
        )?;
        Ok(v)
    };
    use sys::CUfunction_attribute::*;
    let registers = attribute(CU_FUNC_ATTRIBUTE_NUM_REGS)?;
    let local = attribute(CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES)?;
    let static_shared = attribute(CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES)?;
    // CubeCL raises the dynamic shared-memory limit before launching large tiles; do the same
    // so the occupancy query sees the launch as it happens.
    check(
        unsafe {
            sys::cuFuncSetAttribute(
                function,
                CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                module.shared_bytes as c_int,
            )
        },
        "cuFuncSetAttribute",
    )?;
    let threads = block_threads(std::str::from_utf8(&module.ptx).unwrap_or(""));
    let mut blocks = 0;
    check(
        unsafe {
            sys::cuOccupancyMaxActiveBlocksPerMultiprocessor(
                &mut blocks,
                function,
                threads,
                module.shared_bytes,
            )
        },
        "cuOccupancyMaxActiveBlocksPerMultiprocessor",
    )?;
    println!(
        "   registers {registers}, local {local} B, static shared {static_shared} B, \
         {threads} threads/block, {blocks} blocks/SM = {} warps/SM",
        blocks * threads / 32
    );
    unsafe { sys::cuModuleUnload(handle) };
    Ok(())
}

fn text(buffer: &[u8]) -> String {
    CStr::from_bytes_until_nul(buffer)
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn check(result: sys::CUresult, what: &str) -> Result<()> {
    if result == sys::cudaError_enum::CUDA_SUCCESS {
        Ok(())
    } else {
        bail!("{what}: {result:?}")
    }
}
