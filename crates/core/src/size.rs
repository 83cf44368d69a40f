//! Sizes (`512Mi`, `2Gi`, `10G`) and CPU amounts (`0.5`, `1.0`, `500m`) as written in the
//! configuration and the API, parsed into exact integers.

use std::fmt;

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

/// A size in bytes, written like Kubernetes quantities: `512Mi`, `2Gi`, `10G`, `100M`,
/// `1024k`, or a plain number of bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub const fn mib(n: u64) -> Self {
        ByteSize(n * 1024 * 1024)
    }
    pub const fn gib(n: u64) -> Self {
        ByteSize(n * 1024 * 1024 * 1024)
    }
    pub fn bytes(self) -> u64 {
        self.0
    }

    /// Parses a size; the error is the sentence shown to the user after the key path.
    pub fn parse(s: &str) -> Result<Self, String> {
        let err = || format!("{s:?} is not a size (examples: 512Mi, 2Gi)");
        let t = s.trim();
        let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        if num.is_empty() {
            return Err(err());
        }
        let mult: u64 = match unit.trim() {
            "" | "B" | "b" => 1,
            "k" | "K" | "kB" | "KB" => 1000,
            "Ki" | "KiB" => 1 << 10,
            "M" | "MB" => 1000 * 1000,
            "Mi" | "MiB" => 1 << 20,
            "G" | "GB" => 1000 * 1000 * 1000,
            "Gi" | "GiB" => 1 << 30,
            "T" | "TB" => 1000 * 1000 * 1000 * 1000,
            "Ti" | "TiB" => 1 << 40,
            _ => return Err(err()),
        };
        let value: f64 = num.parse().map_err(|_| err())?;
        let bytes = value * mult as f64;
        if !bytes.is_finite() || bytes < 1.0 || bytes > u64::MAX as f64 {
            return Err(err());
        }
        Ok(ByteSize(bytes as u64))
    }
}

impl std::str::FromStr for ByteSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        ByteSize::parse(s)
    }
}

impl std::str::FromStr for Cpu {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Cpu::parse(s)
    }
}

impl fmt::Display for ByteSize {
    /// Shows the largest binary unit that divides the value exactly (`2Gi`, `512Mi`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(&str, u64); 4] = [("Ti", 1 << 40), ("Gi", 1 << 30), ("Mi", 1 << 20), ("Ki", 1 << 10)];
        for (name, m) in UNITS {
            if self.0 >= m && self.0.is_multiple_of(m) {
                return write!(f, "{}{name}", self.0 / m);
            }
        }
        write!(f, "{}", self.0)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a size such as 512Mi or 2Gi")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ByteSize, E> {
                ByteSize::parse(v).map_err(E::custom)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ByteSize, E> {
                if v == 0 {
                    return Err(E::custom("0 is not a size (examples: 512Mi, 2Gi)"));
                }
                Ok(ByteSize(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v)
                    .map_err(|_| E::custom(format!("{v} is not a size (examples: 512Mi, 2Gi)")))
                    .and_then(|v| self.visit_u64(v))
            }
        }
        d.deserialize_any(V)
    }
}

/// An amount of CPU in thousandths of a core: `1.0` or `"1"` is 1000, `"500m"` is 500.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cpu(pub u32);

impl Cpu {
    pub fn millis(self) -> u32 {
        self.0
    }
    /// Nano-CPUs as the engine expects them (`1.0` core = 1e9).
    pub fn nano_cpus(self) -> i64 {
        i64::from(self.0) * 1_000_000
    }

    pub fn parse(s: &str) -> Result<Self, String> {
        let err = || format!("{s:?} is not a CPU amount (examples: 0.5, 2, 500m)");
        let t = s.trim();
        let millis = if let Some(m) = t.strip_suffix('m') {
            m.parse::<u32>().map_err(|_| err())? as f64
        } else {
            t.parse::<f64>().map_err(|_| err())? * 1000.0
        };
        Self::from_millis_f64(millis).ok_or_else(err)
    }

    fn from_millis_f64(m: f64) -> Option<Self> {
        (m.is_finite() && (1.0..=1_000_000.0).contains(&m)).then(|| Cpu(m.round() as u32))
    }
}

impl fmt::Display for Cpu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_multiple_of(1000) {
            write!(f, "{}", self.0 / 1000)
        } else {
            write!(f, "{}", f64::from(self.0) / 1000.0)
        }
    }
}

impl Serialize for Cpu {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Cpu {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = Cpu;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a CPU amount such as 0.5 or 2")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Cpu, E> {
                Cpu::parse(v).map_err(E::custom)
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Cpu, E> {
                Cpu::from_millis_f64(v * 1000.0)
                    .ok_or_else(|| E::custom(format!("{v} is not a CPU amount (examples: 0.5, 2, 500m)")))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Cpu, E> {
                self.visit_f64(v as f64)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Cpu, E> {
                self.visit_f64(v as f64)
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_binary_and_decimal_units() {
        assert_eq!(ByteSize::parse("512Mi").unwrap(), ByteSize::mib(512));
        assert_eq!(ByteSize::parse("2Gi").unwrap(), ByteSize::gib(2));
        assert_eq!(ByteSize::parse("10G").unwrap().bytes(), 10_000_000_000);
        assert_eq!(ByteSize::parse("1.5Gi").unwrap().bytes(), 3 << 29);
        assert_eq!(ByteSize::parse("4096").unwrap().bytes(), 4096);
    }

    #[test]
    fn bad_sizes_are_rejected_with_examples() {
        for bad in ["2Qi", "", "Gi", "-1Gi", "0", "1.2.3M"] {
            let e = ByteSize::parse(bad).unwrap_err();
            assert!(e.contains("is not a size (examples: 512Mi, 2Gi)"), "{bad}: {e}");
        }
        assert_eq!(
            ByteSize::parse("2Qi").unwrap_err(),
            "\"2Qi\" is not a size (examples: 512Mi, 2Gi)"
        );
    }

    #[test]
    fn sizes_display_in_the_largest_exact_unit() {
        assert_eq!(ByteSize::gib(2).to_string(), "2Gi");
        assert_eq!(ByteSize::mib(1536).to_string(), "1536Mi");
        assert_eq!(ByteSize(1000).to_string(), "1000");
    }

    #[test]
    fn cpus_parse_fractions_and_millis() {
        assert_eq!(Cpu::parse("0.5").unwrap().millis(), 500);
        assert_eq!(Cpu::parse("500m").unwrap().millis(), 500);
        assert_eq!(Cpu::parse("2").unwrap().nano_cpus(), 2_000_000_000);
        assert!(Cpu::parse("zero").unwrap_err().contains("is not a CPU amount"));
        assert!(Cpu::parse("0").is_err());
    }
}
