//! The SMTP notifier: each [`Message`] is submitted to a mail server with `lettre`'s async tokio
//! transport (rustls with the webpki root certificates; no pooling, one connection per message).
//!
//! Every e-mail is `text/plain; charset=utf-8` with `From`, `To`, `Subject`, `Date`, the
//! message's stable `Message-ID` and, when the order has one, `X-Correlation-Id`. The saga calls
//! [`Notifier::send`] only after the store agreed to send that kind for that order, and records it
//! as sent afterwards, so at most one message per order and kind reaches the server — unless a
//! crash falls between the server's 250 and that record, in which case the re-send carries the
//! same `Message-ID`.
//!
//! Failures are all [`NotifyError`]s (the saga retries the job, then dead-letters it); the text
//! names the server, says whether the failure was transient (4xx reply, connection, timeout) or
//! permanent (5xx reply) and carries the SMTP reply code, e.g. `SMTP mail.example.com:587:
//! permanent error (550): 5.1.1 mailbox unavailable`.
//!
//! Credentials are refused over an unencrypted connection ([`SmtpTls::None`]) except to a
//! loopback host, so a password is never sent in the clear across a network.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use lettre::message::header::{ContentType, Header, HeaderName, HeaderValue};
use lettre::message::{Mailbox, MessageBuilder};
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Tokio1Executor};

use super::{Message, Notifier, NotifyError};

/// How the connection to the SMTP server is protected.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SmtpTls {
    /// Plain text (a local relay or a test server). Credentials only to a loopback host.
    None,
    /// Connect in plain text, then `STARTTLS`; refuses to continue if the server does not offer
    /// it. Usually port 587.
    #[default]
    StartTls,
    /// TLS from the first byte ("implicit TLS", SMTPS). Usually port 465.
    Tls,
}

impl SmtpTls {
    /// The usual port for this mode: 25, 587 or 465.
    pub fn default_port(self) -> u16 {
        match self {
            SmtpTls::None => 25,
            SmtpTls::StartTls => 587,
            SmtpTls::Tls => 465,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SmtpTls::None => "none",
            SmtpTls::StartTls => "starttls",
            SmtpTls::Tls => "tls",
        }
    }
}

impl fmt::Display for SmtpTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SmtpTls {
    type Err = SmtpConfigError;

    /// `none`, `starttls` or `tls` (case-insensitive).
    fn from_str(value: &str) -> Result<Self, Self::Err> {
        match value.trim().to_ascii_lowercase().as_str() {
            "none" | "plain" => Ok(SmtpTls::None),
            "starttls" => Ok(SmtpTls::StartTls),
            "tls" | "smtps" | "implicit" => Ok(SmtpTls::Tls),
            _ => Err(SmtpConfigError::TlsMode(value.to_string())),
        }
    }
}

/// The SMTP password. It never prints: `Debug` shows `SmtpPassword(***)` and there is no
/// `Display`; [`SmtpPassword::expose`] is the only way to read it.
#[derive(Clone)]
pub struct SmtpPassword(String);

impl SmtpPassword {
    pub fn new(password: impl Into<String>) -> Self {
        Self(password.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SmtpPassword {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SmtpPassword(***)")
    }
}

impl From<String> for SmtpPassword {
    fn from(password: String) -> Self {
        Self(password)
    }
}

/// Where and how to send e-mail. Start from [`SmtpSettings::new`] (STARTTLS on 587, no
/// credentials, 30 s timeout) and override fields; [`SmtpNotifier::new`] validates.
#[derive(Clone, Debug)]
pub struct SmtpSettings {
    /// Server host name (checked against its TLS certificate) or IP address.
    pub host: String,
    pub port: u16,
    pub tls: SmtpTls,
    /// Set both or neither of `username` and `password`.
    pub username: Option<String>,
    pub password: Option<SmtpPassword>,
    /// The `From` mailbox: `shop@example.com` or `Example Shop <shop@example.com>`.
    pub from: String,
    /// The whole delivery of one message: connecting, TLS, AUTH and the SMTP exchange. (lettre's
    /// async transport bounds only the TCP connect; a server that accepts and then stalls is cut
    /// off by this deadline, and the job is retried.)
    pub timeout: Duration,
}

/// Default for [`SmtpSettings::timeout`].
pub const DEFAULT_SMTP_TIMEOUT: Duration = Duration::from_secs(30);

impl SmtpSettings {
    /// STARTTLS on port 587, no credentials, a 30-second timeout.
    pub fn new(host: impl Into<String>, from: impl Into<String>) -> Self {
        Self {
            host: host.into(),
            port: SmtpTls::StartTls.default_port(),
            tls: SmtpTls::StartTls,
            username: None,
            password: None,
            from: from.into(),
            timeout: DEFAULT_SMTP_TIMEOUT,
        }
    }
}

/// Why SMTP settings were refused.
#[derive(Debug, thiserror::Error)]
pub enum SmtpConfigError {
    #[error("SMTP host is empty")]
    EmptyHost,
    #[error("SMTP port must be between 1 and 65535")]
    ZeroPort,
    #[error("SMTP timeout must be more than zero")]
    ZeroTimeout,
    #[error("SMTP TLS mode {0:?} is not one of none, starttls, tls")]
    TlsMode(String),
    #[error(
        "SMTP from-address {value:?} is not a valid mailbox ({reason}); expected e.g. \
         `shop@example.com` or `Example Shop <shop@example.com>`"
    )]
    From { value: String, reason: String },
    #[error("SMTP username and password must be set together")]
    PartialCredentials,
    #[error(
        "SMTP credentials would be sent unencrypted to {0}; use TLS mode starttls or tls \
         (plain text is allowed only to a loopback host)"
    )]
    CleartextCredentials(String),
    #[error("SMTP TLS set-up for {host}: {reason}")]
    Tls { host: String, reason: String },
}

/// Sends each message to an SMTP server.
pub struct SmtpNotifier {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
    /// `host:port`, for error messages.
    server: String,
    timeout: Duration,
}

impl fmt::Debug for SmtpNotifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SmtpNotifier")
            .field("server", &self.server)
            .field("from", &self.from.to_string())
            .finish_non_exhaustive()
    }
}

impl SmtpNotifier {
    /// Validates the settings and builds the transport. Does not connect: an unreachable server
    /// shows up as failing (and retried) send jobs, not as a start-up error.
    pub fn new(settings: SmtpSettings) -> Result<Self, SmtpConfigError> {
        let host = settings.host.trim().to_string();
        if host.is_empty() {
            return Err(SmtpConfigError::EmptyHost);
        }
        if settings.port == 0 {
            return Err(SmtpConfigError::ZeroPort);
        }
        if settings.timeout.is_zero() {
            return Err(SmtpConfigError::ZeroTimeout);
        }
        let from = settings
            .from
            .trim()
            .parse::<Mailbox>()
            .map_err(|e| SmtpConfigError::From {
                value: settings.from.clone(),
                reason: e.to_string(),
            })?;
        let credentials = match (settings.username, settings.password) {
            (None, None) => None,
            (Some(user), Some(password)) => Some(Credentials::new(user, password.expose().to_string())),
            _ => return Err(SmtpConfigError::PartialCredentials),
        };
        if credentials.is_some() && settings.tls == SmtpTls::None && !is_loopback(&host) {
            return Err(SmtpConfigError::CleartextCredentials(host));
        }
        let tls = match settings.tls {
            SmtpTls::None => Tls::None,
            mode => {
                let parameters = TlsParameters::new(host.clone()).map_err(|e| SmtpConfigError::Tls {
                    host: host.clone(),
                    reason: e.to_string(),
                })?;
                if mode == SmtpTls::StartTls {
                    Tls::Required(parameters)
                } else {
                    Tls::Wrapper(parameters)
                }
            }
        };
        let mut builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(host.clone())
            .port(settings.port)
            .tls(tls)
            .timeout(Some(settings.timeout));
        if let Some(credentials) = credentials {
            builder = builder.credentials(credentials);
        }
        let server = if host.contains(':') {
            format!("[{host}]:{}", settings.port)
        } else {
            format!("{host}:{}", settings.port)
        };
        Ok(Self {
            transport: builder.build(),
            from,
            server,
            timeout: settings.timeout,
        })
    }

    /// The e-mail as it goes on the wire.
    fn email(&self, message: &Message) -> Result<lettre::Message, NotifyError> {
        let to = message
            .to
            .trim()
            .parse::<Mailbox>()
            .map_err(|e| NotifyError(format!("SMTP {}: invalid recipient {:?}: {e}", self.server, message.to)))?;
        let mut builder: MessageBuilder = lettre::Message::builder()
            .from(self.from.clone())
            .to(to)
            .subject(message.subject.clone())
            .message_id(Some(message.message_id.clone()))
            .date_now()
            .header(ContentType::TEXT_PLAIN);
        if let Some(correlation) = &message.correlation_id {
            builder = builder.header(CorrelationIdHeader(correlation.clone()));
        }
        // CRLF line endings up front: lettre picks the transfer encoding before normalising them,
        // and a bare LF rules out 7-bit. So short-lined ASCII text goes out readable as it is;
        // long lines and non-ASCII text are quoted-printable or base64.
        let body = message.body.replace("\r\n", "\n").replace('\n', "\r\n");
        builder.body(body).map_err(|e| {
            NotifyError(format!(
                "SMTP {}: could not build message {}: {e}",
                self.server, message.message_id
            ))
        })
    }
}

#[async_trait]
impl Notifier for SmtpNotifier {
    async fn send(&self, message: &Message) -> Result<(), NotifyError> {
        let email = self.email(message)?;
        match tokio::time::timeout(self.timeout, self.transport.send(email)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(error)) => Err(NotifyError(describe(&self.server, &error))),
            Err(_) => Err(NotifyError(format!(
                "SMTP {}: timed out after {:?} without completing the delivery of {}",
                self.server, self.timeout, message.message_id
            ))),
        }
    }
}

/// The failure as one line naming the server, whether it is transient or permanent, and the
/// SMTP reply code when there was one:
///
/// - `SMTP host:587: permanent error (550): 5.1.1 mailbox unavailable`
/// - `SMTP host:587: transient error (451): 4.3.0 try again later`
/// - `SMTP host:587: transient, no SMTP reply: Connection error: Connection refused (os error 111)`
/// - `SMTP host:587: failed, no SMTP reply: internal client error: STARTTLS is not supported …`
fn describe(server: &str, error: &lettre::transport::smtp::Error) -> String {
    // lettre's Display says "permanent error (550): <reply text>" / "transient error (451): …",
    // or names the failure kind followed by its cause.
    let mut text = if error.status().is_some() {
        format!("SMTP {server}: {error}")
    } else if error.is_client() || error.is_response() {
        format!("SMTP {server}: failed, no SMTP reply: {error}")
    } else {
        // Connection, network, TLS handshake, timeout: worth retrying.
        format!("SMTP {server}: transient, no SMTP reply: {error}")
    };
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host
            .trim_matches(['[', ']'])
            .parse::<IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// `X-Correlation-Id`, so a message can be traced back to the request that placed the order.
#[derive(Clone, Debug)]
struct CorrelationIdHeader(String);

impl Header for CorrelationIdHeader {
    fn name() -> HeaderName {
        HeaderName::new_from_ascii_str("X-Correlation-Id")
    }

    fn parse(value: &str) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        Ok(Self(value.to_string()))
    }

    fn display(&self) -> HeaderValue {
        // Encoded (RFC 2047) and folded by lettre: a stray CR/LF cannot start a new header.
        HeaderValue::new(Self::name(), self.0.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> SmtpSettings {
        SmtpSettings::new("mail.example.com", "Shop <shop@example.com>")
    }

    #[test]
    fn defaults_are_starttls_on_587() {
        let s = settings();
        assert_eq!(
            (s.tls, s.port, s.timeout),
            (SmtpTls::StartTls, 587, DEFAULT_SMTP_TIMEOUT)
        );
        SmtpNotifier::new(s).expect("valid settings");
    }

    #[test]
    fn bad_from_address_is_refused_clearly() {
        let error = SmtpNotifier::new(SmtpSettings {
            from: "not an address".into(),
            ..settings()
        })
        .unwrap_err();
        assert!(matches!(error, SmtpConfigError::From { .. }), "{error}");
        assert!(error.to_string().contains("from-address \"not an address\""), "{error}");
    }

    #[test]
    fn credentials_in_pairs_and_never_in_clear_over_a_network() {
        let half = SmtpNotifier::new(SmtpSettings {
            username: Some("shop".into()),
            ..settings()
        });
        assert!(matches!(half, Err(SmtpConfigError::PartialCredentials)));
        let cleartext = SmtpSettings {
            tls: SmtpTls::None,
            port: 25,
            username: Some("shop".into()),
            password: Some(SmtpPassword::new("hunter2")),
            ..settings()
        };
        assert!(matches!(
            SmtpNotifier::new(cleartext.clone()),
            Err(SmtpConfigError::CleartextCredentials(_))
        ));
        for host in ["127.0.0.1", "localhost", "::1"] {
            SmtpNotifier::new(SmtpSettings {
                host: host.into(),
                ..cleartext.clone()
            })
            .expect("loopback may take plain-text credentials");
        }
    }

    #[test]
    fn password_never_prints() {
        let s = SmtpSettings {
            username: Some("shop".into()),
            password: Some(SmtpPassword::new("hunter2")),
            ..settings()
        };
        let shown = format!("{s:?}");
        assert!(
            !shown.contains("hunter2") && shown.contains("SmtpPassword(***)"),
            "{shown}"
        );
    }

    #[test]
    fn tls_modes_parse() {
        assert_eq!("STARTTLS".parse::<SmtpTls>().unwrap(), SmtpTls::StartTls);
        assert_eq!("tls".parse::<SmtpTls>().unwrap(), SmtpTls::Tls);
        assert_eq!("none".parse::<SmtpTls>().unwrap(), SmtpTls::None);
        assert!("ssl3".parse::<SmtpTls>().is_err());
        assert_eq!(SmtpTls::Tls.default_port(), 465);
    }

    #[test]
    fn email_carries_ids_and_plain_utf8_text() {
        let notifier = SmtpNotifier::new(settings()).unwrap();
        let email = notifier
            .email(&Message {
                to: "buyer@example.com".into(),
                subject: "Payment received for order 1".into(),
                body: "Hello Bea,\n\nthanks.\n".into(),
                message_id: "<receipt.1@orderflow>".into(),
                correlation_id: Some("corr-1".into()),
            })
            .unwrap();
        let text = String::from_utf8(email.formatted()).unwrap();
        for header in [
            "From: Shop <shop@example.com>\r\n",
            "To: buyer@example.com\r\n",
            "Subject: Payment received for order 1\r\n",
            "Message-ID: <receipt.1@orderflow>\r\n",
            "X-Correlation-Id: corr-1\r\n",
            "Content-Type: text/plain; charset=utf-8\r\n",
            "Content-Transfer-Encoding: 7bit\r\n",
        ] {
            assert!(text.contains(header), "{header:?} missing in:\n{text}");
        }
        assert!(text.ends_with("\r\n\r\nHello Bea,\r\n\r\nthanks.\r\n"), "{text}");
        let injected = notifier
            .email(&Message {
                to: "buyer@example.com".into(),
                subject: "s".into(),
                body: "b".into(),
                message_id: "<receipt.2@orderflow>".into(),
                correlation_id: Some("c\r\nBcc: evil@example.com".into()),
            })
            .unwrap();
        let text = String::from_utf8(injected.formatted()).unwrap();
        assert!(!text.contains("\r\nBcc:"), "header injection:\n{text}");
        assert!(
            notifier
                .email(&Message {
                    to: "nobody".into(),
                    subject: String::new(),
                    body: String::new(),
                    message_id: "<x@orderflow>".into(),
                    correlation_id: None,
                })
                .is_err()
        );
    }
}
