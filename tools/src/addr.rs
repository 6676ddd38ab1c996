//! Addresses as operators type them: `host:port` with a host name (resolved, every address
//! tried in turn, as ssh does), an IPv4 literal, or a bracketed IPv6 literal (`[fd00::2]:7000`);
//! for `--listen` also `:PORT` or `PORT` (all addresses: IPv6 and IPv4).

use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs};

/// Why an address did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddrError {
    /// Nothing given.
    #[error("empty address (expected HOST:PORT, e.g. 10.0.0.2:7000 or [fd00::2]:7000)")]
    Empty,
    /// No port.
    #[error("`{text}` has no port (expected HOST:PORT, e.g. {text}:7000)")]
    NoPort {
        /// The text given.
        text: String,
    },
    /// The port is not a number in 0..=65535.
    #[error("bad port `{port}` in `{text}` (expected 0..65535)")]
    BadPort {
        /// The text given.
        text: String,
        /// The port part.
        port: String,
    },
    /// An IPv6 literal without brackets (its colons clash with the port's).
    #[error("`{text}`: an IPv6 address needs brackets, e.g. [{host}]:7000")]
    Ipv6NeedsBrackets {
        /// The text given.
        text: String,
        /// The host part.
        host: String,
    },
    /// Brackets around something that is not an IPv6 address.
    #[error("`{text}`: only an IPv6 address goes in brackets")]
    BadBracket {
        /// The text given.
        text: String,
    },
    /// `--connect` needs a host.
    #[error("`{text}` names no host (expected HOST:PORT, e.g. 10.0.0.2{text})")]
    NoHost {
        /// The text given.
        text: String,
    },
}

/// A parsed `HOST:PORT` (host absent: every local address).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Host name or IP literal (without brackets); `None` for all addresses.
    pub host: Option<String>,
    /// The port.
    pub port: u16,
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            Some(h) if h.contains(':') => write!(f, "[{h}]:{}", self.port),
            Some(h) => write!(f, "{h}:{}", self.port),
            None => write!(f, ":{}", self.port),
        }
    }
}

fn port(text: &str, p: &str) -> Result<u16, AddrError> {
    if p.is_empty() {
        return Err(AddrError::NoPort {
            text: text.to_owned(),
        });
    }
    p.parse().map_err(|_| AddrError::BadPort {
        text: text.to_owned(),
        port: p.to_owned(),
    })
}

/// Parses `HOST:PORT`, `[V6]:PORT`, and (when `host_optional`) `:PORT` and `PORT`.
fn parse(text: &str, host_optional: bool) -> Result<Endpoint, AddrError> {
    let t = text.trim();
    if t.is_empty() {
        return Err(AddrError::Empty);
    }
    let (host, p) = if let Some(rest) = t.strip_prefix('[') {
        let Some((h, after)) = rest.split_once(']') else {
            return Err(AddrError::BadBracket { text: t.to_owned() });
        };
        if h.parse::<Ipv6Addr>().is_err() {
            return Err(AddrError::BadBracket { text: t.to_owned() });
        }
        let Some(p) = after.strip_prefix(':') else {
            return Err(AddrError::NoPort { text: t.to_owned() });
        };
        (Some(h), p)
    } else if t.bytes().all(|b| b.is_ascii_digit()) {
        (None, t)
    } else {
        match t.rsplit_once(':') {
            None => return Err(AddrError::NoPort { text: t.to_owned() }),
            Some((h, _)) if h.contains(':') => {
                return Err(AddrError::Ipv6NeedsBrackets {
                    text: t.to_owned(),
                    host: if t.parse::<Ipv6Addr>().is_ok() { t } else { h }.to_owned(),
                })
            }
            Some(("", p)) => (None, p),
            Some((h, p)) => (Some(h), p),
        }
    };
    let port = port(t, p)?;
    if host.is_none() && !host_optional {
        return Err(AddrError::NoHost { text: t.to_owned() });
    }
    Ok(Endpoint {
        host: host.map(str::to_owned),
        port,
    })
}

/// `--connect`: `HOST:PORT` or `[V6]:PORT`.
pub fn parse_connect(text: &str) -> Result<Endpoint, AddrError> {
    parse(text, false)
}

/// `--listen`: also `:PORT` and `PORT` (every address).
pub fn parse_listen(text: &str) -> Result<Endpoint, AddrError> {
    parse(text, true)
}

impl Endpoint {
    /// The addresses to try, in the resolver's order (literals give themselves). With no host:
    /// the IPv6 wildcard (which also takes IPv4 where `net.ipv6.bindv6only` is 0, the default),
    /// then the IPv4 wildcard for hosts without IPv6.
    pub fn resolve(&self) -> io::Result<Vec<SocketAddr>> {
        match &self.host {
            None => Ok(vec![
                SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), self.port),
                SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), self.port),
            ]),
            Some(h) => {
                if let Ok(ip) = h.parse::<IpAddr>() {
                    return Ok(vec![SocketAddr::new(ip, self.port)]);
                }
                let v: Vec<SocketAddr> = (h.as_str(), self.port).to_socket_addrs()?.collect();
                let mut seen = Vec::with_capacity(v.len());
                for a in v {
                    if !seen.contains(&a) {
                        seen.push(a);
                    }
                }
                Ok(seen)
            }
        }
    }
}

/// Calls `attempt` on each address in turn until one succeeds or `is_final` says its error must
/// not be retried on the next address. Returns the success, or every failure in order.
pub fn try_in_turn<T, E>(
    addrs: &[SocketAddr],
    mut attempt: impl FnMut(SocketAddr) -> Result<T, E>,
    is_final: impl Fn(&E) -> bool,
) -> Result<(SocketAddr, T), Vec<(SocketAddr, E)>> {
    let mut failures = Vec::new();
    for &a in addrs {
        match attempt(a) {
            Ok(v) => return Ok((a, v)),
            Err(e) => {
                let stop = is_final(&e);
                failures.push((a, e));
                if stop {
                    break;
                }
            }
        }
    }
    Err(failures)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(host: Option<&str>, port: u16) -> Endpoint {
        Endpoint {
            host: host.map(str::to_owned),
            port,
        }
    }

    #[test]
    fn connect_takes_names_v4_and_bracketed_v6() {
        assert_eq!(
            parse_connect("localhost:7000"),
            Ok(ep(Some("localhost"), 7000))
        );
        assert_eq!(parse_connect("10.0.0.2:1"), Ok(ep(Some("10.0.0.2"), 1)));
        assert_eq!(
            parse_connect("[fd00::2]:7000"),
            Ok(ep(Some("fd00::2"), 7000))
        );
        assert!(matches!(
            parse_connect(":7000"),
            Err(AddrError::NoHost { .. })
        ));
        assert!(matches!(
            parse_connect("7000"),
            Err(AddrError::NoHost { .. })
        ));
        assert!(matches!(
            parse_connect("host"),
            Err(AddrError::NoPort { .. })
        ));
        assert!(matches!(
            parse_connect("host:"),
            Err(AddrError::NoPort { .. })
        ));
        assert!(matches!(
            parse_connect("host:70000"),
            Err(AddrError::BadPort { .. })
        ));
        assert!(matches!(
            parse_connect("fd00::2:7000"),
            Err(AddrError::Ipv6NeedsBrackets { .. })
        ));
        assert!(matches!(
            parse_connect("[host]:1"),
            Err(AddrError::BadBracket { .. })
        ));
    }

    #[test]
    fn listen_takes_a_bare_port_for_every_address() {
        assert_eq!(parse_listen(":7000"), Ok(ep(None, 7000)));
        assert_eq!(parse_listen("7000"), Ok(ep(None, 7000)));
        assert_eq!(parse_listen("[::]:0"), Ok(ep(Some("::"), 0)));
        let all = ep(None, 7).resolve().expect("wildcards");
        assert_eq!(all.len(), 2);
        assert!(all[0].is_ipv6() && all[0].ip().is_unspecified());
        assert!(all[1].is_ipv4() && all[1].ip().is_unspecified());
    }

    #[test]
    fn display_brackets_v6_and_parses_back() {
        for t in ["[fd00::2]:7000", "host:1", ":9"] {
            assert_eq!(parse_listen(t).expect("parses").to_string(), t);
        }
    }

    #[test]
    fn every_address_is_tried_in_turn_until_one_answers() {
        let addrs: Vec<SocketAddr> = ["[::1]:1", "127.0.0.2:1", "127.0.0.1:1"]
            .iter()
            .map(|s| s.parse().expect("addr"))
            .collect();
        let mut tried = Vec::new();
        let r = try_in_turn(
            &addrs,
            |a| {
                tried.push(a);
                if a == addrs[2] {
                    Ok("up")
                } else {
                    Err("refused")
                }
            },
            |_| false,
        );
        assert_eq!(r, Ok((addrs[2], "up")));
        assert_eq!(tried, addrs);
        let r: Result<(SocketAddr, ()), _> = try_in_turn(&addrs, |_| Err("auth"), |_| true);
        assert_eq!(
            r,
            Err(vec![(addrs[0], "auth")]),
            "a final error stops the walk"
        );
    }
}
