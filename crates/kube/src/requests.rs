//! Counting the API requests a client makes, by verb (`list`, `watch`,
//! `get`, `create`, `update`, `patch`, `apply`, `delete`), as the API server's own
//! `apiserver_request_total` names them: the agent exports the counts as
//! `trellis_api_requests_total{verb}`, and `bench/k8s-converge` reads them
//! to show what a thousand nodes cost the API server.

use std::sync::Arc;

/// Called with the verb of every request the client sends.
#[derive(Clone)]
pub struct RequestHook(pub Arc<dyn Fn(&'static str) + Send + Sync>);

impl std::fmt::Debug for RequestHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RequestHook")
    }
}

/// The verb of a request: `GET` is `watch` with `watch=true`/`watch=1`,
/// `list` on a collection (`/api/v1/nodes`,
/// `/apis/G/V/namespaces/NS/things`), `get` on one object or its
/// subresource; a PATCH with `apply` (content type
/// `application/apply-patch+yaml`) is `apply`.
pub fn verb(method: &http::Method, path: &str, query: Option<&str>, apply: bool) -> &'static str {
    match *method {
        http::Method::GET => {
            let watch = query.is_some_and(|q| {
                q.split('&')
                    .any(|kv| kv == "watch=true" || kv == "watch=1" || kv == "watch")
            });
            if watch {
                return "watch";
            }
            let rest = path
                .strip_prefix("/api/v1/")
                .or_else(|| {
                    // /apis/GROUP/VERSION/...
                    let r = path.strip_prefix("/apis/")?;
                    let mut it = r.splitn(3, '/');
                    it.next()?;
                    it.next()?;
                    it.next()
                })
                .unwrap_or("");
            let segs: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
            // namespaces/NS/RESOURCE... is a namespaced path, except the
            // Namespace object itself (namespaces/NS)
            let segs = match segs.as_slice() {
                // the Namespace's own subresources
                ["namespaces", _, "status" | "finalize"] => return "get",
                ["namespaces", _, tail @ ..] if !tail.is_empty() => tail,
                s => s,
            };
            match segs.len() {
                0 => "get", // discovery, /version
                1 => "list",
                _ => "get",
            }
        }
        http::Method::POST => "create",
        http::Method::PUT => "update",
        // server-side apply is a PATCH the API server counts as APPLY
        http::Method::PATCH if apply => "apply",
        http::Method::PATCH => "patch",
        http::Method::DELETE => "delete",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Method;

    #[test]
    fn verbs_as_the_api_server_counts_them() {
        for (m, path, q, want) in [
            (
                Method::GET,
                "/api/v1/nodes",
                Some("watch=true&resourceVersion=5"),
                "watch",
            ),
            (Method::GET, "/api/v1/nodes", Some("limit=500"), "list"),
            (Method::GET, "/api/v1/nodes", None, "list"),
            (Method::GET, "/api/v1/nodes/n1", None, "get"),
            (
                Method::GET,
                "/api/v1/pods",
                Some("fieldSelector=spec.nodeName%3Dn1"),
                "list",
            ),
            (
                Method::GET,
                "/api/v1/namespaces/x/configmaps/trellis-config",
                None,
                "get",
            ),
            (Method::GET, "/api/v1/namespaces/x/configmaps", None, "list"),
            (Method::GET, "/api/v1/namespaces", None, "list"),
            (Method::GET, "/api/v1/namespaces/x", None, "get"),
            (Method::GET, "/api/v1/namespaces/x/status", None, "get"),
            (
                Method::GET,
                "/apis/trellis.dev/v1/bgppeers",
                Some("watch=1"),
                "watch",
            ),
            (Method::GET, "/apis/trellis.dev/v1/bgppeers", None, "list"),
            (
                Method::GET,
                "/apis/trellis.dev/v1/bgppeers/tor",
                None,
                "get",
            ),
            (Method::GET, "/version", None, "get"),
            (Method::PATCH, "/api/v1/nodes/n1/status", None, "patch"),
            (Method::POST, "/api/v1/nodes", None, "create"),
            (Method::DELETE, "/api/v1/nodes/n1", None, "delete"),
        ] {
            assert_eq!(verb(&m, path, q, false), want, "{m} {path}?{q:?}");
        }
        assert_eq!(
            verb(
                &Method::PATCH,
                "/apis/trellis.dev/v1/bgppeers/tor",
                None,
                true
            ),
            "apply"
        );
    }
}
