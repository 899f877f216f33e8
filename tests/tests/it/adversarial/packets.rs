//! Crafted packets against the inbound capture (tc ingress on the pod's `eth0`, and
//! `sk_lookup` for SYNs that meet a TIME_WAIT socket). The promise under test: the app
//! never accepts a connection that did not pass ztunnel; what tc cannot classify it
//! drops and counts by reason. The packets are built with etherparse and sent from a
//! pod outside the mesh through an AF_PACKET socket on its `eth0`, which also reads the
//! answers; that pod's own kernel would reset the handshakes it never started, so its
//! outgoing resets are dropped (iptables in its netns only).
use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd as _,
    process::Command,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use etherparse::{
    EtherType, Ethernet2Header, IpFragOffset, IpNumber, Ipv4Header, Ipv6FlowLabel,
    Ipv6FragmentHeader, Ipv6Header, Ipv6RawExtHeader, NetHeaders, PacketHeaders, TcpHeader,
    TcpOptionElement, TransportHeader, UdpHeader,
};
use ztunnel::{admin::ConfigDump, netns::Netns, proxy::Direction};
use ztunnel_tests::{Pod, Topology, Ztunnel};

const STRICT: &str = "peerAuthentications:
  - name: strict
    namespace: default
    mode: STRICT
";

/// The app: a server in the pod's netns (dual-stack) that records the peer of every
/// connection it accepts. It echoes, or with `close_first` writes a line and closes.
struct App {
    peers: Arc<Mutex<Vec<SocketAddr>>>,
}

impl App {
    fn start(pod: &Pod, port: u16, close_first: bool) -> anyhow::Result<Self> {
        let addr: SocketAddr = format!("[::]:{port}").parse()?;
        let listener =
            Netns::open(&pod.netns_path)?.run_on_thread(|| TcpListener::bind(addr))??;
        let peers = Arc::new(Mutex::new(Vec::new()));
        let seen = peers.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                if let Ok(peer) = conn.peer_addr() {
                    seen.lock().expect("peers lock").push(canonical(peer));
                }
                if close_first {
                    let _ = conn.write_all(b"hello\n");
                    continue;
                }
                std::thread::spawn(move || {
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = conn.read(&mut buf) {
                        if n == 0 || conn.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                });
            }
        });
        Ok(Self { peers })
    }

    fn peers(&self) -> Vec<SocketAddr> {
        self.peers.lock().expect("peers lock").clone()
    }
}

/// `::ffff:a.b.c.d` as the IPv4 address a dual-stack listener means.
fn canonical(a: SocketAddr) -> SocketAddr {
    match a.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), a.port()),
            None => a,
        },
        IpAddr::V4(_) => a,
    }
}

fn counter(d: &ConfigDump, name: &str) -> u64 {
    d.capture.counters.get(name).copied().unwrap_or(0)
}

/// The MAC address of `eth0` in a pod.
fn mac(pod: &Pod) -> anyhow::Result<[u8; 6]> {
    let out = Command::new("ip")
        .args(["-n", &pod.netns, "-o", "link", "show", "eth0"])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let hex = text
        .split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .with_context(|| format!("no MAC in {text:?}"))?;
    let mut mac = [0u8; 6];
    for (i, byte) in hex.split(':').enumerate() {
        ensure!(i < 6, "bad MAC {hex}");
        mac[i] = u8::from_str_radix(byte, 16)?;
    }
    Ok(mac)
}

/// An IPv6 extension header to put in front of the TCP header.
#[derive(Clone, Copy, Debug)]
enum Ext {
    HopByHop,
    DestOpts,
    /// Type 0, no segments left: the kernel skips it (RFC 8200 §4.4).
    Routing,
    Fragment {
        /// In 8-octet units.
        offset: u16,
        more: bool,
    },
}

impl Ext {
    fn number(self) -> IpNumber {
        match self {
            Ext::HopByHop => IpNumber::IPV6_HEADER_HOP_BY_HOP,
            Ext::DestOpts => IpNumber::IPV6_DESTINATION_OPTIONS,
            Ext::Routing => IpNumber::IPV6_ROUTE_HEADER,
            Ext::Fragment { .. } => IpNumber::IPV6_FRAGMENTATION_HEADER,
        }
    }

    fn bytes(self, next: IpNumber) -> anyhow::Result<Vec<u8>> {
        Ok(match self {
            // One PadN option filling the header's six bytes.
            Ext::HopByHop | Ext::DestOpts => Ipv6RawExtHeader::new_raw(next, &[1, 4, 0, 0, 0, 0])?
                .to_bytes()
                .to_vec(),
            // Routing type 0, segments left 0, reserved.
            Ext::Routing => Ipv6RawExtHeader::new_raw(next, &[0, 0, 0, 0, 0, 0])?
                .to_bytes()
                .to_vec(),
            Ext::Fragment { offset, more } => {
                Ipv6FragmentHeader::new(next, IpFragOffset::try_new(offset)?, more, 0x5eed)
                    .to_bytes()
                    .to_vec()
            }
        })
    }
}

/// A TCP client faked with raw frames from a pod outside the mesh.
struct Attacker {
    sock: socket2::Socket,
    mac: [u8; 6],
    target_mac: [u8; 6],
    src: SocketAddr,
    dst: SocketAddr,
    ip_id: u16,
}

/// What the target answered a SYN with.
struct SynAck {
    seq: u32,
}

impl Attacker {
    /// From `from` (sending from `src`, an address of `from`) to `dst` in `target`.
    fn new(from: &Pod, target: &Pod, src: SocketAddr, dst: SocketAddr) -> anyhow::Result<Self> {
        // The pod's kernel knows nothing of the connections faked here: keep it from
        // resetting them.
        for tool in ["iptables", "ip6tables"] {
            let rule = [
                "OUTPUT",
                "-p",
                "tcp",
                "--tcp-flags",
                "RST",
                "RST",
                "-j",
                "DROP",
            ];
            let check = Command::new("ip")
                .args(["netns", "exec", &from.netns, tool, "-C"])
                .args(rule)
                .output()?;
            if !check.status.success() {
                let out = Command::new("ip")
                    .args(["netns", "exec", &from.netns, tool, "-A"])
                    .args(rule)
                    .output()?;
                ensure!(
                    out.status.success(),
                    "{tool} in {}: {}",
                    from.netns,
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        let sock = Netns::open(&from.netns_path)?.run_on_thread(
            || -> anyhow::Result<socket2::Socket> {
                let proto = (libc::ETH_P_ALL as u16).to_be();
                let sock = socket2::Socket::new(
                    socket2::Domain::PACKET,
                    socket2::Type::RAW,
                    Some(socket2::Protocol::from(i32::from(proto))),
                )?;
                // SAFETY: a NUL-terminated interface name.
                let ifindex = unsafe { libc::if_nametoindex(c"eth0".as_ptr()) };
                ensure!(ifindex != 0, "no eth0 in the pod");
                // SAFETY: a zeroed sockaddr_ll is valid; the fields set are its own.
                let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
                sll.sll_family = libc::AF_PACKET as u16;
                sll.sll_protocol = proto;
                sll.sll_ifindex = ifindex as i32;
                // SAFETY: binding our own socket to a valid sockaddr_ll of its size.
                let rc = unsafe {
                    libc::bind(
                        sock.as_raw_fd(),
                        (&raw const sll).cast(),
                        std::mem::size_of::<libc::sockaddr_ll>() as u32,
                    )
                };
                ensure!(
                    rc == 0,
                    "bind AF_PACKET: {}",
                    std::io::Error::last_os_error()
                );
                Ok(sock)
            },
        )??;
        Ok(Self {
            sock,
            mac: mac(from)?,
            target_mac: mac(target)?,
            src,
            dst,
            ip_id: 0x4000,
        })
    }

    fn tcp(&self, seq: u32) -> TcpHeader {
        TcpHeader::new(self.src.port(), self.dst.port(), seq, 64240)
    }

    fn ether(&self) -> Ethernet2Header {
        Ethernet2Header {
            source: self.mac,
            destination: self.target_mac,
            ether_type: if self.dst.is_ipv4() {
                EtherType::IPV4
            } else {
                EtherType::IPV6
            },
        }
    }

    fn v4(&self) -> ([u8; 4], [u8; 4]) {
        match (self.src.ip(), self.dst.ip()) {
            (IpAddr::V4(s), IpAddr::V4(d)) => (s.octets(), d.octets()),
            _ => unreachable!("an IPv4 attacker"),
        }
    }

    fn v6(&self) -> ([u8; 16], [u8; 16]) {
        match (self.src.ip(), self.dst.ip()) {
            (IpAddr::V6(s), IpAddr::V6(d)) => (s.octets(), d.octets()),
            _ => unreachable!("an IPv6 attacker"),
        }
    }

    /// The TCP segment's bytes, checksum filled in.
    fn segment(&self, mut tcp: TcpHeader, payload: &[u8]) -> anyhow::Result<Vec<u8>> {
        tcp.checksum = if self.dst.is_ipv4() {
            let (s, d) = self.v4();
            tcp.calc_checksum_ipv4_raw(s, d, payload)?
        } else {
            let (s, d) = self.v6();
            tcp.calc_checksum_ipv6_raw(s, d, payload)?
        };
        let mut out = tcp.to_bytes().to_vec();
        out.extend_from_slice(payload);
        Ok(out)
    }

    /// IPv4 frames carrying `l4` (protocol `proto`) in fragments of `frag` bytes (a
    /// multiple of 8; `None`: one unfragmented frame).
    fn ipv4_frames(
        &mut self,
        proto: IpNumber,
        l4: &[u8],
        frag: Option<usize>,
    ) -> anyhow::Result<Vec<Vec<u8>>> {
        let (s, d) = self.v4();
        self.ip_id = self.ip_id.wrapping_add(1);
        let size = frag.unwrap_or(l4.len()).max(1);
        let mut frames = Vec::new();
        for (i, piece) in l4.chunks(size).enumerate() {
            let mut ip = Ipv4Header::new(piece.len() as u16, 64, proto, s, d)?;
            ip.identification = self.ip_id;
            ip.fragment_offset = IpFragOffset::try_new((i * size / 8) as u16)?;
            ip.more_fragments = (i + 1) * size < l4.len();
            ip.header_checksum = ip.calc_header_checksum();
            let mut f = self.ether().to_bytes().to_vec();
            f.extend_from_slice(&ip.to_bytes());
            f.extend_from_slice(piece);
            frames.push(f);
        }
        Ok(frames)
    }

    /// An IPv6 frame: `exts` in order, then `l4` (protocol `proto`), which may be a
    /// piece of a fragmented datagram.
    fn ipv6_frame(&self, exts: &[Ext], proto: IpNumber, l4: &[u8]) -> anyhow::Result<Vec<u8>> {
        let (s, d) = self.v6();
        let mut chain = Vec::new();
        for (i, ext) in exts.iter().enumerate() {
            let next = exts.get(i + 1).map_or(proto, |e| e.number());
            chain.extend(ext.bytes(next)?);
        }
        let ip = Ipv6Header {
            traffic_class: 0,
            flow_label: Ipv6FlowLabel::ZERO,
            payload_length: (chain.len() + l4.len()) as u16,
            next_header: exts.first().map_or(proto, |e| e.number()),
            hop_limit: 64,
            source: s,
            destination: d,
        };
        let mut f = self.ether().to_bytes().to_vec();
        f.extend_from_slice(&ip.to_bytes());
        f.extend(chain);
        f.extend_from_slice(l4);
        Ok(f)
    }

    /// A whole TCP segment as one frame, IPv6 behind `exts`.
    fn frame(&mut self, exts: &[Ext], tcp: TcpHeader, payload: &[u8]) -> anyhow::Result<Vec<u8>> {
        let seg = self.segment(tcp, payload)?;
        if self.dst.is_ipv4() {
            Ok(self.ipv4_frames(IpNumber::TCP, &seg, None)?.remove(0))
        } else {
            self.ipv6_frame(exts, IpNumber::TCP, &seg)
        }
    }

    fn send(&self, frame: &[u8]) -> anyhow::Result<()> {
        let n = self.sock.send(frame)?;
        ensure!(n == frame.len(), "short send: {n} of {}", frame.len());
        Ok(())
    }

    /// Waits up to `wait` for the target's SYN-ACK to our source port.
    fn syn_ack(&self, wait: Duration) -> anyhow::Result<Option<SynAck>> {
        let deadline = Instant::now() + wait;
        let mut buf = vec![0u8; 65536];
        while Instant::now() < deadline {
            self.sock.set_read_timeout(Some(
                deadline
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(10)),
            ))?;
            let n = match (&self.sock).read(&mut buf) {
                Ok(n) => n,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            let Ok(p) = PacketHeaders::from_ethernet_slice(&buf[..n]) else {
                continue;
            };
            let from: IpAddr = match &p.net {
                Some(NetHeaders::Ipv4(h, _)) => IpAddr::from(h.source),
                Some(NetHeaders::Ipv6(h, _)) => IpAddr::from(h.source),
                _ => continue,
            };
            if let Some(TransportHeader::Tcp(t)) = &p.transport
                && from == self.dst.ip()
                && t.source_port == self.dst.port()
                && t.destination_port == self.src.port()
                && t.syn
                && t.ack
            {
                return Ok(Some(SynAck {
                    seq: t.sequence_number,
                }));
            }
        }
        Ok(None)
    }

    /// Sends the SYN `frames` (one segment, possibly fragmented); when a SYN-ACK comes
    /// back within `wait`, completes the handshake and sends `payload`, behind `exts`.
    /// Returns whether the handshake completed.
    fn connect(
        &mut self,
        frames: &[Vec<u8>],
        exts: &[Ext],
        isn: u32,
        wait: Duration,
        payload: &[u8],
    ) -> anyhow::Result<bool> {
        for f in frames {
            self.send(f)?;
        }
        let Some(sa) = self.syn_ack(wait)? else {
            return Ok(false);
        };
        let mut ack = self.tcp(isn.wrapping_add(1));
        ack.ack = true;
        ack.acknowledgment_number = sa.seq.wrapping_add(1);
        let f = self.frame(exts, ack.clone(), &[])?;
        self.send(&f)?;
        ack.psh = true;
        let f = self.frame(exts, ack, payload)?;
        self.send(&f)?;
        Ok(true)
    }

    fn syn(&self, isn: u32) -> TcpHeader {
        let mut syn = self.tcp(isn);
        syn.syn = true;
        syn
    }
}

/// node1: A (enrolled, STRICT, dual-stack) runs the app on :8080; C, outside the mesh,
/// is the attacker.
struct Target {
    /// Held for its Drop, which tears the namespaces down.
    _t: Topology,
    a: Pod,
    c: Pod,
    app: App,
    z: Ztunnel,
}

fn target(policy: &str, close_first: bool) -> anyhow::Result<Target> {
    let mut t = Topology::new()?;
    let a = t.add_pod("a", true, true)?;
    let c = t.add_pod("c", false, true)?;
    let app = App::start(&a, 8080, close_first)?;
    t.write_workloads_text(&format!("{}{policy}", t.workloads_yaml()))?;
    let file = t.workloads_path();
    let z = t.start_ztunnel_with_file("node1", false, &file)?;
    Ok(Target {
        _t: t,
        a,
        c,
        app,
        z,
    })
}

impl Target {
    /// Asserts the app never accepted a connection.
    fn app_untouched(&self, what: &str) -> anyhow::Result<()> {
        // Give a connection that got through time to be accepted.
        std::thread::sleep(Duration::from_millis(500));
        let peers = self.app.peers();
        ensure!(
            peers.is_empty(),
            "{what}: the app accepted {peers:?} without ztunnel"
        );
        Ok(())
    }
}

/// A SYN sent as 8-byte IPv4 fragments, which the kernel would reassemble behind tc's
/// back, is dropped; fragmented UDP still passes.
#[test]
fn fragmented_ipv4_syn_is_dropped_under_strict() -> anyhow::Result<()> {
    let tg = target(STRICT, false)?;
    let (src, dst) = (tg.c.addr(41001), tg.a.addr(8080));
    let mut atk = Attacker::new(&tg.c, &tg.a, src, dst)?;
    let seg = atk.segment(atk.syn(1000), &[])?;
    let frames = atk.ipv4_frames(IpNumber::TCP, &seg, Some(8))?;
    assert_eq!(frames.len(), 3, "a 20-byte header in 8-byte pieces");
    let connected = atk.connect(&frames, &[], 1000, Duration::from_secs(3), b"plaintext\n")?;
    tg.app_untouched("fragmented SYN")?;
    assert!(!connected, "the fragmented SYN was answered");
    let d = tg.z.dump()?;
    assert_eq!(counter(&d, "inbound_drop_fragment"), 3);
    assert_eq!(d.connections.opened_total, 0, "{:?}", d.connections.list);

    // Fragmented UDP is not tc's business: it must still arrive.
    let udp = Netns::open(&tg.a.netns_path)?
        .run_on_thread(|| UdpSocket::bind(SocketAddr::from(([0, 0, 0, 0], 9999))))??;
    udp.set_read_timeout(Some(Duration::from_secs(30)))?;
    let (s, d4) = atk.v4();
    let body = b"a datagram long enough to need more than one fragment!";
    let mut header = UdpHeader::without_ipv4_checksum(41002, 9999, body.len())?;
    header.checksum = header.calc_checksum_ipv4_raw(s, d4, body)?;
    let mut dgram = header.to_bytes().to_vec();
    dgram.extend_from_slice(body);
    for f in atk.ipv4_frames(IpNumber::UDP, &dgram, Some(16))? {
        atk.send(&f)?;
    }
    let mut got = [0u8; 256];
    let (n, _) = udp
        .recv_from(&mut got)
        .context("fragmented UDP did not arrive")?;
    assert_eq!(&got[..n], body);
    Ok(())
}

/// IPv6 SYNs behind Hop-by-Hop, Destination Options and Routing headers reach ztunnel
/// (which refuses their plaintext under STRICT), never the app; a chain longer than tc
/// walks is dropped.
#[test]
fn ipv6_syn_behind_extension_headers_is_steered_to_ztunnel() -> anyhow::Result<()> {
    let tg = target(STRICT, false)?;
    let cases: [(&str, &[Ext]); 4] = [
        ("hop-by-hop", &[Ext::HopByHop]),
        ("destination options", &[Ext::DestOpts]),
        ("routing", &[Ext::Routing]),
        (
            "all three",
            &[Ext::HopByHop, Ext::DestOpts, Ext::Routing, Ext::DestOpts],
        ),
    ];
    for (i, (what, exts)) in cases.iter().enumerate() {
        let src = tg.c.addr6(41100 + i as u16);
        let mut atk = Attacker::new(&tg.c, &tg.a, src, tg.a.addr6(8080))?;
        let f = atk.frame(exts, atk.syn(2000), &[])?;
        let connected = atk.connect(&[f], exts, 2000, Duration::from_secs(30), b"plaintext\n")?;
        assert!(connected, "{what}: no SYN-ACK from ztunnel's listener");
        tg.z.wait_for(&format!("{what}: ztunnel's denial of {src}"), |d| {
            d.connections.list.iter().any(|r| {
                r.src == src
                    && r.direction == Direction::Inbound
                    && r.outcome
                        .as_deref()
                        .is_some_and(|o| o.starts_with("denied"))
            })
        })?;
        tg.app_untouched(what)?;
    }
    let d = tg.z.dump()?;
    assert_eq!(counter(&d, "inbound_steered"), cases.len() as u64);

    // Nine Destination Options headers: the kernel would walk them all, tc stops at
    // eight and cannot tell whether TCP follows.
    let mut atk = Attacker::new(&tg.c, &tg.a, tg.c.addr6(41200), tg.a.addr6(8080))?;
    let long = [Ext::DestOpts; 9];
    let f = atk.frame(&long, atk.syn(3000), &[])?;
    let connected = atk.connect(&[f], &long, 3000, Duration::from_secs(3), b"plaintext\n")?;
    assert!(!connected, "a SYN behind nine headers was answered");
    tg.app_untouched("nine destination options headers")?;
    assert_eq!(counter(&tg.z.dump()?, "inbound_drop_unparseable"), 1);
    Ok(())
}

/// The pod's IPv6 link-local address, once duplicate address detection is done.
fn link_local(pod: &Pod) -> anyhow::Result<std::net::Ipv6Addr> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = Command::new("ip")
            .args([
                "-n", &pod.netns, "-6", "-o", "addr", "show", "dev", "eth0", "scope", "link",
            ])
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if !text.contains("tentative")
            && let Some(addr) = text
                .split_whitespace()
                .skip_while(|w| *w != "inet6")
                .nth(1)
                .and_then(|a| a.split('/').next())
        {
            return Ok(addr.parse()?);
        }
        ensure!(
            Instant::now() < deadline,
            "no link-local address in {}: {text}",
            pod.netns
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A SYN to an address of the pod that ztunnel does not know — its IPv6 link-local
/// address, reachable from the same L2 — still goes to ztunnel (tc steers whatever the
/// destination), which refuses it; it never reaches the app.
#[test]
fn syn_to_the_pods_link_local_address_is_steered_to_ztunnel() -> anyhow::Result<()> {
    let tg = target(STRICT, false)?;
    let ll = link_local(&tg.a)?;
    let src = tg.c.addr6(41250);
    let mut atk = Attacker::new(&tg.c, &tg.a, src, SocketAddr::new(IpAddr::V6(ll), 8080))?;
    let f = atk.frame(&[], atk.syn(6000), &[])?;
    let connected = atk.connect(&[f], &[], 6000, Duration::from_secs(30), b"plaintext\n")?;
    assert!(connected, "no SYN-ACK from ztunnel's listener");
    tg.z.wait_for("ztunnel's refusal", |d| {
        d.connections.list.iter().any(|r| {
            r.src == src
                && r.outcome
                    .as_deref()
                    .is_some_and(|o| o.starts_with("denied") || o.starts_with("refused"))
        })
    })?;
    tg.app_untouched("link-local destination")?;
    assert_eq!(counter(&tg.z.dump()?, "inbound_steered"), 1);
    Ok(())
}

/// An IPv6 SYN in fragments is dropped whole (first fragment and later one); fragmented
/// UDP passes.
#[test]
fn fragmented_ipv6_syn_is_dropped_under_strict() -> anyhow::Result<()> {
    let tg = target(STRICT, false)?;
    let mut atk = Attacker::new(&tg.c, &tg.a, tg.c.addr6(41300), tg.a.addr6(8080))?;
    // The kernel discards a first fragment without the whole TCP header (RFC 7112), so
    // the SYN carries 12 bytes of options: the first fragment holds the header and
    // four of them, the second the rest.
    let mut syn = atk.syn(4000);
    syn.set_options(&[
        TcpOptionElement::MaximumSegmentSize(1400),
        TcpOptionElement::SelectiveAcknowledgementPermitted,
        TcpOptionElement::Noop,
        TcpOptionElement::Noop,
        TcpOptionElement::WindowScale(7),
        TcpOptionElement::Noop,
    ])?;
    let seg = atk.segment(syn, &[])?;
    assert_eq!(seg.len(), 32);
    let first = atk.ipv6_frame(
        &[Ext::Fragment {
            offset: 0,
            more: true,
        }],
        IpNumber::TCP,
        &seg[..24],
    )?;
    let rest = atk.ipv6_frame(
        &[Ext::Fragment {
            offset: 3,
            more: false,
        }],
        IpNumber::TCP,
        &seg[24..],
    )?;
    let connected = atk.connect(
        &[first, rest],
        &[],
        4000,
        Duration::from_secs(3),
        b"plaintext\n",
    )?;
    tg.app_untouched("fragmented IPv6 SYN")?;
    assert!(!connected, "the fragmented IPv6 SYN was answered");
    let d = tg.z.dump()?;
    assert_eq!(counter(&d, "inbound_drop_fragment"), 2);
    assert_eq!(d.connections.opened_total, 0, "{:?}", d.connections.list);

    let udp = Netns::open(&tg.a.netns_path)?.run_on_thread(|| {
        UdpSocket::bind(SocketAddr::new(
            IpAddr::V6(tg.a.ip6.expect("dual-stack")),
            9999,
        ))
    })??;
    udp.set_read_timeout(Some(Duration::from_secs(30)))?;
    let (s, d6) = atk.v6();
    let body = b"a datagram long enough to need more than one fragment!";
    let mut header = UdpHeader::without_ipv4_checksum(41301, 9999, body.len())?;
    header.checksum = header.calc_checksum_ipv6_raw(s, d6, body)?;
    let mut dgram = header.to_bytes().to_vec();
    dgram.extend_from_slice(body);
    for (i, piece) in dgram.chunks(16).enumerate() {
        let ext = Ext::Fragment {
            offset: (i * 2) as u16,
            more: (i + 1) * 16 < dgram.len(),
        };
        atk.send(&atk.ipv6_frame(&[ext], IpNumber::UDP, piece)?)?;
    }
    let mut got = [0u8; 256];
    let (n, _) = udp
        .recv_from(&mut got)
        .context("fragmented IPv6 UDP did not arrive")?;
    assert_eq!(&got[..n], body);
    Ok(())
}

/// TCP whose header is cut short — by the frame, or by the IP length — is dropped and
/// counted, as is a SYN whose options run past the datagram.
#[test]
fn truncated_tcp_headers_are_dropped_and_counted() -> anyhow::Result<()> {
    let tg = target(STRICT, false)?;
    let mut v4 = Attacker::new(&tg.c, &tg.a, tg.c.addr(41400), tg.a.addr(8080))?;
    let seg = v4.segment(v4.syn(5000), &[])?;
    // Ten bytes of a TCP header.
    let cut = v4.ipv4_frames(IpNumber::TCP, &seg[..10], None)?.remove(0);
    // A SYN claiming 60 bytes of header (options) in a 20-byte segment.
    let mut long = seg.clone();
    long[12] = 0xf0;
    let long = v4.ipv4_frames(IpNumber::TCP, &long, None)?.remove(0);
    let v6 = Attacker::new(&tg.c, &tg.a, tg.c.addr6(41401), tg.a.addr6(8080))?;
    let seg6 = v6.segment(v6.syn(5000), &[])?;
    let cut6 = v6.ipv6_frame(&[Ext::DestOpts], IpNumber::TCP, &seg6[..12])?;
    for f in [&cut, &long] {
        v4.send(f)?;
    }
    v6.send(&cut6)?;
    assert!(v4.syn_ack(Duration::from_secs(2))?.is_none());
    assert!(v6.syn_ack(Duration::from_secs(1))?.is_none());
    tg.app_untouched("truncated headers")?;
    let d = tg.z.dump()?;
    assert_eq!(counter(&d, "inbound_drop_truncated"), 3);
    assert_eq!(d.connections.opened_total, 0, "{:?}", d.connections.list);
    Ok(())
}

/// Connects from `src` (a fixed address and port, SO_REUSEADDR) inside `pod`, reads
/// until the server's EOF, then closes: the server side closed first.
fn call_from(pod: &Pod, src: SocketAddr, dst: SocketAddr) -> anyhow::Result<String> {
    Netns::open(&pod.netns_path)?.run_on_thread(move || -> anyhow::Result<String> {
        let sock = socket2::Socket::new(
            socket2::Domain::for_address(dst),
            socket2::Type::STREAM,
            None,
        )?;
        sock.set_reuse_address(true)?;
        sock.bind(&src.into())?;
        sock.connect_timeout(&dst.into(), Duration::from_secs(20))
            .with_context(|| format!("connect {src} → {dst}"))?;
        let mut stream: TcpStream = sock.into();
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut got = String::new();
        stream.read_to_string(&mut got)?;
        Ok(got)
    })?
}

/// A SYN whose 4-tuple still belongs to a TIME_WAIT socket in the pod must reach
/// ztunnel like any other: the kernel's TIME_WAIT processing would otherwise hand it to
/// the app's listener on the original port. And it must reach it at once, as a client
/// reusing its port expects.
#[test]
fn syn_matching_a_time_wait_socket_passes_ztunnel() -> anyhow::Result<()> {
    let tg = target("", true)?;
    let (a, c, z) = (&tg.a, &tg.c, &tg.z);
    for (src, dst) in [
        (c.addr(40123), a.addr(8080)),
        (c.addr6(40124), a.addr6(8080)),
    ] {
        assert_eq!(call_from(c, src, dst)?, "hello\n");
        // ztunnel relayed the app's close first, so its accepted socket (the pod's
        // address and :8080 ↔ C's fixed port) now sits in TIME_WAIT.
        z.wait_for("the first connection to close", |d| {
            d.connections
                .list
                .iter()
                .any(|r| r.src == src && r.outcome.is_some())
        })?;
        // Same source port again, at once: the SYN meets the TIME_WAIT socket.
        assert_eq!(call_from(c, src, dst)?, "hello\n");
        let d = z.wait_for("both connections closed", |d| {
            d.connections
                .list
                .iter()
                .filter(|r| r.outcome.is_some() && r.src == src)
                .count()
                == 2
        })?;
        for r in d.connections.list.iter().filter(|r| r.src == src) {
            assert_eq!(r.direction, Direction::Inbound);
            assert_eq!(r.dst, dst);
        }
    }
    // The app saw four connections, all dialled by ztunnel (from C's address, an
    // ephemeral port): never C's own socket.
    let peers = tg.app.peers();
    assert_eq!(peers.len(), 4, "{peers:?}");
    assert!(
        peers.iter().all(|p| p.port() != 40123 && p.port() != 40124),
        "the app accepted C's own connection: {peers:?}"
    );
    let d = z.dump()?;
    assert_eq!(counter(&d, "inbound_time_wait_steered"), 2);
    assert_eq!(counter(&d, "inbound_steered"), 4);
    Ok(())
}
