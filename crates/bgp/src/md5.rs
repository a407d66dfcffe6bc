//! TCP MD5 signatures (RFC 2385) on a BGP socket: `setsockopt(TCP_MD5SIG)`
//! with a `struct tcp_md5sig` (neither socket2 nor nix exposes it). Set it
//! on the connecting socket before `connect`, and per peer address on a
//! listener. The only unsafe code of this crate lives here.
#![allow(unsafe_code)]

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, BorrowedFd};

/// Longest key the kernel takes.
pub const MAX_KEY: usize = 80;

/// `struct tcp_md5sig` from `<linux/tcp.h>`.
#[repr(C)]
struct TcpMd5Sig {
    addr: libc::sockaddr_storage,
    flags: u8,
    prefixlen: u8,
    keylen: u16,
    ifindex: libc::c_int,
    key: [u8; MAX_KEY],
}

/// Signs every segment to and from `peer` with `key` (an empty key removes
/// the signature).
pub fn set_md5(sock: BorrowedFd<'_>, peer: SocketAddr, key: &[u8]) -> std::io::Result<()> {
    if key.len() > MAX_KEY {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("TCP MD5 key longer than {MAX_KEY} bytes"),
        ));
    }
    // SAFETY: an all-zero bit pattern is a valid value for every field
    // (plain integers and byte arrays).
    let mut sig: TcpMd5Sig = unsafe { std::mem::zeroed() };
    match peer {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: 0,
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than sockaddr_in and suitably
            // aligned for it; we write exactly one sockaddr_in at its start.
            unsafe {
                std::ptr::write(
                    std::ptr::addr_of_mut!(sig.addr).cast::<libc::sockaddr_in>(),
                    sin,
                )
            };
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: 0,
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: 0,
            };
            // SAFETY: as above, for sockaddr_in6.
            unsafe {
                std::ptr::write(
                    std::ptr::addr_of_mut!(sig.addr).cast::<libc::sockaddr_in6>(),
                    sin6,
                )
            };
        }
    }
    sig.keylen = key.len() as u16;
    sig.key[..key.len()].copy_from_slice(key);
    // SAFETY: the fd is a live socket borrowed for the call; the option value
    // points at a fully initialised struct of the size we pass.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_MD5SIG,
            std::ptr::addr_of!(sig).cast::<libc::c_void>(),
            std::mem::size_of::<TcpMd5Sig>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn layout_matches_the_kernel() {
        // sizeof(struct tcp_md5sig) on Linux: 128 + 1 + 1 + 2 + 4 + 80
        assert_eq!(std::mem::size_of::<TcpMd5Sig>(), 216);
    }

    #[test]
    fn sets_on_a_tcp_socket_and_refuses_long_keys() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let peer: SocketAddr = "127.0.0.1:179".parse().expect("addr");
        set_md5(l.as_fd(), peer, b"secret").expect("setsockopt TCP_MD5SIG");
        assert!(set_md5(l.as_fd(), peer, &[0u8; 81]).is_err());
    }
}
