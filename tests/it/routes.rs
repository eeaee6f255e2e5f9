//! SPEC "Routes served to callers": routing, authentication, validation, normalization.
//! Every rejection is answered locally: the mock must see no request.

use hyper::Method;

use crate::support::*;

#[tokio::test]
async fn unknown_routes_and_methods_never_reach_upstream() {
    let gw = start().await;
    for path in [
        "/",
        "/v1/models",
        "/v1/fine_tuning/jobs",
        "/v1/fine_tuning/checkpoints/x/permissions/a/b",
        "/v1/fine_tuning/checkpoints/x/other",
        "/v1/fine_tuning/checkpoints/x/permissions/",
    ] {
        let r = gw.client.get(path, WRITER).await;
        assert_eq!(r.status, 404, "{path}");
        assert_eq!(r.error().0, "not_found");
    }
    for (method, path) in [
        (Method::PUT, list_path(CP)),
        (Method::PATCH, list_path(CP)),
        (Method::DELETE, list_path(CP)),
        (Method::GET, format!("{}/cp_abc", list_path(CP))),
        (Method::POST, format!("{}/cp_abc", list_path(CP))),
    ] {
        let r = gw
            .client
            .send(method.clone(), &path, Some(WRITER), &[], None)
            .await;
        assert_eq!(r.status, 405, "{method} {path}");
        assert_eq!(r.error().0, "method_not_allowed");
        assert!(r.headers.contains_key("allow"));
    }
    assert!(gw.mock.requests().is_empty(), "{:?}", gw.mock.requests());
}

#[tokio::test]
async fn missing_or_unknown_tokens_are_401_without_upstream() {
    let gw = start().await;
    let path = list_path(CP);
    for headers in [
        vec![],
        vec![("authorization", "Bearer not-a-client")],
        vec![("authorization", "Basic cmVhZGVyOng=")],
        vec![("authorization", "Bearer")],
        vec![("authorization", ADMIN_KEY)],
    ] {
        let r = gw
            .client
            .send(Method::GET, &path, None, &headers, None)
            .await;
        assert_eq!(r.status, 401, "{headers:?}");
        assert_eq!(r.error(), ("invalid_api_key".to_string(), None));
    }
    assert!(gw.mock.requests().is_empty());
}

/// Two `Authorization` fields are ambiguous whatever they hold (a proxy in front may have
/// checked the other one): 401, in either order, even when both name the same client.
#[tokio::test]
async fn two_authorization_headers_are_401_whatever_they_hold() {
    let gw = start().await;
    let path = list_path(CP);
    let (reader, bogus) = (
        format!("Bearer {READER}"),
        "Bearer not-a-client".to_string(),
    );
    for (first, second) in [(&reader, &bogus), (&bogus, &reader), (&reader, &reader)] {
        let headers = [
            ("authorization", first.as_str()),
            ("authorization", second.as_str()),
        ];
        let r = gw
            .client
            .send(Method::GET, &path, None, &headers, None)
            .await;
        assert_eq!(r.status, 401, "{first} then {second}");
        assert_eq!(r.error().0, "invalid_api_key");
        assert!(
            r.json()["error"]["message"]
                .as_str()
                .unwrap()
                .contains("more than one Authorization header"),
            "{:?}",
            r.json()
        );
    }
    assert!(gw.mock.requests().is_empty());
    assert_eq!(gw.client.get(&path, READER).await.status, 200);
}

#[tokio::test]
async fn ungranted_checkpoints_are_403_without_upstream() {
    let gw = start().await;
    assert_eq!(gw.client.get(&list_path(GLOBEX), READER).await.status, 403);
    assert_eq!(gw.client.get(&list_path(CP), NOBODY).await.status, 403);
    let r = gw.client.get(&list_path(GLOBEX), READER).await;
    assert_eq!(r.error().0, "permission_denied");
    assert!(gw.mock.requests().is_empty());
    // The writer is granted everything.
    assert_eq!(gw.client.get(&list_path(GLOBEX), WRITER).await.status, 200);
}

#[tokio::test]
async fn bad_input_is_400_naming_the_parameter_without_upstream() {
    let gw = start().await;
    let long = "a".repeat(257);
    let cases: Vec<(String, &str)> = vec![
        (format!("{}?limit=0", list_path(CP)), "limit"),
        (format!("{}?limit=101", list_path(CP)), "limit"),
        (format!("{}?limit=abc", list_path(CP)), "limit"),
        (format!("{}?order=sideways", list_path(CP)), "order"),
        (format!("{}?color=blue", list_path(CP)), "color"),
        (format!("{}?limit=5&limit=5", list_path(CP)), "limit"),
        (format!("{}?after=a&after=b", list_path(CP)), "after"),
        (format!("{}?project_id=", list_path(CP)), "project_id"),
        (format!("{}?after=%00", list_path(CP)), "after"),
        (list_path(".."), "checkpoint"),
        (list_path("ft%3Aa%2F..%2Fb"), "checkpoint"),
        (list_path("ft%3Aa%2Fb"), "checkpoint"),
        (list_path("ft%3Aa%00b"), "checkpoint"),
        (list_path("ft%3Aa%0Ab"), "checkpoint"),
        (list_path("ft%3Aa%20b"), "checkpoint"),
        (list_path("ft%3Aa%ZZ"), "checkpoint"),
        (list_path(&long), "checkpoint"),
    ];
    for (path, param) in &cases {
        // The writer is granted "*", so only validation can refuse these.
        let r = gw.client.get(path, WRITER).await;
        assert_eq!(r.status, 400, "{path}");
        assert_eq!(
            r.error(),
            ("invalid_parameter".to_string(), Some(param.to_string())),
            "{path}"
        );
    }
    let r = gw
        .client
        .delete(&format!("{}/cp%2F..", list_path(CP)), WRITER)
        .await;
    assert_eq!(r.error().1.as_deref(), Some("permission_id"));
    assert!(gw.mock.requests().is_empty(), "{:?}", gw.mock.requests());
}

#[tokio::test]
async fn check_order_is_route_then_token_then_input_then_grant() {
    let gw = start().await;
    // Unknown route beats a missing token.
    let r = gw
        .client
        .send(Method::GET, "/v1/models", None, &[], None)
        .await;
    assert_eq!(r.status, 404);
    // A missing token beats bad input: the unauthenticated learn nothing about validity.
    let r = gw
        .client
        .send(
            Method::GET,
            &format!("{}?limit=0", list_path(CP)),
            None,
            &[],
            None,
        )
        .await;
    assert_eq!(r.status, 401);
    // Bad input beats a missing grant.
    let r = gw
        .client
        .get(&format!("{}?limit=0", list_path(GLOBEX)), READER)
        .await;
    assert_eq!(r.status, 400);
    // A wrong method beats a missing token.
    let r = gw
        .client
        .send(Method::PUT, &list_path(CP), None, &[], None)
        .await;
    assert_eq!(r.status, 405);
    // A missing grant beats a bad or oversized body: the body of the unauthorized is never read.
    let r = gw.client.post(&list_path(CP), READER, "not json").await;
    assert_eq!(r.status, 403);
    let huge = format!(r#"{{"project_ids":["{}"]}}"#, "p".repeat(100_000));
    let r = gw.client.post(&list_path(CP), READER, &huge).await;
    assert_eq!(r.status, 403);
    assert!(gw.mock.requests().is_empty());
}

#[tokio::test]
async fn equivalent_queries_share_one_entry_and_upstream_sees_the_canonical_form() {
    let gw = start().await;
    let encoded = CP.replace(':', "%3A");
    let variants = [
        list_path(CP),
        format!("{}?limit=10", list_path(CP)),
        format!("{}?order=descending", list_path(CP)),
        format!("{}?order=descending&limit=10", list_path(CP)),
        format!("{}?limit=10&order=descending&", list_path(CP)),
        list_path(&encoded),
        format!("{}?limit=10", list_path(&encoded.replace("%3A", "%3a"))),
    ];
    let mut bodies = Vec::new();
    for path in &variants {
        let r = gw.client.get(path, READER).await;
        assert_eq!(r.status, 200, "{path}");
        bodies.push(r.body);
    }
    assert_eq!(gw.upstream_gets(), 1, "all variants are one cache entry");
    assert!(bodies.windows(2).all(|w| w[0] == w[1]));
    let sent = &gw.mock.requests()[0];
    assert_eq!(
        sent.path_and_query,
        format!("/v1/fine_tuning/checkpoints/{CP}/permissions?limit=10&order=descending")
    );

    let a = format!(
        "{}?project_id=proj_0003&order=ascending&limit=5",
        list_path(CP)
    );
    let b = format!(
        "{}?limit=5&project_id=proj_0003&order=ascending",
        list_path(CP)
    );
    gw.client.get(&a, READER).await;
    gw.client.get(&b, READER).await;
    assert_eq!(gw.upstream_gets(), 2);
    assert_eq!(
        gw.mock.requests()[1].path_and_query,
        format!("/v1/fine_tuning/checkpoints/{CP}/permissions?limit=5&order=ascending&project_id=proj_0003")
    );
}

#[tokio::test]
async fn pagination_parameters_reach_upstream_and_pages_differ() {
    let gw = start().await;
    let first = gw
        .client
        .get(&format!("{}?limit=10", list_path(CP)), READER)
        .await;
    let first_json = first.json();
    assert_eq!(first_json["has_more"], true);
    let last = first_json["last_id"].as_str().unwrap();
    let second = gw
        .client
        .get(&format!("{}?limit=10&after={last}", list_path(CP)), READER)
        .await;
    assert_eq!(second.status, 200);
    let (a, b) = (first.ids(), second.ids());
    assert_eq!(a.len(), 10);
    assert_eq!(b.len(), 10);
    assert!(a.iter().all(|id| !b.contains(id)), "pages overlap");
    assert_eq!(gw.upstream_gets(), 2);
}

/// SPEC "Hygiene rules": a checkpoint or permission id that is `.` or `..`, raw or encoded, is
/// a 400 and never forwarded (a normalising hop would turn it into another route).
#[tokio::test]
async fn dot_segment_ids_are_400_and_never_forwarded() {
    let gw = start().await;
    for dot in [".", "%2E", "%2e", "..", "%2E%2E", ".%2e"] {
        let r = gw.client.get(&list_path(dot), WRITER).await;
        assert_eq!(r.status, 400, "GET {dot}");
        assert_eq!(r.error().1.as_deref(), Some("checkpoint"), "GET {dot}");
        let r = gw
            .client
            .post(&list_path(dot), WRITER, r#"{"project_ids":["proj_a"]}"#)
            .await;
        assert_eq!(r.status, 400, "POST {dot}");
        let r = gw
            .client
            .delete(&format!("{}/{dot}", list_path(CP)), WRITER)
            .await;
        assert_eq!(r.status, 400, "DELETE permission {dot}");
        assert_eq!(r.error().1.as_deref(), Some("permission_id"));
    }
    assert!(gw.mock.requests().is_empty(), "{:?}", gw.mock.requests());
}
