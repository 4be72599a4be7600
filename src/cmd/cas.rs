//! `kiln cas`: a CAS client (push a base rootfs, fetch a tree, cat a blob).

use std::path::PathBuf;

use anyhow::Context;
use kiln_server::Digest;
use kiln_server::client::{CasClient, Source};

/// Arguments of `kiln cas`.
#[derive(clap::Args, Debug)]
pub struct CasArgs {
    /// Server URL.
    #[arg(long, env = "KILN_SERVER", default_value = "http://127.0.0.1:50051")]
    pub server: String,
    /// Instance name.
    #[arg(long, default_value = "")]
    pub instance: String,
    #[command(subcommand)]
    pub command: CasCommand,
}

/// What to do.
#[derive(clap::Subcommand, Debug)]
pub enum CasCommand {
    /// Upload a directory tree; prints its root Directory digest (HASH/SIZE),
    /// e.g. a base root filesystem for `chrootRootDigest`.
    #[command(alias = "upload")]
    UploadDir {
        /// The directory.
        dir: PathBuf,
    },
    /// Recreate the tree under a root Directory digest in DEST (new or empty).
    DownloadTree {
        /// Root Directory digest, HASH/SIZE.
        digest: Digest,
        /// Destination directory.
        dest: PathBuf,
    },
    /// Write a blob to stdout.
    Cat {
        /// Blob digest, HASH/SIZE.
        digest: Digest,
    },
    /// Upload a file as one blob; prints its digest.
    Put {
        /// The file.
        file: PathBuf,
    },
}

/// Runs `kiln cas`.
pub fn run(args: CasArgs) -> anyhow::Result<()> {
    super::init_logging();
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let client = CasClient::connect(&args.server, &args.instance)
            .await
            .with_context(|| format!("connecting to {}", args.server))?;
        match args.command {
            CasCommand::UploadDir { dir } => {
                let root = client
                    .upload_directory(&dir)
                    .await
                    .with_context(|| format!("uploading {}", dir.display()))?;
                println!("{root}");
            }
            CasCommand::DownloadTree { digest, dest } => {
                client
                    .download_tree(digest, &dest)
                    .await
                    .with_context(|| format!("downloading {digest} to {}", dest.display()))?;
            }
            CasCommand::Cat { digest } => {
                let mut out = tokio::io::stdout();
                client.read_into(digest, &mut out).await?;
            }
            CasCommand::Put { file } => {
                let data =
                    std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
                let digest = Digest::of(&data);
                client.upload(vec![(digest, Source::File(file))]).await?;
                println!("{digest}");
            }
        }
        Ok(())
    })
}
