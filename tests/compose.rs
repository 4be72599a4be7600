//! The docker compose stack of compose/, for real: images built from this
//! workspace, a server and two privileged workers brought up under a unique
//! project name on a free loopback port, and BuildStream (in the CI job image)
//! building through it. One worker is killed while it runs an action and the
//! build must still succeed; the server is restarted and the workers must
//! rejoin and build again; with every worker stopped, a fresh BuildStream
//! must still get its build from the action cache. Teardown must leave no
//! container, network or volume of the project behind.
//!
//! Needs a Docker engine, docker-compose (1.29) or `docker compose` (v2),
//! debootstrap and the busybox fixture; says "skipped: …" when one is missing.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const KILN: &str = env!("CARGO_BIN_EXE_kiln");
const TOP: &str = env!("CARGO_MANIFEST_DIR");

/// Says why the test cannot run; in CI a missing Docker engine is a skip,
/// but a missing fixture means the test scripts were not run and fails.
fn skip(why: &str) {
    eprintln!("\n*** skipped: compose stack test: {why} ***\n");
}

fn ok(cmd: &mut Command) -> bool {
    cmd.stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// `docker compose` (v2 plugin) if present, else `docker-compose` (1.29);
/// KILN_COMPOSE="docker-compose" forces one.
fn compose_command() -> Option<Vec<String>> {
    if let Ok(forced) = std::env::var("KILN_COMPOSE") {
        return Some(forced.split_whitespace().map(String::from).collect());
    }
    if ok(Command::new("docker").args(["compose", "version"])) {
        return Some(vec!["docker".into(), "compose".into()]);
    }
    if ok(Command::new("docker-compose").arg("version")) {
        return Some(vec!["docker-compose".into()]);
    }
    None
}

fn busybox_fixture() -> Option<PathBuf> {
    let base = std::env::var_os("KILN_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(TOP).join(".cache/fixtures"));
    let root = base.join("busybox");
    root.join("bin/busybox").exists().then_some(root)
}

/// Runs `cmd` to completion within `limit`, killing it past that.
fn run_limited(cmd: &mut Command, limit: Duration) -> Output {
    let what = format!("{cmd:?}");
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {what}: {e}"));
    wait_limited(child, limit, &what)
}

fn wait_limited(mut child: Child, limit: Duration, what: &str) -> Output {
    let start = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "{what} still running after {limit:?}\nstdout:\n{}\nstderr:\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// stdout and stderr, without terminal colour codes (the images set
/// NO_COLOR, but a log is grepped here either way).
fn text(out: &Output) -> String {
    let raw = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let mut plain = String::with_capacity(raw.len());
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            // CSI sequences end with a letter.
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            plain.push(c);
        }
    }
    plain
}

/// One compose project: every command gets the same files, project name and
/// environment. Dropping it tears the project down.
struct Stack {
    compose: Vec<String>,
    project: String,
    env: Vec<(String, String)>,
    images: Vec<String>,
}

impl Stack {
    fn cmd(&self, args: &[&str]) -> Command {
        let dir = Path::new(TOP).join("compose");
        let mut c = Command::new(&self.compose[0]);
        c.args(&self.compose[1..])
            .arg("-f")
            .arg(dir.join("docker-compose.yml"))
            .arg("-f")
            .arg(dir.join("docker-compose.ci.yml"))
            .args(["-p", &self.project])
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        c
    }

    fn must(&self, args: &[&str], limit: Duration) -> String {
        let out = run_limited(&mut self.cmd(args), limit);
        assert!(
            out.status.success(),
            "compose {args:?} failed:\n{}\nlogs:\n{}",
            text(&out),
            self.logs()
        );
        text(&out)
    }

    fn container(&self, service: &str) -> String {
        let id = self.must(&["ps", "-q", service], Duration::from_secs(60));
        let id = id.trim().to_string();
        assert!(!id.is_empty(), "no container for {service}");
        id
    }

    fn logs(&self) -> String {
        let out = run_limited(
            &mut self.cmd(&["logs", "--no-color", "--tail=200"]),
            Duration::from_secs(60),
        );
        text(&out)
    }

    fn service_logs(&self, service: &str) -> String {
        let out = run_limited(
            &mut self.cmd(&["logs", "--no-color", service]),
            Duration::from_secs(60),
        );
        text(&out)
    }

    /// Waits for the server's healthcheck to pass; returns how long it took.
    fn wait_healthy(&self, limit: Duration) -> Duration {
        let start = Instant::now();
        loop {
            let id = self.container("server");
            let out = run_limited(
                Command::new("docker").args(["inspect", "-f", "{{.State.Health.Status}}", &id]),
                Duration::from_secs(30),
            );
            if text(&out).trim() == "healthy" {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < limit,
                "server not healthy after {limit:?} ({}):\n{}",
                text(&out).trim(),
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Waits until the server's log shows `host` joined `n` times.
    fn wait_joined(&self, host: &str, n: usize, limit: Duration) {
        let start = Instant::now();
        let needle = format!("host={host}");
        loop {
            let logs = self.service_logs("server");
            let joined = logs
                .lines()
                .filter(|l| l.contains("worker joined") && l.contains(&needle))
                .count();
            if joined >= n {
                return;
            }
            assert!(
                start.elapsed() < limit,
                "{host} joined {joined} times, not {n}, within {limit:?}:\n{logs}"
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// Starts `bst` in the job container without its dependencies (the
    /// test decides which services run).
    fn bst(&self, script: &str) -> Child {
        self.cmd(&["run", "--rm", "--no-deps", "-T", "bst", "sh", "-ec", script])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning compose run bst")
    }

    fn leftovers(&self) -> Vec<String> {
        let label = format!("label=com.docker.compose.project={}", self.project);
        let mut left = Vec::new();
        for (what, args) in [
            ("container", vec!["ps", "-a", "-q", "--filter", &label]),
            ("network", vec!["network", "ls", "-q", "--filter", &label]),
            ("volume", vec!["volume", "ls", "-q", "--filter", &label]),
        ] {
            let out = run_limited(Command::new("docker").args(&args), Duration::from_secs(60));
            for id in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                left.push(format!("{what} {id}"));
            }
        }
        left
    }

    fn down(&self) -> Output {
        run_limited(
            &mut self.cmd(&["down", "-v", "--remove-orphans", "-t", "10"]),
            Duration::from_secs(180),
        )
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("compose logs at the failure:\n{}", self.logs());
        }
        let _ = self.down();
        for image in &self.images {
            let _ = run_limited(
                Command::new("docker").args(["rmi", image]),
                Duration::from_secs(60),
            );
        }
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The example project with two more elements: `slow.bst` runs long enough
/// to kill its worker mid-action, `second.bst` is built after the restart.
fn project(dir: &Path) {
    let example = Path::new(TOP).join("compose/example");
    let status = Command::new("cp")
        .arg("-a")
        .arg(example.join("."))
        .arg(dir)
        .status()
        .unwrap();
    assert!(status.success());
    std::fs::write(
        dir.join("elements/slow.bst"),
        "kind: manual\nbuild-depends:\n- base.bst\nconfig:\n  install-commands:\n  \
         - sleep 17\n  - mkdir -p \"%{install-root}/share\"\n  \
         - echo slow done > \"%{install-root}/share/slow.txt\"\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("elements/second.bst"),
        "kind: manual\nbuild-depends:\n- base.bst\nconfig:\n  install-commands:\n  \
         - mkdir -p \"%{install-root}/share\"\n  \
         - echo after restart > \"%{install-root}/share/second.txt\"\n",
    )
    .unwrap();
}

#[test]
fn compose_stack_serves_buildstream_through_worker_loss_and_server_restart() {
    let total = Instant::now();
    if !ok(Command::new("docker").arg("info")) {
        return skip("no Docker engine (`docker info` failed)");
    }
    let Some(compose) = compose_command() else {
        return skip("neither `docker compose` nor `docker-compose` is installed");
    };
    let Some(busybox) = busybox_fixture() else {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("the busybox fixture is missing in CI: run scripts/fixtures");
        }
        return skip("busybox fixture missing (run scripts/fixtures)");
    };
    if !ok(Command::new("sh").args(["-c", "command -v debootstrap"])) {
        return skip("debootstrap is missing (scripts/install-test-deps installs it)");
    }
    eprintln!("compose command: {}", compose.join(" "));

    let unique = format!(
        "{}{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_micros()
    );
    let tag = format!("test{unique}");
    let project_name = format!("kilntest{unique}");

    // Images: the kiln image from this test's own binary (the debug build
    // cargo just made; build-images strips it), the job image cached by key.
    let t = Instant::now();
    let out = run_limited(
        Command::new(Path::new(TOP).join("compose/build-images"))
            .args(["--job", "--kiln", KILN])
            .env("KILN_TAG", &tag),
        Duration::from_secs(900),
    );
    assert!(out.status.success(), "build-images failed:\n{}", text(&out));
    eprintln!("{}images built in {:?}", text(&out), t.elapsed());

    let work = tempfile::tempdir().unwrap();
    let proj = work.path().join("project");
    project(&proj);
    let port = free_port();
    let stack = Stack {
        compose,
        project: project_name,
        env: vec![
            ("KILN_IMAGE".into(), format!("kiln:{tag}")),
            ("KILN_BST_IMAGE".into(), format!("kiln-bst:{tag}")),
            ("KILN_PORT".into(), port.to_string()),
            ("KILN_BST_PROJECT".into(), proj.display().to_string()),
            ("KILN_SYSROOT".into(), busybox.display().to_string()),
        ],
        images: vec![format!("kiln:{tag}"), format!("kiln-bst:{tag}")],
    };

    // Up, and healthy: the healthcheck inside, and the published port from
    // the host's loopback.
    let t = Instant::now();
    stack.must(
        &["up", "-d", "server", "worker-1", "worker-2"],
        Duration::from_secs(180),
    );
    stack.wait_healthy(Duration::from_secs(120));
    eprintln!("up to healthy: {:?}", t.elapsed());
    let health = run_limited(
        Command::new(KILN).args(["health", "--server", &format!("http://127.0.0.1:{port}")]),
        Duration::from_secs(30),
    );
    assert!(health.status.success(), "{}", text(&health));
    stack.wait_joined("worker-1", 1, Duration::from_secs(120));
    stack.wait_joined("worker-2", 1, Duration::from_secs(120));
    eprintln!("both workers joined: {:?} after up", t.elapsed());

    // Build 1: kill whichever worker runs slow.bst's action while it runs.
    let t = Instant::now();
    let build = stack.bst(
        "bst --no-interactive build slow.bst && \
         bst --no-interactive artifact checkout slow.bst --directory /project/out-slow",
    );
    let killed = 'find: loop {
        assert!(
            t.elapsed() < Duration::from_secs(300),
            "no worker ran slow.bst's action within 5 minutes:\n{}",
            stack.logs()
        );
        for service in ["worker-1", "worker-2"] {
            let id = stack.container(service);
            let top = run_limited(
                Command::new("docker").args(["top", &id]),
                Duration::from_secs(30),
            );
            if text(&top).contains("sleep 17") {
                break 'find service;
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let id = stack.container(killed);
    let out = run_limited(
        Command::new("docker").args(["kill", &id]),
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "docker kill: {}", text(&out));
    eprintln!("killed {killed} mid-action after {:?}", t.elapsed());
    let out = wait_limited(build, Duration::from_secs(420), "bst build slow.bst");
    assert!(
        out.status.success(),
        "the build failed after {killed} was killed:\n{}\n{}",
        text(&out),
        stack.logs()
    );
    let slow = std::fs::read_to_string(proj.join("out-slow/share/slow.txt")).unwrap();
    assert_eq!(slow, "slow done\n");
    let server_log = stack.service_logs("server");
    assert!(
        server_log.contains("re-queued after its worker was lost"),
        "the server never re-queued the killed worker's action:\n{server_log}"
    );
    eprintln!("build 1 survived losing {killed}: {:?}", t.elapsed());

    // Bring the killed worker back (its restart policy may already have),
    // then restart the server: both workers must rejoin on their own.
    stack.must(&["up", "-d", "--no-deps", killed], Duration::from_secs(120));
    stack.wait_joined(killed, 2, Duration::from_secs(120));
    let t = Instant::now();
    stack.must(&["restart", "server"], Duration::from_secs(120));
    stack.wait_healthy(Duration::from_secs(120));
    eprintln!("server restarted, healthy again in {:?}", t.elapsed());
    let survivor = if killed == "worker-1" {
        "worker-2"
    } else {
        "worker-1"
    };
    stack.wait_joined(survivor, 2, Duration::from_secs(120));
    stack.wait_joined(killed, 3, Duration::from_secs(120));
    eprintln!("both workers rejoined {:?} after the restart", t.elapsed());

    let t = Instant::now();
    let out = wait_limited(
        stack.bst(
            "bst --no-interactive build second.bst && \
             bst --no-interactive artifact checkout second.bst --directory /project/out-second",
        ),
        Duration::from_secs(420),
        "bst build second.bst",
    );
    assert!(out.status.success(), "build after restart:\n{}", text(&out));
    let second = std::fs::read_to_string(proj.join("out-second/share/second.txt")).unwrap();
    assert_eq!(second, "after restart\n");
    eprintln!("build 2 (after the restart): {:?}", t.elapsed());

    // With no worker at all, a fresh job container (empty local cache) must
    // still get slow.bst: only the restarted server's action cache has it.
    stack.must(&["stop", "worker-1", "worker-2"], Duration::from_secs(120));
    let t = Instant::now();
    let out = wait_limited(
        stack.bst(
            "bst --no-interactive build slow.bst && \
             bst --no-interactive artifact checkout slow.bst --directory /project/out-cached",
        ),
        Duration::from_secs(300),
        "bst build slow.bst from the cache",
    );
    assert!(
        out.status.success(),
        "with no worker, slow.bst did not come from the cache:\n{}\n{}",
        text(&out),
        stack.logs()
    );
    let cached = std::fs::read_to_string(proj.join("out-cached/share/slow.txt")).unwrap();
    assert_eq!(cached, "slow done\n");
    eprintln!(
        "build 3 (action cache, no workers): {:?}; server log says cache hit: {}",
        t.elapsed(),
        stack.service_logs("server").contains("action cache hit")
    );

    // Teardown leaves nothing of the project.
    let out = stack.down();
    assert!(out.status.success(), "compose down:\n{}", text(&out));
    let left = stack.leftovers();
    assert!(left.is_empty(), "left behind after down: {left:?}");
    eprintln!("compose stack test passed in {:?}", total.elapsed());
}

/// `kiln health`, the stack's healthcheck, without Docker: 0 and one line
/// for a live server, an error naming the server for a port nobody serves.
#[test]
fn kiln_health_tells_a_live_server_from_a_dead_port() {
    use std::io::{BufRead, BufReader};
    let data = tempfile::tempdir().unwrap();
    let mut server = Command::new(KILN)
        .args([
            "serve",
            "--workers",
            "0",
            "--memory",
            "--listen",
            "127.0.0.1:0",
        ])
        .arg("--data-dir")
        .arg(data.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut addr = String::new();
    let mut reader = BufReader::new(server.stdout.take().unwrap());
    let mut line = String::new();
    while reader.read_line(&mut line).unwrap() > 0 {
        if let Some(a) = line.trim().strip_prefix("kiln: listening on ") {
            addr = a.to_string();
            break;
        }
        line.clear();
    }
    assert!(!addr.is_empty(), "kiln serve never said where it listens");

    let live = run_limited(
        Command::new(KILN).args(["health", "--server", &format!("http://{addr}")]),
        Duration::from_secs(30),
    );
    assert!(live.status.success(), "{}", text(&live));
    assert!(text(&live).contains("is serving (execution enabled)"));

    let _ = server.kill();
    let _ = server.wait();
    let dead = run_limited(
        Command::new(KILN).args([
            "health",
            "--timeout",
            "2",
            "--server",
            &format!("http://{addr}"),
        ]),
        Duration::from_secs(30),
    );
    assert!(!dead.status.success(), "health passed for a dead server");
    assert!(text(&dead).contains(&addr), "{}", text(&dead));
}
