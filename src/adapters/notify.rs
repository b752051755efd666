//! Notifiers: how the shop tells a customer something. The default writes one `.eml` file per
//! message into the data directory; SMTP comes next. The message id is derived from the order
//! and the kind, so a re-send after a crash (I8 allows at most one) is recognisably the same
//! message, and the file notifier simply overwrites it.

pub mod smtp;

use std::path::PathBuf;

use async_trait::async_trait;

/// One message to a customer.
#[derive(Clone, Debug)]
pub struct Message {
    pub to: String,
    pub subject: String,
    pub body: String,
    /// Stable per order and kind, e.g. `<receipt.0190….@orderflow>`.
    pub message_id: String,
    pub correlation_id: Option<String>,
}

#[derive(Debug, thiserror::Error)]
#[error("could not send the message: {0}")]
pub struct NotifyError(pub String);

#[async_trait]
pub trait Notifier: Send + Sync {
    async fn send(&self, message: &Message) -> Result<(), NotifyError>;
}

/// Writes RFC 5322 messages as files: `<dir>/<message-id>.eml`.
pub struct FileNotifier {
    dir: PathBuf,
    from: String,
}

impl FileNotifier {
    pub fn new(dir: PathBuf, from: String) -> Self {
        Self { dir, from }
    }
}

/// Renders the message with headers.
pub fn render(message: &Message, from: &str) -> String {
    let mut text = format!(
        "From: {from}\r\nTo: {}\r\nSubject: {}\r\nMessage-ID: {}\r\nDate: {}\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n",
        message.to,
        message.subject,
        message.message_id,
        chrono::Utc::now().to_rfc2822(),
    );
    if let Some(correlation) = &message.correlation_id {
        text.push_str(&format!("X-Correlation-Id: {correlation}\r\n"));
    }
    text.push_str("\r\n");
    text.push_str(&message.body.replace('\n', "\r\n"));
    text
}

#[async_trait]
impl Notifier for FileNotifier {
    async fn send(&self, message: &Message) -> Result<(), NotifyError> {
        // `<receipt.0190…@orderflow>` → `receipt.0190….eml`
        let local = message
            .message_id
            .trim_matches(['<', '>'])
            .split('@')
            .next()
            .unwrap_or_default();
        let name: String = local
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
            .collect();
        let path = self.dir.join(format!("{name}.eml"));
        let temp = self.dir.join(format!(".{name}.eml.tmp"));
        let text = render(message, &self.from);
        let io = |e: std::io::Error| NotifyError(format!("{}: {e}", path.display()));
        tokio::fs::create_dir_all(&self.dir).await.map_err(io)?;
        tokio::fs::write(&temp, text).await.map_err(io)?;
        tokio::fs::rename(&temp, &path).await.map_err(io)?;
        Ok(())
    }
}
