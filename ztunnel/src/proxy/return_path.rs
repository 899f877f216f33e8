//! Source-address preservation inside a pod, without iptables. ztunnel connects to the
//! app from the client's own address (`IP_TRANSPARENT`) with mark [`MARK`]. With
//! `net.ipv4.tcp_fwmark_accept=1` the app's accepted socket inherits the SYN's mark, and
//! a policy rule sends everything carrying it to a table whose only route is `local
//! default dev lo`: the app's replies to the (non-local) client address come back to
//! ztunnel's socket instead of leaving through `eth0`. `fwmark_reflect=1` does the same
//! for the kernel's own replies (a RST from a closed port), so a refused connect is seen
//! at once instead of timing out. The numbers follow Istio's in-pod mode (mark
//! 0x111/0xfff).
use crate::netns::{self, Netns};

/// Mark of ztunnel's connections to the app that carry the client's address.
pub const MARK: u32 = 0x111;
const MASK: u32 = 0xfff;
const TABLE: &str = "133";
const PREF: &str = "32764";

/// What [`install`] changed, so [`remove`] can put it back.
#[derive(Debug)]
pub struct ReturnPath {
    /// (sysctl, value before install)
    old_sysctls: Vec<(&'static str, String)>,
    v6: bool,
}

const SYSCTLS: [&str; 3] = [
    "net/ipv4/tcp_fwmark_accept",
    "net/ipv4/fwmark_reflect",
    "net/ipv6/fwmark_reflect",
];

fn rule_args(v6: bool, op: &str) -> Vec<String> {
    let fam = if v6 { "-6" } else { "-4" };
    [
        fam,
        "rule",
        op,
        "fwmark",
        &format!("{MARK:#x}/{MASK:#x}"),
        "pref",
        PREF,
        "lookup",
        TABLE,
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect()
}

fn ip(netns: &Netns, args: &[String]) -> Result<String, netns::Error> {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    netns.exec("ip", &args)
}

/// Installs the sysctl, rule and route in the pod's netns (idempotent).
pub fn install(netns: &Netns, v6: bool) -> Result<ReturnPath, netns::Error> {
    let mut old_sysctls = Vec::new();
    for key in SYSCTLS {
        // IPv6 may be disabled in the pod; its sysctl is then absent and not needed.
        match netns.sysctl(key, "1") {
            Ok(old) => old_sysctls.push((key, old)),
            Err(e) if key.starts_with("net/ipv6") => tracing::debug!(error = %e, "no IPv6 sysctl"),
            Err(e) => return Err(e),
        }
    }
    let mut families = vec![false];
    if v6 {
        families.push(true);
    }
    for v6 in families {
        // A rule left by a previous ztunnel would be duplicated: delete first.
        let _ = ip(netns, &rule_args(v6, "del"));
        ip(netns, &rule_args(v6, "add"))?;
        let default = if v6 { "::/0" } else { "0.0.0.0/0" };
        let fam = if v6 { "-6" } else { "-4" };
        ip(
            netns,
            &[
                fam, "route", "replace", "local", default, "dev", "lo", "table", TABLE,
            ]
            .map(str::to_owned),
        )?;
    }
    Ok(ReturnPath { old_sysctls, v6 })
}

/// Takes the rule, route and sysctl out again (errors are logged: the netns may be gone).
pub fn remove(netns: &Netns, rp: ReturnPath) {
    let mut families = vec![false];
    if rp.v6 {
        families.push(true);
    }
    for v6 in families {
        let fam = if v6 { "-6" } else { "-4" };
        for args in [
            rule_args(v6, "del"),
            [fam, "route", "flush", "table", TABLE]
                .map(str::to_owned)
                .to_vec(),
        ] {
            if let Err(e) = ip(netns, &args) {
                tracing::debug!(error = %e, "return path cleanup");
            }
        }
    }
    for (key, old) in &rp.old_sysctls {
        if let Err(e) = netns.sysctl(key, old) {
            tracing::debug!(error = %e, "return path cleanup");
        }
    }
}
