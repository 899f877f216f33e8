//! The source port of a dial to an app from its client's address (source preservation),
//! chosen by ztunnel before the SYN.
//!
//! Inside the pod's netns such a dial and the client's own connections share one
//! address, and the kernel keeps a tuple unique only per socket direction: ztunnel's
//! accepted socket of a plaintext client connection (local `pod:8080`, remote
//! `client:40000`) is exactly the socket the app would hold for a dial from
//! `client:40000`, and the app's socket of a dial from `client:40001` is exactly the
//! socket a new client connection from that port would need. Either way the second
//! connection's SYN reaches the first one's socket and hangs until a timeout.
//!
//! Linux clients connect from even ports first (`__inet_hash_connect` prefers the
//! range's low parity; only a client with every even port in use takes odd ones). So a
//! dial takes an **odd** port of the pod's `ip_local_port_range` (less
//! `ip_local_reserved_ports`): no new client connection of a Linux client then meets a
//! live dial, and no dial meets a client connection's port, whether ztunnel holds that
//! connection, its predecessor in an upgrade does, it waits in an accept queue or it is
//! in TIME_WAIT. A dial still never takes a tuple a client connection this ztunnel holds
//! has (a client on an odd port: another OS, a client that binds), and only when 16 odd
//! ports are taken does it try even ones. Each port is bound with `SO_REUSEADDR` (the
//! same port to other destinations stays usable, as with a port picked at connect) and
//! taken when `connect` finds its tuple free (`EADDRNOTAVAIL` otherwise). Ports are
//! taken in turn from one cursor per process, so a port comes back only after the
//! others of its parity: the TIME_WAIT a dial leaves has usually ended by then.
use std::{
    io,
    sync::{
        Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

/// How many ports of one parity a dial tries (bind and connect) before it moves on to
/// the other parity, and then fails.
pub(super) const TRIES_PER_PARITY: u32 = 16;

/// How long a pod's port range is used before it is read again: a changed sysctl
/// applies to dials from a second later.
const REREAD_AFTER: Duration = Duration::from_secs(1);

/// A netns's `net.ipv4.ip_local_port_range` (both families use it) less
/// `net.ipv4.ip_local_reserved_ports`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct PortRange {
    lo: u16,
    hi: u16,
    /// Inclusive ranges, as the sysctl lists them.
    reserved: Vec<(u16, u16)>,
}

impl PortRange {
    /// Parses the two sysctls' text (`"32768\t60999"`; `"8080,9000-9010"` or empty).
    pub(super) fn parse(range: &str, reserved: &str) -> Result<Self, String> {
        let port = |s: &str| {
            s.trim()
                .parse::<u16>()
                .map_err(|e| format!("port {s:?}: {e}"))
        };
        let mut it = range.split_whitespace();
        let (Some(lo), Some(hi), None) = (it.next(), it.next(), it.next()) else {
            return Err(format!("ip_local_port_range {range:?}: not two ports"));
        };
        let (lo, hi) = port(lo)
            .and_then(|lo| Ok((lo, port(hi)?)))
            .map_err(|e| format!("ip_local_port_range {range:?}: {e}"))?;
        if lo > hi || lo == 0 {
            return Err(format!(
                "ip_local_port_range {range:?}: not a range of ports"
            ));
        }
        let reserved = reserved
            .trim()
            .split(',')
            .filter(|s| !s.is_empty())
            .map(|s| match s.split_once('-') {
                Some((a, b)) => Ok((port(a)?, port(b)?)),
                None => port(s).map(|p| (p, p)),
            })
            .collect::<Result<Vec<_>, String>>()
            .map_err(|e| format!("ip_local_reserved_ports {reserved:?}: {e}"))?;
        Ok(Self { lo, hi, reserved })
    }

    /// Reads the current netns's range.
    fn read() -> io::Result<Self> {
        let read = |path: &str| {
            std::fs::read_to_string(path)
                .map_err(|e| io::Error::new(e.kind(), format!("{path} in the pod's netns: {e}")))
        };
        let range = read("/proc/sys/net/ipv4/ip_local_port_range")?;
        let reserved = read("/proc/sys/net/ipv4/ip_local_reserved_ports")?;
        Self::parse(&range, &reserved).map_err(io::Error::other)
    }

    /// The range's first port of `parity` (1: odd, 0: even) and how many it has.
    fn parity(&self, parity: u16) -> (u16, u32) {
        let first = if self.lo % 2 == parity {
            self.lo
        } else {
            match self.lo.checked_add(1) {
                Some(p) if p <= self.hi => p,
                _ => return (0, 0),
            }
        };
        (first, u32::from((self.hi - first) / 2) + 1)
    }

    fn is_reserved(&self, port: u16) -> bool {
        self.reserved.iter().any(|&(a, b)| (a..=b).contains(&port))
    }

    /// The ports a dial tries, in order: up to [`TRIES_PER_PARITY`] odd ones, then as many
    /// even ones, each the next of its parity from `cursor` (reserved ports passed over).
    pub(super) fn candidates<'a>(&'a self, cursor: &'a Cursor) -> impl Iterator<Item = u16> + 'a {
        [1, 0].into_iter().flat_map(move |parity| {
            let (first, count) = self.parity(parity);
            (0..count)
                .filter_map(move |_| {
                    let n = cursor.0.fetch_add(1, Ordering::Relaxed) % count;
                    // `n < count`, so the port is at most `hi`.
                    let port = first + u16::try_from(2 * n).unwrap_or(0);
                    (!self.is_reserved(port)).then_some(port)
                })
                .take(TRIES_PER_PARITY as usize)
        })
    }
}

impl std::fmt::Display for PortRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.lo, self.hi)
    }
}

/// Where the next dial's port search starts (one per process, random at start-up).
#[derive(Debug)]
pub(super) struct Cursor(AtomicU32);

impl Default for Cursor {
    fn default() -> Self {
        Self(AtomicU32::new(rand::random()))
    }
}

/// A pod's [`PortRange`], read in its netns and read again once [`REREAD_AFTER`] old.
#[derive(Debug, Default)]
pub struct PodPorts(Mutex<Option<(Instant, std::sync::Arc<PortRange>)>>);

impl PodPorts {
    /// The range; must run inside the pod's netns (`/proc/sys/net` shows the caller's).
    pub(super) fn current(&self) -> io::Result<std::sync::Arc<PortRange>> {
        let mut cached = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((at, range)) = cached.as_ref()
            && at.elapsed() < REREAD_AFTER
        {
            return Ok(range.clone());
        }
        let range = std::sync::Arc::new(PortRange::read()?);
        *cached = Some((Instant::now(), range.clone()));
        Ok(range)
    }
}

#[cfg(test)]
mod tests {
    use super::{Cursor, PortRange, TRIES_PER_PARITY};
    use std::sync::atomic::AtomicU32;

    fn range(r: &str, reserved: &str) -> PortRange {
        PortRange::parse(r, reserved).expect("a valid range")
    }

    fn ports(r: &PortRange, start: u32) -> Vec<u16> {
        let cursor = Cursor(AtomicU32::new(start));
        r.candidates(&cursor).collect()
    }

    #[test]
    fn the_sysctls_text_is_parsed_and_bad_text_named() {
        assert_eq!(
            range("32768\t60999\n", "8080,9000-9010\n"),
            PortRange {
                lo: 32768,
                hi: 60999,
                reserved: vec![(8080, 8080), (9000, 9010)]
            }
        );
        assert!(range("1024 1024", "\n").reserved.is_empty());
        for (r, res) in [
            ("32768", ""),
            ("32768 60999 1", ""),
            ("60999 32768", ""),
            ("0 10", ""),
            ("32768 70000", ""),
            ("32768 60999", "80-x"),
        ] {
            let e = PortRange::parse(r, res).expect_err(r);
            assert!(e.contains(if res.is_empty() { r } else { res }), "{e}");
        }
    }

    #[test]
    fn odd_ports_come_first_then_even_ones_each_in_turn() {
        let r = range("40000 40007", "");
        assert_eq!(
            ports(&r, 0),
            [40001, 40003, 40005, 40007, 40000, 40002, 40004, 40006]
        );
        // The cursor goes on from where the odd ports left it.
        assert_eq!(
            ports(&r, 2),
            [40005, 40007, 40001, 40003, 40004, 40006, 40000, 40002]
        );
        // A range of one odd port, of one even port.
        assert_eq!(ports(&range("40001 40001", ""), 7), [40001]);
        assert_eq!(ports(&range("40000 40000", ""), 7), [40000]);
        assert_eq!(ports(&range("65535 65535", ""), 0), [65535]);
    }

    #[test]
    fn a_dial_tries_a_bounded_number_of_ports_and_never_a_reserved_one() {
        let r = range("32768 60999", "32769-40000,40003");
        let all = ports(&r, 0);
        assert_eq!(all.len(), 2 * TRIES_PER_PARITY as usize);
        assert!(all[..TRIES_PER_PARITY as usize].iter().all(|p| p % 2 == 1));
        assert!(all[TRIES_PER_PARITY as usize..].iter().all(|p| p % 2 == 0));
        assert!(all.iter().all(|p| !r.is_reserved(*p)), "{all:?}");
        assert_eq!(all[0], 40001);
        assert_eq!(all[1], 40005);
        // Every port reserved: nothing to try.
        assert!(ports(&range("40000 40003", "40000-40003"), 0).is_empty());
    }

    #[test]
    fn the_cursor_wraps_without_leaving_the_range() {
        let r = range("40000 40004", "");
        let all = ports(&r, u32::MAX - 1);
        assert_eq!(all.len(), 5);
        assert!(all.iter().all(|p| (40000..=40004).contains(p)), "{all:?}");
    }
}
