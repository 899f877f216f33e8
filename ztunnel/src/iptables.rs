//! The iptables capture fallback (`--capture=iptables`, or `auto` on kernels without the
//! eBPF features): NAT REDIRECT rules inside the pod's netns send the pod's outbound TCP
//! (but to ztunnel's reserved ports) to ztunnel's :15001 and inbound TCP on `eth0` (but
//! HBONE's :15008), whatever its destination address, to :15006 — the same rules as the
//! eBPF programs. The original destination comes from conntrack through
//! `SO_ORIGINAL_DST`, as with eBPF. Conntrack reassembles fragments before NAT sees them
//! and re-evaluates NAT for a SYN that reopens a closed tuple, so neither bypasses it.
//! ztunnel's own connections are skipped by their marks (0x539, and 0x111 for the
//! source-preserving connections to the app and their replies). With `--dns-capture`,
//! the pod's UDP and TCP to port 53 (but to loopback and its own addresses) go to the DNS
//! proxy's `:15053`; conntrack gives the answers the server's address back.
use std::net::IpAddr;

use crate::netns::{self, Netns};

const OUT: &str = "ZTUNNEL_OUTPUT";
const PRE: &str = "ZTUNNEL_PREROUTING";

/// The rules installed in one pod.
#[derive(Debug)]
pub struct PodRules {
    pub name: String,
    netns: Netns,
    v6: bool,
    dns: bool,
}

impl PodRules {
    /// What is attached, for the admin port.
    pub fn attached(&self) -> Vec<&'static str> {
        let mut out = vec![
            "iptables nat OUTPUT → :15001",
            "iptables nat PREROUTING → :15006",
        ];
        if self.dns {
            out.push("iptables nat OUTPUT :53 → :15053");
        }
        out
    }

    /// The jumps from the built-in chains into ours.
    fn jumps(&self) -> Vec<Vec<&'static str>> {
        let mut out = vec![
            vec!["OUTPUT", "-p", "tcp", "-j", OUT],
            vec!["PREROUTING", "-p", "tcp", "-j", PRE],
        ];
        if self.dns {
            out.push(vec!["OUTPUT", "-p", "udp", "--dport", "53", "-j", OUT]);
        }
        out
    }
}

fn run(netns: &Netns, v6: bool, args: &[&str]) -> Result<String, netns::Error> {
    netns.exec(if v6 { "ip6tables" } else { "iptables" }, args)
}

/// The rules of one family, in order; each is appended with `-A`.
fn rules(addrs: &[IpAddr], v6: bool, dns: bool) -> Vec<Vec<String>> {
    let loopback = if v6 { "::1/128" } else { "127.0.0.0/8" };
    let reserved = ztunnel_common::ports::NEVER_CAPTURED
        .map(|p| p.to_string())
        .join(",");
    let mut r: Vec<Vec<&str>> = vec![
        vec![OUT, "-m", "mark", "--mark", "0x539/0xfff", "-j", "RETURN"],
        vec![OUT, "-m", "mark", "--mark", "0x111/0xfff", "-j", "RETURN"],
        vec![OUT, "-d", loopback, "-j", "RETURN"],
        vec![
            OUT,
            "-p",
            "tcp",
            "-m",
            "multiport",
            "--dports",
            &reserved,
            "-j",
            "RETURN",
        ],
    ];
    let own: Vec<String> = addrs
        .iter()
        .filter(|a| a.is_ipv6() == v6)
        .map(ToString::to_string)
        .collect();
    let mut out: Vec<Vec<String>> = r
        .drain(..)
        .map(|v| v.into_iter().map(str::to_owned).collect())
        .collect();
    for a in &own {
        out.push([OUT, "-d", a, "-j", "RETURN"].map(str::to_owned).to_vec());
    }
    if dns {
        for proto in ["udp", "tcp"] {
            out.push(
                [
                    OUT,
                    "-p",
                    proto,
                    "--dport",
                    "53",
                    "-j",
                    "REDIRECT",
                    "--to-ports",
                    "15053",
                ]
                .map(str::to_owned)
                .to_vec(),
            );
        }
    }
    out.push(
        [OUT, "-p", "tcp", "-j", "REDIRECT", "--to-ports", "15001"]
            .map(str::to_owned)
            .to_vec(),
    );
    out.push(
        [PRE, "-p", "tcp", "--dport", "15008", "-j", "RETURN"]
            .map(str::to_owned)
            .to_vec(),
    );
    // Every destination address, as tc: ztunnel's :15006 handler refuses those that
    // are not the pod's.
    out.push(
        [
            PRE,
            "-i",
            "eth0",
            "-p",
            "tcp",
            "-j",
            "REDIRECT",
            "--to-ports",
            "15006",
        ]
        .map(str::to_owned)
        .to_vec(),
    );
    out
}

/// Whether every rule and both jumps are in place already (a predecessor's, still
/// serving or not): `iptables -C` for each.
fn installed(pod: &PodRules, addrs: &[IpAddr]) -> bool {
    families(pod.v6).into_iter().all(|fam| {
        pod.jumps().iter().all(|j| present(pod, fam, j))
            && rules(addrs, fam, pod.dns).iter().all(|rule| {
                present(
                    pod,
                    fam,
                    &rule.iter().map(String::as_str).collect::<Vec<_>>(),
                )
            })
    })
}

/// IPv4 (`false`), then IPv6 (`true`) when the pod has an IPv6 address.
fn families(v6: bool) -> Vec<bool> {
    if v6 { vec![false, true] } else { vec![false] }
}

/// Whether the rule `rule` (chain first, as for `-A`) is in the nat table.
fn present(pod: &PodRules, v6: bool, rule: &[&str]) -> bool {
    let mut args = vec!["-t", "nat", "-C"];
    args.extend_from_slice(rule);
    run(&pod.netns, v6, &args).is_ok()
}

/// Every jump into our chains any ztunnel may have made (the DNS one too: a
/// predecessor's, with `--dns-capture` set otherwise).
const ALL_JUMPS: [&[&str]; 3] = [
    &["OUTPUT", "-p", "tcp", "-j", OUT],
    &["PREROUTING", "-p", "tcp", "-j", PRE],
    &["OUTPUT", "-p", "udp", "--dport", "53", "-j", OUT],
];

/// One family's rules as an `iptables-restore --noflush` script, applied as one commit:
/// both chains declared (created, or emptied when they exist) and filled, the jumps into
/// them added where `present` says they are missing, and jumps no longer wanted (DNS)
/// taken out. The nat table is never seen without the pod's complete rules.
fn restore_script(
    pod: &PodRules,
    addrs: &[IpAddr],
    v6: bool,
    present: impl Fn(&[&str]) -> bool,
) -> String {
    let mut out = format!("*nat\n:{OUT} - [0:0]\n:{PRE} - [0:0]\n");
    for rule in rules(addrs, v6, pod.dns) {
        out += &format!("-A {}\n", rule.join(" "));
    }
    let wanted = pod.jumps();
    for jump in ALL_JUMPS {
        let want = wanted.iter().any(|w| w.as_slice() == jump);
        match (want, present(jump)) {
            (true, false) => out += &format!("-A {}\n", jump.join(" ")),
            (false, true) => out += &format!("-D {}\n", jump.join(" ")),
            _ => {}
        }
    }
    out += "COMMIT\n";
    out
}

/// Replaces the family's rules by the ones for `addrs` in one commit (see
/// [`restore_script`]); on failure nothing changed.
fn apply(pod: &PodRules, addrs: &[IpAddr], v6: bool) -> Result<(), netns::Error> {
    let script = restore_script(pod, addrs, v6, |j| present(pod, v6, j));
    // `-w`: wait (bounded) for the xtables lock another iptables user may hold.
    pod.netns
        .exec_with_input(
            if v6 {
                "ip6tables-restore"
            } else {
                "iptables-restore"
            },
            &["--noflush", "-w", "5"],
            Some(script.as_bytes()),
        )
        .map(drop)
}

/// Installs the pod's rules. Rules already in place (a predecessor's) are left as they
/// are; different ones (a predecessor's for another spec or version) are replaced in
/// one commit per family, so the pod is never uncaptured meanwhile.
pub fn install(
    name: &str,
    netns: Netns,
    addrs: &[IpAddr],
    dns: bool,
) -> Result<PodRules, netns::Error> {
    let v6 = addrs.iter().any(IpAddr::is_ipv6);
    let pod = PodRules {
        name: name.to_owned(),
        netns,
        v6,
        dns,
    };
    if installed(&pod, addrs) {
        tracing::info!(pod = %pod.name, "iptables capture already in place; kept");
        return Ok(pod);
    }
    for fam in families(v6) {
        apply(&pod, addrs, fam)?;
    }
    Ok(pod)
}

/// Rewrites a re-enrolled pod's rules for its changed addresses in place, one commit
/// per family: the pod is captured by the old rules or the new ones at every moment.
/// On failure the old rules are in force again (a family already rewritten is put
/// back) and come back with the reason.
pub fn reinstall(
    old: PodRules,
    old_addrs: &[IpAddr],
    addrs: &[IpAddr],
) -> Result<PodRules, Box<(netns::Error, PodRules)>> {
    let v6 = addrs.iter().any(IpAddr::is_ipv6);
    let new = PodRules {
        name: old.name.clone(),
        netns: match old.netns.try_clone() {
            Ok(n) => n,
            Err(e) => return Err(Box::new((e, old))),
        },
        v6,
        dns: old.dns,
    };
    let mut done = Vec::new();
    for fam in families(v6) {
        if let Err(e) = apply(&new, addrs, fam) {
            for fam in done {
                if let Err(again) = apply(&old, old_addrs, fam) {
                    tracing::error!(pod = %old.name, error = %again, "failed to put the pod's previous iptables rules back");
                }
            }
            return Err(Box::new((e, old)));
        }
        done.push(fam);
    }
    // An IPv6 address gone: its family's rules go (the IPv4 ones are in place).
    if old.v6 && !v6 {
        remove_family(&old, true);
    }
    Ok(new)
}

fn remove_rules(pod: &PodRules) {
    for fam in families(pod.v6) {
        remove_family(pod, fam);
    }
}

/// Takes one family's jumps and chains out. Each step may find nothing to remove (a
/// fresh pod): errors are expected here.
fn remove_family(pod: &PodRules, v6: bool) {
    for j in ALL_JUMPS {
        let mut args = vec!["-t", "nat", "-D"];
        args.extend_from_slice(j);
        let _ = run(&pod.netns, v6, &args);
    }
    for chain in [OUT, PRE] {
        let _ = run(&pod.netns, v6, &["-t", "nat", "-F", chain]);
        let _ = run(&pod.netns, v6, &["-t", "nat", "-X", chain]);
    }
}

/// Takes the pod's rules out; connections already redirected keep flowing.
pub fn remove(pod: PodRules) {
    remove_rules(&pod);
    tracing::info!(pod = %pod.name, "iptables capture removed");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_skip_ztunnel_loopback_and_own_addresses_before_redirecting() {
        let addrs: Vec<IpAddr> = vec![
            "10.0.0.5".parse().expect("ip"),
            "fd00::5".parse().expect("ip"),
        ];
        let v4 = rules(&addrs, false, true);
        let redirect = v4
            .iter()
            .position(|r| r.contains(&"15001".to_owned()) && r.contains(&"REDIRECT".to_owned()))
            .expect("outbound redirect");
        for skip in ["0x539/0xfff", "0x111/0xfff", "127.0.0.0/8", "10.0.0.5"] {
            let at = v4
                .iter()
                .position(|r| r.iter().any(|a| a == skip))
                .expect("skip rule");
            assert!(at < redirect, "{skip} must be skipped before the redirect");
        }
        assert!(v4.iter().all(|r| !r.iter().any(|a| a == "fd00::5")));
        // DNS to loopback (a resolver in the pod) and to the pod itself is not captured.
        for proto in ["udp", "tcp"] {
            let dns = v4
                .iter()
                .position(|r| r.contains(&proto.to_owned()) && r.contains(&"15053".to_owned()))
                .expect("dns redirect");
            for skip in ["0x539/0xfff", "127.0.0.0/8", "10.0.0.5"] {
                let at = v4
                    .iter()
                    .position(|r| r.iter().any(|a| a == skip))
                    .expect("skip rule");
                assert!(at < dns, "{skip} must be skipped before the DNS redirect");
            }
            assert!(dns < redirect, "port 53 before the outbound redirect");
        }
        assert!(
            rules(&addrs, false, false)
                .iter()
                .all(|r| !r.contains(&"15053".to_owned())),
            "no DNS rules without --dns-capture"
        );
        let v6 = rules(&addrs, true, true);
        assert!(v6.iter().any(|r| r.iter().any(|a| a == "::1/128")));
        assert!(v6.iter().any(|r| r.iter().any(|a| a == "fd00::5")));
    }

    #[test]
    fn only_ztunnels_in_pod_ports_are_exempt_and_inbound_covers_every_address() {
        let addrs: Vec<IpAddr> = vec!["10.0.0.5".parse().expect("ip")];
        let v4 = rules(&addrs, false, false);
        let exempt = v4
            .iter()
            .find(|r| r.iter().any(|a| a == "multiport"))
            .expect("port exemption");
        assert!(
            exempt.contains(&"15001,15006,15008".to_owned()),
            "{exempt:?}"
        );
        // 15000, 15020, 15021 and 15053 are the app's inside a pod, as in Istio.
        for app_port in ["15000", "15020", "15021", "15053"] {
            assert!(
                v4.iter().all(|r| !r.iter().any(|a| a.contains(app_port))),
                "{app_port} must be captured"
            );
        }
        let inbound: Vec<_> = v4.iter().filter(|r| r[0] == PRE).collect();
        assert_eq!(inbound.len(), 2, "{inbound:?}");
        assert!(
            inbound[0].contains(&"15008".to_owned()) && inbound[0].contains(&"RETURN".to_owned())
        );
        assert!(
            inbound[1].contains(&"15006".to_owned()) && !inbound[1].contains(&"-d".to_owned()),
            "inbound redirect must not depend on the destination address: {:?}",
            inbound[1]
        );
    }

    #[test]
    fn a_rewrite_is_one_commit_that_refills_the_chains_and_fixes_only_the_jumps() {
        let pod = |dns| PodRules {
            name: "default/a".to_owned(),
            netns: Netns::current().expect("own netns"),
            v6: false,
            dns,
        };
        let addrs: Vec<IpAddr> = vec!["10.0.0.5".parse().expect("ip")];
        // Nothing in place: both chains declared (created or emptied), every rule and
        // both jumps appended, all before the one COMMIT.
        let fresh = restore_script(&pod(false), &addrs, false, |_| false);
        let lines: Vec<&str> = fresh.lines().collect();
        assert_eq!(
            lines[..3],
            [
                "*nat",
                ":ZTUNNEL_OUTPUT - [0:0]",
                ":ZTUNNEL_PREROUTING - [0:0]"
            ]
        );
        assert_eq!(lines.last(), Some(&"COMMIT"));
        assert_eq!(lines.iter().filter(|l| **l == "COMMIT").count(), 1);
        let appended = lines
            .iter()
            .filter(|l| l.starts_with("-A ZTUNNEL_"))
            .count();
        assert_eq!(appended, rules(&addrs, false, false).len());
        assert!(lines.contains(&"-A ZTUNNEL_OUTPUT -d 10.0.0.5 -j RETURN"));
        assert!(lines.contains(&"-A OUTPUT -p tcp -j ZTUNNEL_OUTPUT"));
        assert!(lines.contains(&"-A PREROUTING -p tcp -j ZTUNNEL_PREROUTING"));
        assert!(!fresh.contains("--dport 53 -j ZTUNNEL_OUTPUT"), "{fresh}");
        // Every jump in place, the DNS one too, without --dns-capture: the jumps stay
        // (never removed and re-added), the DNS one goes, in the same commit.
        let rewrite = restore_script(&pod(false), &addrs, false, |_| true);
        assert!(!rewrite.contains("-A OUTPUT ") && !rewrite.contains("-A PREROUTING "));
        assert!(rewrite.contains("\n-D OUTPUT -p udp --dport 53 -j ZTUNNEL_OUTPUT\n"));
        // With --dns-capture and no DNS jump yet, it is added and nothing is deleted.
        let dns = restore_script(&pod(true), &addrs, false, |j| j.len() == 5);
        assert!(dns.contains("\n-A OUTPUT -p udp --dport 53 -j ZTUNNEL_OUTPUT\n"));
        assert!(!dns.contains("-D "), "{dns}");
    }
}
