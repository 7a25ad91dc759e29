//! The report: Markdown in the seed's layout (System, Config, Baseline, Speculative, Speedup),
//! JSON with every number, and an SVG chart of tokens/s and accepted length.

use std::{fmt::Write as _, path::Path};

use anyhow::{Context, Result};
use serde::Serialize;

use crate::{
    e2e::{PromptResult, Summary},
    kernel::Row,
    scale::ScaleResult,
    system::System,
};

/// Everything one run measured.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub system: System,
    pub config: serde_json::Value,
    pub notes: Vec<String>,
    pub kernel: Option<Vec<Row>>,
    pub e2e: Option<E2eReport>,
    pub scale: Option<ScaleResult>,
}

#[derive(Debug, Clone, Serialize)]
pub struct E2eReport {
    pub model: String,
    pub dtype: String,
    pub heads: String,
    pub tree: String,
    pub tree_nodes: usize,
    /// Prompts the run set out to decode (more than `overall.prompts` in a partial report).
    pub planned_prompts: usize,
    /// Tolerance of the lossless check, in units in the last place of each position's largest
    /// logit magnitude.
    pub tie_ulps: f32,
    pub overall: Summary,
    pub per_category: Vec<Summary>,
    pub prompts: Vec<PromptResult>,
}

impl Report {
    /// Writes `report.md`, `report.json` and `chart.svg` into `dir`.
    pub fn write(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let write = |name: &str, text: String| {
            let path = dir.join(name);
            let tmp = dir.join(format!(".{name}.tmp"));
            std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
            std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))
        };
        write("report.json", serde_json::to_string_pretty(self)?)?;
        write("report.md", self.markdown())?;
        if let Some(e2e) = &self.e2e {
            write("chart.svg", chart(e2e))?;
        }
        Ok(())
    }

    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let sys = &self.system;
        let _ = writeln!(s, "# Decoding benchmark\n");
        let _ = writeln!(s, "## System\n");
        let _ = writeln!(s, "| | |\n|---|---|");
        let _ = writeln!(s, "| Date | {} |", sys.date_utc);
        let _ = writeln!(
            s,
            "| Platform | {} ({} cores: {}) |",
            sys.os, sys.cpu_cores, sys.cpu
        );
        let _ = writeln!(s, "| Device | {} |", sys.device);
        let _ = writeln!(s, "| GPU | {} |", sys.gpu.as_deref().unwrap_or("none"));
        let _ = writeln!(s, "| Burn / CubeCL | {} / {} |", sys.burn, sys.cubecl);
        let _ = writeln!(
            s,
            "| Commit | {} |",
            sys.git_commit.as_deref().unwrap_or("unknown")
        );
        let _ = writeln!(
            s,
            "\n## Config\n\n```json\n{}\n```",
            serde_json::to_string_pretty(&self.config).unwrap_or_default()
        );
        for n in &self.notes {
            let _ = writeln!(s, "\n> {n}");
        }
        if let Some(rows) = &self.kernel {
            let _ = writeln!(s, "\n## Attention kernel\n");
            let _ = writeln!(
                s,
                "Median over samples after warm-up, device synchronised before each clock read. Error: relative L2 against an f64 reference computed on the host from the same (rounded) inputs, over up to 64 query rows per head.\n"
            );
            let _ = writeln!(
                s,
                "| case | shape (b, h/h_kv, q×kv, d) | dtype | implementation | ms | speedup vs naive | TFLOP/s | GB/s | rel. error |"
            );
            let _ = writeln!(s, "|---|---|---|---|---:|---:|---:|---:|---:|");
            for r in rows {
                let c = &r.case;
                let f = |v: Option<f64>, p: usize| v.map_or("–".into(), |v| format!("{v:.p$}"));
                let _ = writeln!(
                    s,
                    "| {} | {}, {}/{}, {}×{}, {}{} | {} | {} | {} | {} | {} | {} | {} |",
                    c.name,
                    c.batch,
                    c.heads,
                    c.kv_heads,
                    c.q_len,
                    c.kv_len,
                    c.head_dim,
                    if c.causal { ", causal" } else { "" },
                    c.dtype,
                    r.implementation,
                    f(r.timing.map(|t| t.median_ms), 4),
                    f(r.speedup_vs_naive, 2),
                    f(r.tflops, 2),
                    f(r.gbps, 1),
                    r.rel_err.map_or("–".into(), |e| format!("{e:.1e}")),
                );
            }
        }
        if let Some(e) = &self.e2e {
            let o = &e.overall;
            let _ = writeln!(s, "\n## End-to-end decoding: {} ({})\n", e.model, e.dtype);
            let _ = writeln!(
                s,
                "Greedy decoding, batch 1, {} prompts; Medusa heads: {}; tree: {} ({} nodes).\n",
                o.prompts, e.heads, e.tree, e.tree_nodes
            );
            if o.prompts < e.planned_prompts {
                let _ = writeln!(
                    s,
                    "**Partial: {} of {} prompts decoded when this report was written.**\n",
                    o.prompts, e.planned_prompts
                );
            }
            let _ = writeln!(s, "### Baseline (autoregressive)\n");
            let _ = writeln!(
                s,
                "| tokens | seconds | tokens/s |\n|---:|---:|---:|\n| {} | {:.2} | {:.1} |",
                o.ar_tokens, o.ar_seconds, o.ar_tokens_per_s
            );
            let _ = writeln!(s, "\n### Speculative (Medusa)\n");
            let heads: Vec<String> = o
                .head_acceptance
                .iter()
                .enumerate()
                .map(|(k, a)| format!("head {}: {:.3}", k + 1, a))
                .collect();
            let _ = writeln!(
                s,
                "| tokens | seconds | tokens/s | steps | mean accepted length | acceptance per head |\n|---:|---:|---:|---:|---:|---|"
            );
            let _ = writeln!(
                s,
                "| {} | {:.2} | {:.1} | {} | {:.3} | {} |",
                o.medusa_tokens,
                o.medusa_seconds,
                o.medusa_tokens_per_s,
                o.medusa_steps,
                o.mean_accepted_length,
                heads.join(", ")
            );
            let _ = writeln!(s, "\n### Speedup\n");
            let _ = writeln!(
                s,
                "**{:.2}×** tokens/s (Medusa over autoregressive). Lossless check: **{}** ({} of {} prompts token-identical to autoregressive; {}).",
                o.speedup,
                if o.lossless { "PASS" } else { "FAIL" },
                o.identical_prompts,
                o.prompts,
                if o.identical_prompts == o.prompts {
                    "exact".to_string()
                } else {
                    format!(
                        "in the prompts that differ, every Medusa token, scored teacher-forced, within {} {} ulps (of the position's largest logit magnitude) of its position's top logit and each output ending as greedy decoding ends: {}",
                        e.tie_ulps,
                        e.dtype,
                        if o.lossless { "yes" } else { "NO" }
                    )
                }
            );
            let _ = writeln!(
                s,
                "\nA Medusa step took {:.2} ms and an autoregressive token {:.2} ms (each run's seconds over its steps or tokens, prefill included): a step costs **{:.2} decode steps** and yields {:.3} tokens.",
                o.medusa_step_ms, o.ar_token_ms, o.step_cost, o.mean_accepted_length
            );
            let _ = writeln!(
                s,
                "\nTeacher-forced greedy check (one forward over prompt + output; gap = top logit minus the emitted token's, in {} ulps of the position's largest logit magnitude): Medusa tokens at most {:.2} ulps below the top, autoregressive tokens at most {:.2}. Exact arithmetic would give 0 for both; the autoregressive figure is the rounding distance between the decode path and the teacher-forced forward alone.",
                e.dtype, o.medusa_max_gap_ulps, o.ar_max_gap_ulps
            );
            if o.identical_prompts < o.prompts {
                let diverged: Vec<String> = e
                    .prompts
                    .iter()
                    .filter(|p| !p.identical)
                    .map(|p| {
                        let gap = p
                            .mismatch_logit_gap
                            .map_or(String::new(), |g| format!(", logit gap {g:.3}"));
                        let verdict = if p.lossless() {
                            String::new()
                        } else if p.medusa_well_terminated {
                            format!(
                                ", **{} tokens beyond the tolerance**",
                                p.medusa_greedy.beyond_tolerance
                            )
                        } else {
                            format!(
                                ", **{} tokens beyond the tolerance, output ends where greedy decoding would not**",
                                p.medusa_greedy.beyond_tolerance
                            )
                        };
                        let at = if p.medusa_greedy.max_gap_ulps > 0.0 {
                            format!(" of |logit| {:.1}", p.medusa_greedy.max_gap_magnitude)
                        } else {
                            String::new()
                        };
                        format!(
                            "#{} at token {}{gap} (max {:.2} ulps{at}{verdict})",
                            p.id,
                            p.first_mismatch.unwrap_or(0),
                            p.medusa_greedy.max_gap_ulps
                        )
                    })
                    .collect();
                let _ = writeln!(s, "\nDiverged from autoregressive: {}", diverged.join(", "));
                let _ = writeln!(
                    s,
                    "\nLogit gap: the autoregressive token's logit minus Medusa's at the first difference, from a fresh forward over the common prefix; a gap near zero is a near-tie that the dtype's rounding decided differently in the two paths. Max ulps: the largest teacher-forced gap of that prompt's Medusa tokens, in ulps of its position's largest logit magnitude (given)."
                );
            }
            let _ = writeln!(s, "\n### Per category\n");
            let _ = writeln!(
                s,
                "| category | prompts | AR tok/s | Medusa tok/s | speedup | mean accepted length | lossless |\n|---|---:|---:|---:|---:|---:|---|"
            );
            for c in &e.per_category {
                let _ = writeln!(
                    s,
                    "| {} | {} | {:.1} | {:.1} | {:.2}× | {:.3} | {} |",
                    c.name,
                    c.prompts,
                    c.ar_tokens_per_s,
                    c.medusa_tokens_per_s,
                    c.speedup,
                    c.mean_accepted_length,
                    if c.lossless { "yes" } else { "NO" }
                );
            }
            let _ = writeln!(s, "\n![tokens/s and accepted length](chart.svg)");
        }
        if let Some(sc) = &self.scale {
            let _ = writeln!(
                s,
                "\n## {} at batch 1 on random weights ({})\n",
                sc.preset, sc.dtype
            );
            let _ = writeln!(
                s,
                "{:.2} B parameters, {:.2} GB of weights read per token; device copy bandwidth measured in this run: {:.0} GB/s, so the ceiling is {:.1} tokens/s. Prompt {} tokens, {} new tokens.\n",
                sc.parameters as f64 / 1e9,
                sc.weight_bytes_per_token / 1e9,
                sc.bandwidth_gbps,
                sc.ceiling_tokens_per_s,
                sc.prompt_tokens,
                sc.new_tokens
            );
            let _ = writeln!(
                s,
                "| path | ms/token | tokens/s | fraction of ceiling |\n|---|---:|---:|---:|"
            );
            for d in &sc.decode {
                let _ = writeln!(
                    s,
                    "| {} | {:.2} | {:.1} | {:.1}% |",
                    d.label,
                    d.ms_per_token,
                    d.tokens_per_s,
                    100.0 * d.fraction_of_ceiling
                );
            }
            if !sc.linear.is_empty() {
                let _ = writeln!(
                    s,
                    "\nEach projection shape alone (weights rotated over copies larger than L2; GB/s = weight bytes / median time; {:.0} GB/s measured above):\n",
                    sc.bandwidth_gbps
                );
                let _ = writeln!(
                    s,
                    "| projection | rows | k × n | per forward | ours ms | ours host ms | ours GB/s | stock ms | stock GB/s |\n|---|---:|---|---:|---:|---:|---:|---:|---:|"
                );
                for l in &sc.linear {
                    let (stock_ms, stock_gbps) = match (&l.stock, l.stock_gbps) {
                        (Some(t), Some(g)) => (format!("{:.4}", t.median_ms), format!("{g:.0}")),
                        _ => ("—".into(), "—".into()),
                    };
                    let _ = writeln!(
                        s,
                        "| {} | {} | {} × {} | {} | {:.4} | {:.4} | {:.0} | {} | {} |",
                        l.name,
                        l.rows,
                        l.k,
                        l.n,
                        l.per_forward,
                        l.ours.median_ms,
                        l.ours.host_ms,
                        l.ours_gbps,
                        stock_ms,
                        stock_gbps
                    );
                }
                let projections_ms: f64 = sc
                    .linear
                    .iter()
                    .filter(|l| l.rows == 1)
                    .map(|l| l.per_forward as f64 * l.ours.median_ms)
                    .sum();
                if let Some(ours) = sc.decode.first() {
                    let _ = writeln!(
                        s,
                        "\nThe projections of one decode step, timed alone, add up to {:.2} ms of the {:.2} ms a token takes with our kernels; the rest is attention, norms, RoPE, the cache, sampling and dispatch.",
                        projections_ms, ours.ms_per_token
                    );
                }
            }
            let f = &sc.decode_forward;
            let _ = writeln!(
                s,
                "\nDispatch: one decode forward (no read-back) keeps the host busy {:.2} ms enqueueing it and the device done after {:.2} ms ({:.0}% host); the host share close to 100% means the GPU waits for dispatch.",
                f.host_ms,
                f.median_ms,
                100.0 * f.host_ms / f.median_ms
            );
            let f = &sc.tree_forward;
            let _ = writeln!(
                s,
                "\nThe same for one tree forward ({} nodes, hidden states only): host {:.2} ms, device done after {:.2} ms ({:.0}% host).",
                sc.tree_nodes,
                f.host_ms,
                f.median_ms,
                100.0 * f.host_ms / f.median_ms
            );
            let _ = writeln!(
                s,
                "\nOne kernel launch (a one-row RMSNorm, back to back) costs {:.1} µs ({:.1} µs of it on the calling thread).",
                1e3 * sc.launch.median_ms,
                1e3 * sc.launch.host_ms
            );
            let _ = writeln!(
                s,
                "\nOne Medusa verification step ({} tree nodes + LM head + argmax) takes {:.2} ms and the {}-head Medusa forward {:.2} ms, against {:.2} ms for one plain decode step: **{:.2}×** the cost of a decode step.",
                sc.tree_nodes,
                sc.tree_step.median_ms,
                sc.medusa_heads,
                sc.medusa_heads_step.median_ms,
                sc.decode_step.median_ms,
                sc.tree_vs_decode
            );
            let _ = writeln!(
                s,
                "\nWith SwiGLU in its own launch before each down projection (`BURN_DECODE_MLP_FOLD=0`), the verification step takes {:.2} ms ({:.3}× the step above; the same path where a tree step does not fold, e.g. large products on tensor cores).",
                sc.tree_step_swiglu_apart.median_ms,
                sc.tree_step_swiglu_apart.median_ms / sc.tree_step.median_ms
            );
            if let Some(e) = &self.e2e {
                let acc = e.overall.mean_accepted_length;
                let _ = writeln!(
                    s,
                    "\n*Projection* (not a measurement): with the mean accepted length measured above on {} ({:.3} tokens/step), Medusa at this scale would give about {:.1} tokens/s ({:.2}× the plain decode).",
                    e.model,
                    acc,
                    acc / ((sc.tree_step.median_ms + sc.medusa_heads_step.median_ms) / 1e3),
                    acc / sc.tree_vs_decode
                );
            }
        }
        s
    }
}

/// A two-panel bar chart: tokens/s (AR vs Medusa) and mean accepted length, per category.
fn chart(e: &E2eReport) -> String {
    let rows: Vec<&Summary> = e
        .per_category
        .iter()
        .chain(std::iter::once(&e.overall))
        .collect();
    let (w, h, left, top, bottom) = (900.0, 420.0, 60.0, 40.0, 70.0);
    let panel_w = (w - left - 40.0) / 2.0;
    let plot_h = h - top - bottom;
    let mut s = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">"#
    );
    s += r#"<rect width="100%" height="100%" fill="white"/>"#;
    let panel = |s: &mut String,
                 x0: f64,
                 title: &str,
                 values: &[(f64, f64)],
                 max: f64,
                 labels: (&str, &str)| {
        let _ = write!(
            s,
            r#"<text x="{}" y="20" font-size="14">{title}</text>"#,
            x0
        );
        let group = panel_w / rows.len() as f64;
        let bar = group * 0.35;
        for (i, ((a, b), r)) in values.iter().zip(&rows).enumerate() {
            let gx = x0 + i as f64 * group;
            for (j, (v, color)) in [(*a, "#8c8c8c"), (*b, "#2a6fdb")].iter().enumerate() {
                if v.is_nan() {
                    continue;
                }
                let bh = plot_h * v / max;
                let x = gx + group * 0.12 + j as f64 * bar;
                let _ = write!(
                    s,
                    r#"<rect x="{x:.1}" y="{:.1}" width="{bar:.1}" height="{bh:.1}" fill="{color}"/>"#,
                    top + plot_h - bh
                );
                let _ = write!(
                    s,
                    r#"<text x="{:.1}" y="{:.1}" font-size="9" text-anchor="middle">{v:.1}</text>"#,
                    x + bar / 2.0,
                    top + plot_h - bh - 3.0
                );
            }
            let _ = write!(
                s,
                r#"<text x="{:.1}" y="{:.1}" transform="rotate(30 {:.1} {:.1})">{}</text>"#,
                gx + 4.0,
                top + plot_h + 14.0,
                gx + 4.0,
                top + plot_h + 14.0,
                r.name
            );
        }
        let _ = write!(
            s,
            r#"<line x1="{x0}" y1="{}" x2="{}" y2="{}" stroke="black"/>"#,
            top + plot_h,
            x0 + panel_w,
            top + plot_h
        );
        let _ = write!(
            s,
            r##"<rect x="{}" y="28" width="10" height="10" fill="#8c8c8c"/><text x="{}" y="37">{}</text><rect x="{}" y="28" width="10" height="10" fill="#2a6fdb"/><text x="{}" y="37">{}</text>"##,
            x0 + panel_w - 200.0,
            x0 + panel_w - 186.0,
            labels.0,
            x0 + panel_w - 100.0,
            x0 + panel_w - 86.0,
            labels.1
        );
    };
    let tps: Vec<(f64, f64)> = rows
        .iter()
        .map(|r| (r.ar_tokens_per_s, r.medusa_tokens_per_s))
        .collect();
    let max_tps = tps.iter().map(|(a, b)| a.max(*b)).fold(1.0, f64::max) * 1.15;
    panel(
        &mut s,
        left,
        "tokens/s",
        &tps,
        max_tps,
        ("autoregressive", "Medusa"),
    );
    let acc: Vec<(f64, f64)> = rows
        .iter()
        .map(|r| (f64::NAN, r.mean_accepted_length))
        .collect();
    let max_acc = acc.iter().map(|(_, b)| *b).fold(1.0, f64::max) * 1.15;
    panel(
        &mut s,
        left + panel_w + 40.0,
        "mean accepted length (tokens/step)",
        &acc,
        max_acc,
        ("", "Medusa"),
    );
    s += "</svg>\n";
    s
}
