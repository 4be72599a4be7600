//! The sandbox helper as a stand-alone executable, for tests and benchmarks:
//! `kiln-sandbox-helper __sandbox-helper` behaves exactly like
//! `kiln __sandbox-helper`.

fn main() {
    if std::env::var_os("KILN_SANDBOX_LOG").is_some() {
        // Tests set this to see the helper's debug logs on stderr.
        eprintln!("kiln-sandbox-helper: logging is handled by the kiln binary; running quietly");
    }
    kiln_sandbox::helper_main()
}
