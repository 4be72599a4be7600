//! `kiln config`: the default configuration file, and checking a file.

use std::io::Write;
use std::path::PathBuf;

use crate::config::{Config, DEFAULT_TOML};

#[derive(clap::Subcommand, Debug)]
pub enum ConfigCommand {
    /// Print the default configuration file, every key commented.
    PrintDefault,
    /// Check a configuration file; prints the first error, naming the key.
    Check {
        /// The file to check.
        file: PathBuf,
    },
}

pub fn run(cmd: ConfigCommand) -> anyhow::Result<()> {
    match cmd {
        ConfigCommand::PrintDefault => {
            // A closed pipe (`| head`) is not an error worth a message.
            let _ = std::io::stdout().write_all(DEFAULT_TOML.as_bytes());
            Ok(())
        }
        ConfigCommand::Check { file } => {
            Config::from_file(&file)?;
            println!("{}: OK", file.display());
            Ok(())
        }
    }
}
