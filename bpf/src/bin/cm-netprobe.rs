//! `cm-netprobe`: a small network probe for datapath tests and for operators checking a
//! service by hand.
//!
//! - `cm-netprobe serve --name NAME --port PORT`: answers every TCP connection and every UDP
//!   datagram on PORT with NAME. Prints `listening` once ready.
//! - `cm-netprobe tcp ADDR:PORT [--count N] [--timeout-ms T]`: N connections, one line each:
//!   `ok NAME` or `err KIND ERRNO`.
//! - `cm-netprobe udp ADDR:PORT [--count N] [--timeout-ms T]`: N unconnected datagrams, one
//!   line each: `ok NAME from ADDR:PORT` or `err KIND ERRNO`.
//! - `cm-netprobe udp-connected ADDR:PORT [--count N] [--timeout-ms T]`: the same over a
//!   connected UDP socket: `ok NAME`.
//! - `cm-netprobe tcp-loop ADDR:PORT --duration-ms D`: connects back to back for D ms, then
//!   prints `attempts N ok N failed N`.
//! - `cm-netprobe tcp-latency ADDR:PORT --count N`: N connects, prints `p50_us X p99_us Y`.
//! - `cm-netprobe icmp ADDR [--count N] [--timeout-ms T] [--ident I]`: N ICMP echo requests
//!   (a raw socket: root; identifier I, default the process ID), one line each: `ok ADDR`
//!   (the echo reply came back) or `err TimedOut 0`.
//! - `cm-netprobe tcp-log ADDR:PORT --duration-ms D [--timeout-ms T] [--gap-ms G]`: connects
//!   one after the other (G ms apart) for D ms; one line each with the wall-clock time the
//!   attempt started (Unix milliseconds): `MS ok NAME` or `MS err KIND ERRNO`.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

fn usage() -> ! {
    eprintln!(
        "usage: cm-netprobe serve --name NAME --port PORT | tcp|udp|udp-connected ADDR:PORT [--count N] [--timeout-ms T] | tcp-loop ADDR:PORT --duration-ms D | tcp-latency ADDR:PORT --count N | tcp-log ADDR:PORT --duration-ms D [--gap-ms G]"
    );
    std::process::exit(2)
}

fn flag(args: &[String], name: &str, default: u64) -> u64 {
    args.windows(2)
        .find(|w| w[0] == name)
        .map(|w| w[1].parse().unwrap_or_else(|_| usage()))
        .unwrap_or(default)
}

fn text_flag<'a>(args: &'a [String], name: &str) -> &'a str {
    args.windows(2)
        .find(|w| w[0] == name)
        .map(|w| w[1].as_str())
        .unwrap_or_else(|| usage())
}

fn describe(e: &std::io::Error) -> String {
    format!("err {:?} {}", e.kind(), e.raw_os_error().unwrap_or(0))
}

fn serve(name: &str, port: u16) -> std::io::Result<()> {
    let tcp = TcpListener::bind(("0.0.0.0", port))?;
    let udp = UdpSocket::bind(("0.0.0.0", port))?;
    let reply = name.as_bytes().to_vec();
    let udp_reply = reply.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        while let Ok((_, from)) = udp.recv_from(&mut buf) {
            let _ = udp.send_to(&udp_reply, from);
        }
    });
    println!("listening");
    std::io::stdout().flush()?;
    for mut s in tcp.incoming().flatten() {
        let _ = s.write_all(&reply);
    }
    Ok(())
}

fn tcp_once(addr: SocketAddr, timeout: Duration) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)?;
    Ok(buf)
}

fn udp_once(addr: SocketAddr, timeout: Duration) -> std::io::Result<(String, SocketAddr)> {
    let s = UdpSocket::bind("0.0.0.0:0")?;
    s.set_read_timeout(Some(timeout))?;
    s.send_to(b"ping", addr)?;
    let mut buf = [0u8; 1500];
    let (n, from) = s.recv_from(&mut buf)?;
    Ok((String::from_utf8_lossy(&buf[..n]).into_owned(), from))
}

fn udp_connected_once(addr: SocketAddr, timeout: Duration) -> std::io::Result<String> {
    let s = UdpSocket::bind("0.0.0.0:0")?;
    s.set_read_timeout(Some(timeout))?;
    s.connect(addr)?;
    s.send(b"ping")?;
    let mut buf = [0u8; 1500];
    let n = s.recv(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// The Internet checksum (RFC 1071).
fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !u16::try_from(sum).unwrap_or(u16::MAX)
}

/// One ICMP echo request to `ip`, waiting for its reply (matched by identifier and sequence).
fn ping(ip: Ipv4Addr, id: u16, seq: u16, timeout: Duration) -> std::io::Result<()> {
    use socket2::{Domain, Protocol, Socket, Type};
    let sock = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4))?;
    let mut msg = [0u8; 16];
    msg[0] = 8; // echo request
    msg[4..6].copy_from_slice(&id.to_be_bytes());
    msg[6..8].copy_from_slice(&seq.to_be_bytes());
    msg[8..].copy_from_slice(b"cmprobe!");
    let sum = checksum(&msg);
    msg[2..4].copy_from_slice(&sum.to_be_bytes());
    sock.send_to(&msg, &SocketAddrV4::new(ip, 0).into())?;
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 1500];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::ErrorKind::TimedOut.into());
        }
        sock.set_read_timeout(Some(left))?;
        let n = match (&sock).read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                return Err(std::io::ErrorKind::TimedOut.into());
            }
            Err(e) => return Err(e),
        };
        // A raw IPv4 socket hands over the IP header too.
        let pkt = &buf[..n];
        let ihl = usize::from(pkt.first().map_or(0, |b| b & 0x0f)) * 4;
        let Some(icmp) = pkt.get(ihl..ihl + 8) else {
            continue;
        };
        let from = pkt
            .get(12..16)
            .map(|a| Ipv4Addr::new(a[0], a[1], a[2], a[3]));
        if icmp[0] == 0
            && icmp[4..6] == id.to_be_bytes()
            && icmp[6..8] == seq.to_be_bytes()
            && from == Some(ip)
        {
            return Ok(());
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(cmd) = args.first() else { usage() };
    if cmd == "serve" {
        let port = u16::try_from(flag(&args, "--port", 0)).unwrap_or_else(|_| usage());
        if let Err(e) = serve(text_flag(&args, "--name"), port) {
            eprintln!("serve failed: {e}");
            std::process::exit(1);
        }
        return;
    }
    if cmd == "icmp" {
        let ip: Ipv4Addr = args
            .get(1)
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| usage());
        let timeout = Duration::from_millis(flag(&args, "--timeout-ms", 1000));
        let ident = u16::try_from(flag(
            &args,
            "--ident",
            u64::from(std::process::id() & 0xffff),
        ))
        .unwrap_or_else(|_| usage());
        for seq in 0..flag(&args, "--count", 1) {
            match ping(ip, ident, u16::try_from(seq).unwrap_or(u16::MAX), timeout) {
                Ok(()) => println!("ok {ip}"),
                Err(e) => println!("{}", describe(&e)),
            }
        }
        return;
    }
    let addr: SocketAddr = args
        .get(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| usage());
    let count = flag(&args, "--count", 1);
    let timeout = Duration::from_millis(flag(&args, "--timeout-ms", 1000));
    match cmd.as_str() {
        "tcp" => {
            for _ in 0..count {
                match tcp_once(addr, timeout) {
                    Ok(name) => println!("ok {name}"),
                    Err(e) => println!("{}", describe(&e)),
                }
            }
        }
        "udp" => {
            for _ in 0..count {
                match udp_once(addr, timeout) {
                    Ok((name, from)) => println!("ok {name} from {from}"),
                    Err(e) => println!("{}", describe(&e)),
                }
            }
        }
        "udp-connected" => {
            for _ in 0..count {
                match udp_connected_once(addr, timeout) {
                    Ok(name) => println!("ok {name}"),
                    Err(e) => println!("{}", describe(&e)),
                }
            }
        }
        "tcp-loop" => {
            let until = Instant::now() + Duration::from_millis(flag(&args, "--duration-ms", 1000));
            let (mut ok, mut failed) = (0u64, 0u64);
            while Instant::now() < until {
                match tcp_once(addr, timeout) {
                    Ok(_) => ok += 1,
                    Err(e) => {
                        failed += 1;
                        eprintln!("{}", describe(&e));
                    }
                }
            }
            println!("attempts {} ok {ok} failed {failed}", ok + failed);
        }
        "tcp-log" => {
            let until = Instant::now() + Duration::from_millis(flag(&args, "--duration-ms", 1000));
            let gap = Duration::from_millis(flag(&args, "--gap-ms", 0));
            let mut out = std::io::stdout().lock();
            while Instant::now() < until {
                let started = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_millis())
                    .unwrap_or(0);
                let line = match tcp_once(addr, timeout) {
                    Ok(name) => format!("{started} ok {name}"),
                    Err(e) => format!("{started} {}", describe(&e)),
                };
                let _ = writeln!(out, "{line}");
                #[allow(clippy::disallowed_methods, reason = "a synchronous tool: no runtime")]
                std::thread::sleep(gap);
            }
        }
        "tcp-latency" => {
            let mut samples = Vec::new();
            for _ in 0..count {
                let t = Instant::now();
                match TcpStream::connect_timeout(&addr, timeout) {
                    Ok(_) => samples.push(t.elapsed()),
                    Err(e) => println!("{}", describe(&e)),
                }
            }
            samples.sort();
            if samples.is_empty() {
                println!("no samples");
                return;
            }
            let pct = |p: f64| samples[((samples.len() - 1) as f64 * p) as usize].as_micros();
            println!(
                "p50_us {} p99_us {} n {}",
                pct(0.5),
                pct(0.99),
                samples.len()
            );
        }
        _ => usage(),
    }
}
