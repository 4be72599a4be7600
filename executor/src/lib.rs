//! Kiln's worker: lease → fetch → stage → sandbox → collect → upload → report.

pub mod base;
pub mod cache;
pub mod cas;
pub mod collect;
pub mod error;
pub mod run;
pub mod stage;
pub mod transfer;
pub mod trash;
pub mod worker;
pub mod tree;

pub use error::{Error, Result};
