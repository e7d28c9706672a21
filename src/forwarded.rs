//! Forwarding headers, done as careful proxies do them: hop-by-hop headers and every header the
//! request's `Connection` names go first, then the guard sets `X-Forwarded-For`, `-Proto` and
//! `-Host` itself. What a client says about where a request came from (`X-Forwarded-*`,
//! `Forwarded`, `X-Real-IP`) is believed only from a configured trusted proxy; from anyone else it
//! is replaced, never appended to, so a client can neither erase nor forge its address.
//!
//! Hand-written because tower-http has no trusted-proxy handling of forwarding headers, and a CIDR
//! match is a dozen lines, not worth a dependency outside the crates this project keeps to.

use std::net::IpAddr;
use std::str::FromStr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Headers that belong to one connection, not to the message (RFC 9110 §7.6.1).
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Client-supplied claims about the request's origin, dropped unless the peer is trusted.
const ORIGIN_CLAIMS: [HeaderName; 6] = [
    X_FORWARDED_FOR,
    X_FORWARDED_PROTO,
    X_FORWARDED_HOST,
    HeaderName::from_static("x-forwarded-port"),
    HeaderName::from_static("x-real-ip"),
    header::FORWARDED,
];

/// The connection a request arrived on, put on the request where it is accepted.
#[derive(Clone, Debug)]
pub struct ClientAddr {
    pub ip: IpAddr,
    /// The peer is one of `PGRST_GUARD_TRUSTED_PROXIES`: its forwarding headers are kept.
    pub trusted: bool,
    /// `ip` as written in `X-Forwarded-For`, made once per connection rather than per request.
    forwarded_for: HeaderValue,
}

impl ClientAddr {
    pub fn new(ip: IpAddr, trusted: bool) -> ClientAddr {
        let forwarded_for =
            HeaderValue::from_str(&ip.to_canonical().to_string()).expect("an IP is a valid header value");
        ClientAddr { ip, trusted, forwarded_for }
    }
}

/// An IP network in CIDR notation (`10.0.0.0/8`, `::1/128`, or a bare address).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpNet {
    network: IpAddr,
    prefix: u8,
}

impl FromStr for IpNet {
    type Err = String;

    fn from_str(text: &str) -> Result<IpNet, String> {
        let (address, prefix) = match text.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (text, None),
        };
        let network: IpAddr = address.trim().parse().map_err(|_| format!("{text:?} is not an IP address or CIDR"))?;
        let max = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => {
                p.trim().parse::<u8>().ok().filter(|p| *p <= max).ok_or_else(|| format!("bad prefix in {text:?}"))?
            }
            None => max,
        };
        Ok(IpNet { network, prefix })
    }
}

impl IpNet {
    pub fn contains(&self, ip: IpAddr) -> bool {
        let (network, ip, bits) = match (self.network, ip.to_canonical()) {
            (IpAddr::V4(n), IpAddr::V4(i)) => (u32::from(n) as u128, u32::from(i) as u128, 32),
            (IpAddr::V6(n), IpAddr::V6(i)) => (u128::from(n), u128::from(i), 128),
            _ => return false,
        };
        let shift = bits - u32::from(self.prefix);
        shift >= bits || (network >> shift) == (ip >> shift)
    }
}

/// Is `ip` one of the `trusted` proxies?
pub fn is_trusted(trusted: &[IpNet], ip: IpAddr) -> bool {
    trusted.iter().any(|net| net.contains(ip))
}

/// Removes hop-by-hop headers and every header `Connection` names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
    headers.remove(header::UPGRADE);
}

/// Sets the forwarding headers for a request from `client` that named `original_host`. Call after
/// [`strip_hop_by_hop`], so that nothing the client listed in `Connection` can remove them.
pub fn set_forwarding_headers(
    headers: &mut HeaderMap,
    client: Option<&ClientAddr>,
    original_host: Option<HeaderValue>,
) {
    let trusted = client.is_some_and(|c| c.trusted);
    let previous_for = if trusted { headers.get(X_FORWARDED_FOR).cloned() } else { None };
    if !trusted {
        for name in ORIGIN_CLAIMS {
            headers.remove(name);
        }
    }
    if let Some(client) = client {
        match previous_for.as_ref().and_then(|v| v.to_str().ok()) {
            Some(previous) => {
                let ip = client.forwarded_for.to_str().unwrap_or_default();
                if let Ok(value) = HeaderValue::from_str(&format!("{previous}, {ip}")) {
                    headers.insert(X_FORWARDED_FOR, value);
                }
            }
            None => {
                headers.insert(X_FORWARDED_FOR, client.forwarded_for.clone());
            }
        }
    }
    if !headers.contains_key(X_FORWARDED_PROTO) {
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
    }
    if let Some(host) = original_host {
        if !headers.contains_key(X_FORWARDED_HOST) {
            headers.insert(X_FORWARDED_HOST, host);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_membership() {
        let net: IpNet = "10.1.0.0/16".parse().unwrap();
        assert!(net.contains("10.1.200.3".parse().unwrap()));
        assert!(!net.contains("10.2.0.1".parse().unwrap()));
        assert!(net.contains("::ffff:10.1.0.9".parse().unwrap()), "IPv4-mapped IPv6");
        let one: IpNet = "127.0.0.1".parse().unwrap();
        assert!(one.contains("127.0.0.1".parse().unwrap()) && !one.contains("127.0.0.2".parse().unwrap()));
        let all: IpNet = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("8.8.8.8".parse().unwrap()));
        assert!("fd00::/8".parse::<IpNet>().unwrap().contains("fd12::1".parse().unwrap()));
        assert!("10.0.0.0/33".parse::<IpNet>().is_err() && "nope".parse::<IpNet>().is_err());
    }

    #[test]
    fn a_client_cannot_erase_or_forge_its_address() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONNECTION, HeaderValue::from_static("x-forwarded-for, x-real-ip"));
        headers.insert(X_FORWARDED_FOR, HeaderValue::from_static("6.6.6.6"));
        headers.insert(header::FORWARDED, HeaderValue::from_static("for=6.6.6.6"));
        headers.insert("apikey", HeaderValue::from_static("k"));
        strip_hop_by_hop(&mut headers);
        let client = ClientAddr::new("192.0.2.7".parse().unwrap(), false);
        set_forwarding_headers(&mut headers, Some(&client), Some(HeaderValue::from_static("guard:8080")));
        assert_eq!(headers.get(X_FORWARDED_FOR).unwrap(), "192.0.2.7");
        assert!(headers.get(header::FORWARDED).is_none());
        assert_eq!(headers.get("apikey").unwrap(), "k");
        assert_eq!(headers.get(X_FORWARDED_HOST).unwrap(), "guard:8080");
    }
}
