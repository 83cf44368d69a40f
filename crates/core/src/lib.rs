//! The pure core of conductor.
//!
//! Everything here is a decision, never an effect: the configuration model and its
//! validation, environment definitions, resource arithmetic, resource names and labels,
//! validation of every string that may reach the container engine, lifecycle state
//! machines, scheduling policy, and the [`engine::Engine`] trait that the Podman adapter
//! (and later a Kubernetes one) implements. Nothing in this crate touches the file system,
//! the network or a process; the crates above it do.

pub mod command;
pub mod config;
pub mod egress;
pub mod engine;
pub mod environment;
pub mod fork;
pub mod lifecycle;
pub mod naming;
pub mod resources;
pub mod secrets;
pub mod size;
pub mod task;
pub mod validate;
pub mod volume;

pub use config::Config;
