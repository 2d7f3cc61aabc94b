//! Untrusted text in logs: [`LogSafe`] escapes control characters and caps the length, so a
//! client-chosen topic, type or id can never forge a log line or flood the log.
//!
//! Use it for every untrusted string, always as a structured field (`org = %LogSafe(org)`),
//! never formatted into the message itself.

use std::fmt;

/// Longest untrusted text written to a log field, in characters.
pub const MAX_LOGGED_CHARS: usize = 80;

pub struct LogSafe<'a>(pub &'a str);

impl fmt::Display for LogSafe<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut chars = self.0.chars();
        for c in chars.by_ref().take(MAX_LOGGED_CHARS) {
            if c.is_control() {
                write!(f, "{}", c.escape_default())?;
            } else {
                write!(f, "{c}")?;
            }
        }
        if chars.next().is_some() {
            write!(f, "…(truncated)")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newlines_cannot_forge_a_line() {
        let text = LogSafe("org\n2026-01-01T00:00:00Z  INFO forged").to_string();
        assert!(!text.contains('\n'));
        assert!(text.starts_with("org\\n2026"));
    }

    #[test]
    fn long_text_is_capped() {
        let text = LogSafe(&"x".repeat(10_000)).to_string();
        assert!(text.len() < MAX_LOGGED_CHARS + 20);
        assert!(text.ends_with("…(truncated)"));
    }
}
