//! The lab: a client and a server namespace joined by a veth on
//! 198.18.0.0/15, with the traffic the tests send through it.
use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    time::Duration,
};

use socket2::{Domain, Protocol, Socket, Type};

use crate::{Netns, HANG};

/// Two namespaces on one veth link: a server at `SERVER` and a client with
/// several source addresses. Conntrack runs only in the server.
pub struct Lab {
    pub server: Netns,
    pub client: Netns,
}

pub const SERVER: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);

impl Lab {
    pub fn new(tag: &str, client_addrs: &[Ipv4Addr]) -> anyhow::Result<Self> {
        let pid = std::process::id();
        let server = Netns::create(&format!("ctrace-{tag}-srv-{pid}"))?;
        let client = Netns::create(&format!("ctrace-{tag}-cli-{pid}"))?;
        client.exec("ip", &["link", "add", "veth-c", "type", "veth", "peer", "name", "veth-s"])?;
        client.exec("ip", &["link", "set", "veth-s", "netns", &server.name])?;
        for addr in client_addrs {
            client.exec("ip", &["addr", "add", &format!("{addr}/16"), "dev", "veth-c"])?;
        }
        server.exec("ip", &["addr", "add", &format!("{SERVER}/16"), "dev", "veth-s"])?;
        client.exec("ip", &["link", "set", "veth-c", "up"])?;
        server.exec("ip", &["link", "set", "veth-s", "up"])?;
        Ok(Lab { server, client })
    }

    /// Opens a TCP connection from `src` to the server, or gives up after
    /// `timeout` (a dropped SYN: closing the socket stops retransmissions).
    pub fn connect(&self, src: Ipv4Addr, port: u16, timeout: Duration) -> std::io::Result<Socket> {
        self.client.enter(|| {
            let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
            socket.bind(&SocketAddr::V4(SocketAddrV4::new(src, 0)).into())?;
            socket.connect_timeout(&SocketAddr::V4(SocketAddrV4::new(SERVER, port)).into(), timeout)?;
            Ok(socket)
        })
    }

    /// Sends `count` SYNs from `src` as fast as sockets can be made: each a
    /// non-blocking connect whose socket is closed at once (one SYN, no
    /// retransmission). Returns how many SYNs left.
    pub fn syn_burst(&self, src: Ipv4Addr, port: u16, count: u64) -> u64 {
        self.client.enter(|| {
            let dst: socket2::SockAddr = SocketAddr::V4(SocketAddrV4::new(SERVER, port)).into();
            let bind: socket2::SockAddr = SocketAddr::V4(SocketAddrV4::new(src, 0)).into();
            let mut sent = 0;
            for _ in 0..count {
                let Ok(socket) = Socket::new(Domain::IPV4, Type::STREAM, None) else { continue };
                if socket.bind(&bind).is_err() || socket.set_nonblocking(true).is_err() {
                    continue;
                }
                match socket.connect(&dst) {
                    Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => sent += 1,
                    _ => {}
                }
            }
            sent
        })
    }

    /// Turns conntrack on in the server namespace (table `name`) and counts
    /// the SYNs from `src` before conntrack sees them (raw priority): the
    /// ground truth, read with `nft_counter(&lab.server, "inet", name, "syn_storm")`.
    pub fn count_syns(&self, name: &str, src: Ipv4Addr) -> anyhow::Result<()> {
        self.track_connections(name)?;
        self.server.exec("nft", &["add counter inet", name, "syn_storm"])?;
        self.server.exec("nft", &["add chain inet", name, "raw { type filter hook prerouting priority raw; }"])?;
        let rule = format!("ip saddr {src} tcp flags & (syn | ack) == syn counter name syn_storm");
        self.server.exec("nft", &["add rule inet", name, "raw", &rule])?;
        Ok(())
    }

    /// Turns conntrack on in the server namespace: a `ct state new` rule
    /// (any conntrack expression registers its hooks there) in table `name`.
    pub fn track_connections(&self, name: &str) -> anyhow::Result<()> {
        self.server.exec("nft", &["add", "table", "inet", name])?;
        self.server.exec("nft", &["add chain inet", name, "track { type filter hook input priority filter; }"])?;
        self.server.exec("nft", &["add rule inet", name, "track ct state new counter"])?;
        Ok(())
    }

    /// Sends one datagram from one socket on `src` to each of `ports` on the
    /// server: a new conntrack entry per port, made as fast as sendto goes.
    /// Returns when the server's kernel has processed every one of them.
    ///
    /// Readiness: the packets cross the veth through the sending CPU's
    /// backlog, in order, but under load the kernel may leave that backlog
    /// to ksoftirqd after sendto returned. So the sender stays on one CPU
    /// and ends with a datagram on a flow conntrack already knows (no new
    /// entry, so it cannot fail to insert); once the server has received
    /// it, everything sent before it has been through conntrack. The caller
    /// keeps that flow's entry for the whole spray (a UDP timeout longer
    /// than the spray takes), or the last datagram may be refused too.
    pub fn udp_spray(&self, src: Ipv4Addr, ports: std::ops::RangeInclusive<u16>) -> std::io::Result<u64> {
        const MARKER_PORT: u16 = 65_000;
        assert!(!ports.contains(&MARKER_PORT));
        let marker_sink = self.udp_sink(MARKER_PORT).map_err(std::io::Error::other)?;
        marker_sink.set_read_timeout(Some(HANG))?;
        let marker_dst: socket2::SockAddr = SocketAddr::V4(SocketAddrV4::new(SERVER, MARKER_PORT)).into();
        let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 16];
        self.client.enter(|| {
            pin_to_first_cpu()?;
            let marker = Socket::new(Domain::IPV4, Type::DGRAM, None)?;
            marker.bind(&SocketAddr::V4(SocketAddrV4::new(src, 0)).into())?;
            marker.send_to(b"marker", &marker_dst)?;
            marker_sink.recv(&mut buf)?; // the marker's flow is in the table
            let socket = Socket::new(Domain::IPV4, Type::DGRAM, None)?;
            socket.bind(&SocketAddr::V4(SocketAddrV4::new(src, 0)).into())?;
            let mut sent = 0;
            for port in ports {
                if socket.send_to(b"ctrace", &SocketAddr::V4(SocketAddrV4::new(SERVER, port)).into()).is_ok() {
                    sent += 1;
                }
            }
            marker.send_to(b"marker", &marker_dst)?;
            marker_sink.recv(&mut buf)?;
            Ok(sent)
        })
    }

    /// Sends `rounds` pairs of identical SYNs from `src` to the server's
    /// `port`, one flow per round (source port `first_sport + round`), the
    /// two of a pair from two CPUs at the same moment (both senders spin
    /// until the other arrives). Each CPU passes its packets through
    /// conntrack itself, so a pair can race: both pass `nf_conntrack_in`
    /// before either's entry is inserted, and the second insertion meets
    /// the first, which TCP cannot settle (insert_failed, the SYN dropped).
    /// How many pairs raced is the kernel's to count.
    ///
    /// Returns once the server has processed every SYN (each sender ends
    /// with a datagram to `marker`, a UDP sink, behind its SYNs in its CPU's
    /// backlog), with how many were sent; None when this process may run on
    /// one CPU only.
    pub fn raced_syns(
        &self,
        src: Ipv4Addr,
        port: u16,
        rounds: u16,
        first_sport: u16,
        marker: (&Socket, u16),
    ) -> std::io::Result<Option<u32>> {
        use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
        let (sink, marker_port) = marker;
        let cpus = allowed_cpus()?;
        let [first, second, ..] = cpus[..] else { return Ok(None) };
        let dst: socket2::SockAddr = SocketAddr::V4(SocketAddrV4::new(SERVER, 0)).into();
        let marker_dst: socket2::SockAddr = SocketAddr::V4(SocketAddrV4::new(SERVER, marker_port)).into();
        let (arrived, gave_up) = (AtomicU32::new(0), AtomicBool::new(false));
        let sender = |cpu: usize| -> std::io::Result<u32> {
            let raw = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::TCP))?;
            raw.bind(&SocketAddr::V4(SocketAddrV4::new(src, 0)).into())?;
            let udp = Socket::new(Domain::IPV4, Type::DGRAM, None)?;
            udp.bind(&SocketAddr::V4(SocketAddrV4::new(src, 0)).into())?;
            pin(cpu)?;
            let mut sent = 0;
            for round in 0..rounds {
                arrived.fetch_add(1, Ordering::AcqRel);
                while arrived.load(Ordering::Acquire) < 2 * (u32::from(round) + 1) {
                    if gave_up.load(Ordering::Relaxed) {
                        return Err(std::io::Error::other("the other sender gave up"));
                    }
                    std::hint::spin_loop();
                }
                let segment = tcp_segment(src, SERVER, first_sport + round, port, 0x02);
                sent += u32::from(raw.send_to(&segment, &dst).is_ok());
            }
            udp.send_to(b"marker", &marker_dst)?;
            Ok(sent)
        };
        // Spawned from a thread inside the client namespace: both are in it.
        let sent = self.client.enter(|| {
            std::thread::scope(|scope| {
                let (sender, gave_up) = (&sender, &gave_up);
                let run = move |cpu| {
                    let result = sender(cpu);
                    if result.is_err() {
                        gave_up.store(true, Ordering::Relaxed);
                    }
                    result
                };
                let (a, b) = (scope.spawn(move || run(first)), scope.spawn(move || run(second)));
                let joined = |h: std::thread::ScopedJoinHandle<'_, std::io::Result<u32>>| {
                    h.join().unwrap_or_else(|_| Err(std::io::Error::other("a sender panicked")))
                };
                Ok::<u32, std::io::Error>(joined(a)? + joined(b)?)
            })
        })?;
        sink.set_read_timeout(Some(HANG))?;
        let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 16];
        sink.recv(&mut buf)?;
        sink.recv(&mut buf)?;
        Ok(Some(sent))
    }

    /// Sends one UDP datagram from `src` (a fresh source port) to the server.
    pub fn udp_send(&self, src: Ipv4Addr, port: u16) -> std::io::Result<()> {
        self.udp_send_from(src, 0, port)
    }

    /// Sends one UDP datagram on each of `flows` new flows (a fresh source
    /// port each) from `src` to the server's `port`, all from one thread in
    /// the client namespace: quick, so that a short conntrack timeout does
    /// not expire the first entry before the last is made (one namespace
    /// entry per datagram took seconds under emulation).
    pub fn udp_flows(&self, src: Ipv4Addr, port: u16, flows: u64) -> std::io::Result<()> {
        self.client.enter(|| {
            for _ in 0..flows {
                let socket = Socket::new(Domain::IPV4, Type::DGRAM, None)?;
                socket.bind(&SocketAddr::V4(SocketAddrV4::new(src, 0)).into())?;
                socket.send_to(b"ctrace", &SocketAddr::V4(SocketAddrV4::new(SERVER, port)).into())?;
            }
            Ok(())
        })
    }

    /// Sends one UDP datagram from `src`:`sport` (0: any) to the server.
    pub fn udp_send_from(&self, src: Ipv4Addr, sport: u16, port: u16) -> std::io::Result<()> {
        self.client.enter(|| {
            let socket = Socket::new(Domain::IPV4, Type::DGRAM, None)?;
            socket.bind(&SocketAddr::V4(SocketAddrV4::new(src, sport)).into())?;
            socket.send_to(b"ctrace", &SocketAddr::V4(SocketAddrV4::new(SERVER, port)).into())?;
            Ok(())
        })
    }

    /// Sends `count` bare TCP segments with header `flags` from `src` to the
    /// server's `port` through a raw socket (no connection behind them),
    /// from source ports 1024, 1025, ... (wrapping): each a new flow to
    /// conntrack. As fast as sendto goes, so it can flood. Returns how many
    /// left.
    pub fn tcp_raw(&self, src: Ipv4Addr, port: u16, flags: u8, count: u32) -> std::io::Result<u32> {
        self.client.enter(|| {
            let socket = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::TCP))?;
            socket.bind(&SocketAddr::V4(SocketAddrV4::new(src, 0)).into())?;
            let dst: socket2::SockAddr = SocketAddr::V4(SocketAddrV4::new(SERVER, 0)).into();
            let mut sent = 0;
            for i in 0..count {
                let sport = 1024 + (i % 64_000) as u16;
                let segment = tcp_segment(src, SERVER, sport, port, flags);
                if socket.send_to(&segment, &dst).is_ok() {
                    sent += 1;
                }
            }
            Ok(sent)
        })
    }

    /// Sends `count` TCP SYNs to the server's `port`, each from a
    /// pseudo-random source address (a spoofed flood: the addresses exist
    /// only in these packets' headers, on this veth; see [`Spoofed`] for
    /// where replies go). `seed` picks the sequence: pass the previous
    /// call's return to go on with it. Through a raw IP socket as fast as
    /// sendto goes. Returns how many left and the next seed.
    pub fn syn_flood_random_sources(
        &self,
        port: u16,
        count: u32,
        sources: Spoofed,
        seed: u32,
    ) -> std::io::Result<(u32, u32)> {
        self.client.enter(|| {
            // IPPROTO_RAW: the packet carries its own IP header.
            let socket = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::from(libc::IPPROTO_RAW)))?;
            let dst: socket2::SockAddr = SocketAddr::V4(SocketAddrV4::new(SERVER, 0)).into();
            let (sources, next) = sources.addresses(count, seed);
            let mut sent = 0;
            for (i, src) in (0..count).zip(sources) {
                let mut packet = [0u8; 40];
                packet[0] = 0x45; // IPv4, 5-word header
                packet[2..4].copy_from_slice(&40u16.to_be_bytes());
                packet[4..6].copy_from_slice(&(i as u16).to_be_bytes());
                packet[8] = 64; // TTL
                packet[9] = 6; // TCP; the kernel fills in the checksum
                packet[12..16].copy_from_slice(&src.octets());
                packet[16..20].copy_from_slice(&SERVER.octets());
                packet[20..].copy_from_slice(&tcp_segment(src, SERVER, 1024 + (i % 60_000) as u16, port, 0x02));
                if socket.send_to(&packet, &dst).is_ok() {
                    sent += 1;
                }
            }
            Ok((sent, next))
        })
    }

    /// Routes everything the server sends back over its veth (for floods
    /// from addresses outside the lab's /16).
    pub fn route_all_back(&self) -> anyhow::Result<()> {
        self.server.exec("ip", &["route", "add", "default", "dev", "veth-s"]).map(drop)
    }

    /// A UDP socket bound in the server namespace: datagrams arrive and get
    /// no answer, so their conntrack entries stay unreplied.
    pub fn udp_sink(&self, port: u16) -> anyhow::Result<Socket> {
        self.server.enter(|| {
            let socket = Socket::new(Domain::IPV4, Type::DGRAM, None)?;
            socket.bind(&SocketAddr::V4(SocketAddrV4::new(SERVER, port)).into())?;
            Ok(socket)
        })
    }

    /// A listening socket in the server namespace. The kernel completes
    /// handshakes into its backlog without accept().
    pub fn listen(&self, port: u16) -> anyhow::Result<Socket> {
        self.server.enter(|| {
            let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
            socket.set_reuse_address(true)?;
            socket.bind(&SocketAddr::V4(SocketAddrV4::new(SERVER, port)).into())?;
            socket.listen(1024)?;
            Ok(socket)
        })
    }
}

/// Where a spoofed flood's source addresses come from.
#[derive(Clone, Copy, Debug)]
pub enum Spoofed {
    /// 198.18.2.0-198.18.255.255 (65,024 addresses, inside the lab's /16).
    LabRange,
    /// Any unicast address from 1.0.0.0 to 223.255.255.255 but 127/8, as
    /// `hping3 --rand-source` sends: the server must route back over the
    /// veth ([`Lab::route_all_back`]).
    Anywhere,
}

impl Spoofed {
    /// The `count` source addresses [`Lab::syn_flood_random_sources`] sends
    /// from for `seed`, in order, and the seed that goes on: ground truth
    /// for distinct-source estimates.
    pub fn addresses(self, count: u32, seed: u32) -> (Vec<Ipv4Addr>, u32) {
        let mut state = seed;
        let addresses = (0..count)
            .map(|_| {
                state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                self.address(state)
            })
            .collect();
        (addresses, state)
    }

    fn address(self, random: u32) -> Ipv4Addr {
        match self {
            Spoofed::LabRange => {
                let host = 2 * 256 + (random >> 8) % (254 * 256);
                Ipv4Addr::new(198, 18, (host >> 8) as u8, host as u8)
            }
            Spoofed::Anywhere => {
                let first = 1 + (random >> 24) % 223;
                Ipv4Addr::from(if first == 127 {
                    128 << 24 | (random & 0xff_ffff)
                } else {
                    first << 24 | (random & 0xff_ffff)
                })
            }
        }
    }
}

/// Keeps the calling thread on the first CPU it may use.
fn pin_to_first_cpu() -> std::io::Result<()> {
    pin(allowed_cpus()?.first().copied().unwrap_or(0))
}

/// The CPUs this thread may run on.
fn allowed_cpus() -> std::io::Result<Vec<usize>> {
    // SAFETY: cpu_set_t is plain data; the call gets a valid pointer and size.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok((0..libc::CPU_SETSIZE as usize).filter(|&c| libc::CPU_ISSET(c, &set)).collect())
    }
}

/// Keeps the calling thread on `cpu`.
fn pin(cpu: usize) -> std::io::Result<()> {
    // SAFETY: a valid set with one CPU, applied to the calling thread (0).
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// A 20-byte TCP header with a correct checksum (over the IPv4 pseudo-header).
pub fn tcp_segment(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, flags: u8) -> [u8; 20] {
    let mut tcp = [0u8; 20];
    tcp[0..2].copy_from_slice(&sport.to_be_bytes());
    tcp[2..4].copy_from_slice(&dport.to_be_bytes());
    tcp[4..8].copy_from_slice(&0x1234_5678u32.to_be_bytes()); // sequence
    tcp[12] = 5 << 4; // data offset: 5 words
    tcp[13] = flags;
    tcp[14..16].copy_from_slice(&65535u16.to_be_bytes()); // window
    let mut pseudo = Vec::with_capacity(32);
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&[0, 6, 0, 20]); // zero, protocol TCP, length
    pseudo.extend_from_slice(&tcp);
    let mut sum: u32 = pseudo.chunks(2).map(|w| u16::from_be_bytes([w[0], w[1]]) as u32).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    tcp[16..18].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    tcp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_checksum_verifies() {
        let (src, dst) = (Ipv4Addr::new(198, 18, 0, 12), SERVER);
        let tcp = tcp_segment(src, dst, 40_000, 8082, 0x03);
        // Summing the pseudo-header and the segment, checksum included, gives all ones.
        let mut bytes = src.octets().to_vec();
        bytes.extend_from_slice(&dst.octets());
        bytes.extend_from_slice(&[0, 6, 0, 20]);
        bytes.extend_from_slice(&tcp);
        let mut sum: u32 = bytes.chunks(2).map(|w| u16::from_be_bytes([w[0], w[1]]) as u32).sum();
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        assert_eq!(sum, 0xffff);
        assert_eq!(tcp[13], 0x03);
    }
}
