//! An http(s) base URL for PostgREST, its admin server or a pass-through origin.

use std::fmt;

use http::uri::{Authority, Scheme, Uri};

/// The upstream PostgREST base: scheme, authority and an optional path prefix (no trailing slash).
#[derive(Clone, Debug)]
pub struct UpstreamUrl {
    pub scheme: Scheme,
    pub authority: Authority,
    pub path_prefix: String,
}

impl UpstreamUrl {
    pub fn parse(text: &str) -> Result<UpstreamUrl, String> {
        let uri: Uri = text.parse().map_err(|_| format!("expected an http or https URL, got {text:?}"))?;
        let scheme = match uri.scheme_str() {
            Some("http") => Scheme::HTTP,
            Some("https") => Scheme::HTTPS,
            _ => return Err(format!("expected an http or https URL, got {text:?}")),
        };
        let authority = uri.authority().cloned().ok_or_else(|| format!("expected a host in {text:?}"))?;
        if authority.as_str().contains('@') {
            return Err("credentials in the URL are not supported; send them as headers".to_string());
        }
        if uri.query().is_some() {
            return Err(format!("a base URL takes no query string: {text:?}"));
        }
        let path_prefix = uri.path().trim_end_matches('/').to_string();
        Ok(UpstreamUrl { scheme, authority, path_prefix })
    }
}

impl fmt::Display for UpstreamUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}{}", self.scheme, self.authority, self.path_prefix)
    }
}
