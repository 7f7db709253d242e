//! Write consistency levels and read preferences (DESIGN.md section 3), with the spellings
//! the seeds use accepted as aliases.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// When a write is acknowledged.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Consistency {
    /// The leader has appended the write to its own log.
    Eventual,
    /// `n` copies, the leader's included, hold the write durably.
    AtLeast(u8),
    /// Committed by a majority and applied on the leader.
    Quorum,
    /// Committed and durably held by every voting replica.
    All,
}

impl Consistency {
    pub const ALLOWED: &'static str = "eventual, at_least:N, quorum, all";
}

impl fmt::Display for Consistency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Consistency::Eventual => f.write_str("eventual"),
            Consistency::AtLeast(n) => write!(f, "at_least:{n}"),
            Consistency::Quorum => f.write_str("quorum"),
            Consistency::All => f.write_str("all"),
        }
    }
}

impl FromStr for Consistency {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let lower = s.trim().to_ascii_lowercase();
        let level = match lower.as_str() {
            "eventual" | "async" => Consistency::Eventual,
            "quorum" => Consistency::Quorum,
            "all" | "strong" | "sync" => Consistency::All,
            other => {
                // at_least:N, at_least(N), atleast:N
                let rest = other
                    .strip_prefix("at_least")
                    .or_else(|| other.strip_prefix("atleast"))
                    .ok_or_else(|| bad_level(s))?;
                let n = rest
                    .trim_start_matches([':', '(', '='])
                    .trim_end_matches(')')
                    .parse::<u8>()
                    .map_err(|_| bad_level(s))?;
                if n == 0 {
                    return Err(format!("at_least needs N >= 1 (got {s:?})"));
                }
                Consistency::AtLeast(n)
            }
        };
        Ok(level)
    }
}

fn bad_level(s: &str) -> String {
    format!(
        "unknown consistency level {s:?}; allowed: {}",
        Consistency::ALLOWED
    )
}

/// Which replica serves a read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum ReadPreference {
    Primary,
    Secondary,
    Nearest,
    Any,
}

impl ReadPreference {
    pub const ALLOWED: &'static str = "primary, secondary, nearest, any";
}

impl fmt::Display for ReadPreference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ReadPreference::Primary => "primary",
            ReadPreference::Secondary => "secondary",
            ReadPreference::Nearest => "nearest",
            ReadPreference::Any => "any",
        })
    }
}

impl FromStr for ReadPreference {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "primary" => Ok(ReadPreference::Primary),
            "secondary" => Ok(ReadPreference::Secondary),
            "nearest" => Ok(ReadPreference::Nearest),
            "any" => Ok(ReadPreference::Any),
            _ => Err(format!(
                "unknown read preference {s:?}; allowed: {}",
                ReadPreference::ALLOWED
            )),
        }
    }
}

macro_rules! string_serde {
    ($t:ty) => {
        impl TryFrom<String> for $t {
            type Error = String;
            fn try_from(s: String) -> Result<Self, String> {
                s.parse()
            }
        }
        impl From<$t> for String {
            fn from(v: $t) -> String {
                v.to_string()
            }
        }
    };
}
string_serde!(Consistency);
string_serde!(ReadPreference);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_parse_with_seed_aliases() {
        assert_eq!("async".parse(), Ok(Consistency::Eventual));
        assert_eq!("STRONG".parse(), Ok(Consistency::All));
        assert_eq!("at_least:2".parse(), Ok(Consistency::AtLeast(2)));
        assert_eq!("at_least(3)".parse(), Ok(Consistency::AtLeast(3)));
        assert!("at_least:0".parse::<Consistency>().is_err());
        let err = "fast".parse::<Consistency>().unwrap_err();
        assert!(err.contains("allowed: eventual"), "{err}");
        assert_eq!(Consistency::AtLeast(2).to_string(), "at_least:2");
    }

    #[test]
    fn read_preferences_parse() {
        assert_eq!("Nearest".parse(), Ok(ReadPreference::Nearest));
        assert!("closest".parse::<ReadPreference>().is_err());
    }
}
