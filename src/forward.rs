//! One UNet forward on the tensors of a safetensors file (`rewire forward`): the graph a recipe
//! or a plan file makes for those inputs (the segment of `--step`), a reference pass that
//! records the K/V inputs the recipe's `Reference` rewrites read, and `out` written together
//! with the Store rewrites' maps, or nothing at all.
//!
//! Try it: `cargo run --release -- forward models/tiny-sd --inputs tests/fixtures/unet_cases/baseline.safetensors --out /tmp/out.safetensors`.

use crate::compile::plan_file::{PlanError, PlanFile};
use crate::compile::{self, CompileError, CompileOptions, Compiled};
use crate::exec::{ExecError, HostTensor, LowerOptions, Plan, WeightDtype};
use crate::graph::GraphError;
use crate::graph::keys::Key;
use crate::io::InputError;
use crate::recipe::{RecipeError, Source};
use crate::unet::{ModelError, UNet};
use crate::weights::{Staged, TensorFiles, WeightError, encode_f32, write_error};
use burn::tensor::Device;
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

/// Why a forward did not run or write.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("{path}: no `sample` or `reference_sample` tensor")]
    ReferenceSample {
        path: PathBuf,
        #[source]
        source: WeightError,
    },
    #[error(
        "recipe \"{recipe}\": step {step} is a cached step (Cache, rewrite {rewrite}: a full step every {interval} steps); a single forward has no cached features\n  hint: run the job (`rewire run --recipe ...`), or forward a full step (--step {})",
        .step - .step % .interval
    )]
    CachedStep {
        recipe: String,
        step: usize,
        rewrite: usize,
        interval: usize,
    },
    #[error("the compiled recipe has no graph")]
    NoGraph,
    #[error("recipe \"{0}\" has step ranges: say which step this forward is (--step I --steps N)")]
    NeedsStep(String),
    #[error("--step {step} is outside the run of {steps:?} steps")]
    StepOutside { step: usize, steps: Option<usize> },
    #[error(
        "the plan reads a reference pass: give --reference FILE or `reference_sample` in the inputs"
    )]
    NoReference,
    #[error("the graph has no `out` output")]
    NoOut,
    #[error("--store-out {0}: the recipe stores nothing (it has no Store rewrite)")]
    StoresNothing(PathBuf),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    Input(#[from] InputError),
    #[error(transparent)]
    Weights(#[from] WeightError),
    #[error(transparent)]
    Recipe(#[from] RecipeError),
    #[error(transparent)]
    Compile(#[from] CompileError),
    #[error(transparent)]
    Graph(#[from] GraphError),
    #[error(transparent)]
    Exec(#[from] ExecError),
}

/// What `rewire forward` was asked.
#[derive(Debug, Clone, Default)]
pub struct ForwardOptions {
    pub model: PathBuf,
    /// `sample`, `timestep`, `encoder_hidden_states` (+ `text_embeds`, `time_ids` for SDXL).
    pub inputs: PathBuf,
    /// Where `out` is written.
    pub out: PathBuf,
    pub recipe: Option<PathBuf>,
    /// A plan made by `rewire compile`.
    pub plan: Option<PathBuf>,
    /// Where the stores go (default: OUT with .store.safetensors).
    pub store_out: Option<PathBuf>,
    pub step: Option<usize>,
    pub steps: Option<usize>,
    pub weights: WeightDtype,
    pub no_fuse: bool,
    pub frames: Option<usize>,
    /// Inputs of the reference pass (default: the inputs file's `reference_sample`).
    pub reference: Option<PathBuf>,
}

/// What a forward wrote.
#[derive(Debug, Clone)]
pub struct Forwarded {
    /// The shape of `out`.
    pub shape: Vec<usize>,
    /// The stored maps' count and file, when the recipe stores.
    pub stores: Option<(usize, PathBuf)>,
    /// From the first pass to the files committed.
    pub seconds: f64,
}

/// The reference pass's inputs: `--reference FILE` (its `sample`, else `reference_sample`), or
/// the inputs file's `reference_sample`; timestep and encoder states from the main inputs
/// unless the reference file has its own.
fn reference_inputs(
    a: &ForwardOptions,
    main: &HashMap<String, HostTensor>,
) -> Result<Option<HashMap<String, HostTensor>>, ForwardError> {
    let (file, path) = match &a.reference {
        Some(p) => (TensorFiles::open(p)?, p.clone()),
        None => {
            let f = TensorFiles::open(&a.inputs)?;
            if !f.contains("reference_sample") {
                return Ok(None);
            }
            (f, a.inputs.clone())
        }
    };
    let name = if a.reference.is_some() && file.contains("sample") {
        "sample"
    } else {
        "reference_sample"
    };
    let (shape, data) = file
        .read_f32(name)
        .map_err(|source| ForwardError::ReferenceSample { path, source })?;
    let mut m = main.clone();
    m.retain(|k, _| crate::io::INPUT_NAMES.contains(&k.as_str()));
    m.insert("sample".into(), HostTensor::new(shape, data));
    for k in [
        "timestep",
        "encoder_hidden_states",
        "text_embeds",
        "time_ids",
    ] {
        if a.reference.is_some() && file.contains(k) {
            let (s, d) = file.read_f32(k)?;
            m.insert(k.into(), HostTensor::new(s, d));
        }
    }
    Ok(Some(m))
}

/// The recipe compiled for the inputs, or the plan file checked against them.
fn compiled(
    a: &ForwardOptions,
    plan_file: Option<&PlanFile>,
    base: &crate::graph::Graph,
    spec: crate::graph::InputSpec,
    reference: bool,
) -> Result<Option<Compiled>, ForwardError> {
    if let Some(r) = &a.recipe {
        let src = Source::load(r)?;
        let opts = CompileOptions {
            fuse: !a.no_fuse,
            steps: a.steps,
            words: None,
            require_bound_words: true,
            frames: a.frames,
            references: Some(if reference {
                vec!["reference".into()]
            } else {
                vec![]
            }),
            pass: None,
            passes: Vec::new(),
            stop_after: None,
        };
        Ok(Some(compile::compile_graph(&src, base, &opts)?))
    } else if let (Some(p), Some(plan)) = (&a.plan, plan_file) {
        plan.check_run(p, spec, a.steps, None)?;
        Ok(Some(plan.compiled(p, base)?))
    } else {
        Ok(None)
    }
}

/// Runs the forward `a` asks for on `device` and writes `out` and the stores, all or nothing.
pub fn forward(a: &ForwardOptions, device: &Device) -> Result<Forwarded, ForwardError> {
    let lower = LowerOptions {
        weights: a.weights,
        ..Default::default()
    };
    let unet = UNet::open(&a.model)?;
    // A plan is checked against the model before anything else is read.
    let plan_file = match &a.plan {
        Some(p) => Some(PlanFile::load(p, &unet.fingerprint())?),
        None => None,
    };
    let mut given = crate::io::read_forward_inputs(&a.inputs)?;
    let base = unet.graph(given.spec)?;
    let reference = reference_inputs(a, &given.tensors)?;
    let compiled = compiled(
        a,
        plan_file.as_ref(),
        &base,
        given.spec,
        reference.is_some(),
    )?;
    if let (Some(c), Some(d)) = (&compiled, compiled.as_ref().and_then(|c| c.cache.as_ref()))
        && let Some(i) = a.step
        && !d.full(i)
    {
        return Err(ForwardError::CachedStep {
            recipe: c.recipe.clone(),
            step: i,
            rewrite: d.rewrite,
            interval: d.interval,
        });
    }
    let graph = match &compiled {
        None => base.clone(),
        Some(c) => {
            let ranged = c.segments.iter().any(|s| s.steps.is_some());
            let seg = match (ranged, a.step) {
                (false, _) => c.segments.first().ok_or(ForwardError::NoGraph)?,
                (true, None) => return Err(ForwardError::NeedsStep(c.recipe.clone())),
                (true, Some(i)) => c.segment_for(i).ok_or(ForwardError::StepOutside {
                    step: i,
                    steps: c.steps,
                })?,
            };
            seg.graph.clone()
        }
    };
    let t0 = Instant::now();
    if let Some(c) = &compiled
        && !c.records.is_empty()
    {
        let Some(reference) = &reference else {
            return Err(ForwardError::NoReference);
        };
        // The reference pass records only the layers a rewrite reads.
        let recorder = c.recorder("reference")?;
        let rp = Plan::lower(&recorder, &unet.weights, device, lower)?;
        let recorded = rp.run_host(reference)?;
        for (k, v) in recorded {
            if matches!(Key::parse(&k), Key::Reference { .. }) {
                given.tensors.insert(k, v);
            }
        }
    }
    let plan = Plan::lower(&graph, &unet.weights, device, lower)?;
    let result = plan.run_host(&given.tensors)?;
    let y = result.get("out").ok_or(ForwardError::NoOut)?;
    write(a, y, &result, t0)
}

/// `out` and the stores, written together or not at all.
fn write(
    a: &ForwardOptions,
    y: &HostTensor,
    result: &HashMap<String, HostTensor>,
    t0: Instant,
) -> Result<Forwarded, ForwardError> {
    let mut staged = Staged::new();
    let out_bytes = encode_f32(&a.out, &[("out".into(), y.shape.clone(), y.data.clone())])?;
    staged
        .stage(&a.out, &out_bytes)
        .map_err(|e| write_error(&a.out, e))?;
    let mut stored: Vec<(String, Vec<usize>, Vec<f32>)> = result
        .iter()
        .filter(|(k, _)| Key::parse(k).store_parts().is_some())
        .map(|(k, v)| (k.clone(), v.shape.clone(), v.data.clone()))
        .collect();
    let stores = if !stored.is_empty() {
        stored.sort_by(|x, y| x.0.cmp(&y.0));
        let path = a
            .store_out
            .clone()
            .unwrap_or_else(|| a.out.with_extension("store.safetensors"));
        let bytes = encode_f32(&path, &stored)?;
        staged
            .stage(&path, &bytes)
            .map_err(|e| write_error(&path, e))?;
        staged.commit().map_err(|e| write_error(&path, e))?;
        Some((stored.len(), path))
    } else if let Some(p) = &a.store_out {
        return Err(ForwardError::StoresNothing(p.clone()));
    } else {
        staged.commit().map_err(|e| write_error(&a.out, e))?;
        None
    };
    Ok(Forwarded {
        shape: y.shape.clone(),
        stores,
        seconds: t0.elapsed().as_secs_f64(),
    })
}
