//! Peak RSS and seconds of `rewire video edit` (FateZero, 20 steps, shapes-sd at 64×64) for
//! clips of 4, 16 and 64 frames, the whole clip as one batch (`--window 0`) and in windows of 8
//! frames (the default), with the inversion's stores kept in memory (the built-in
//! `rewrites/fatezero.ron`) and spilled to disk (`on: Disk`). Each run is its own process; its
//! peak RSS is what the command prints (VmHWM). One run per cell: read the ratios, not the
//! absolute numbers.
//!
//! Try it: `cargo bench --bench video_memory` (about 10 minutes on 2 cores);
//! `REWIRE_BENCH_FRAMES=4,16` for fewer.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

fn draw(dir: &Path, frames: usize) {
    std::fs::create_dir_all(dir).unwrap();
    for k in 0..frames {
        // A red circle crossing the picture left to right.
        let cx = 12.0 + 40.0 * k as f32 / (frames.max(2) - 1) as f32;
        let img = image::RgbImage::from_fn(64, 64, |x, y| {
            let (dx, dy) = (x as f32 + 0.5 - cx, y as f32 + 0.5 - 32.0);
            if dx * dx + dy * dy <= 10.9 * 10.9 {
                image::Rgb([215, 35, 35])
            } else {
                image::Rgb([238, 238, 232])
            }
        });
        img.save(dir.join(format!("f{k:03}.png"))).unwrap();
    }
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let counts: Vec<usize> = std::env::var("REWIRE_BENCH_FRAMES")
        .ok()
        .map(|v| v.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![4, 16, 64]);
    let tmp = tempfile::tempdir().unwrap();
    let recipe = std::fs::read_to_string(root.join("rewrites/fatezero.ron")).unwrap();
    let disk = tmp.path().join("fatezero_disk.ron");
    std::fs::write(
        &disk,
        recipe.replace("reduce: Each)", "reduce: Each, on: Disk)"),
    )
    .unwrap();
    println!(
        "| frames | window | stores | seconds | peak RSS | stored in memory (per window) | on disk |"
    );
    println!("|---|---|---|---|---|---|---|");
    for &n in &counts {
        let frames = tmp.path().join(format!("in{n}"));
        draw(&frames, n);
        let cells = [
            ("0", "memory", None),
            ("0", "disk", Some(&disk)),
            ("8", "memory", None),
            ("8", "disk", Some(&disk)),
        ];
        for (window, what, recipe) in cells {
            let out = tmp.path().join(format!("out{n}{what}{window}.gif"));
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_rewire"));
            cmd.args(["video", "edit"])
                .arg(root.join("models/shapes-sd"))
                .arg(&frames)
                .args([
                    "--source-prompt",
                    "a red circle",
                    "--prompt",
                    "a blue circle",
                    "--window",
                    window,
                    "-o",
                ])
                .arg(&out);
            if let Some(r) = recipe {
                cmd.arg("--recipe").arg(r);
            }
            let t0 = Instant::now();
            let o = cmd.output().unwrap();
            let secs = t0.elapsed().as_secs_f64();
            let err = String::from_utf8_lossy(&o.stderr);
            if !o.status.success() {
                println!(
                    "| {n} | {window} | {what} | failed: {} |",
                    err.trim().replace('\n', " ")
                );
                continue;
            }
            // "…; stored maps per window: X MiB in memory, Y MiB on disk; peak RSS Z MiB"
            let field = |after: &str, until: &str| {
                err.split(after)
                    .nth(1)
                    .and_then(|r| r.split(until).next())
                    .unwrap_or("?")
                    .trim()
                    .to_string()
            };
            println!(
                "| {n} | {window} | {what} | {secs:.1} | {} | {} MiB | {} MiB |",
                field("peak RSS", "\n"),
                field("stored maps per window:", "MiB in memory"),
                field("in memory,", "MiB on disk"),
            );
        }
    }
}
