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

/// Installs the chains and hooks them into OUTPUT and PREROUTING (replacing any left
/// by a previous ztunnel).
/// Whether every rule and both jumps are in place already (a predecessor's, still
/// serving or not): `iptables -C` for each.
fn installed(pod: &PodRules, addrs: &[IpAddr]) -> bool {
    let mut families = vec![false];
    if pod.v6 {
        families.push(true);
    }
    families.into_iter().all(|fam| {
        pod.jumps().iter().all(|j| {
            let mut args = vec!["-t", "nat", "-C"];
            args.extend_from_slice(j);
            run(&pod.netns, fam, &args).is_ok()
        }) && rules(addrs, fam, pod.dns).iter().all(|rule| {
            let mut args = vec!["-t", "nat", "-C"];
            args.extend(rule.iter().map(String::as_str));
            run(&pod.netns, fam, &args).is_ok()
        })
    })
}

/// Installs the pod's rules. Rules already in place (a predecessor's) are left as they
/// are: taking them out first would let connections pass uncaptured meanwhile.
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
    remove_rules(&pod);
    let mut families = vec![false];
    if v6 {
        families.push(true);
    }
    for fam in families {
        for chain in [OUT, PRE] {
            run(&pod.netns, fam, &["-t", "nat", "-N", chain])?;
        }
        for rule in rules(addrs, fam, pod.dns) {
            let mut args = vec!["-t", "nat", "-A"];
            args.extend(rule.iter().map(String::as_str));
            run(&pod.netns, fam, &args)?;
        }
        for j in pod.jumps() {
            let mut args = vec!["-t", "nat", "-A"];
            args.extend_from_slice(&j);
            run(&pod.netns, fam, &args)?;
        }
    }
    Ok(pod)
}

fn remove_rules(pod: &PodRules) {
    let mut families = vec![false];
    if pod.v6 {
        families.push(true);
    }
    for fam in families {
        // Each step may find nothing to remove (a fresh pod): errors are expected here.
        // Every jump any ztunnel may have made, the DNS one too (a predecessor's, with
        // `--dns-capture` set otherwise).
        for j in [
            &["OUTPUT", "-p", "tcp", "-j", OUT][..],
            &["PREROUTING", "-p", "tcp", "-j", PRE],
            &["OUTPUT", "-p", "udp", "--dport", "53", "-j", OUT],
        ] {
            let mut args = vec!["-t", "nat", "-D"];
            args.extend_from_slice(j);
            let _ = run(&pod.netns, fam, &args);
        }
        for chain in [OUT, PRE] {
            let _ = run(&pod.netns, fam, &["-t", "nat", "-F", chain]);
            let _ = run(&pod.netns, fam, &["-t", "nat", "-X", chain]);
        }
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
}
