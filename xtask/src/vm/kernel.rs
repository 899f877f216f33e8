//! Debian kernels for the VMs: the newest `linux-image-<series>…` of a suite, resolved and
//! fetched with `apt-get download` under a private APT configuration (its own sources
//! list, lists and cache under `target/vm/apt/`, the host's mirror), unpacked under
//! `target/vm/kernels/<package>/` and never installed.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use super::{Series, mkdir, write};
use crate::exec::{capture, exec};

/// The Debian mirror host the host's own APT uses, e.g. `http://deb.debian.org`.
pub(super) fn mirror() -> anyhow::Result<String> {
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(entries) = fs::read_dir("/etc/apt/sources.list.d") {
        let mut more: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        more.sort();
        files.extend(more);
    }
    for file in files {
        let name = file.to_string_lossy();
        if !(name.ends_with(".list") || name.ends_with(".sources")) {
            continue;
        }
        let Ok(text) = fs::read_to_string(&file) else {
            continue;
        };
        if let Some(host) = mirror_in(&text) {
            return Ok(host);
        }
    }
    bail!(
        "no Debian mirror in /etc/apt/sources.list or /etc/apt/sources.list.d (an http(s) URI ending in /debian)"
    )
}

/// The first `scheme://host` whose URI path is `/debian` or `/debian-security`, from a
/// one-line (`deb [opts] URI suite …`) or deb822 (`URIs: …`) sources file.
fn mirror_in(text: &str) -> Option<String> {
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .flat_map(|l| l.split_whitespace())
        .filter(|w| w.starts_with("http://") || w.starts_with("https://"))
        .find_map(|uri| {
            let uri = uri.trim_end_matches('/');
            let (base, last) = uri.rsplit_once('/')?;
            (matches!(last, "debian" | "debian-security")
                && base.contains("://")
                && !base.ends_with(':'))
            .then(|| base.to_owned())
        })
}

/// A kernel unpacked from its .debs.
#[derive(Clone)]
pub(super) struct Kernel {
    pub(super) package: String,
    pub(super) vmlinuz: PathBuf,
    pub(super) modules: PathBuf,
}

/// The private APT setup of one suite: its own sources list, lists and cache dirs.
fn apt(dir: &Path, mirror: &str, s: &Series) -> anyhow::Result<PathBuf> {
    let apt = dir.join("apt").join(s.suite);
    for d in [
        "state/lists/partial",
        "cache/archives/partial",
        "etc/apt.conf.d",
        "etc/preferences.d",
        "etc/sources.list.d",
    ] {
        mkdir(&apt.join(d))?;
    }
    let status = apt.join("state/status");
    if !status.exists() {
        write(&status, "")?;
    }
    write(
        &apt.join("etc/sources.list"),
        &format!(
            "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] {mirror}/{} {} main\n",
            s.archive, s.suite
        ),
    )?;
    let a = apt.display();
    let conf = apt.join("apt.conf");
    write(
        &conf,
        &format!(
            "Dir::State \"{a}/state\";\n\
             Dir::State::status \"{a}/state/status\";\n\
             Dir::Cache \"{a}/cache\";\n\
             Dir::Etc::SourceList \"{a}/etc/sources.list\";\n\
             Dir::Etc::SourceParts \"{a}/etc/sources.list.d\";\n\
             Dir::Etc::Parts \"{a}/etc/apt.conf.d\";\n\
             Dir::Etc::Preferences \"{a}/etc/preferences\";\n\
             Dir::Etc::PreferencesParts \"{a}/etc/preferences.d\";\n\
             APT::Architecture \"amd64\";\n\
             APT::Sandbox::User \"root\";\n\
             Acquire::Languages \"none\";\n"
        ),
    )?;
    Ok(conf)
}

/// Resolves the newest `linux-image-<series>…-amd64[-unsigned]` of the suite, downloads
/// it (and, for the split packaging of newer kernels, its `linux-binary-`/`linux-modules-`
/// parts) and unpacks it under `target/vm/kernels/<package>/`. Offline, the newest
/// cached kernel of the series is used.
pub(super) fn fetch_kernel(s: &Series, mirror: &str, dir: &Path) -> anyhow::Result<Kernel> {
    let conf = apt(dir, mirror, s)?;
    let kernels = dir.join("kernels");
    let apt_cmd = |program: &str| {
        let mut cmd = Command::new(program);
        cmd.env("APT_CONFIG", &conf);
        cmd
    };
    if let Err(e) = capture(apt_cmd("apt-get").args(["-qq", "update"])) {
        let cached = newest_cached(&kernels, s)?;
        let Some(cached) = cached else {
            return Err(e.context(format!(
                "failed to update the package lists of {} and no {} kernel is cached",
                s.suite, s.version
            )));
        };
        eprintln!(
            "vm-test: {}: package lists not updated ({e:#}); using cached {}",
            s.version, cached.package
        );
        return Ok(cached);
    }
    let names = capture(apt_cmd("apt-cache").args(["search", "--names-only", "^linux-image-"]))?;
    let Some(package) = newest_image(
        s.version,
        names.lines().filter_map(|l| l.split(" - ").next()),
    ) else {
        // The suite moved on (backports keep only recent kernels): the cache still has it.
        if let Some(cached) = newest_cached(&kernels, s)? {
            eprintln!(
                "vm-test: {}: no longer in {}; using cached {}",
                s.version, s.suite, cached.package
            );
            return Ok(cached);
        }
        bail!("no linux-image-{}…-amd64 package in {}", s.version, s.suite);
    };
    let unpacked = kernels.join(&package);
    if let Some(k) = load_cached(&unpacked)? {
        return Ok(k);
    }

    // The ABI string (e.g. `7.3.4+deb13-amd64`) names the package's own parts.
    let abi = package
        .trim_start_matches("linux-image-")
        .trim_end_matches("-unsigned")
        .to_owned();
    let depends = capture(apt_cmd("apt-cache").args(["depends", &package]))?;
    let mut packages = vec![package.clone()];
    packages.extend(
        depends
            .lines()
            .filter_map(|l| l.trim().strip_prefix("Depends: "))
            .filter(|d| d.starts_with("linux-") && d.ends_with(&abi))
            .map(str::to_owned),
    );
    let debs = unpacked.join("debs");
    if unpacked.exists() {
        fs::remove_dir_all(&unpacked)
            .with_context(|| format!("failed to remove {}", unpacked.display()))?;
    }
    mkdir(&debs)?;
    exec(
        apt_cmd("apt-get")
            .args(["-qq", "download"])
            .args(&packages)
            .current_dir(&debs),
    )?;
    let root = unpacked.join("root");
    for deb in fs::read_dir(&debs).with_context(|| format!("failed to read {}", debs.display()))? {
        let deb = deb
            .with_context(|| format!("failed to read {}", debs.display()))?
            .path();
        exec(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;
    }
    write(&unpacked.join("series"), s.version)?;
    load_cached(&unpacked)?
        .with_context(|| format!("{package} has no vmlinuz or no modules directory"))
}

/// The newest `linux-image-<version>[.-]…-amd64` (signed or `-unsigned`) among `names`,
/// comparing the ABI strings' numbers.
fn newest_image<'a>(version: &str, names: impl Iterator<Item = &'a str>) -> Option<String> {
    names
        .filter(|n| {
            let Some(abi) = n.strip_prefix("linux-image-") else {
                return false;
            };
            let Some(rest) = abi.strip_prefix(version) else {
                return false;
            };
            let flavour = abi.trim_end_matches("-unsigned");
            // `6.1.0-56`, not `6.12…` nor the meta package `6.1-amd64`.
            let mut after = rest.chars();
            matches!(after.next(), Some('.' | '-'))
                && after.next().is_some_and(|c| c.is_ascii_digit())
                && flavour.ends_with("-amd64")
                && !flavour.ends_with("-cloud-amd64")
                && !flavour.ends_with("-rt-amd64")
                && !flavour.ends_with("-dbg")
        })
        .max_by(|a, b| {
            natural_key(a)
                .cmp(&natural_key(b))
                // The same kernel signed or not: take the unsigned one, it needs nothing else.
                .then(a.ends_with("-unsigned").cmp(&b.ends_with("-unsigned")))
        })
        .map(str::to_owned)
}

/// The runs of digits in `s`, for version ordering (`6.12.118+deb13` > `6.12.115+deb13.1`).
fn natural_key(s: &str) -> Vec<u64> {
    s.split(|c: char| !c.is_ascii_digit())
        .filter(|p| !p.is_empty())
        .map(|p| p.parse().unwrap_or(u64::MAX))
        .collect()
}

fn newest_cached(kernels: &Path, s: &Series) -> anyhow::Result<Option<Kernel>> {
    let Ok(entries) = fs::read_dir(kernels) else {
        return Ok(None);
    };
    let mut found = Vec::new();
    for e in entries.flatten() {
        if fs::read_to_string(e.path().join("series")).is_ok_and(|v| v == s.version) {
            found.push(e.file_name().to_string_lossy().into_owned());
        }
    }
    let Some(newest) = newest_image(s.version, found.iter().map(String::as_str)) else {
        return Ok(None);
    };
    load_cached(&kernels.join(newest))
}

/// An unpacked kernel: `boot/vmlinuz-*` or `usr/lib/modules/<release>/vmlinuz`, and the
/// modules directory; `None` when not (completely) unpacked.
fn load_cached(unpacked: &Path) -> anyhow::Result<Option<Kernel>> {
    if !unpacked.join("series").exists() {
        return Ok(None);
    }
    let root = unpacked.join("root");
    let package = unpacked
        .file_name()
        .context("kernel directory name")?
        .to_string_lossy()
        .into_owned();
    for base in ["lib/modules", "usr/lib/modules"] {
        let Ok(entries) = fs::read_dir(root.join(base)) else {
            continue;
        };
        for e in entries.flatten() {
            let modules = e.path();
            let release = e.file_name().to_string_lossy().into_owned();
            let vmlinuz = [
                root.join("boot").join(format!("vmlinuz-{release}")),
                modules.join("vmlinuz"),
            ]
            .into_iter()
            .find(|p| p.is_file());
            if let Some(vmlinuz) = vmlinuz
                && modules.join("kernel").is_dir()
            {
                return Ok(Some(Kernel {
                    package,
                    vmlinuz,
                    modules,
                }));
            }
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newest_image_takes_the_highest_abi_of_the_series() {
        let names = [
            "linux-image-6.1.0-55-amd64",
            "linux-image-6.1.0-56-amd64",
            "linux-image-6.1.0-56-amd64-unsigned",
            "linux-image-6.1.0-56-cloud-amd64",
            "linux-image-6.12.118+deb12-amd64",
            "linux-image-6.1-amd64",
        ];
        assert_eq!(
            newest_image("6.1", names.into_iter()).as_deref(),
            Some("linux-image-6.1.0-56-amd64-unsigned")
        );
        let names = [
            "linux-image-6.12.115+deb13.1-amd64",
            "linux-image-6.12.118+deb13-amd64",
            "linux-image-6.12.118+deb13-rt-amd64",
        ];
        assert_eq!(
            newest_image("6.12", names.into_iter()).as_deref(),
            Some("linux-image-6.12.118+deb13-amd64")
        );
        assert_eq!(newest_image("7.3", names.into_iter()), None);
    }

    #[test]
    fn mirror_comes_from_one_line_and_deb822_sources() {
        assert_eq!(
            mirror_in("Types: deb\n# http://snapshot.debian.org/archive/debian/x\nURIs: http://deb.debian.org/debian\nSuites: bookworm\n")
                .as_deref(),
            Some("http://deb.debian.org")
        );
        assert_eq!(
            mirror_in("deb [arch=amd64] https://mirror.example.org/debian/ bookworm main\n")
                .as_deref(),
            Some("https://mirror.example.org")
        );
        assert_eq!(
            mirror_in("deb https://packages.cloud.google.com/apt cloud-sdk main\n"),
            None
        );
    }
}
