//! Parsing IPv4 networks written as `a.b.c.d/prefix` into [`Cidr`].
//!
//! Parsing is strict: host bits must be zero, so `10.0.0.1/24` is an error that names the
//! network the user probably meant (`10.0.0.0/24`) rather than being silently rounded.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use crate::model::Cidr;

/// Why a string is not a CIDR network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CidrError {
    /// No `/prefix`; holds the address if the rest is one.
    MissingPrefix { addr: Option<Ipv4Addr> },
    /// The part before `/` is not an IPv4 address.
    BadAddress(String),
    /// The part after `/` is not a number from 0 to 32.
    BadPrefix(String),
    /// Bits beyond the prefix are set; `network` is the same network with them cleared.
    HostBitsSet { network: Cidr },
}

impl FromStr for Cidr {
    type Err = CidrError;

    fn from_str(s: &str) -> Result<Cidr, CidrError> {
        let Some((addr, prefix)) = s.split_once('/') else {
            return Err(CidrError::MissingPrefix {
                addr: s.parse().ok(),
            });
        };
        let addr: Ipv4Addr = addr
            .parse()
            .map_err(|_| CidrError::BadAddress(addr.to_owned()))?;
        // `u8::from_str` accepts a leading `+`; a prefix is plain digits.
        let prefix = match prefix.parse::<u8>() {
            Ok(p) if p <= 32 && prefix.bytes().all(|b| b.is_ascii_digit()) => p,
            _ => return Err(CidrError::BadPrefix(prefix.to_owned())),
        };
        let network = Cidr {
            addr: Ipv4Addr::from(u32::from(addr) & mask(prefix)),
            prefix,
        };
        if network.addr != addr {
            return Err(CidrError::HostBitsSet { network });
        }
        Ok(network)
    }
}

impl Cidr {
    /// Whether every address of `other` is in `self`.
    pub fn contains(&self, other: &Cidr) -> bool {
        other.prefix >= self.prefix
            && u32::from(other.addr) & mask(self.prefix) == u32::from(self.addr)
    }

    /// Whether `address` is in `self`.
    pub fn contains_address(&self, address: Ipv4Addr) -> bool {
        u32::from(address) & mask(self.prefix) == u32::from(self.addr)
    }

    /// The network's last address (its broadcast address).
    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) | !mask(self.prefix))
    }

    /// The network's `n`th address (0 is the network's own), if it has that many.
    pub fn nth(&self, n: u32) -> Option<Ipv4Addr> {
        let size = 1u64 << (32 - u32::from(self.prefix));
        (u64::from(n) < size).then(|| Ipv4Addr::from(u32::from(self.addr) + n))
    }
}

impl fmt::Display for CidrError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CidrError::MissingPrefix { .. } => f.write_str("missing `/prefix`"),
            CidrError::BadAddress(a) => write!(f, "`{a}` is not an IPv4 address"),
            CidrError::BadPrefix(p) => write!(f, "prefix length `{p}` is not between 0 and 32"),
            CidrError::HostBitsSet { .. } => f.write_str("bits after the prefix are set"),
        }
    }
}

impl std::error::Error for CidrError {}

fn mask(prefix: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr(a: [u8; 4], prefix: u8) -> Cidr {
        Cidr {
            addr: Ipv4Addr::from(a),
            prefix,
        }
    }

    #[test]
    fn parses_networks() {
        assert_eq!("10.0.0.0/8".parse(), Ok(cidr([10, 0, 0, 0], 8)));
        assert_eq!("127.77.0.0/16".parse(), Ok(cidr([127, 77, 0, 0], 16)));
        assert_eq!("203.0.113.7/32".parse(), Ok(cidr([203, 0, 113, 7], 32)));
        assert_eq!("0.0.0.0/0".parse(), Ok(Cidr::ANYWHERE));
    }

    #[test]
    fn addresses_in_a_network() {
        let vpc: Cidr = "172.31.0.0/16".parse().unwrap();
        assert!(vpc.contains_address(Ipv4Addr::new(172, 31, 255, 255)));
        assert!(!vpc.contains_address(Ipv4Addr::new(172, 32, 0, 0)));
        assert_eq!(vpc.broadcast(), Ipv4Addr::new(172, 31, 255, 255));
        assert_eq!(vpc.nth(3), Some(Ipv4Addr::new(172, 31, 0, 3)));
        assert_eq!(vpc.nth(65_535), Some(Ipv4Addr::new(172, 31, 255, 255)));
        assert_eq!(vpc.nth(65_536), None);
        assert!(Cidr::ANYWHERE.contains_address(Ipv4Addr::new(203, 0, 113, 9)));
        assert_eq!(Cidr::ANYWHERE.broadcast(), Ipv4Addr::BROADCAST);
        let host: Cidr = "203.0.113.7/32".parse().unwrap();
        assert_eq!(host.broadcast(), host.addr);
        assert_eq!(host.nth(1), None);
    }

    #[test]
    fn display_round_trips() {
        let c: Cidr = "192.168.4.0/22".parse().unwrap();
        assert_eq!(c.to_string(), "192.168.4.0/22");
    }

    #[test]
    fn rejects_bad_syntax() {
        assert_eq!(
            "10.0.0.1".parse::<Cidr>(),
            Err(CidrError::MissingPrefix {
                addr: Some(Ipv4Addr::new(10, 0, 0, 1))
            })
        );
        assert_eq!(
            "office".parse::<Cidr>(),
            Err(CidrError::MissingPrefix { addr: None })
        );
        assert_eq!(
            "10.0.0/8".parse::<Cidr>(),
            Err(CidrError::BadAddress("10.0.0".into()))
        );
        assert_eq!(
            "256.0.0.0/8".parse::<Cidr>(),
            Err(CidrError::BadAddress("256.0.0.0".into()))
        );
        assert_eq!(
            "10.0.0.0/".parse::<Cidr>(),
            Err(CidrError::BadPrefix("".into()))
        );
        assert_eq!(
            "10.0.0.0/+8".parse::<Cidr>(),
            Err(CidrError::BadPrefix("+8".into()))
        );
        assert_eq!(
            "10.0.0.0/8/8".parse::<Cidr>(),
            Err(CidrError::BadPrefix("8/8".into()))
        );
    }

    #[test]
    fn rejects_prefix_over_32() {
        assert_eq!(
            "10.0.0.0/33".parse::<Cidr>(),
            Err(CidrError::BadPrefix("33".into()))
        );
    }

    #[test]
    fn host_bits_set_names_the_network() {
        assert_eq!(
            "10.1.2.3/16".parse::<Cidr>(),
            Err(CidrError::HostBitsSet {
                network: cidr([10, 1, 0, 0], 16)
            })
        );
        assert_eq!(
            "1.2.3.4/0".parse::<Cidr>(),
            Err(CidrError::HostBitsSet {
                network: Cidr::ANYWHERE
            })
        );
    }

    #[test]
    fn containment() {
        let loopback = cidr([127, 0, 0, 0], 8);
        assert!(loopback.contains(&cidr([127, 77, 0, 0], 16)));
        assert!(loopback.contains(&loopback));
        assert!(!loopback.contains(&cidr([10, 77, 0, 0], 16)));
        assert!(!cidr([127, 77, 0, 0], 16).contains(&loopback));
        assert!(Cidr::ANYWHERE.contains(&loopback));
    }
}
