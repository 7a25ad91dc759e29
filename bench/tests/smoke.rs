//! The benchmark binary on the CPU with tiny settings: the report files appear and agree with
//! each other, every number is present, and greedy Medusa reproduced the baseline.

use std::process::Command;

#[test]
fn bench_smoke_on_cpu() {
    let out = std::env::temp_dir().join(format!("bench-smoke-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let status = Command::new(env!("CARGO_BIN_EXE_bench"))
        .args([
            "--backend",
            "cpu",
            "--per-category",
            "1",
            "--max-new-tokens",
            "8",
            "--heads",
            "2",
        ])
        .args([
            "--tree",
            "[[0], [1], [0, 0], [0, 1]]",
            "--samples",
            "3",
            "--warmup",
            "1",
        ])
        .arg("--out")
        .arg(&out)
        .status()
        .expect("running the bench binary");
    assert!(status.success(), "bench exited with {status}");
    for f in ["report.md", "report.json", "chart.svg"] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    let kernel = json["kernel"].as_array().expect("kernel rows");
    assert!(!kernel.is_empty());
    for row in kernel {
        assert!(row["timing"]["median_ms"].as_f64().unwrap() > 0.0, "{row}");
        assert!(row["rel_err"].as_f64().unwrap() < 1e-4, "{row}");
    }
    let e2e = &json["e2e"];
    let overall = &e2e["overall"];
    assert_eq!(overall["lossless"], true);
    assert_eq!(overall["prompts"], 6, "one prompt per Spec-Bench category");
    // f32 on the CPU: exact, not only within the rounding tolerance.
    assert_eq!(overall["identical_prompts"], 6);
    for p in e2e["prompts"].as_array().unwrap() {
        let score = &p["medusa_greedy"];
        assert_eq!(
            score["tokens"], p["medusa_tokens"],
            "every token scored: {p}"
        );
        assert_eq!(score["beyond_tolerance"], 0, "{p}");
        assert_eq!(p["ar_greedy"]["tokens"], p["ar_tokens"], "{p}");
    }
    let tokens = overall["medusa_tokens"].as_u64().unwrap();
    assert_eq!(tokens, overall["ar_tokens"].as_u64().unwrap());
    let per_prompt: u64 = e2e["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["medusa_tokens"].as_u64().unwrap())
        .sum();
    assert_eq!(per_prompt, tokens, "per-prompt tokens add up to the total");
    let steps = overall["medusa_steps"].as_u64().unwrap();
    let mean = overall["mean_accepted_length"].as_f64().unwrap();
    assert!((mean - tokens as f64 / steps as f64).abs() < 1e-9);
    assert!(overall["ar_tokens_per_s"].as_f64().unwrap() > 0.0);
    assert_eq!(e2e["per_category"].as_array().unwrap().len(), 6);
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(md.contains("Lossless check") && md.contains("**PASS**"));
    assert!(
        md.contains(&format!("| {tokens} |")),
        "markdown shows the JSON's token count"
    );
}
