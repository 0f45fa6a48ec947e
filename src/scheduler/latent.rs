//! The elementwise algebra a scheduler step needs, over host vectors and device tensors alike:
//! each scheduler writes its step once, generic over [`Latent`], and runs it on `Vec<f32>`
//! ([`super::Scheduler::step`]) or on a Burn `Tensor<4>` ([`super::Scheduler::step_tensor`]).
//! Every operation is one f32 rounding (a scalar is applied as f32, as torch does), so the two
//! give the same bits when the step applies its operations in the same order.
//!
//! Try it: `cargo test --release --lib scheduler::tests::tensor_steps_match_host_steps`.

use burn::tensor::{Tensor, TensorData};

/// A sample or model output a scheduler steps: a host `Vec<f32>` or a device `Tensor<4>`.
pub(crate) trait Latent: Clone {
    /// The shape, for length checks (a host vector is one axis).
    fn shape_of(&self) -> Vec<usize>;
    /// The number of values.
    fn count(&self) -> usize {
        self.shape_of().iter().product()
    }
    /// `self · a`.
    fn times(self, a: f32) -> Self;
    /// `self / a`.
    fn over(self, a: f32) -> Self;
    /// `self + other`.
    fn plus(self, other: Self) -> Self;
    /// `self − other`.
    fn minus(self, other: Self) -> Self;
    /// Kept in a scheduler's history.
    fn keep(&self) -> Held;
    /// A kept value back in this form (`like` gives a device tensor's device and shape).
    fn from_held(held: &Held, like: &Self) -> Self;
}

/// A value a scheduler keeps between steps (PNDM's past outputs, DPM-Solver++'s previous data
/// prediction), where the step that made it left it: host or device. Stepping on device tensors
/// keeps the history on the device.
#[derive(Debug, Clone)]
pub(crate) enum Held {
    Host(Vec<f32>),
    Device(Box<Tensor<4>>),
}

impl Latent for Vec<f32> {
    fn shape_of(&self) -> Vec<usize> {
        vec![self.len()]
    }
    fn times(mut self, a: f32) -> Self {
        self.iter_mut().for_each(|x| *x *= a);
        self
    }
    fn over(mut self, a: f32) -> Self {
        self.iter_mut().for_each(|x| *x /= a);
        self
    }
    fn plus(mut self, other: Self) -> Self {
        self.iter_mut().zip(&other).for_each(|(x, y)| *x += y);
        self
    }
    fn minus(mut self, other: Self) -> Self {
        self.iter_mut().zip(&other).for_each(|(x, y)| *x -= y);
        self
    }
    fn keep(&self) -> Held {
        Held::Host(self.clone())
    }
    fn from_held(held: &Held, _like: &Self) -> Self {
        match held {
            Held::Host(v) => v.clone(),
            Held::Device(t) => (**t)
                .clone()
                .into_data()
                .convert::<f32>()
                .try_into_vec::<f32>()
                .expect("f32 data after convert"),
        }
    }
}

impl Latent for Tensor<4> {
    fn shape_of(&self) -> Vec<usize> {
        self.dims().to_vec()
    }
    fn times(self, a: f32) -> Self {
        self.mul_scalar(a)
    }
    fn over(self, a: f32) -> Self {
        self.div_scalar(a)
    }
    fn plus(self, other: Self) -> Self {
        self.add(other)
    }
    fn minus(self, other: Self) -> Self {
        self.sub(other)
    }
    fn keep(&self) -> Held {
        Held::Device(Box::new(self.clone()))
    }
    fn from_held(held: &Held, like: &Self) -> Self {
        match held {
            Held::Device(t) => (**t).clone(),
            Held::Host(v) => Tensor::from_data(
                TensorData::new(v.clone(), like.dims().to_vec()),
                &like.device(),
            ),
        }
    }
}

/// Checks that a model output and a sample have the same shape.
pub(crate) fn check_same<L: Latent>(class: &str, model_output: &L, sample: &L) {
    let (a, b) = (model_output.shape_of(), sample.shape_of());
    assert!(
        a == b,
        "{class}: model_output has {} values (shape {a:?}), sample has {} (shape {b:?})",
        model_output.count(),
        sample.count()
    );
}
