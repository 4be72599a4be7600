//! Kiln's worker: lease → fetch → stage → sandbox → collect → upload → report.

pub mod cache;
pub mod cas;
pub mod collect;
pub mod error;
pub mod stage;
pub mod trash;
pub mod tree;

pub use error::{Error, Result};
