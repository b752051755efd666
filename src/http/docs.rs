//! `/docs`: the OpenAPI document rendered as one self-contained HTML page, on the server, with
//! inline CSS and no scripts or external assets, so it works offline and under a strict
//! Content-Security-Policy. Operations are grouped by tag, each with its method, path,
//! description, security, parameters (with their limits), request body and responses; the
//! component schemas follow.

use std::fmt::Write;

use serde_json::Value;

const METHODS: [&str; 8] = ["get", "put", "post", "delete", "options", "head", "patch", "trace"];
const CORRELATION_HEADER: &str = "X-Correlation-Id";

const STYLE: &str = "
body{font:15px/1.5 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1d2330;background:#fafbfc}
main{max-width:1100px;margin:0 auto;padding:1.5rem 2rem 4rem}
h1{margin:.2rem 0}h2{margin-top:2.5rem;border-bottom:2px solid #dde3ea;padding-bottom:.3rem}
h3{margin:0;font-size:1.05rem}h4{margin:1rem 0 .3rem;font-size:.95rem;color:#445}
code{font:13px/1.4 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;background:#eef1f5;padding:0 .25rem;border-radius:3px}
nav ul{columns:2;padding-left:1.2rem}nav li{break-inside:avoid}
.op{background:#fff;border:1px solid #dde3ea;border-radius:6px;padding:1rem 1.2rem;margin:1rem 0}
.sig{display:flex;gap:.6rem;align-items:baseline;flex-wrap:wrap}
.m{font:700 12px ui-monospace,monospace;text-transform:uppercase;padding:.15rem .45rem;border-radius:3px;color:#fff}
.get{background:#2f7d32}.post{background:#1f5fa8}.patch{background:#8a5a00}.put{background:#6a3fa0}.delete{background:#b3261e}
.path{font:600 15px ui-monospace,monospace}.summary{color:#445}
.sec{font-size:.85rem;color:#5a6270}.lock{color:#8a5a00;font-weight:600}
table{border-collapse:collapse;width:100%;margin:.3rem 0;font-size:.9rem}
th,td{border:1px solid #e3e8ee;padding:.3rem .5rem;text-align:left;vertical-align:top}
th{background:#f3f5f8;font-weight:600}
.st{font:700 13px ui-monospace,monospace}.s2{color:#2f7d32}.s3{color:#1f5fa8}.s4{color:#b3261e}.s5{color:#8a1c1c}
.lim{color:#5a3d00;font-size:.85rem}.req{color:#b3261e;font-size:.8rem;font-weight:600}
.schema{background:#fff;border:1px solid #dde3ea;border-radius:6px;padding:.6rem 1rem;margin:.8rem 0}
";

/// The whole page for an OpenAPI document (as JSON).
pub fn render(doc: &Value) -> String {
    let mut out = String::with_capacity(64 * 1024);
    let title = text(&doc["info"]["title"]);
    let version = text(&doc["info"]["version"]);
    let _ = write!(
        out,
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{t} API reference</title><style>{STYLE}</style></head><body><main>\
         <h1>{t} API reference</h1><p class=\"sec\">Version {v} · OpenAPI {o} · \
         machine-readable: <a href=\"/openapi.json\">/openapi.json</a> · every response carries \
         <code>{CORRELATION_HEADER}</code></p>{d}",
        t = escape(&title),
        v = escape(&version),
        o = escape(&text(&doc["openapi"])),
        d = markdown(&text(&doc["info"]["description"])),
    );

    let operations = operations(doc);
    let tags = tags(doc, &operations);
    out.push_str("<nav><h2>Operations</h2><ul>");
    for (tag, _) in &tags {
        for op in operations.iter().filter(|op| &op.tag == tag) {
            let _ = write!(
                out,
                "<li><a href=\"#{id}\"><span class=\"m {m}\">{m}</span> <code>{p}</code></a> {s}</li>",
                id = op.anchor(),
                m = op.method,
                p = escape(&op.path),
                s = escape(&text(&op.operation["summary"])),
            );
        }
    }
    out.push_str("</ul></nav>");

    for (tag, description) in &tags {
        let _ = write!(
            out,
            "<section><h2 id=\"tag-{t}\">{t}</h2>{d}",
            t = escape(tag),
            d = markdown(description)
        );
        for op in operations.iter().filter(|op| &op.tag == tag) {
            render_operation(&mut out, doc, op);
        }
        out.push_str("</section>");
    }

    out.push_str("<section><h2 id=\"schemas\">Schemas</h2>");
    if let Some(schemas) = doc["components"]["schemas"].as_object() {
        for (name, schema) in schemas {
            let _ = write!(
                out,
                "<div class=\"schema\" id=\"schema-{n}\"><h3>{n}</h3>{d}{b}</div>",
                n = escape(name),
                d = markdown(&text(&schema["description"])),
                b = schema_block(schema),
            );
        }
    }
    out.push_str("</section></main></body></html>");
    out
}

struct Operation<'a> {
    method: &'static str,
    path: String,
    tag: String,
    operation: &'a Value,
}

impl Operation<'_> {
    fn anchor(&self) -> String {
        let slug: String = self
            .path
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        format!("op-{}{}", self.method, slug)
    }
}

fn operations(doc: &Value) -> Vec<Operation<'_>> {
    let mut ops = Vec::new();
    for (path, item) in doc["paths"].as_object().into_iter().flatten() {
        for method in METHODS {
            if let Some(operation) = item.get(method) {
                let tag = operation["tags"][0].as_str().unwrap_or("other").to_string();
                ops.push(Operation {
                    method,
                    path: path.clone(),
                    tag,
                    operation,
                });
            }
        }
    }
    ops
}

/// Tags in the document's order, then any an operation uses that the document does not list.
fn tags(doc: &Value, operations: &[Operation]) -> Vec<(String, String)> {
    let mut tags: Vec<(String, String)> = doc["tags"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|t| (text(&t["name"]), text(&t["description"])))
        .filter(|(name, _)| operations.iter().any(|op| &op.tag == name))
        .collect();
    for op in operations {
        if !tags.iter().any(|(name, _)| name == &op.tag) {
            tags.push((op.tag.clone(), String::new()));
        }
    }
    tags
}

fn render_operation(out: &mut String, doc: &Value, op: &Operation) {
    let operation = op.operation;
    let _ = write!(
        out,
        "<article class=\"op\" id=\"{id}\"><div class=\"sig\"><span class=\"m {m}\">{m}</span>\
         <span class=\"path\">{p}</span><span class=\"summary\">{s}</span></div>",
        id = op.anchor(),
        m = op.method,
        p = escape(&op.path),
        s = escape(&text(&operation["summary"])),
    );
    let secured = operation["security"]
        .as_array()
        .is_some_and(|s| s.iter().any(|req| req.as_object().is_some_and(|r| !r.is_empty())));
    out.push_str(if secured {
        "<p class=\"sec\"><span class=\"lock\">Requires a bearer token</span> (<code>Authorization: Bearer &lt;JWT&gt;</code>)</p>"
    } else {
        "<p class=\"sec\">Public: no token needed</p>"
    });
    out.push_str(&markdown(&text(&operation["description"])));

    if let Some(params) = operation["parameters"].as_array().filter(|p| !p.is_empty()) {
        out.push_str(
            "<h4>Parameters</h4><table><tr><th>name</th><th>in</th><th>schema and limits</th><th>description</th></tr>",
        );
        for param in params {
            let _ = write!(
                out,
                "<tr><td><code>{n}</code>{r}</td><td>{i}</td><td>{s}</td><td>{d}</td></tr>",
                n = escape(&text(&param["name"])),
                r = if param["required"] == Value::Bool(true) {
                    " <span class=\"req\">required</span>"
                } else {
                    ""
                },
                i = escape(&text(&param["in"])),
                s = schema_inline(&param["schema"]),
                d = markdown(&text(&param["description"])),
            );
        }
        out.push_str("</table>");
    }

    if let Some(body) = operation.get("requestBody") {
        out.push_str("<h4>Request body</h4>");
        if body["required"] == Value::Bool(true) {
            out.push_str("<p class=\"sec\"><span class=\"req\">required</span></p>");
        }
        out.push_str(&markdown(&text(&body["description"])));
        for (media, content) in body["content"].as_object().into_iter().flatten() {
            let _ = write!(
                out,
                "<p><code>{}</code> {}</p>",
                escape(media),
                schema_inline(&content["schema"])
            );
            if let Some(schema) = resolve(doc, &content["schema"]) {
                out.push_str(&schema_block(schema));
            }
        }
    }

    out.push_str("<h4>Responses</h4><table><tr><th>status</th><th>description</th><th>body</th><th>headers</th></tr>");
    for (status, response) in operation["responses"].as_object().into_iter().flatten() {
        let response = resolve(doc, response).unwrap_or(response);
        let bodies: Vec<String> = response["content"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(media, content)| format!("<code>{}</code> {}", escape(media), schema_inline(&content["schema"])))
            .collect();
        let headers: Vec<String> = response["headers"]
            .as_object()
            .into_iter()
            .flatten()
            // Every response carries it; the page says so once at the top.
            .filter(|(name, _)| name.as_str() != CORRELATION_HEADER)
            .map(|(name, header)| {
                format!(
                    "<code>{}</code>{}",
                    escape(name),
                    Some(text(&header["description"]))
                        .filter(|d| !d.is_empty())
                        .map(|d| format!(": {}", inline_markdown(&d)))
                        .unwrap_or_default()
                )
            })
            .collect();
        let _ = write!(
            out,
            "<tr><td class=\"st s{c}\">{s}</td><td>{d}</td><td>{b}</td><td>{h}</td></tr>",
            c = status.chars().next().unwrap_or('0'),
            s = escape(status),
            d = markdown(&text(&response["description"])),
            b = bodies.join("<br>"),
            h = headers.join("<br>"),
        );
    }
    out.push_str("</table></article>");
}

/// Follows a local `$ref` to the component it names.
fn resolve<'a>(doc: &'a Value, value: &'a Value) -> Option<&'a Value> {
    let reference = value.get("$ref")?.as_str()?;
    let pointer = reference.strip_prefix('#')?;
    doc.pointer(pointer)
}

/// A one-line summary of a schema: its type (linked when it is a component) and limits.
fn schema_inline(schema: &Value) -> String {
    if let Some(reference) = schema.get("$ref").and_then(Value::as_str) {
        let name = reference.rsplit('/').next().unwrap_or(reference);
        let link = if reference.starts_with("#/components/schemas/") {
            format!("<a href=\"#schema-{n}\">{n}</a>", n = escape(name))
        } else {
            escape(name)
        };
        return link;
    }
    for combinator in ["oneOf", "anyOf", "allOf"] {
        if let Some(options) = schema.get(combinator).and_then(Value::as_array) {
            let joiner = if combinator == "allOf" { " and " } else { " or " };
            let parts: Vec<String> = options.iter().map(schema_inline).collect();
            return parts.join(joiner);
        }
    }
    let mut parts = Vec::new();
    let kind = match &schema["type"] {
        Value::String(kind) => kind.clone(),
        Value::Array(kinds) => kinds.iter().map(text).collect::<Vec<_>>().join(" | "),
        _ => "any".to_string(),
    };
    if kind.starts_with("array") {
        parts.push(format!("array of {}", schema_inline(&schema["items"])));
    } else {
        parts.push(format!("<code>{}</code>", escape(&kind)));
    }
    if let Some(format) = schema["format"].as_str() {
        parts.push(format!("format <code>{}</code>", escape(format)));
    }
    parts.extend(limits(schema));
    parts.join(" · ")
}

/// The limits a schema declares, each as a short phrase.
fn limits(schema: &Value) -> Vec<String> {
    let mut limits = Vec::new();
    let range = |low: &str, high: &str, unit: &str| -> Option<String> {
        match (schema.get(low), schema.get(high)) {
            (Some(l), Some(h)) => Some(format!("{}–{}{unit}", number(l), number(h))),
            (Some(l), None) => Some(format!("≥ {}{unit}", number(l))),
            (None, Some(h)) => Some(format!("≤ {}{unit}", number(h))),
            (None, None) => None,
        }
    };
    limits.extend(range("minimum", "maximum", ""));
    limits.extend(range("minLength", "maxLength", " characters"));
    limits.extend(range("minItems", "maxItems", " items"));
    limits.extend(range("minProperties", "maxProperties", " members"));
    if let Some(step) = schema.get("multipleOf") {
        limits.push(format!("multiple of {}", number(step)));
    }
    if let Some(pattern) = schema["pattern"].as_str() {
        limits.push(format!("pattern <code>{}</code>", escape(pattern)));
    }
    if let Some(values) = schema["enum"].as_array() {
        let values: Vec<String> = values
            .iter()
            .map(|v| format!("<code>{}</code>", escape(&text(v))))
            .collect();
        limits.push(format!("one of {}", values.join(", ")));
    }
    if let Some(default) = schema.get("default") {
        limits.push(format!("default <code>{}</code>", escape(&text(default))))
    }
    limits
        .into_iter()
        .map(|limit| format!("<span class=\"lim\">{limit}</span>"))
        .collect()
}

/// A schema in full: its properties as a table (or its summary when it has none).
fn schema_block(schema: &Value) -> String {
    let Some(properties) = schema["properties"].as_object() else {
        return format!("<p>{}</p>", schema_inline(schema));
    };
    let required: Vec<&str> = schema["required"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    let mut out = String::new();
    let mut notes = limits(schema);
    if schema["additionalProperties"] == Value::Bool(false) {
        notes.push("<span class=\"lim\">no other members</span>".into());
    }
    if !notes.is_empty() {
        let _ = write!(out, "<p>object · {}</p>", notes.join(" · "));
    }
    out.push_str("<table><tr><th>member</th><th>schema and limits</th><th>description</th></tr>");
    for (name, property) in properties {
        let _ = write!(
            out,
            "<tr><td><code>{n}</code>{r}</td><td>{s}</td><td>{d}</td></tr>",
            n = escape(name),
            r = if required.contains(&name.as_str()) {
                " <span class=\"req\">required</span>"
            } else {
                ""
            },
            s = schema_inline(property),
            d = markdown(&text(&property["description"])),
        );
    }
    out.push_str("</table>");
    out
}

fn number(value: &Value) -> String {
    escape(&text(value))
}

/// A JSON value as plain text (strings without quotes).
fn text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            c => out.push(c),
        }
    }
    out
}

/// The little Markdown the descriptions use: paragraphs and `code`.
fn markdown(text: &str) -> String {
    text.split("\n\n")
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| format!("<p>{}</p>", inline_markdown(p)))
        .collect()
}

fn inline_markdown(text: &str) -> String {
    let mut out = String::new();
    for (index, piece) in text.split('`').enumerate() {
        if index % 2 == 1 {
            let _ = write!(out, "<code>{}</code>", escape(piece));
        } else {
            out.push_str(&escape(piece));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_and_renders_code() {
        assert_eq!(inline_markdown("a `<b>` & c"), "a <code>&lt;b&gt;</code> &amp; c");
        assert_eq!(markdown("one\n\ntwo"), "<p>one</p><p>two</p>");
    }

    #[test]
    fn limits_are_shown() {
        let schema = serde_json::json!({ "type": "integer", "minimum": 1, "maximum": 200, "default": 50 });
        let summary = schema_inline(&schema);
        assert!(summary.contains("1–200"), "{summary}");
        assert!(summary.contains("default <code>50</code>"), "{summary}");
    }
}
