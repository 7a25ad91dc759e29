//! What the numbers were measured on.

use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct System {
    pub date_utc: String,
    pub os: String,
    pub cpu: String,
    pub cpu_cores: usize,
    pub device: String,
    pub gpu: Option<String>,
    pub burn: String,
    pub cubecl: String,
    pub git_commit: Option<String>,
}

impl System {
    pub fn collect(device: &str) -> Self {
        let lock = include_str!("../../Cargo.lock");
        Self {
            date_utc: command("date", &["-u", "+%Y-%m-%d %H:%M UTC"]).unwrap_or_default(),
            os: format!("{} {}", std::env::consts::OS, std::env::consts::ARCH),
            cpu: std::fs::read_to_string("/proc/cpuinfo")
                .ok()
                .and_then(|s| {
                    s.lines()
                        .find(|l| l.starts_with("model name"))
                        .and_then(|l| l.split(':').nth(1))
                        .map(|s| s.trim().to_string())
                })
                .unwrap_or_else(|| "unknown".into()),
            cpu_cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            device: device.to_string(),
            gpu: gpu(),
            burn: locked_version(lock, "burn").unwrap_or_default(),
            cubecl: locked_version(lock, "cubecl").unwrap_or_default(),
            // The commit the binary was built from (see build.rs); the checkout it runs in
            // only when the build had no git.
            git_commit: Some(env!("BENCH_BUILD_COMMIT"))
                .filter(|c| !c.is_empty())
                .map(String::from)
                .or_else(|| command("git", &["rev-parse", "--short", "HEAD"])),
        }
    }
}

/// The card this process runs on: CUDA's device 0, which is the first of
/// `CUDA_VISIBLE_DEVICES` when that is set (nvidia-smi ignores it and lists every card).
fn gpu() -> Option<String> {
    let visible = std::env::var("CUDA_VISIBLE_DEVICES")
        .ok()
        .and_then(|v| v.split(',').next().map(|s| s.trim().to_string()))
        .filter(|s| !s.is_empty());
    let id = visible.map(|v| format!("--id={v}"));
    let mut args = vec![
        "--query-gpu=name,memory.total,driver_version",
        "--format=csv,noheader",
    ];
    args.extend(id.as_deref());
    let out = command("nvidia-smi", &args)?;
    let cards: Vec<&str> = out.lines().collect();
    Some(match cards.len() {
        1 => cards[0].to_string(),
        n => format!("{} (device 0 of {n} in the machine)", cards[0]),
    })
}

fn command(cmd: &str, args: &[&str]) -> Option<String> {
    let out = std::process::Command::new(cmd).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
}

/// The version of `name` recorded in `Cargo.lock`.
fn locked_version(lock: &str, name: &str) -> Option<String> {
    let needle = format!("name = \"{name}\"\nversion = \"");
    let start = lock.find(&needle)? + needle.len();
    let end = lock[start..].find('"')?;
    Some(lock[start..start + end].to_string())
}
