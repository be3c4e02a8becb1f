//! The WebSocket and event-stream origin check: a page on another site must not be able
//! to use a visitor's browser to open the gateway's socket.

/// Whether a browser page from `origin` may connect. No `Origin` header (a script, a
/// dashboard server) is allowed; a page from the same host and port as the request's
/// `Host` is allowed; any other origin only when listed.
pub fn allowed(origin: Option<&str>, host: Option<&str>, allow_list: &[String]) -> bool {
    let Some(origin) = origin else {
        return true;
    };
    if allow_list
        .iter()
        .any(|allowed| allowed == "*" || allowed.eq_ignore_ascii_case(origin))
    {
        return true;
    }
    let origin_host = origin
        .split_once("://")
        .map(|(_, rest)| rest)
        .unwrap_or(origin)
        .trim_end_matches('/');
    host.is_some_and(|host| origin_host.eq_ignore_ascii_case(host))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_host_or_listed_or_none() {
        let none: Vec<String> = Vec::new();
        assert!(allowed(None, Some("pi.local:8000"), &none));
        assert!(allowed(
            Some("http://pi.local:8000"),
            Some("pi.local:8000"),
            &none
        ));
        assert!(allowed(
            Some("http://PI.local:8000"),
            Some("pi.local:8000"),
            &none
        ));
        assert!(!allowed(
            Some("http://evil.example"),
            Some("pi.local:8000"),
            &none
        ));
        assert!(!allowed(
            Some("http://pi.local:9000"),
            Some("pi.local:8000"),
            &none
        ));
        assert!(!allowed(Some("null"), Some("pi.local:8000"), &none));
        let listed = vec!["https://dash.farm.example".to_owned()];
        assert!(allowed(
            Some("https://dash.farm.example"),
            Some("pi.local:8000"),
            &listed
        ));
        assert!(!allowed(Some("http://pi.local:8000"), None, &none));
    }
}
