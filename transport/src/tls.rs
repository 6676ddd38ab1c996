//! TLS 1.3 connections (rustls, `ring` provider): placeholder until the TLS path lands.

use std::net::{SocketAddr, TcpStream};

use vfmig_wire::handshake::Agreed;

use crate::config::{SessionConfig, TlsConfig};
use crate::error::TransportError;
use crate::handshake_io::Side;
use crate::ring::Sock;

pub(crate) fn client(
    _stream: TcpStream,
    _tls: &TlsConfig,
    peer: SocketAddr,
    _side: &mut Side,
    _conn: usize,
    _cfg: &SessionConfig,
) -> Result<(Sock, Agreed), TransportError> {
    Err(TransportError::InsecureRefused { peer })
}

pub(crate) fn server(
    _stream: TcpStream,
    _tls: &TlsConfig,
    peer: SocketAddr,
    _side: &mut Side,
    _conn: usize,
    _cfg: &SessionConfig,
) -> Result<(Sock, Agreed), TransportError> {
    Err(TransportError::InsecureRefused { peer })
}
