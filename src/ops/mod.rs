//! Op families, one module each. A family holds, for its ops, everything that is specific to
//! them: the name and arity ([`Family::name`], [`Family::arity`]), the parameter checks and
//! shape rule ([`Family::check_params`], [`Family::infer`]), the weight list (names relative to
//! the op's path, with shapes; the one list both the loader's check,
//! [`crate::graph::Graph::check`], and the lowering read), the FLOPs estimate, and the lowering
//! to a kernel plus that kernel's run. [`crate::graph::Op`]'s methods and
//! [`crate::exec::Kernel`]'s `lower`/`run` only dispatch here, so a new op touches three places:
//! its `Op` variant, its line in [`family`], and its family module here.
//!
//! Families: [`layout`] (inputs, outputs, reshapes, adds, concatenation, upsampling),
//! [`embed`] (the timestep projection), [`linear`] (linear, GEGLU feed-forward), [`conv`]
//! (convolution, resnet), [`norm`] (group norm, layer norm, SiLU), [`attention`] (attention and
//! its fused reweights, K/V gathering), [`probs`] (materialised attention probabilities),
//! [`tome`] (token merging).
//!
//! Try it: `cargo test --release --test parity` runs every family's kernel against diffusers.

pub mod attention;
pub mod conv;
pub mod embed;
pub mod layout;
pub mod linear;
pub mod norm;
pub mod probs;
pub mod tome;

use crate::exec::{Kernel, LowerOptions, Value};
use crate::graph::{Op, Shape};
use crate::weights::{WeightError, WeightSource};
use burn::tensor::Device;

/// What one op family knows about its ops. Each method is called only with ops of the family
/// (see [`family`]).
pub trait Family: Sync {
    /// The op's name, as error messages, plan files, `explain` and `rewire graph` spell it.
    fn name(&self, op: &Op) -> &'static str;

    /// The number of inputs the op takes.
    fn arity(&self, op: &Op) -> usize;

    /// Checks the op's own fields (no shapes involved): what a forged plan could carry that
    /// would divide by zero, loop forever or allocate without bound.
    fn check_params(&self, _op: &Op) -> Result<(), String> {
        Ok(())
    }

    /// The output shape from the input shapes; `Err` says what does not fit.
    fn infer(&self, op: &Op, inputs: &[&[usize]]) -> Result<Shape, String>;

    /// The weights the op reads, relative to its path, with their expected shapes.
    fn weights(&self, _op: &Op) -> Vec<(&'static str, Shape)> {
        vec![]
    }

    /// Estimated floating-point operations (multiply-adds count 2); by default one per output
    /// element.
    fn flops(&self, _op: &Op, _inputs: &[&[usize]], out: &[usize]) -> u64 {
        elements(out)
    }

    /// The kernel for the op, taking its weights from `w` (read through [`Family::weights`]).
    fn lower(&self, op: &Op, w: &mut Weights, dev: &Device, opts: LowerOptions) -> Kernel;
}

/// The family of an op.
pub fn family(op: &Op) -> &'static dyn Family {
    match op {
        Op::Input { .. }
        | Op::Output { .. }
        | Op::ToTokens
        | Op::ToImage { .. }
        | Op::Add { .. }
        | Op::Concat { .. }
        | Op::Upsample { .. }
        | Op::Reshape { .. } => &layout::Layout,
        Op::TimestepProj { .. } => &embed::Embed,
        Op::Linear { .. } | Op::FeedForward { .. } => &linear::Linear,
        Op::Conv2d { .. } | Op::Resnet { .. } => &conv::Conv,
        Op::GroupNorm { .. } | Op::LayerNorm { .. } | Op::Silu => &norm::Norm,
        Op::Attention(_)
        | Op::ScaleKeys { .. }
        | Op::AugmentQ { .. }
        | Op::AugmentK { .. }
        | Op::KvGather { .. } => &attention::Attention,
        Op::AttnProbs { .. }
        | Op::ProbsReweight { .. }
        | Op::ProbsReplace { .. }
        | Op::ProbsSet { .. }
        | Op::ProbsStore { .. }
        | Op::AttnMix { .. } => &probs::Probs,
        Op::TomeMatch { .. } | Op::TomeMerge | Op::TomeUnmerge => &tome::Tome,
    }
}

/// An op's weights, read in the order of its weight list ([`Family::weights`]): the lowering
/// takes them in that order, so no weight name is spelled twice.
pub struct Weights {
    items: std::vec::IntoIter<Vec<f32>>,
}

impl Weights {
    /// Reads `{path}.{name}` for every entry of `list`, checking its shape.
    pub fn read(
        files: &dyn WeightSource,
        path: &str,
        list: &[(&'static str, Shape)],
    ) -> Result<Self, WeightError> {
        let items = list
            .iter()
            .map(|(name, shape)| files.read(&format!("{path}.{name}"), shape))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Weights {
            items: items.into_iter(),
        })
    }

    /// The next weight of the list.
    pub fn take(&mut self) -> Vec<f32> {
        self.items
            .next()
            .expect("a lowering takes exactly the weights of its op's list")
    }
}

/// A kernel's inputs, taken in port order.
pub struct Args(std::vec::IntoIter<Value>);

impl Args {
    pub fn new(args: Vec<Value>) -> Self {
        Args(args.into_iter())
    }

    /// The next input.
    pub fn take(&mut self) -> Value {
        self.0
            .next()
            .expect("arity checked when the graph was built")
    }
}

/// `Ok` when `cond` holds, else `Err(msg)`.
pub(crate) fn want(cond: bool, msg: String) -> Result<(), String> {
    if cond { Ok(()) } else { Err(msg) }
}

/// Checks that a count lies in `1..=max` (`name` is the limit's name in src/limits.rs).
pub(crate) fn count(what: &str, v: usize, max: usize, name: &str) -> Result<(), String> {
    want(
        (1..=max).contains(&v),
        format!("{what} = {v} is outside 1..={max} (src/limits.rs: {name})"),
    )
}

/// Checks that `eps` is a finite number > 0.
pub(crate) fn eps_ok(eps: f64) -> Result<(), String> {
    want(
        eps.is_finite() && eps > 0.0,
        format!("eps = {eps} is not a finite number > 0"),
    )
}

/// The element count of a shape, as u64.
pub(crate) fn elements(s: &[usize]) -> u64 {
    s.iter().product::<usize>() as u64
}
