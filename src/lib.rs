//! rewire: load a Stable Diffusion UNet as a typed op graph, rewrite its attention layers with
//! declarative recipes, and run it on Burn.
//!
//! The compile pipeline, tract-style: load ([`unet::UNet::open`]) → graph ([`unet::UNet::graph`],
//! checked by [`graph::Graph::check`]) → lower ([`exec::Plan::lower`]) → run ([`exec::Plan::run`]).
//!
//! Try it: `cargo run --release -- inspect models/tiny-sd`.

pub mod backend;
pub mod clip;
pub mod compile;
pub mod config;
pub mod exec;
pub mod forward;
pub mod graph;
pub mod invert;
pub mod io;
pub mod limits;
pub mod ops;
pub mod picture;
pub mod pipeline;
pub mod preflight;
pub mod profile;
pub mod recipe;
pub mod report;
pub mod run;
pub mod scheduler;
pub mod shape;
pub mod size;
pub mod unet;
pub mod vae;
pub mod video;
pub mod weights;
