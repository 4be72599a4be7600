//! Subcommands of the `kiln` binary, one module each.

pub mod bench;
pub mod sandbox;
