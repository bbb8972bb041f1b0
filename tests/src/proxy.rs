//! A small TCP proxy for fault injection between agent and receiver: it can cut every live
//! connection, refuse new ones for a while, delay traffic, and flip bits in the byte stream.
//! Plain threads; one pair of pumps per connection.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Default)]
struct Ctl {
    blocked: AtomicBool,
    delay_ms: AtomicU64,
    /// Flip a bit in the byte at this many bytes from now (agent → receiver), if non-zero.
    corrupt_in: AtomicU64,
    conns: Mutex<Vec<TcpStream>>,
    stop: AtomicBool,
}

/// A running proxy; dropped → stops accepting and cuts connections.
pub struct Proxy {
    pub addr: SocketAddr,
    ctl: Arc<Ctl>,
}

impl Proxy {
    pub fn start(target: SocketAddr) -> std::io::Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let ctl = Arc::new(Ctl::default());
        let c = ctl.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if c.stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(client) = conn else { continue };
                if c.blocked.load(Ordering::SeqCst) {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                }
                let Ok(server) = TcpStream::connect(target) else {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                {
                    let mut g = c.conns.lock().unwrap();
                    g.push(client.try_clone().unwrap());
                    g.push(server.try_clone().unwrap());
                }
                pump(client.try_clone().unwrap(), server.try_clone().unwrap(), c.clone(), true);
                pump(server, client, c.clone(), false);
            }
        });
        Ok(Proxy { addr, ctl })
    }

    /// Closes every live connection (both directions), like a link cut.
    pub fn cut(&self) {
        let mut g = self.ctl.conns.lock().unwrap();
        for s in g.drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    /// While blocked, new connections are closed at once.
    pub fn block(&self, on: bool) {
        self.ctl.blocked.store(on, Ordering::SeqCst);
        if on {
            self.cut();
        }
    }

    /// Adds a one-way delay to every chunk forwarded.
    pub fn delay(&self, d: Duration) {
        self.ctl.delay_ms.store(d.as_millis() as u64, Ordering::SeqCst);
    }

    /// Flips one bit `after` bytes from now in the agent → receiver direction.
    pub fn corrupt_after(&self, after: u64) {
        self.ctl.corrupt_in.store(after.max(1), Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.ctl.stop.store(true, Ordering::SeqCst);
        self.cut();
        let _ = TcpStream::connect(self.addr);
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream, ctl: Arc<Ctl>, upstream: bool) {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let d = ctl.delay_ms.load(Ordering::SeqCst);
            if d > 0 {
                std::thread::sleep(Duration::from_millis(d));
            }
            if upstream {
                let left = ctl.corrupt_in.load(Ordering::SeqCst);
                if left > 0 {
                    if left <= n as u64 {
                        buf[(left - 1) as usize] ^= 0x10;
                        ctl.corrupt_in.store(0, Ordering::SeqCst);
                    } else {
                        ctl.corrupt_in.store(left - n as u64, Ordering::SeqCst);
                    }
                }
            }
            if to.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Write);
        let _ = from.shutdown(Shutdown::Read);
    });
}
