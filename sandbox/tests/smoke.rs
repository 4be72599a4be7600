mod common;
use common::*;
use kiln_sandbox::*;

#[test]
fn smoke() {
    let fx = need_fixture!();
    for mode in [Mode::Root, Mode::Unprivileged] {
        let l = launcher(mode, BackendKind::Userns);
        let s = Scratch::new(&fx, mode);
        let r = run_sh(
            &l,
            &s,
            "echo hello; id; hostname; pwd; ls /; ls /dev; mount; ps; echo err >&2; exit 3",
        );
        eprintln!(
            "{mode:?} {:?}\nstdout:\n{}\nstderr:\n{}",
            r.outcome, r.stdout, r.stderr
        );
        assert_eq!(r.outcome.status, ExitStatus::Exited(3));
    }
}
