//! Everything checked before an action is queued (ARCHITECTURE step 1):
//! the Action and Command exist and decode, paths stay inside the root, the
//! platform is understood, and the whole input tree is well formed and
//! present. Errors here are returned by Execute itself, and no worker is
//! bothered with the action.

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use kiln_proto::reapi::{Action, Command, ExecuteRequest};
use kiln_proto::tree::{resolve_relative, validate_directory};
use prost::Message;

use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::scheduler::Requirements;
use kiln_storage::Cas;
use kiln_storage::tree;

use super::ExecutionConfig;

/// An action that passed every check.
#[derive(Debug, Clone)]
pub struct CheckedAction {
    pub instance: String,
    pub action_digest: Digest,
    pub action: Action,
    pub action_bytes: Bytes,
    pub command_bytes: Bytes,
    pub requirements: Requirements,
    /// The platform properties as sent, for the worker.
    pub properties: Vec<(String, String)>,
    pub timeout: Option<Duration>,
}

/// Trees whose every Directory was found well formed. Validity is a pure
/// function of the digest, so this never goes stale (presence of the blobs
/// is checked separately).
#[derive(Debug, Default)]
pub struct ValidTrees {
    set: Mutex<HashSet<Digest>>,
}

const VALID_TREES_MAX: usize = 100_000;

impl ValidTrees {
    fn contains(&self, d: &Digest) -> bool {
        self.set.lock().expect("valid trees").contains(d)
    }

    fn insert(&self, d: Digest) {
        let mut set = self.set.lock().expect("valid trees");
        if set.len() >= VALID_TREES_MAX {
            set.clear();
        }
        set.insert(d);
    }
}

pub async fn check(
    cas: &Cas,
    valid: &ValidTrees,
    config: &ExecutionConfig,
    req: &ExecuteRequest,
) -> Result<CheckedAction> {
    crate::digest::check_digest_function(req.digest_function)?;
    let action_digest = Digest::from_field(req.action_digest.as_ref(), "action_digest")?;
    let action_bytes = fetch(cas, &action_digest, "the Action").await?;
    let action = Action::decode(action_bytes.clone()).map_err(|source| Error::Decode {
        what: "Action",
        digest: action_digest,
        source,
    })?;
    let command_digest =
        Digest::from_field(action.command_digest.as_ref(), "action.command_digest")?;
    let input_root = Digest::from_field(
        action.input_root_digest.as_ref(),
        "action.input_root_digest",
    )?;
    let command_bytes = fetch(cas, &command_digest, "the Command").await?;
    let command = Command::decode(command_bytes.clone()).map_err(|source| Error::Decode {
        what: "Command",
        digest: command_digest,
        source,
    })?;

    let properties = platform_properties(&action, &command);
    check_no_nul(&command, &properties)?;
    check_command(&command)?;

    let requirements = Requirements::parse(
        properties.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        config.ignore_unknown_properties,
    )
    .map_err(|e| Error::InvalidArgument(e.to_string()))?;

    let timeout = effective_timeout(&action, config)?;

    let mut missing = check_tree(cas, valid, input_root, "input root").await?;
    if let Some((hash, size)) = &requirements.chroot_root_digest {
        let base = Digest::parse(hash, *size)?;
        missing.extend(check_tree(cas, valid, base, "chrootRootDigest").await?);
    }
    if !missing.is_empty() {
        return Err(Error::MissingBlobs {
            context: format!("action {action_digest}"),
            missing,
        });
    }

    Ok(CheckedAction {
        instance: req.instance_name.clone(),
        action_digest,
        action,
        action_bytes,
        command_bytes,
        requirements,
        properties,
        timeout,
    })
}

async fn fetch(cas: &Cas, d: &Digest, what: &str) -> Result<Bytes> {
    cas.get(d).await?.ok_or_else(|| Error::MissingBlobs {
        context: format!("{what} {d}"),
        missing: vec![*d],
    })
}

#[allow(deprecated)]
fn check_command(cmd: &Command) -> Result<()> {
    if cmd.arguments.is_empty() || cmd.arguments[0].is_empty() {
        return Err(Error::InvalidArgument(
            "the Command has no arguments: arguments[0] must name the program to run".into(),
        ));
    }
    let wd = resolve_relative("", &cmd.working_directory).map_err(|why| {
        Error::InvalidArgument(format!(
            "working_directory {:?} {why}",
            cmd.working_directory
        ))
    })?;
    let outputs = cmd
        .output_paths
        .iter()
        .chain(&cmd.output_files)
        .chain(&cmd.output_directories);
    for p in outputs {
        resolve_relative(&wd, p).map_err(|why| {
            Error::InvalidArgument(format!(
                "output path {p:?} (relative to working directory {:?}) {why}",
                cmd.working_directory
            ))
        })?;
    }
    let mut names = HashSet::new();
    for v in &cmd.environment_variables {
        if v.name.is_empty()
            || v.name.contains('=')
            || v.name.contains('\0')
            || v.value.contains('\0')
        {
            return Err(Error::InvalidArgument(format!(
                "environment variable {:?} has an invalid name or value",
                v.name
            )));
        }
        if !names.insert(v.name.as_str()) {
            return Err(Error::InvalidArgument(format!(
                "environment variable {:?} is set twice",
                v.name
            )));
        }
    }
    Ok(())
}

/// A NUL byte can reach no system call (an argument, the environment, a
/// path), so one in any string a worker would pass on is refused here,
/// naming the field, rather than by the worker after the action queued.
/// (Names and symlink targets in the input tree: `validate_directory`.)
#[allow(deprecated)]
fn check_no_nul(cmd: &Command, properties: &[(String, String)]) -> Result<()> {
    let refuse = |field: String| {
        Err(Error::InvalidArgument(format!(
            "{field} contains a NUL byte, which no argument, environment variable or path can hold"
        )))
    };
    if let Some(i) = cmd.arguments.iter().position(|a| a.contains('\0')) {
        return refuse(format!("arguments[{i}]"));
    }
    if let Some(v) = cmd
        .environment_variables
        .iter()
        .find(|v| v.name.contains('\0') || v.value.contains('\0'))
    {
        return refuse(format!("environment variable {:?}", v.name));
    }
    if cmd.working_directory.contains('\0') {
        return refuse("working_directory".into());
    }
    if let Some(p) = cmd
        .output_paths
        .iter()
        .chain(&cmd.output_files)
        .chain(&cmd.output_directories)
        .find(|p| p.contains('\0'))
    {
        return refuse(format!("output path {p:?}"));
    }
    if let Some((name, _)) = properties
        .iter()
        .find(|(k, v)| k.contains('\0') || v.contains('\0'))
    {
        return refuse(format!("platform property {name:?}"));
    }
    Ok(())
}

fn effective_timeout(action: &Action, config: &ExecutionConfig) -> Result<Option<Duration>> {
    let asked = action.timeout.as_ref().map(|t| {
        Duration::from_secs(t.seconds.max(0) as u64) + Duration::from_nanos(t.nanos.max(0) as u64)
    });
    match asked {
        Some(t) if t > config.max_action_timeout() => Err(Error::InvalidArgument(format!(
            "action timeout of {:?} exceeds this server's maximum of {:?}",
            t,
            config.max_action_timeout()
        ))),
        Some(t) if !t.is_zero() => Ok(Some(t)),
        _ => Ok(config
            .default_action_timeout()
            .or(Some(config.max_action_timeout()))),
    }
}

/// Every blob of the tree under `root` the CAS lacks, after checking every
/// Directory is well formed (INVALID_ARGUMENT naming the directory and the
/// entry otherwise).
async fn check_tree(
    cas: &Cas,
    valid: &ValidTrees,
    root: Digest,
    what: &str,
) -> Result<Vec<Digest>> {
    if valid.contains(&root) {
        return tree::missing_in_directory_tree(cas, root)
            .await
            .map_err(Error::from);
    }
    let walk = tree::walk(cas, root).await?;
    for (d, dir) in &walk.directories {
        validate_directory(dir).map_err(|why| {
            Error::InvalidArgument(format!("{what} {root}: directory {d}: {why}"))
        })?;
    }
    if let Some(why) = walk.shape_problem(&root) {
        return Err(Error::InvalidArgument(format!("{what} {root}: {why}")));
    }
    let mut missing = walk.missing;
    let files = tree::file_digests(walk.directories.iter().map(|(_, d)| d))?;
    missing.extend(cas.find_missing(&files).await?);
    if missing.is_empty() {
        valid.insert(root);
    }
    Ok(missing)
}

/// The platform an action asks for: Action.platform wins; older clients set
/// only Command.platform.
pub(crate) fn platform_properties(
    action: &kiln_proto::reapi::Action,
    command: &kiln_proto::reapi::Command,
) -> Vec<(String, String)> {
    #[allow(deprecated)]
    let platform = action
        .platform
        .as_ref()
        .filter(|p| !p.properties.is_empty())
        .or(command.platform.as_ref());
    platform
        .map(|p| {
            p.properties
                .iter()
                .map(|p| (p.name.clone(), p.value.clone()))
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn action_with_timeout(secs: i64) -> Action {
        Action {
            timeout: Some(kiln_proto::protobuf::Duration {
                seconds: secs,
                nanos: 0,
            }),
            ..Default::default()
        }
    }

    #[test]
    fn timeouts_respect_the_server_maximum() {
        let config = ExecutionConfig {
            max_action_timeout_secs: 60,
            default_action_timeout_secs: 30,
            ..Default::default()
        };
        assert_eq!(
            effective_timeout(&action_with_timeout(10), &config).unwrap(),
            Some(Duration::from_secs(10))
        );
        assert_eq!(
            effective_timeout(&Action::default(), &config).unwrap(),
            Some(Duration::from_secs(30)),
            "no timeout asked: the server default"
        );
        let err = effective_timeout(&action_with_timeout(61), &config).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)));
        assert!(err.to_string().contains("maximum"), "{err}");
    }

    #[test]
    #[allow(deprecated)]
    fn commands_that_escape_or_are_empty_are_invalid() {
        let mut cmd = Command {
            arguments: vec!["/bin/true".into()],
            working_directory: "src".into(),
            output_files: vec!["../out/a.o".into()],
            ..Default::default()
        };
        assert!(check_command(&cmd).is_ok(), "stays inside the root");
        cmd.output_files = vec!["../../a.o".into()];
        assert!(
            check_command(&cmd)
                .unwrap_err()
                .to_string()
                .contains("../../a.o")
        );
        cmd.output_files.clear();
        cmd.working_directory = "/abs".into();
        assert!(check_command(&cmd).is_err());
        cmd.working_directory.clear();
        cmd.arguments.clear();
        assert!(check_command(&cmd).is_err());
    }
}
