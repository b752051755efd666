//! Field-level validation errors: every bad field is reported at once, each named by a JSON
//! pointer (`/items/2/quantity`), so a client can fix a request in one round trip.

use serde::Serialize;

/// One invalid field and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FieldError {
    /// JSON pointer to the field, e.g. `/items/0/quantity`.
    pub field: String,
    pub message: String,
}

/// A collection of field errors, built up while validating a whole request.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FieldErrors(Vec<FieldError>);

impl FieldErrors {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn single(field: impl Into<String>, message: impl Into<String>) -> Self {
        let mut errors = Self::new();
        errors.add(field, message);
        errors
    }

    pub fn add(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError {
            field: field.into(),
            message: message.into(),
        });
    }

    /// Runs a parser and records its error under `field`, returning the value when it parsed.
    pub fn check<T>(&mut self, field: &str, result: Result<T, String>) -> Option<T> {
        match result {
            Ok(value) => Some(value),
            Err(message) => {
                self.add(field, message);
                None
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn into_vec(self) -> Vec<FieldError> {
        self.0
    }

    pub fn as_slice(&self) -> &[FieldError] {
        &self.0
    }

    /// `Ok(value)` when no error was recorded, else all the errors.
    pub fn finish<T>(self, value: impl FnOnce() -> T) -> Result<T, FieldErrors> {
        if self.is_empty() { Ok(value()) } else { Err(self) }
    }
}

/// Checks a required text field: trimmed, non-empty, at most `max` characters, no control chars.
pub fn text(value: &str, max: usize) -> Result<String, String> {
    let trimmed = value.trim();
    if trimmed.is_empty() {
        return Err("must not be empty".into());
    }
    optional_text(trimmed, max)
}

/// Like [`text`] but allows an empty string (returned as-is after trimming).
pub fn optional_text(value: &str, max: usize) -> Result<String, String> {
    let trimmed = value.trim();
    if trimmed.chars().count() > max {
        return Err(format!("must be at most {max} characters"));
    }
    if trimmed.chars().any(|c| c.is_control() && c != '\n' && c != '\t') {
        return Err("must not contain control characters".into());
    }
    Ok(trimmed.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collects_every_error() {
        let mut errors = FieldErrors::new();
        assert_eq!(errors.check("/name", text("  ", 10)), None);
        assert_eq!(errors.check("/sku", text("abcdefghijk", 10)), None);
        assert_eq!(errors.check("/ok", text(" fine ", 10)), Some("fine".to_string()));
        let fields: Vec<_> = errors.into_vec().into_iter().map(|e| e.field).collect();
        assert_eq!(fields, ["/name", "/sku"]);
    }

    #[test]
    fn rejects_control_characters() {
        assert!(text("a\u{0}b", 10).is_err());
        assert!(optional_text("line\nbreak", 20).is_ok());
    }
}
