//! `kvmesh ping`: is a node answering on its TCP port? (The compose health check.)

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

/// Why a ping failed.
#[derive(Debug, thiserror::Error)]
pub enum PingError {
    /// Nothing could be reached.
    #[error("cannot connect to {addr}: {reason}")]
    Connect {
        /// The address asked for.
        addr: String,
        /// Why.
        reason: String,
    },
    /// Something answered, but not a kvmesh node.
    #[error("{addr} answered {answer:?}, not PONG: is it a kvmesh node?")]
    WrongAnswer {
        /// The address asked for.
        addr: String,
        /// What came back.
        answer: String,
    },
    /// Connected, but no answer in time.
    #[error("{addr} did not answer: {reason}")]
    NoAnswer {
        /// The address asked for.
        addr: String,
        /// Why.
        reason: String,
    },
}

/// Sends `PING` to `addr` and expects `PONG` within `timeout`.
pub fn ping(addr: &str, timeout: Duration) -> Result<(), PingError> {
    let connect = |reason: String| PingError::Connect {
        addr: addr.to_owned(),
        reason,
    };
    let no_answer = |e: std::io::Error| PingError::NoAnswer {
        addr: addr.to_owned(),
        reason: e.to_string(),
    };
    let target = addr
        .to_socket_addrs()
        .map_err(|e| connect(e.to_string()))?
        .next()
        .ok_or_else(|| connect("the address resolves to nothing".into()))?;
    let mut stream =
        TcpStream::connect_timeout(&target, timeout).map_err(|e| connect(e.to_string()))?;
    stream.set_read_timeout(Some(timeout)).map_err(no_answer)?;
    stream.set_write_timeout(Some(timeout)).map_err(no_answer)?;
    stream.write_all(b"PING\r\n").map_err(no_answer)?;
    let mut answer = Vec::new();
    let mut buf = [0u8; 64];
    while answer.len() < 6 {
        match stream.read(&mut buf).map_err(no_answer)? {
            0 => break,
            n => answer.extend_from_slice(&buf[..n]),
        }
    }
    if answer.starts_with(b"PONG\r\n") {
        let _ = stream.write_all(b"QUIT\r\n");
        Ok(())
    } else {
        Err(PingError::WrongAnswer {
            addr: addr.to_owned(),
            answer: String::from_utf8_lossy(&answer).into_owned(),
        })
    }
}
