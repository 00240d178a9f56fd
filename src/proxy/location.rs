//! The `Location` of a `redirect` route: a URL written with nginx's variables `$host` (the request's host,
//! lowercase, without its port) and `$request_uri` (the path and query as the client sent them), e.g.
//! `https://www.example.com$request_uri` to move a site, or `https://$host/new/` to move a section.

use std::fmt;

use http::HeaderValue;

/// A `Location` with its variables, parsed once from the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocationTemplate {
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Host,
    RequestUri,
}

/// Why a template was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    /// A `$` that does not begin `$host` or `$request_uri`.
    #[error("unknown variable at {0:?}: only $host and $request_uri are known")]
    UnknownVariable(String),
    /// The text cannot be a header value, whatever the variables become.
    #[error("not a valid Location: it must be printable ASCII without spaces")]
    Invalid,
    /// Empty.
    #[error("must not be empty")]
    Empty,
}

impl LocationTemplate {
    /// Parses `text`; a `$` must begin one of the two variables.
    pub fn parse(text: &str) -> Result<Self, TemplateError> {
        if text.is_empty() {
            return Err(TemplateError::Empty);
        }
        if !text.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(TemplateError::Invalid);
        }
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(at) = rest.find('$') {
            if at > 0 {
                parts.push(Part::Text(rest[..at].to_owned()));
            }
            let variable = &rest[at..];
            // The variable's name runs to the first byte that cannot be part of one (`$hostname` is not
            // `$host` followed by "name").
            let name_len = variable[1..].bytes().take_while(|b| b.is_ascii_alphanumeric() || *b == b'_').count();
            let (part, len) = match &variable[..1 + name_len] {
                "$request_uri" => (Part::RequestUri, 1 + name_len),
                "$host" => (Part::Host, 1 + name_len),
                _ => {
                    let shown: String = variable.chars().take(16).collect();
                    return Err(TemplateError::UnknownVariable(shown));
                }
            };
            parts.push(part);
            rest = &variable[len..];
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_owned()));
        }
        Ok(Self { parts })
    }

    /// The `Location` for a request to `host` (normalised) with `request_uri` (path and query). `None` when
    /// the result is not a valid header value (the request's own parts were, so this does not happen for
    /// requests hyper accepted).
    pub fn render(&self, host: &str, request_uri: &str) -> Option<HeaderValue> {
        let mut location = String::with_capacity(64 + request_uri.len());
        for part in &self.parts {
            match part {
                Part::Text(text) => location.push_str(text),
                Part::Host => location.push_str(host),
                Part::RequestUri => location.push_str(request_uri),
            }
        }
        HeaderValue::from_str(&location).ok()
    }
}

impl fmt::Display for LocationTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for part in &self.parts {
            match part {
                Part::Text(text) => f.write_str(text)?,
                Part::Host => f.write_str("$host")?,
                Part::RequestUri => f.write_str("$request_uri")?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variables_are_replaced_and_text_kept() {
        let render = |template: &str| {
            LocationTemplate::parse(template).unwrap().render("shop.example.com", "/cart?id=7").unwrap()
        };
        assert_eq!(render("https://www.example.com$request_uri"), "https://www.example.com/cart?id=7");
        assert_eq!(render("https://www.$host$request_uri"), "https://www.shop.example.com/cart?id=7");
        assert_eq!(render("https://$host/new/"), "https://shop.example.com/new/");
        assert_eq!(render("/moved"), "/moved");
        assert_eq!(render("$request_uri$request_uri"), "/cart?id=7/cart?id=7");
        // A value that makes no header value renders nothing (the route answers 400), never a broken header.
        let template = LocationTemplate::parse("https://$host$request_uri").unwrap();
        assert_eq!(template.render("bad\nhost", "/"), None);
        assert_eq!(template.render("host", "/\r\nSet-Cookie: x=1"), None);
        let template = "https://$host:8443$request_uri";
        assert_eq!(LocationTemplate::parse(template).unwrap().to_string(), template);
    }

    #[test]
    fn unknown_variables_and_invalid_text_are_refused() {
        assert_eq!(
            LocationTemplate::parse("https://example.com$uri"),
            Err(TemplateError::UnknownVariable("$uri".to_owned()))
        );
        assert!(matches!(LocationTemplate::parse("https://x$"), Err(TemplateError::UnknownVariable(_))));
        assert!(matches!(LocationTemplate::parse("https://$hostname/"), Err(TemplateError::UnknownVariable(_))));
        assert_eq!(LocationTemplate::parse("https://exa mple.com"), Err(TemplateError::Invalid));
        assert_eq!(LocationTemplate::parse("https://x\n"), Err(TemplateError::Invalid));
        assert_eq!(LocationTemplate::parse(""), Err(TemplateError::Empty));
    }
}
