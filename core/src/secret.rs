//! [`Secret`]: a join token or an API key. Its value is never printed, logged or written out:
//! `Debug` and `Display` show only whether it is set, and serialising it (a config echoed into
//! `events.jsonl`, an `Assign`, `/status`) writes an empty string. Code that needs the value
//! asks for it by name, [`Secret::expose`], where it is used.

use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// The value itself, for the one place that uses it (a proof, a header comparison).
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `None` when empty: "no key".
    pub fn non_empty(&self) -> Option<&Secret> {
        (!self.0.is_empty()).then_some(self)
    }

    /// Characters in the value (what an error about its strength may say of it).
    pub fn chars(&self) -> usize {
        self.0.chars().count()
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_empty() { "Secret(none)" } else { "Secret(<redacted>)" })
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_empty() { "(none)" } else { "<redacted>" })
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Secret {
        Secret(value)
    }
}

/// Serialises as an empty string, whatever the value: a secret never leaves the process
/// through a serialised config. (Reading one back therefore gives "not set", which is what
/// the receivers of a serialised config — workers, the event log — need.)
impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str("")
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Secret, D::Error> {
        String::deserialize(deserializer).map(Secret)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_never_shows_its_value() {
        let s = Secret::new("hunter2-hunter2-hunter2");
        assert_eq!(format!("{s} {s:?}"), "<redacted> Secret(<redacted>)");
        assert_eq!(serde_json::to_string(&s).unwrap(), "\"\"");
        assert_eq!(s.expose(), "hunter2-hunter2-hunter2");
        let back: Secret = serde_json::from_str("\"abc\"").unwrap();
        assert_eq!(back.expose(), "abc");
        assert_eq!(format!("{}", Secret::default()), "(none)");
    }
}
