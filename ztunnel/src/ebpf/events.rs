//! The capture programs' decision events (`ztunnel_common::events`): the ring buffer's
//! reader and the decoding of each event into names and socket addresses.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use std::os::fd::AsFd as _;

use aya::maps::{Map, MapData, MapError, RingBuf};
use ztunnel_common::{
    AF_INET, AF_INET6, IpKey,
    events::{Event, level, reason, source},
};

/// The ring buffer's reader. The programs write without waking it (a wake-up per event,
/// an irq_work, cost more than the program itself), so its owner polls [`Reader::drain`].
///
/// The ring is mapped into ztunnel only while it is read: the kernel maps all of a ring
/// buffer's pages at `mmap` (its data twice, for records that wrap), so a mapped 256 KiB
/// ring is 520 KiB of ztunnel's resident memory, and with every program group off (the
/// default) nothing writes to it.
pub struct Reader {
    /// The map itself, unmapped: what a mapping is made from.
    map: MapData,
    ring: Option<RingBuf<MapData>>,
}

impl Reader {
    pub(super) fn new(map: MapData) -> Self {
        Reader { map, ring: None }
    }

    /// Appends the events waiting in the ring to `out`, at most `max`. `reporting`:
    /// whether any program group may write to the ring now; if not, the ring is read
    /// until empty (what was written before the switch-off) and then unmapped.
    pub fn drain(
        &mut self,
        out: &mut Vec<Event>,
        max: usize,
        reporting: bool,
    ) -> Result<(), MapError> {
        if self.ring.is_none() && reporting {
            self.ring = Some(self.mapped()?);
        }
        let Some(ring) = &mut self.ring else {
            // Unmapped only once empty, with nothing reporting since: nothing to read
            // (an event a program wrote as its level went off waits for the next mapping).
            return Ok(());
        };
        while out.len() < max {
            let Some(item) = ring.next() else {
                if !reporting {
                    self.ring = None;
                }
                break;
            };
            if let Some(ev) = decode(&item) {
                out.push(ev);
            }
        }
        Ok(())
    }

    fn mapped(&self) -> Result<RingBuf<MapData>, MapError> {
        let fd = self
            .map
            .fd()
            .as_fd()
            .try_clone_to_owned()
            .map_err(|io_error| {
                MapError::SyscallError(aya::sys::SyscallError {
                    call: "dup",
                    io_error,
                })
            })?;
        RingBuf::try_from(Map::RingBuf(MapData::from_fd(fd)?))
    }
}

/// An event from its bytes in the ring (unaligned: the ring's records are 8-aligned,
/// but a copy costs nothing next to the syscall).
pub fn decode(bytes: &[u8]) -> Option<Event> {
    if bytes.len() < size_of::<Event>() {
        return None;
    }
    // SAFETY: the length is checked above and `Event` is plain data for which every
    // bit pattern is valid.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<Event>()) })
}

/// An address the program knew, as a socket address (`None` for family 0).
pub fn socket_addr(ip: &IpKey, port: u16) -> Option<SocketAddr> {
    let ip = ip_addr(ip)?;
    Some(SocketAddr::new(ip, port))
}

pub fn ip_addr(ip: &IpKey) -> Option<IpAddr> {
    match u16::try_from(ip.family).ok()? {
        AF_INET => Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(ip.addr[0])))),
        AF_INET6 => {
            let mut b = [0u8; 16];
            for (i, w) in ip.addr.iter().enumerate() {
                b[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
            }
            Some(IpAddr::V6(Ipv6Addr::from(b)))
        }
        _ => None,
    }
}

/// The program group's name (`connect`, `tc`, …).
pub fn source_name(ev: &Event) -> &'static str {
    source::NAMES
        .get(usize::from(ev.source))
        .copied()
        .unwrap_or("unknown")
}

/// (decision, why): `("dropped", "IP fragment of TCP")`.
pub fn reason_names(ev: &Event) -> (&'static str, &'static str) {
    reason::NAMES
        .get(usize::from(ev.reason))
        .copied()
        .unwrap_or(("unknown", "unknown"))
}

/// The level the event was reported at.
pub fn level_of(ev: &Event) -> u32 {
    reason::level_of(ev.reason)
}

/// A level by name (`off`, `warn`, `info`, `debug`).
pub fn parse_level(name: &str) -> Option<u32> {
    level::NAMES
        .iter()
        .position(|n| *n == name)
        .and_then(|i| u32::try_from(i).ok())
}

/// A program group by name.
pub fn parse_source(name: &str) -> Option<u32> {
    source::NAMES
        .iter()
        .position(|n| *n == name)
        .and_then(|i| u32::try_from(i).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_decode_with_names_and_addresses() {
        let ev = Event {
            netns_cookie: 4099,
            src: IpKey {
                addr: [u32::from_ne_bytes([10, 1, 0, 5]), 0, 0, 0],
                family: u32::from(AF_INET),
            },
            dst: IpKey {
                addr: [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])],
                family: u32::from(AF_INET6),
            },
            src_port: 40312,
            dst_port: 8080,
            source: source::TC as u16,
            reason: reason::INBOUND_DROPPED_FRAGMENT,
        };
        // SAFETY: plain data viewed as its bytes.
        let bytes =
            unsafe { std::slice::from_raw_parts((&raw const ev).cast::<u8>(), size_of::<Event>()) };
        let back = decode(bytes).expect("whole event");
        assert_eq!(back, ev);
        assert_eq!(decode(&bytes[..10]), None);
        assert_eq!(
            socket_addr(&back.src, back.src_port),
            Some("10.1.0.5:40312".parse().expect("addr"))
        );
        assert_eq!(
            socket_addr(&back.dst, back.dst_port),
            Some("[::1]:8080".parse().expect("addr"))
        );
        assert_eq!(socket_addr(&IpKey::default(), 0), None);
        assert_eq!(source_name(&back), "tc");
        assert_eq!(reason_names(&back), ("dropped", "IP fragment of TCP"));
        assert_eq!(level_of(&back), level::WARN);
    }

    #[test]
    fn every_reason_has_a_name_and_a_level() {
        for r in 1..reason::COUNT {
            let (decision, why) = reason::NAMES[usize::from(r)];
            assert!(decision != "unknown" && why != "unknown", "reason {r}");
            let l = reason::level_of(r);
            assert!((level::WARN..=level::DEBUG).contains(&l), "reason {r}");
            // What fails closed is reported at warn, so `capture=warn` shows every drop.
            let fails_closed = matches!(decision, "dropped" | "refused" | "failed" | "miss");
            assert_eq!(fails_closed, l == level::WARN, "reason {r}: {decision}");
        }
        assert_eq!(parse_level("debug"), Some(level::DEBUG));
        assert_eq!(parse_level("loud"), None);
        assert_eq!(parse_source("tc"), Some(source::TC));
    }
}
