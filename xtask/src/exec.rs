//! Running external commands: every command line is echoed before it runs, and a failure
//! names the whole command line, environment overrides included, so it can be re-run by hand.
use std::ffi::OsStr;
use std::process::{Command, Stdio};

use anyhow::{Context as _, bail};

/// Runs `cmd` with inherited stdio, echoing it to stderr as `$ …`; fails unless it exits 0.
pub fn exec(cmd: &mut Command) -> anyhow::Result<()> {
    let line = command_line(cmd);
    eprintln!("$ {line}");
    let status = cmd
        .status()
        .with_context(|| format!("failed to start `{line}`"))?;
    if !status.success() {
        bail!("command failed ({status}): {line}");
    }
    Ok(())
}

/// [`exec`], but each line `cmd` writes to stderr goes to `line` instead of to ours.
pub fn exec_with_stderr(cmd: &mut Command, mut line: impl FnMut(String)) -> anyhow::Result<()> {
    use std::io::BufRead as _;
    let shown = command_line(cmd);
    eprintln!("$ {shown}");
    let mut child = cmd
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("failed to start `{shown}`"))?;
    let stderr = child.stderr.take().context("the command's stderr")?;
    for l in std::io::BufReader::new(stderr).lines() {
        line(l.with_context(|| format!("reading the output of `{shown}`"))?);
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("command failed ({status}): {shown}");
    }
    Ok(())
}

/// Runs `cmd` quietly and returns its stdout; fails unless it exits 0, quoting its stderr.
pub fn capture(cmd: &mut Command) -> anyhow::Result<String> {
    let line = command_line(cmd);
    let output = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("failed to start `{line}`"))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        bail!(
            "command failed ({}): {line}\n{}",
            output.status,
            stderr.trim_end()
        );
    }
    String::from_utf8(output.stdout).with_context(|| format!("output of `{line}` is not utf-8"))
}

/// Whether `cmd` starts and exits 0; its output is discarded. For "is X installed" probes.
pub fn succeeds(cmd: &mut Command) -> bool {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

/// `cmd` as a shell line: environment overrides first, then program and arguments.
pub fn command_line(cmd: &Command) -> String {
    let envs = cmd.get_envs().filter_map(|(key, value)| {
        value.map(|value| format!("{}={}", key.to_string_lossy(), quote(value)))
    });
    let words = std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(quote);
    envs.chain(words).collect::<Vec<_>>().join(" ")
}

fn quote(word: &OsStr) -> String {
    let word = word.to_string_lossy();
    let plain = |c: char| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c);
    if !word.is_empty() && word.chars().all(plain) {
        word.into_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line_quotes_what_the_shell_would_split() {
        let mut cmd = Command::new("cargo");
        cmd.env(
            "CARGO_ENCODED_RUSTFLAGS",
            r#"--cfg=bpf_target_arch="x86_64""#,
        )
        .args(["clippy", "--", "-D", "warnings", "it's", ""]);
        assert_eq!(
            command_line(&cmd),
            r#"CARGO_ENCODED_RUSTFLAGS='--cfg=bpf_target_arch="x86_64"' cargo clippy -- -D warnings 'it'\''s' ''"#
        );
    }

    #[test]
    fn exec_with_stderr_hands_over_each_line_and_names_a_failed_command() -> anyhow::Result<()> {
        let mut lines = Vec::new();
        exec_with_stderr(
            Command::new("sh").args(["-c", "echo one >&2; echo two >&2"]),
            |l| lines.push(l),
        )?;
        assert_eq!(lines, ["one", "two"]);
        let err =
            exec_with_stderr(Command::new("false").arg("y"), |_| {}).expect_err("`false` exits 1");
        assert!(err.to_string().contains("false y"), "{err}");
        Ok(())
    }

    #[test]
    fn exec_failure_names_the_command() {
        let err = exec(Command::new("false").arg("x")).expect_err("`false` exits 1");
        assert!(err.to_string().contains("false x"), "{err}");
    }
}
