//! Reverse DNS off the event loop: the view asks, a worker thread looks up,
//! answers appear on a later refresh. A slow resolver never blocks the view.
use std::{
    collections::{HashMap, HashSet},
    ffi::CStr,
    net::{IpAddr, SocketAddr},
    sync::mpsc::{channel, Receiver, Sender},
};

pub struct Resolver {
    names: HashMap<IpAddr, Option<String>>,
    asked: HashSet<IpAddr>,
    requests: Sender<IpAddr>,
    answers: Receiver<(IpAddr, Option<String>)>,
}

/// Bounds the cache under a spoofed flood.
const MAX_NAMES: usize = 10_000;

impl Resolver {
    pub fn start() -> Self {
        let (requests, inbox) = channel::<IpAddr>();
        let (outbox, answers) = channel();
        std::thread::Builder::new()
            .name("ctrace-resolve".into())
            .spawn(move || {
                for addr in inbox {
                    if outbox.send((addr, lookup(addr))).is_err() {
                        break;
                    }
                }
            })
            .expect("spawn resolver thread");
        Resolver { names: HashMap::new(), asked: HashSet::new(), requests, answers }
    }

    /// The name of `addr` if known; asks for it otherwise.
    pub fn name(&mut self, addr: IpAddr) -> Option<String> {
        while let Ok((a, name)) = self.answers.try_recv() {
            self.names.insert(a, name);
        }
        if let Some(known) = self.names.get(&addr) {
            return known.clone();
        }
        if self.asked.len() < MAX_NAMES && self.asked.insert(addr) {
            let _ = self.requests.send(addr);
        }
        None
    }
}

/// getnameinfo with NI_NAMEREQD: a name, or None.
fn lookup(addr: IpAddr) -> Option<String> {
    let sock = socket2::SockAddr::from(SocketAddr::new(addr, 0));
    let mut host = [0 as libc::c_char; 1025];
    // SAFETY: valid sockaddr and buffer with their lengths.
    let rc = unsafe {
        libc::getnameinfo(
            sock.as_ptr().cast(),
            sock.len(),
            host.as_mut_ptr(),
            host.len() as libc::socklen_t,
            std::ptr::null_mut(),
            0,
            libc::NI_NAMEREQD,
        )
    };
    if rc != 0 {
        return None;
    }
    // SAFETY: getnameinfo wrote a NUL-terminated string.
    Some(unsafe { CStr::from_ptr(host.as_ptr()) }.to_string_lossy().into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_resolves_without_blocking_the_caller() {
        let mut r = Resolver::start();
        let addr: IpAddr = "127.0.0.1".parse().unwrap();
        assert_eq!(r.name(addr), None, "first ask never blocks");
        // /etc/hosts names 127.0.0.1 on any sane machine; wait for the worker.
        for _ in 0..200 {
            if let Some(name) = r.name(addr) {
                assert!(!name.is_empty());
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        panic!("127.0.0.1 did not resolve within 2 s");
    }
}
