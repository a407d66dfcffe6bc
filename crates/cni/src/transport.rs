//! One request over a unix stream socket, with the pod's netns as an open
//! fd (SCM_RIGHTS). The only unsafe code of this crate lives here.
#![allow(unsafe_code)]

use crate::error::{CniError, TRY_AGAIN_LATER};
use crate::proto::{Request, Response};
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// How long the plugin waits for the agent's answer.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);
/// Largest request or answer accepted.
pub const MAX_MESSAGE: usize = 4 << 20;

/// Errors moving a request.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// Socket-level failure.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The peer connected and closed without a request (a liveness probe).
    #[error("connection closed without a request")]
    Empty,
    /// The peer sent something that is not our protocol.
    #[error("malformed message: {0}")]
    Malformed(String),
}

/// Sends `req` (and `netns`, if any) to the agent at `socket` and waits for
/// its answer. An agent that cannot be reached is CNI code 11 naming the socket.
pub fn call(socket: &Path, req: &Request, netns: Option<&OwnedFd>) -> Result<Response, CniError> {
    let unreachable = |e: std::io::Error| {
        CniError::new(
            TRY_AGAIN_LATER,
            format!("trellisd is not reachable at {}: {e}", socket.display()),
        )
        .with_details("is the trellis agent running on this node? try again later")
    };
    let stream = UnixStream::connect(socket).map_err(unreachable)?;
    stream
        .set_read_timeout(Some(CLIENT_TIMEOUT))
        .map_err(unreachable)?;
    stream
        .set_write_timeout(Some(CLIENT_TIMEOUT))
        .map_err(unreachable)?;
    let body = serde_json::to_vec(req).map_err(|e| unreachable(e.into()))?;
    send_with_fd(&stream, &body, netns.map(AsRawFd::as_raw_fd)).map_err(unreachable)?;
    stream
        .shutdown(std::net::Shutdown::Write)
        .map_err(unreachable)?;
    let mut answer = Vec::new();
    stream
        .take(MAX_MESSAGE as u64)
        .read_to_end(&mut answer)
        .map_err(unreachable)?;
    serde_json::from_slice(&answer).map_err(|e| {
        CniError::new(
            TRY_AGAIN_LATER,
            format!("trellisd at {} sent no valid answer: {e}", socket.display()),
        )
    })
}

fn send_with_fd(stream: &UnixStream, body: &[u8], fd: Option<RawFd>) -> std::io::Result<()> {
    let fds: Vec<RawFd> = fd.into_iter().collect();
    let cmsgs: Vec<ControlMessage<'_>> = if fds.is_empty() {
        vec![]
    } else {
        vec![ControlMessage::ScmRights(&fds)]
    };
    let sent = sendmsg::<()>(
        stream.as_raw_fd(),
        &[IoSlice::new(body)],
        &cmsgs,
        MsgFlags::empty(),
        None,
    )
    .map_err(std::io::Error::from)?;
    // a stream socket may take only part of a large request at once
    let mut s = stream;
    s.write_all(&body[sent..])
}

/// Reads one request and its optional fd from an accepted connection.
pub fn receive(stream: &UnixStream) -> Result<(Request, Option<OwnedFd>), TransportError> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut cmsg = nix::cmsg_space!([RawFd; 2]);
    let (n, fds) = {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<()>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(std::io::Error::from)?;
        let mut fds = Vec::new();
        for c in msg.cmsgs().map_err(std::io::Error::from)? {
            if let ControlMessageOwned::ScmRights(rights) = c {
                // SAFETY: the kernel just installed these descriptors in our
                // table for this message; nothing else owns them.
                fds.extend(
                    rights
                        .into_iter()
                        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                );
            }
        }
        (msg.bytes, fds)
    };
    if n == 0 {
        return Err(TransportError::Empty);
    }
    buf.truncate(n);
    let s = stream;
    s.take((MAX_MESSAGE - n) as u64).read_to_end(&mut buf)?;
    let req: Request = serde_json::from_slice(&buf)
        .map_err(|e| TransportError::Malformed(format!("request is not valid JSON: {e}")))?;
    let mut fds = fds.into_iter();
    let fd = fds.next();
    if req.has_netns_fd != fd.is_some() {
        return Err(TransportError::Malformed(
            "netns fd announced but not attached (or the reverse)".into(),
        ));
    }
    Ok((req, fd))
}

/// Writes the answer and closes the connection.
pub fn reply(mut stream: &UnixStream, resp: &Response) -> std::io::Result<()> {
    let body = serde_json::to_vec(resp).map_err(std::io::Error::other)?;
    stream.write_all(&body)?;
    stream.shutdown(std::net::Shutdown::Write)
}
