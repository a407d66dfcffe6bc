//! The README's lab commands, read from the README itself and run as
//! written (optional `[...]` parts left out), so the README cannot drift
//! from the code: every line must exit 0.

mod common;
use common::*;
use std::time::Duration;
use trellis_lab::exec;

/// The lines of the first ```sh block after `heading`.
fn sh_block(readme: &str, heading: &str) -> Vec<String> {
    let after = readme
        .split_once(heading)
        .unwrap_or_else(|| panic!("README has no {heading:?}"))
        .1;
    let block = after
        .split_once("```sh\n")
        .expect("a sh block")
        .1
        .split_once("```")
        .expect("block end")
        .0;
    block
        .lines()
        .map(|l| {
            // drop the comment, then every optional [...] part
            let mut l = l.split(" #").next().unwrap_or_default().to_string();
            while let (Some(a), Some(b)) = (l.find('['), l.find(']')) {
                if b < a {
                    break;
                }
                l.replace_range(a..=b, "");
            }
            l.split_whitespace().collect::<Vec<_>>().join(" ")
        })
        .filter(|l| !l.is_empty())
        .collect()
}

/// Removes the labs the README block makes, also when the test fails.
struct Labs(Vec<&'static str>);
impl Drop for Labs {
    fn drop(&mut self) {
        for name in &self.0 {
            let mut c = std::process::Command::new(trellis_lab::bin_dir().join("trellisctl"));
            c.args(["lab", "down", "--name", name]);
            let _ = exec::run(c, None, &[], Duration::from_secs(60));
        }
    }
}

#[test]
fn the_lab_section_runs_as_written() {
    if !privileged("the_lab_section_runs_as_written") {
        return;
    }
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md"))
        .expect("README");
    let lines = sh_block(&readme, "## The lab");
    assert!(lines.len() >= 10, "{lines:?}");
    let _labs = Labs(vec!["dev", "c3", "b3"]);
    let path = format!(
        "{}:{}",
        trellis_lab::bin_dir().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    for line in lines {
        let mut c = std::process::Command::new("sh");
        c.args(["-c", &line]).env("PATH", &path);
        let t = exec::run(c, None, &[], Duration::from_secs(120)).expect("run");
        assert!(
            t.output.status.success(),
            "README line `{line}` failed:\n{}{}",
            String::from_utf8_lossy(&t.output.stdout),
            String::from_utf8_lossy(&t.output.stderr)
        );
    }
}
