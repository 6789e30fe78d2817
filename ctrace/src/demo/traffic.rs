//! The demo's traffic, sent from inside the client namespace to the
//! server over the veth, never anywhere else. Plain sockets where they do
//! (UDP, TCP connects), a raw socket for forged headers (spoofed sources,
//! invalid flag combinations).
use std::{
    net::Ipv4Addr,
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    time::Duration,
};

use super::lab::SERVER;

/// A socket fd closed on drop.
struct Fd(i32);

impl Drop for Fd {
    fn drop(&mut self) {
        // SAFETY: an fd this struct owns.
        unsafe { libc::close(self.0) };
    }
}

fn sockaddr(addr: Ipv4Addr, port: u16) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr { s_addr: u32::from(addr).to_be() },
        sin_zero: [0; 8],
    }
}

/// A socket of `kind` bound to `src` (port `sport`, 0: any).
fn bound(kind: i32, src: Ipv4Addr, sport: u16) -> std::io::Result<Fd> {
    // SAFETY: plain socket calls on an fd this function owns.
    unsafe {
        let fd = Fd(libc::socket(libc::AF_INET, kind | libc::SOCK_CLOEXEC, 0));
        if fd.0 < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let addr = sockaddr(src, sport);
        let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        if libc::bind(fd.0, (&addr as *const libc::sockaddr_in).cast(), len) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(fd)
    }
}

fn connect(fd: &Fd, port: u16) -> i32 {
    let addr = sockaddr(SERVER, port);
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: a valid fd and address.
    unsafe { libc::connect(fd.0, (&addr as *const libc::sockaddr_in).cast(), len) }
}

/// Fills the server's table to `target` entries with UDP flows from the
/// filler (each new port pair is one entry, kept by the namespace's long UDP
/// timeout), sending only what is missing and letting the kernel catch up,
/// so that none of the filler's own packets meets a full table.
pub fn fill_udp(target: u64, mut entries: impl FnMut() -> u64, stop: &AtomicBool) -> std::io::Result<u64> {
    let mut sent = 0u64;
    let (mut sport, mut dport) = (20_000u16, 0u16);
    let mut socket = bound(libc::SOCK_DGRAM, super::lab::FILLER, sport)?;
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    loop {
        let now = entries();
        if now >= target || stop.load(Ordering::Relaxed) {
            return Ok(sent);
        }
        for _ in now..target {
            if dport == u16::MAX {
                (sport, dport) = (sport + 1, 0);
                socket = bound(libc::SOCK_DGRAM, super::lab::FILLER, sport)?;
            }
            dport += 1;
            let to = sockaddr(SERVER, dport);
            // SAFETY: a valid fd, buffer and address.
            let n = unsafe {
                libc::sendto(socket.0, [0u8].as_ptr().cast(), 1, 0, (&to as *const libc::sockaddr_in).cast(), len)
            };
            sent += u64::from(n == 1);
        }
        // Until the count stops moving: everything sent has been seen.
        let mut last = entries();
        loop {
            std::thread::sleep(Duration::from_millis(50));
            let now = entries();
            if now == last {
                break;
            }
            last = now;
        }
    }
}

/// New TCP flows from the named `sources` to `port`, `per_second` each:
/// a non-blocking connect, closed at once (one SYN, no retransmission).
pub fn syn_storm(sources: &[Ipv4Addr], port: u16, per_second: u32, stop: &AtomicBool, sent: &AtomicU64) {
    let pause = Duration::from_secs(1) / per_second.max(1);
    while !stop.load(Ordering::Relaxed) {
        for &src in sources {
            if let Ok(fd) = bound(libc::SOCK_STREAM | libc::SOCK_NONBLOCK, src, 0) {
                if connect(&fd, port) != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINPROGRESS)
                {
                    sent.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        std::thread::sleep(pause);
    }
}

/// Short connections from `src`, each closed at both ends once open (the
/// server closes its side at once): their entries sit in TIME_WAIT. A
/// connect that gets no answer in a second (its SYN dropped by a full
/// table) is given up, so that `stop` is seen.
pub fn short_connections(src: Ipv4Addr, port: u16, stop: &AtomicBool, made: &AtomicU64) {
    while !stop.load(Ordering::Relaxed) {
        let Ok(fd) = bound(libc::SOCK_STREAM | libc::SOCK_NONBLOCK, src, 0) else { continue };
        if connect(&fd, port) != 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINPROGRESS) {
            continue;
        }
        let mut poll = libc::pollfd { fd: fd.0, events: libc::POLLOUT, revents: 0 };
        // SAFETY: one valid pollfd.
        let ready = unsafe { libc::poll(&mut poll, 1, 1000) } == 1;
        let mut error = 0i32;
        let mut len = std::mem::size_of::<i32>() as libc::socklen_t;
        // SAFETY: a valid fd and an int-sized option buffer.
        let ok = ready
            && unsafe {
                libc::getsockopt(fd.0, libc::SOL_SOCKET, libc::SO_ERROR, (&mut error as *mut i32).cast(), &mut len)
            } == 0
            && error == 0;
        if ok {
            // SAFETY: a connected fd of ours.
            unsafe { libc::shutdown(fd.0, libc::SHUT_RDWR) };
            made.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The server's side of [`short_connections`]: accept and close.
pub fn accept_and_close(listener: i32, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: a listening fd; the accepted one is closed at once.
        let fd = unsafe { libc::accept4(listener, std::ptr::null_mut(), std::ptr::null_mut(), libc::SOCK_CLOEXEC) };
        if fd >= 0 {
            drop(Fd(fd));
        } else if std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return; // shut down
        }
    }
}

/// A listening TCP socket on the server's service port; its fd (owned by
/// the caller, who shuts it down to end [`accept_and_close`]).
pub fn listen(port: u16) -> std::io::Result<i32> {
    let fd = bound(libc::SOCK_STREAM, SERVER, port)?;
    // SAFETY: a bound fd of ours.
    if unsafe { libc::listen(fd.0, 4096) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let raw = fd.0;
    std::mem::forget(fd);
    Ok(raw)
}

/// The one's-complement sum of the Internet checksum over `parts`.
fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum = 0u32;
    let mut odd: Option<u8> = None;
    for byte in parts.iter().flat_map(|p| p.iter()) {
        match odd.take() {
            Some(high) => sum += u32::from(u16::from_be_bytes([high, *byte])),
            None => odd = Some(*byte),
        }
    }
    if let Some(high) = odd {
        sum += u32::from(high) << 8;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An IPv4 packet carrying a bare TCP header with `flags`.
pub fn forged_tcp(src: Ipv4Addr, sport: u16, dport: u16, flags: u8, id: u16) -> [u8; 40] {
    let mut packet = [0u8; 40];
    let (ip, tcp) = packet.split_at_mut(20);
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&40u16.to_be_bytes());
    ip[4..6].copy_from_slice(&id.to_be_bytes());
    ip[8] = 64;
    ip[9] = libc::IPPROTO_TCP as u8;
    ip[12..16].copy_from_slice(&src.octets());
    ip[16..20].copy_from_slice(&SERVER.octets());
    tcp[0..2].copy_from_slice(&sport.to_be_bytes());
    tcp[2..4].copy_from_slice(&dport.to_be_bytes());
    tcp[4..8].copy_from_slice(&u32::from(id).wrapping_mul(2_654_435_761).to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = flags;
    tcp[14..16].copy_from_slice(&64_240u16.to_be_bytes());
    let pseudo = [&src.octets()[..], &SERVER.octets()[..], &[0, libc::IPPROTO_TCP as u8, 0, 20][..]];
    let sum = checksum(&[pseudo[0], pseudo[1], pseudo[2], tcp]);
    tcp[16..18].copy_from_slice(&sum.to_be_bytes());
    packet
}

pub const SYN: u8 = 0x02;
pub const FIN: u8 = 0x01;

/// Sends forged packets from `source(i)` with `flags` until `stop`, at most
/// `per_second` (0: as fast as the socket takes them).
pub fn forged(
    source: impl Fn(u32) -> Ipv4Addr,
    port: u16,
    flags: u8,
    per_second: u32,
    stop: &AtomicBool,
    sent: &AtomicU64,
) -> std::io::Result<()> {
    // SAFETY: a raw socket of ours; IPPROTO_RAW implies the header is ours.
    let fd = Fd(unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::IPPROTO_RAW) });
    if fd.0 < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let to = sockaddr(SERVER, 0);
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // Paced in batches (a sleep per packet would not reach 10,000/s).
    let batch = (per_second / 100).max(1);
    let pause = (per_second > 0).then(|| Duration::from_secs(1) * batch / per_second);
    let mut i = 0u32;
    while !stop.load(Ordering::Relaxed) {
        let packet = forged_tcp(source(i), 1024 + (i % 60_000) as u16, port, flags, i as u16);
        // SAFETY: a valid fd, buffer and address.
        let n = unsafe {
            libc::sendto(fd.0, packet.as_ptr().cast(), packet.len(), 0, (&to as *const libc::sockaddr_in).cast(), len)
        };
        if n > 0 {
            sent.fetch_add(1, Ordering::Relaxed);
        }
        i = i.wrapping_add(1);
        if let Some(pause) = pause.filter(|_| i.is_multiple_of(batch)) {
            std::thread::sleep(pause);
        }
    }
    Ok(())
}

/// The CPUs this thread may run on.
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; getaffinity fills it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Vec::new();
        }
        (0..libc::CPU_SETSIZE as usize).filter(|&cpu| libc::CPU_ISSET(cpu, &set)).collect()
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

fn send(fd: i32, payload: &[u8]) -> bool {
    // SAFETY: a connected fd of ours and a valid buffer.
    unsafe { libc::send(fd, payload.as_ptr().cast(), payload.len(), 0) > 0 }
}

/// The DNS A/AAAA race: each lookup is a new UDP socket from `src` whose
/// two queries leave at the same moment from two CPUs (a resolver sending
/// A and AAAA in parallel), so both packets can pass conntrack before
/// either one's new entry is inserted: the second insertion meets the first
/// (a clash). The kernel settles it (`clashres`) or refuses the entry
/// (`insert_failed`: the query is lost, the client waits out its timeout).
/// The second CPU's thread sleeps between lookups and is woken for each;
/// then both spin for a moment so that their sends meet.
pub fn parallel_queries(
    src: Ipv4Addr,
    port: u16,
    per_second: u32,
    stop: &AtomicBool,
    sent: &AtomicU64,
) -> std::io::Result<()> {
    use std::sync::atomic::AtomicI32;
    let cpus = allowed_cpus();
    let [first, second, ..] = cpus[..] else {
        return Err(std::io::Error::other("the race needs two CPUs, and this process may use one"));
    };
    pin(first)?;
    let pause = Duration::from_secs(1) / per_second.max(1);
    // Lookup number r: `round` announces it, `ready` says the partner is
    // about to send, `done` that it sent.
    let (round, ready, done) = (AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0));
    let socket = AtomicI32::new(-1);
    let finished = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let partner = scope.spawn(|| {
            pin(second)?;
            let mut seen = 0;
            loop {
                std::thread::park();
                if finished.load(Ordering::Acquire) {
                    return Ok(());
                }
                let r = round.load(Ordering::Acquire);
                if r == seen {
                    continue; // a spurious wake-up
                }
                seen = r;
                let fd = socket.load(Ordering::Acquire);
                ready.store(r, Ordering::Release);
                send(fd, b"AAAA?");
                done.store(r, Ordering::Release);
            }
        });
        let mut r = 0;
        while !stop.load(Ordering::Relaxed) {
            let Ok(fd) = bound(libc::SOCK_DGRAM, src, 0) else { continue };
            if connect(&fd, port) != 0 {
                continue;
            }
            r += 1;
            socket.store(fd.0, Ordering::Release);
            round.store(r, Ordering::Release);
            partner.thread().unpark();
            let met = |step: &AtomicU64| {
                while step.load(Ordering::Acquire) != r {
                    if partner.is_finished() {
                        return false;
                    }
                    std::hint::spin_loop();
                }
                true
            };
            if !met(&ready) {
                break;
            }
            let a = send(fd.0, b"A?");
            if !met(&done) {
                break;
            }
            sent.fetch_add(1 + u64::from(a), Ordering::Relaxed);
            drop(fd);
            std::thread::sleep(pause);
        }
        finished.store(true, Ordering::Release);
        partner.thread().unpark();
        partner.join().unwrap_or_else(|_| Err(std::io::Error::other("the second sender panicked")))
    })
}

/// A UDP socket bound to the server's port and never read (the demo's DNS
/// server, which never answers: once its queue is full the kernel discards
/// the rest, without an ICMP error); its fd, owned by the caller.
pub fn udp_sink(port: u16) -> std::io::Result<i32> {
    let fd = bound(libc::SOCK_DGRAM, SERVER, port)?;
    let raw = fd.0;
    std::mem::forget(fd);
    Ok(raw)
}

/// Addresses spoofed sources are drawn from: 198.18.2.0 - 198.19.255.255,
/// inside the benchmark range and outside the lab's own addresses.
pub const SPOOFED_SOURCES: u32 = (1 << 17) - 512;

/// The `i`th spoofed source, spread by a multiplicative hash. The server
/// routes the whole range back over the veth, so no reply goes elsewhere.
pub fn spoofed(i: u32) -> Ipv4Addr {
    let offset = i.wrapping_mul(2_654_435_761) % SPOOFED_SOURCES;
    Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 2, 0)) + offset)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forged_headers_check_out() {
        let packet = forged_tcp(Ipv4Addr::new(198, 18, 0, 5), 1024, 8080, SYN | FIN, 7);
        let src = Ipv4Addr::new(198, 18, 0, 5).octets();
        // A correct checksum sums (with the pseudo header) to zero.
        let pseudo = [&src[..], &SERVER.octets()[..], &[0, 6, 0, 20][..], &packet[20..]];
        assert_eq!(checksum(&pseudo), 0);
        assert_eq!(packet[33], SYN | FIN);
        assert_eq!(u16::from_be_bytes([packet[22], packet[23]]), 8080);
        // The textbook example (RFC 1071's words): 0x220d's complement.
        assert_eq!(checksum(&[&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]]), !0xddf2);
    }

    #[test]
    fn spoofed_sources_stay_in_the_lab_range() {
        for i in (0..400_000).step_by(7) {
            let octets = spoofed(i).octets();
            assert!(octets[..2] == [198, 18] && octets[2] >= 2 || octets[..2] == [198, 19], "{octets:?}");
        }
        let distinct: std::collections::HashSet<_> = (0..10_000).map(spoofed).collect();
        assert!(distinct.len() > 9_000);
    }
}
