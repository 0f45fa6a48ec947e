//! A bounded mutation fuzzer over the loaders of untrusted input (issue 14): the recipe parser
//! and validator, the plan loader (byte edits, and field edits resealed with a recomputed
//! checksum), the UNet and scheduler configs, and safetensors files. Each case must end in `Ok`
//! or an error, never a panic. Seeds are fixed, so a failure reproduces; the case counts and the
//! panics found are printed (`cargo test --release --test fuzz -- --nocapture`).
//!
//! `REWIRE_FUZZ_SCALE=N` multiplies the number of cases (default 1: about 10 s in release).

mod common;
use common::*;
use rewire::compile::plan_file::PlanFile;
use rewire::compile::{CompileOptions, compile_graph};
use rewire::graph::InputSpec;
use rewire::recipe::Source;
use rewire::unet::UNet;
use std::path::Path;
use std::sync::Mutex;

/// xorshift64*: small, seeded, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.below(v.len())]
    }
}

/// Interesting numbers: edges of every limit and type.
const NUMBERS: &[&str] = &[
    "0",
    "1",
    "-1",
    "2",
    "3",
    "7",
    "8",
    "77",
    "255",
    "1000",
    "65536",
    "1000000000",
    "4294967296",
    "18446744073709551615",
    "-9223372036854775808",
    "1e9",
    "1e38",
    "3.4e38",
    "-3.4e38",
    "1e-45",
    "0.5",
    "-0.0",
    "NaN",
    "inf",
    "\"\"",
    "\"x\"",
    "[]",
    "{}",
    "null",
    "true",
];

/// Mutates text: replace a number-like token, delete, duplicate or insert a span, flip a byte.
fn mutate_text(rng: &mut Rng, text: &str) -> Vec<u8> {
    let mut b = text.as_bytes().to_vec();
    for _ in 0..1 + rng.below(3) {
        if b.is_empty() {
            b.extend_from_slice(rng.pick(NUMBERS).as_bytes());
            continue;
        }
        let at = rng.below(b.len());
        match rng.below(6) {
            0 => {
                // Replace the run of digits (or a word) at `at` by an interesting number.
                let is_tok = |c: u8| c.is_ascii_alphanumeric() || c == b'.' || c == b'-';
                let (mut s, mut e) = (at, at);
                while s > 0 && is_tok(b[s - 1]) {
                    s -= 1;
                }
                while e < b.len() && is_tok(b[e]) {
                    e += 1;
                }
                b.splice(s..e, rng.pick(NUMBERS).bytes());
            }
            1 => {
                let n = rng.below(16).min(b.len() - at);
                b.drain(at..at + n);
            }
            2 => {
                let n = rng.below(64).min(b.len() - at);
                let span = b[at..at + n].to_vec();
                b.splice(at..at, span);
            }
            3 => b[at] = rng.next() as u8,
            4 => {
                let ins: &&[u8] = rng.pick(INSERTS);
                b.splice(at..at, ins.iter().copied());
            }
            _ => {
                let n = NUMBERS[rng.below(NUMBERS.len())];
                b.splice(at..at, n.bytes());
            }
        }
    }
    b
}

/// Bytes worth inserting into text: brackets, quotes, comments, broken UTF-8.
const INSERTS: &[&[u8]] = &[
    b"(",
    b")",
    b"[",
    b"]",
    b",",
    b"\"",
    b"\xff",
    b"\xe2\x82",
    b"Some(",
    b"//",
    b"/*",
    b"\\",
];

static PANICS: Mutex<Vec<String>> = Mutex::new(Vec::new());
static IN_CASE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
static LAST: Mutex<String> = Mutex::new(String::new());

/// Runs one case; a panic is recorded (message and input) instead of unwinding.
fn case(what: &str, input: &[u8], f: impl FnOnce()) {
    use std::sync::atomic::Ordering;
    IN_CASE.store(true, Ordering::SeqCst);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    IN_CASE.store(false, Ordering::SeqCst);
    if r.is_err() {
        PANICS.lock().unwrap().push(format!(
            "{what}: {}\ninput: {}",
            LAST.lock().unwrap(),
            String::from_utf8_lossy(&input[..input.len().min(400)])
        ));
    }
}

fn scale() -> usize {
    std::env::var("REWIRE_FUZZ_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1)
}

#[test]
fn fuzz_loaders_never_panic() {
    // Silence the default hook's backtraces; panics are collected and reported below.
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if IN_CASE.load(std::sync::atomic::Ordering::SeqCst) {
            *LAST.lock().unwrap() = info.to_string();
        } else {
            default(info);
        }
    }));
    let mut rng = Rng(0x5EED_0014);
    let mut counts: Vec<(&str, usize)> = Vec::new();
    let unet = UNet::open(&tiny_sd()).unwrap();
    let base = unet.graph(InputSpec::new(2, 16, 16)).unwrap();
    let dir = tempfile::tempdir().unwrap();

    // ---- recipes: parse, then validate and compile (with and without steps and words) ----
    let recipes: Vec<String> = std::fs::read_dir(root().join("rewrites"))
        .unwrap()
        .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
        .collect();
    let n = 2500 * scale();
    for i in 0..n {
        let base_text = rng_pick(&mut rng, &recipes);
        let bytes = mutate_text(&mut rng, base_text);
        let steps = [None, Some(1), Some(5), Some(50)][i % 4];
        case("recipe", &bytes, || {
            let Ok(text) = rewire::limits::utf8(bytes.clone()) else {
                return;
            };
            if let Ok(src) = Source::parse(&text, Path::new("fuzz.ron")) {
                let words = (i % 3 == 0).then(|| {
                    [
                        ("red".to_string(), vec![2]),
                        ("circle".to_string(), vec![3]),
                    ]
                    .into_iter()
                    .collect()
                });
                let opts = CompileOptions {
                    fuse: i % 2 == 0,
                    steps,
                    words,
                    frames: Some(2),
                    ..Default::default()
                };
                let _ = compile_graph(&src, &base, &opts);
            }
        });
    }
    counts.push(("recipes", n));

    // ---- plans: byte edits (checksum refusals), and field edits resealed ----
    let src = Source::load(&root().join("rewrites/reweight_renorm.ron")).unwrap();
    let c = compile_graph(&src, &base, &CompileOptions::fused()).unwrap();
    let plan = PlanFile::new(&c, unet.fingerprint(), src.fingerprint());
    let good = serde_json::to_value(&plan).unwrap();
    let path = dir.path().join("fuzz.plan");
    let fp = unet.fingerprint();
    let n = 300 * scale();
    for i in 0..n {
        let bytes = if i % 4 == 0 {
            mutate_text(&mut rng, &serde_json::to_string(&good).unwrap())
        } else {
            let mut v = good.clone();
            for _ in 0..1 + rng.below(3) {
                mutate_json(&mut rng, &mut v);
            }
            reseal(v)
        };
        std::fs::write(&path, &bytes).unwrap();
        case("plan", &bytes, || {
            if let Ok(p) = PlanFile::load(&path, &fp)
                && let Ok(c) = p.compiled(&path, &base)
            {
                // A plan that validates must also lower and run on the model's weights.
                for seg in &c.segments {
                    let _ = rewire::exec::Plan::lower(
                        &seg.graph,
                        &unet.weights,
                        &device(),
                        Default::default(),
                    );
                }
            }
        });
    }
    counts.push(("plans", n));

    // ---- UNet configs: resolve and build the graph ----
    let cfg_text = std::fs::read_to_string(tiny_sd().join("unet/config.json")).unwrap();
    let cfg: serde_json::Value = serde_json::from_str(&cfg_text).unwrap();
    let n = 1500 * scale();
    for i in 0..n {
        let bytes = if i % 3 == 0 {
            mutate_text(&mut rng, &cfg_text)
        } else {
            let mut v = cfg.clone();
            for _ in 0..1 + rng.below(3) {
                mutate_json(&mut rng, &mut v);
            }
            serde_json::to_vec(&v).unwrap()
        };
        case("unet config", &bytes, || {
            let p = Path::new("config.json");
            let Ok(text) = rewire::limits::utf8(bytes.clone()) else {
                return;
            };
            if let Ok(r) =
                rewire::config::UNetConfig::from_json(&text, p).and_then(|c| c.resolve(p))
            {
                let _ = rewire::unet::build(&r, InputSpec::new(1 + i % 3, 8, 8));
            }
        });
    }
    counts.push(("unet configs", n));

    // ---- scheduler configs: build, set timesteps, step once ----
    let sch_text =
        std::fs::read_to_string(tiny_sd().join("scheduler/scheduler_config.json")).unwrap();
    let sch: serde_json::Value = serde_json::from_str(&sch_text).unwrap();
    let names = ["ddim", "pndm", "euler", "dpmpp2m"];
    let n = 1500 * scale();
    for i in 0..n {
        let mut v = sch.clone();
        for _ in 0..1 + rng.below(3) {
            mutate_json(&mut rng, &mut v);
        }
        let bytes = serde_json::to_vec(&v).unwrap();
        let steps = [1, 2, 3, 10, 50, 999, 1000, 1001][i % 8];
        let name = names[i % 4];
        case("scheduler config", &bytes, || {
            use rewire::scheduler::{Scheduler, SchedulerConfig};
            let p = Path::new("scheduler_config.json");
            let Ok(cfg) = SchedulerConfig::from_json(std::str::from_utf8(&bytes).unwrap(), p)
            else {
                return;
            };
            let Ok(mut s) = Scheduler::from_name(name, &cfg) else {
                return;
            };
            if s.set_timesteps(steps).is_ok() && s.check_schedule().is_ok() {
                let ts = s.timesteps().to_vec();
                let x = vec![0.5f32; 16];
                let _ = s.scale_model_input(&x, ts[0]);
                let _ = s.step(&x, ts[0], &x);
            }
        });
    }
    counts.push(("scheduler configs", n));

    // ---- safetensors files: open and read every tensor ----
    let st = std::fs::read(case_path("baseline")).unwrap();
    let st_path = dir.path().join("fuzz.safetensors");
    let n = 1500 * scale();
    for _ in 0..n {
        let mut b = st.clone();
        let header_len = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
        for _ in 0..1 + rng.below(3) {
            // Mostly the header (where the structure is), sometimes the length or the data.
            let at = match rng.below(4) {
                0 => rng.below(8),
                1 => rng.below(b.len()),
                _ => 8 + rng.below(header_len),
            }
            .min(b.len() - 1);
            let r = rng.next();
            match r % 3 {
                0 => b[at] = (r >> 8) as u8,
                1 => b[at] = *rng.pick(b"0123456789,:[]{}\"-e."),
                _ if rng.below(4) == 0 => b.truncate(at.max(1)),
                _ => b[at] = b' ',
            }
            if b.len() <= 8 {
                break;
            }
        }
        std::fs::write(&st_path, &b).unwrap();
        case("safetensors", &b[..b.len().min(8 + header_len)], || {
            if let Ok(f) = rewire::weights::TensorFiles::open(&st_path) {
                let names: Vec<String> = f.names().map(String::from).collect();
                for name in names {
                    let _ = f.read_f32(&name);
                }
                let _ = rewire::io::read_from(&f, &st_path);
            }
        });
    }
    counts.push(("safetensors files", n));

    let _ = std::panic::take_hook();
    let panics = PANICS.lock().unwrap();
    let total: usize = counts.iter().map(|(_, n)| n).sum();
    for (what, n) in &counts {
        println!("fuzz: {n} {what}");
    }
    println!("fuzz: {total} cases, {} panics", panics.len());
    assert!(
        panics.is_empty(),
        "{} panics, first ones:\n{}",
        panics.len(),
        panics
            .iter()
            .take(5)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n---\n")
    );
}

fn rng_pick<'a>(rng: &mut Rng, v: &'a [String]) -> &'a str {
    v[rng.below(v.len())].as_str()
}

fn case_path(name: &str) -> std::path::PathBuf {
    common::case(name)
}

/// Replaces one random leaf (or drops or duplicates an array element) of a JSON value.
fn mutate_json(rng: &mut Rng, v: &mut serde_json::Value) {
    use serde_json::Value;
    let stop = rng.below(4) == 0;
    match v {
        Value::Object(m) if !m.is_empty() && !stop => {
            let k = m.keys().nth(rng.below(m.len())).unwrap().clone();
            mutate_json(rng, m.get_mut(&k).unwrap());
        }
        Value::Array(a) if !a.is_empty() && !stop => {
            let i = rng.below(a.len());
            match rng.below(8) {
                0 => {
                    a.remove(i);
                }
                1 => {
                    let e = a[i].clone();
                    a.insert(i, e);
                }
                _ => mutate_json(rng, &mut a[i]),
            }
        }
        _ => {
            *v = serde_json::from_str(match *rng.pick(NUMBERS) {
                "NaN" | "inf" => "1e308",
                n => n,
            })
            .unwrap_or(Value::Null);
        }
    }
}

/// Recomputes a plan's checksum (SHA-256 of its JSON with an empty checksum) as anyone can.
fn reseal(mut v: serde_json::Value) -> Vec<u8> {
    use sha2::Digest;
    if !v.is_object() {
        return serde_json::to_vec(&v).unwrap();
    }
    v["checksum"] = "".into();
    let Ok(typed) = serde_json::from_value::<PlanFile>(v.clone()) else {
        return serde_json::to_vec(&v).unwrap();
    };
    let sum = format!(
        "{:x}",
        sha2::Sha256::digest(serde_json::to_vec(&typed).unwrap())
    );
    v["checksum"] = sum.into();
    serde_json::to_vec(&v).unwrap()
}
