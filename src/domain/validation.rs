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

/// [`optional_text`]'s rule as the regular expression the API schema publishes: no control
/// characters (Unicode `Cc`) other than tab and line feed.
pub const OPTIONAL_TEXT_PATTERN: &str = r"^[^\u0000-\u0008\u000B-\u001F\u007F-\u009F]*$";

/// [`text`]'s rule as a regular expression: like [`OPTIONAL_TEXT_PATTERN`], with at least one
/// character that is not white space.
pub const TEXT_PATTERN: &str = r"^[^\u0000-\u0008\u000B-\u001F\u007F-\u009F]*[^\s\u0000-\u0008\u000B-\u001F\u007F-\u009F][^\u0000-\u0008\u000B-\u001F\u007F-\u009F]*$";

/// [`single_line`]'s rule as a regular expression: like [`TEXT_PATTERN`], with no tab or line
/// feed either (no control character at all).
pub const SINGLE_LINE_PATTERN: &str =
    r"^[^\u0000-\u001F\u007F-\u009F]*[^\s\u0000-\u001F\u007F-\u009F][^\u0000-\u001F\u007F-\u009F]*$";

/// Checks a required text field: at most `max` characters as sent, not blank, no control chars;
/// returned trimmed.
pub fn text(value: &str, max: usize) -> Result<String, String> {
    let text = optional_text(value, max)?;
    if text.is_empty() {
        return Err("must not be empty".into());
    }
    Ok(text)
}

/// Like [`text`], for a value that is one line (a name, an address line): tab and line feed are
/// refused too.
pub fn single_line(value: &str, max: usize) -> Result<String, String> {
    let text = text(value, max)?;
    if value.contains(['\n', '\t']) {
        return Err("must be a single line: no line breaks or tabs".into());
    }
    Ok(text)
}

/// Like [`text`] but allows an empty or blank string (returned trimmed).
///
/// The length is counted in characters (Unicode scalar values, as JSON Schema's `maxLength`
/// counts them) on the value as sent, so the published limit is exactly the enforced one.
pub fn optional_text(value: &str, max: usize) -> Result<String, String> {
    if value.chars().count() > max {
        return Err(format!("must be at most {max} characters"));
    }
    if value.chars().any(|c| c.is_control() && c != '\n' && c != '\t') {
        return Err("must not contain control characters".into());
    }
    Ok(value.trim().to_string())
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
        assert!(text("a\r", 10).is_err());
        assert!(single_line("line\nbreak", 20).is_err() && single_line("a\tb", 20).is_err());
        assert_eq!(single_line(" one line ", 20), Ok("one line".to_string()));
    }

    #[test]
    fn length_is_counted_as_sent() {
        assert_eq!(text(" ab ", 4), Ok("ab".to_string()));
        assert!(text(" ab  ", 4).is_err());
        assert_eq!(optional_text("éé", 2), Ok("éé".to_string()));
    }
}
