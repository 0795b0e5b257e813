//! Inclusive port ranges as written in policies: "40000-40999" or "8080".

use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortRange {
    pub lo: u16,
    pub hi: u16,
}

impl PortRange {
    pub const fn new(lo: u16, hi: u16) -> Self {
        Self { lo, hi }
    }

    /// How many ports the range holds.
    #[expect(
        clippy::len_without_is_empty,
        reason = "a range holds at least one port: lo <= hi"
    )]
    pub fn len(&self) -> u32 {
        u32::from(self.hi) - u32::from(self.lo) + 1
    }

    /// The ports both ranges hold, if any.
    pub fn intersection(&self, other: &Self) -> Option<Self> {
        let lo = self.lo.max(other.lo);
        let hi = self.hi.min(other.hi);
        (lo <= hi).then_some(Self { lo, hi })
    }

    /// Parses "lo-hi" or a single port, each port within 1..=65535.
    pub fn parse(text: &str) -> Result<Self, String> {
        let port = |part: &str| -> Result<u16, String> {
            let part = part.trim();
            let value: u64 = part
                .parse()
                .map_err(|_| format!("`{part}` is not a port number"))?;
            match u16::try_from(value) {
                Ok(port) if port >= 1 => Ok(port),
                _ => Err(format!("port {value} is outside 1-65535")),
            }
        };
        let (lo, hi) = match text.split_once('-') {
            Some((lo, hi)) => (port(lo)?, port(hi)?),
            None => {
                let only = port(text)?;
                (only, only)
            }
        };
        if lo > hi {
            return Err(format!(
                "range {lo}-{hi} is inverted (first port above last)"
            ));
        }
        Ok(Self { lo, hi })
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.lo == self.hi {
            write!(f, "{}", self.lo)
        } else {
            write!(f, "{}-{}", self.lo, self.hi)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ranges_and_single_ports() {
        assert_eq!(
            PortRange::parse("40000-40999"),
            Ok(PortRange::new(40000, 40999))
        );
        assert_eq!(PortRange::parse(" 8080 "), Ok(PortRange::new(8080, 8080)));
        assert_eq!(PortRange::parse("1-65535").map(|r| r.len()), Ok(65535));
    }

    #[test]
    fn refuses_bad_ranges_with_the_reason() {
        assert_eq!(
            PortRange::parse("0-10"),
            Err("port 0 is outside 1-65535".into())
        );
        assert_eq!(
            PortRange::parse("65536"),
            Err("port 65536 is outside 1-65535".into())
        );
        assert_eq!(
            PortRange::parse("500-400"),
            Err("range 500-400 is inverted (first port above last)".into())
        );
        assert_eq!(PortRange::parse("-"), Err("`` is not a port number".into()));
        assert_eq!(
            PortRange::parse("http"),
            Err("`http` is not a port number".into())
        );
    }

    #[test]
    fn intersects() {
        let a = PortRange::new(100, 200);
        assert_eq!(
            a.intersection(&PortRange::new(150, 300)),
            Some(PortRange::new(150, 200))
        );
        assert_eq!(a.intersection(&PortRange::new(201, 300)), None);
    }
}
