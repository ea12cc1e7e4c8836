//! The raw-tunnel workload: a TCP service that echoes or sinks, put behind each
//! tunnel, and the blocking clients that time round trips and one-stream
//! throughput through it.
//!
//! A connection's first byte picks the mode: `E` echoes every byte back; `S`
//! reads an 8-byte big-endian length, swallows that many bytes and answers one
//! byte, so throughput is timed end to end without relying on half-close.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Barrier;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

const ECHO: u8 = b'E';
const SINK: u8 = b'S';

/// Starts the service on loopback; returns its address.
pub async fn start() -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let _ = tcp.set_nodelay(true);
            tokio::spawn(serve(tcp));
        }
    });
    Ok(addr)
}

/// Serves one connection (a TCP socket, or a tunnelled QUIC stream).
pub async fn serve<S: AsyncRead + AsyncWrite + Unpin>(mut s: S) -> std::io::Result<()> {
    let mut buf = vec![0u8; 256 * 1024];
    match s.read_u8().await? {
        ECHO => loop {
            let n = s.read(&mut buf).await?;
            if n == 0 {
                return Ok(());
            }
            s.write_all(buf.get(..n).unwrap_or_default()).await?;
            s.flush().await?;
        },
        SINK => {
            let mut left = s.read_u64().await?;
            while left > 0 {
                let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                let n = s.read(buf.get_mut(..want).unwrap_or_default()).await?;
                if n == 0 {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
                left -= n as u64;
            }
            s.write_all(b"k").await?;
            s.flush().await
        }
        _ => Ok(()),
    }
}

/// `count` round trips of 64 bytes through `addr` (after `warmup` untimed ones).
pub fn echo_rtts(addr: SocketAddr, warmup: usize, count: usize) -> anyhow::Result<Vec<Duration>> {
    let mut tcp = connect(addr)?;
    tcp.write_all(&[ECHO])?;
    let msg = [0x5au8; 64];
    let mut back = [0u8; 64];
    let mut out = Vec::with_capacity(count);
    for i in 0..warmup + count {
        let t = Instant::now();
        tcp.write_all(&msg)?;
        tcp.read_exact(&mut back).context("echo")?;
        if i >= warmup {
            out.push(t.elapsed());
        }
    }
    Ok(out)
}

/// Sends `bytes` through `addr` on one stream; the time until the sink has them all.
pub fn stream(addr: SocketAddr, bytes: u64) -> anyhow::Result<Duration> {
    let mut tcp = connect(addr)?;
    let chunk = vec![0u8; 256 * 1024];
    let t = Instant::now();
    tcp.write_all(&[SINK])?;
    tcp.write_all(&bytes.to_be_bytes())?;
    let mut left = bytes;
    while left > 0 {
        let n = chunk.len().min(usize::try_from(left)?);
        tcp.write_all(chunk.get(..n).unwrap_or_default())?;
        left -= n as u64;
    }
    let mut ack = [0u8; 1];
    tcp.read_exact(&mut ack).context("sink answer")?;
    Ok(t.elapsed())
}

/// Streams into the sink at `addr` from when all are `started` until `stop`,
/// counting what was written in `sent`; then closes.
pub fn stream_until(
    addr: SocketAddr,
    stop: &AtomicBool,
    sent: &AtomicU64,
    started: &Barrier,
) -> anyhow::Result<()> {
    let tcp = connect(addr);
    started.wait();
    let mut tcp = tcp?;
    tcp.set_write_timeout(Some(Duration::from_secs(30)))?;
    tcp.write_all(&[SINK])?;
    tcp.write_all(&u64::MAX.to_be_bytes())?;
    let chunk = vec![0u8; 64 * 1024];
    while !stop.load(Ordering::Relaxed) {
        tcp.write_all(&chunk).context("streaming")?;
        sent.fetch_add(chunk.len() as u64, Ordering::Relaxed);
    }
    Ok(())
}

/// Waits until `addr` echoes through whatever tunnel is in front of it.
pub fn wait_echo(addr: SocketAddr) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match echo_rtts(addr, 0, 1) {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() > deadline => {
                return Err(e.context(format!("{addr} never echoed")));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

fn connect(addr: SocketAddr) -> anyhow::Result<TcpStream> {
    let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .with_context(|| format!("connecting to {addr}"))?;
    tcp.set_nodelay(true)?;
    tcp.set_read_timeout(Some(Duration::from_secs(30)))?;
    Ok(tcp)
}
