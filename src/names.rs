//! Server names: normalisation and wildcard coverage, shared by the custody checks, SNI selection and the
//! `Host`/`:authority` check so that all three agree on what a name means.
//!
//! A wildcard `*.example.com` covers exactly one leftmost label (`a.example.com`, not `example.com` nor
//! `a.b.example.com`), as in RFC 6125 section 6.4.3 and the custody format.

use std::borrow::Cow;

/// Lower-cases `name` and drops one trailing dot, the form every comparison here uses.
pub fn normalize(name: &str) -> String {
    let name = name.strip_suffix('.').unwrap_or(name);
    name.to_ascii_lowercase()
}

/// Whether `name` is a wildcard pattern (`*.` followed by at least one more label).
pub fn is_wildcard(name: &str) -> bool {
    name.strip_prefix("*.").is_some_and(|rest| !rest.is_empty())
}

/// The parent a wildcard would need to cover `name`: `a.example.com` -> `example.com`. `None` for a name with a
/// single label, or a wildcard.
pub fn wildcard_parent(name: &str) -> Option<&str> {
    if name.starts_with('*') {
        return None;
    }
    let (first, rest) = name.split_once('.')?;
    (!first.is_empty() && !rest.is_empty()).then_some(rest)
}

/// Whether `pattern` (a certificate's DNS name, possibly a wildcard) covers `name` (a host, or a wildcard
/// server name, which only an identical wildcard covers). Both must already be [`normalize`]d.
pub fn covers(pattern: &str, name: &str) -> bool {
    if pattern == name {
        return true;
    }
    match (pattern.strip_prefix("*."), wildcard_parent(name)) {
        (Some(suffix), Some(parent)) => !suffix.is_empty() && suffix == parent,
        _ => false,
    }
}

/// Whether any of `patterns` covers `name`. Both sides must already be [`normalize`]d.
pub fn any_covers<S: AsRef<str>>(patterns: &[S], name: &str) -> bool {
    patterns.iter().any(|p| covers(p.as_ref(), name))
}

/// Checks that `name` is a syntactically valid DNS name or wildcard pattern for a server name list:
/// letters, digits, hyphens and dots, labels of 1 to 63 characters, at most 253 characters, and a `*` only as
/// the whole leftmost label.
pub fn validate_server_name(name: &str) -> Result<(), &'static str> {
    let body = name.strip_prefix("*.").unwrap_or(name);
    if name.is_empty() || name.len() > 253 {
        return Err("a name must have 1 to 253 characters");
    }
    for label in body.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err("every label must have 1 to 63 characters");
        }
        if !label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
            return Err("a name may only hold letters, digits, '-', '.' and a leading '*.'");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err("a label may not begin or end with '-'");
        }
    }
    Ok(())
}

/// Extracts the host from a `Host` header or `:authority` value: strips a port and IPv6 brackets and
/// normalises (borrowing when the host is in normal form already, as it nearly always is: this runs for every
/// request). Returns `None` when the value is empty or malformed.
pub fn host_of_authority(authority: &str) -> Option<Cow<'_, str>> {
    // What nearly every request sends: a lowercase name or IPv4 address, already normal, with or without a
    // port. One pass over its bytes instead of the searches below (they were half of the routing cost of a
    // request).
    if let Some(host) = normal_host_of(authority.as_bytes()) {
        // The bytes up to `host` are ASCII, so the cut is at a character boundary.
        return Some(Cow::Borrowed(&authority[..host]));
    }
    let authority = authority.trim();
    if authority.is_empty() || authority.contains('@') {
        return None;
    }
    let host = if let Some(rest) = authority.strip_prefix('[') {
        let (inside, after) = rest.split_once(']')?;
        if !(after.is_empty() || after.strip_prefix(':').is_some_and(is_port)) {
            return None;
        }
        inside
    } else {
        match authority.rsplit_once(':') {
            // A colon left in the host is not a name (an IPv6 address must be bracketed).
            Some((host, port)) if is_port(port) && !host.contains(':') => host,
            Some(_) => return None,
            None => authority,
        }
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.is_empty() {
        return None;
    }
    Some(match host.bytes().any(|b| b.is_ascii_uppercase()) {
        true => Cow::Owned(host.to_ascii_lowercase()),
        false => Cow::Borrowed(host),
    })
}

/// The length of the host in `authority` when it is already normal (lowercase letters, digits, `-` and `.`, not
/// ending in `.`) and followed by nothing or by `:` and a port; `None` sends it the long way.
fn normal_host_of(authority: &[u8]) -> Option<usize> {
    let mut end = authority.len();
    for (i, &b) in authority.iter().enumerate() {
        if b == b':' {
            end = i;
            break;
        }
        if !(b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.') {
            return None;
        }
    }
    let port = &authority[end..];
    let port_ok = port.is_empty() || (port.len() <= 6 && port.len() > 1 && port[1..].iter().all(u8::is_ascii_digit));
    (end > 0 && authority[end - 1] != b'.' && port_ok).then_some(end)
}

fn is_port(s: &str) -> bool {
    !s.is_empty() && s.len() <= 5 && s.bytes().all(|b| b.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcard_covers_one_label() {
        assert!(covers("*.example.com", "a.example.com"));
        assert!(!covers("*.example.com", "example.com"));
        assert!(!covers("*.example.com", "a.b.example.com"));
        assert!(!covers("*.example.com", "aexample.com"));
        assert!(covers("*.example.com", "*.example.com"));
        assert!(!covers("*.example.com", "*.b.example.com"));
        assert!(!covers("a.example.com", "*.example.com"));
        assert!(covers("localhost", "localhost"));
        assert!(!covers("*.com", "com"));
    }

    #[test]
    fn normalize_lowercases_and_drops_the_root_dot() {
        assert_eq!(normalize("WWW.Example.COM."), "www.example.com");
    }

    #[test]
    fn host_of_authority_strips_ports_and_brackets() {
        assert_eq!(host_of_authority("Example.com:8443").as_deref(), Some("example.com"));
        assert_eq!(host_of_authority("example.com").as_deref(), Some("example.com"));
        assert_eq!(host_of_authority("[::1]:443").as_deref(), Some("::1"));
        assert_eq!(host_of_authority("[::1]").as_deref(), Some("::1"));
        assert_eq!(host_of_authority("user@example.com"), None);
        assert_eq!(host_of_authority("example.com:http"), None);
        assert_eq!(host_of_authority(""), None);
        assert_eq!(host_of_authority(":443"), None);
        assert_eq!(host_of_authority("a-1.example.com"), Some(Cow::Borrowed("a-1.example.com")));
        assert_eq!(host_of_authority("192.0.2.1"), Some(Cow::Borrowed("192.0.2.1")));
        assert_eq!(host_of_authority("example.com.").as_deref(), Some("example.com"));
        assert_eq!(host_of_authority(" example.com ").as_deref(), Some("example.com"));
        assert_eq!(host_of_authority("."), None);
        assert_eq!(host_of_authority("localhost:8443"), Some(Cow::Borrowed("localhost")));
        assert_eq!(host_of_authority("192.0.2.1:65535"), Some(Cow::Borrowed("192.0.2.1")));
        assert_eq!(host_of_authority("example.com.:443").as_deref(), Some("example.com"));
        assert_eq!(host_of_authority("example.com:"), None);
        assert_eq!(host_of_authority("example.com:123456"), None);
        assert_eq!(host_of_authority("example.com:44a"), None);
        assert_eq!(host_of_authority("example.com:443:443"), None);
        assert_eq!(host_of_authority("Example.com:443").as_deref(), Some("example.com"));
    }

    #[test]
    fn server_name_validation() {
        assert!(validate_server_name("www.example.com").is_ok());
        assert!(validate_server_name("*.example.com").is_ok());
        assert!(validate_server_name("localhost").is_ok());
        assert!(validate_server_name("a.*.example.com").is_err());
        assert!(validate_server_name("*").is_err());
        assert!(validate_server_name("-a.example.com").is_err());
        assert!(validate_server_name("a..b").is_err());
        assert!(validate_server_name("exa mple.com").is_err());
    }
}
