//! `portico-dp` routes real traffic the way Envoy would: virtual hosts,
//! first matching route, rewrites, header edits, redirects, direct
//! responses, load balancing; over HTTP/1.1 and h2c; gRPC with trailers
//! and streaming; WebSocket upgrades.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use portico_integration::upstream::Upstream;
use serde_json::json;

use super::dp_common::{api, h2, http1, rt, service, Env};

#[test]
fn routes_rewrites_and_edits_over_http1_and_h2c() {
    let one = Upstream::start("one");
    let two = Upstream::start("two");
    let env = Env::new(|_| {
        vec![
            service("s1", &[&one], json!({})),
            service("s2", &[&two], json!({})),
            service("both", &[&one, &two], json!({})),
            api(
                "shop",
                "/shop",
                &["shop.test"],
                json!([
                    {"name": "exact", "match": {"path": "/exact", "pathType": "exact"},
                     "action": {"service": "s1", "requestHeaders": {"set": {"x-added": "yes, 50% of %REQ(x)%", "x-empty": ""}}, "responseHeaders": {"set": {"x-resp": "r"}}}},
                    {"name": "regex", "match": {"path": "/items/[0-9]+", "pathType": "regex"}, "action": {"service": "s2"}},
                    {"name": "hdr", "match": {"path": "/h", "headers": [{"name": "x-pick", "exact": "two"}]}, "action": {"service": "s2"}},
                    {"name": "rw", "match": {"path": "/rw"}, "action": {"service": "s1", "prefixRewrite": "/inner"}},
                    {"name": "rr", "match": {"path": "/rr"}, "action": {"service": "both"}},
                    {"name": "ping", "match": {"path": "/ping", "pathType": "exact"}, "action": {"directResponse": {"status": 200, "body": "pong\n"}}},
                    {"name": "old", "match": {"path": "/old", "pathType": "exact"}, "action": {"redirect": {"path": "/new", "code": 301}}},
                    {"name": "post", "match": {"path": "/echo", "methods": ["POST"]}, "action": {"service": "s2"}},
                    {"name": "rest", "match": {"path": "/"}, "action": {"service": "s1"}}
                ]),
            ),
        ]
    });
    let _dp = env.dp("dp1", &[]);
    let host = format!("shop.test:{}", env.port);
    let get = |path: &str, headers: &[(&str, &str)]| {
        http1(env.port, "GET", path, &host, headers, "").expect("request")
    };

    let r = get("/shop/exact", &[]);
    assert_eq!(
        (r.status, r.header("x-upstream")),
        (200, Some("one")),
        "{r:?}"
    );
    assert!(r.body.starts_with("GET /shop/exact\n"), "{}", r.body);
    // Values arrive as written: `%` is not Envoy's command operator here,
    // and an empty value is kept.
    assert!(
        r.body.contains("\nx-added: yes, 50% of %REQ(x)%\n") && r.body.contains("\nx-empty: \n"),
        "request header set: {}",
        r.body
    );
    assert!(
        r.body.contains("x-forwarded-for: 127.0.0.1"),
        "xff appended: {}",
        r.body
    );
    assert!(
        r.body.contains("x-request-id: "),
        "request id generated: {}",
        r.body
    );
    assert_eq!(r.header("x-resp"), Some("r"));
    // A client's x-forwarded-for gets the client's address appended.
    let r = get("/shop/exact", &[("x-forwarded-for", "203.0.113.9")]);
    assert!(
        r.body.contains("x-forwarded-for: 203.0.113.9, 127.0.0.1\n"),
        "xff appended to: {}",
        r.body
    );
    // At the edge (use_remote_address, no internal addresses configured)
    // a client may not set the x-envoy-* headers that steer Envoys, and
    // its address goes upstream.
    let r = get(
        "/shop/exact",
        &[
            ("x-envoy-retry-on", "5xx"),
            ("x-envoy-internal", "true"),
            ("x-envoy-upstream-rq-timeout-ms", "1"),
            ("x-envoy-external-address", "10.1.1.1"),
            ("x-forwarded-client-cert", "By=spiffe://forged"),
        ],
    );
    assert_eq!(r.status, 200, "{r:?}");
    for gone in [
        "x-envoy-retry-on",
        "x-envoy-internal",
        "x-envoy-upstream-rq-timeout-ms",
        // No client certificate was presented (Envoy's default, SANITIZE).
        "x-forwarded-client-cert",
    ] {
        assert!(!r.body.contains(gone), "{gone} removed: {}", r.body);
    }
    assert!(
        r.body.contains("x-envoy-external-address: 127.0.0.1\n") && !r.body.contains("10.1.1.1"),
        "client address set: {}",
        r.body
    );
    // Portico's gateway names itself and keeps Envoy's x-envoy-* headers
    // to itself, both ways.
    assert_eq!(r.header("server"), Some("portico"), "{r:?}");
    assert_eq!(r.header("x-envoy-upstream-service-time"), None, "{r:?}");
    assert!(
        !r.body.contains("x-envoy-expected-rq-timeout-ms"),
        "{}",
        r.body
    );

    assert_eq!(
        get("/shop/exact/more", &[]).header("x-upstream"),
        Some("one")
    );
    assert_eq!(get("/shop/items/42", &[]).header("x-upstream"), Some("two"));
    assert_eq!(
        get("/shop/items/4x", &[]).header("x-upstream"),
        Some("one"),
        "regex matches the whole path"
    );
    assert_eq!(
        get("/shop/h", &[("x-pick", "two")]).header("x-upstream"),
        Some("two")
    );
    assert_eq!(
        get("/shop/h", &[("x-pick", "one")]).header("x-upstream"),
        Some("one")
    );
    assert!(
        get("/shop/rw/a?b=1", &[])
            .body
            .starts_with("GET /inner/a?b=1\n"),
        "prefix rewrite keeps the rest and the query"
    );

    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..6 {
        seen.insert(
            get("/shop/rr", &[])
                .header("x-upstream")
                .unwrap_or("")
                .to_string(),
        );
    }
    assert_eq!(
        seen.into_iter().collect::<Vec<_>>(),
        ["one", "two"],
        "round robin reaches both endpoints"
    );

    let r = get("/shop/ping", &[]);
    assert_eq!((r.status, r.body.as_str()), (200, "pong\n"));
    let r = get("/shop/old?x=1", &[]);
    assert_eq!(r.status, 301);
    assert!(
        r.header("location")
            .is_some_and(|l| l.ends_with("/new?x=1")),
        "{r:?}"
    );

    let r = http1(
        env.port,
        "POST",
        "/shop/echo",
        &host,
        &[("content-type", "text/plain")],
        "hello body",
    )
    .expect("post");
    assert_eq!(r.header("x-upstream"), Some("two"));
    assert!(
        r.body.ends_with("\n\nhello body"),
        "body forwarded: {}",
        r.body
    );

    let r = http1(env.port, "GET", "/shop/exact", "other.test", &[], "").expect("request");
    assert_eq!(r.status, 404, "unknown host: {r:?}");
    let r = http1(env.port, "GET", "/nothing", &host, &[], "").expect("request");
    assert_eq!(r.status, 404, "no route: {r:?}");

    // The same table over h2c (prior knowledge) on the same port.
    rt().block_on(async {
        let r = h2(env.port, "GET", "/shop/exact", &host, &[], "").await;
        assert_eq!(
            (r.status, r.header("x-upstream")),
            (200, Some("one")),
            "{r:?}"
        );
        assert!(
            r.body.contains("host: shop.test"),
            "authority becomes Host upstream: {}",
            r.body
        );
        let r = h2(env.port, "POST", "/shop/echo", &host, &[], "h2 body").await;
        assert!(r.body.ends_with("\n\nh2 body"), "{}", r.body);
        assert_eq!(
            h2(env.port, "GET", "/shop/items/7", &host, &[], "")
                .await
                .header("x-upstream"),
            Some("two")
        );
    });
}

#[test]
fn grpc_streams_with_trailers_and_websocket_upgrades() {
    let up = Upstream::start("grpc");
    let env = Env::new(|_| {
        vec![
            service("g", &[&up], json!({"protocol": "grpc"})),
            service("ws", &[&up], json!({})),
            api(
                "grpc",
                "/echo.Echo",
                &[],
                json!([{"name": "all", "match": {"path": "/"}, "action": {"service": "g", "timeout": "0s"}}]),
            ),
            api(
                "ws",
                "/ws",
                &[],
                json!([{"name": "ws", "match": {"path": "/"}, "action": {"service": "ws"}}]),
            ),
            // A gRPC service whose only endpoint refuses connections.
            service(
                "down",
                &[],
                json!({"protocol": "grpc", "endpoints": [{"address": "127.0.0.1", "port": portico_integration::dataplane::free_port()}]}),
            ),
            api(
                "down",
                "/down.Down",
                &[],
                json!([{"name": "all", "match": {"path": "/"}, "action": {"service": "down"}}]),
            ),
        ]
    });
    let _dp = env.dp("dp1", &[]);

    // gRPC over h2c, client streaming three messages; each comes back as
    // it is sent (the upstream echoes frames), then the trailers.
    rt().block_on(async {
        let mut tx = super::dp_common::h2_sender(env.port).await;
        let (btx, brx) = tokio::sync::mpsc::channel::<
            Result<hyper::body::Frame<Bytes>, std::convert::Infallible>,
        >(4);
        let body =
            http_body_util::StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(brx));
        let req = hyper::Request::post(format!("http://gw:{}/echo.Echo/Chat", env.port))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(body)
            .expect("request");
        let resp = tokio::spawn(async move { tx.send_request(req).await });
        let msg = |s: &str| {
            let mut m = vec![0u8];
            m.extend_from_slice(&(s.len() as u32).to_be_bytes());
            m.extend_from_slice(s.as_bytes());
            Bytes::from(m)
        };
        btx.send(Ok(hyper::body::Frame::data(msg("first"))))
            .await
            .expect("send");
        let resp = resp
            .await
            .expect("join")
            .expect("response headers before the stream ends");
        assert_eq!(resp.status(), 200);
        let mut body = resp.into_body();
        let f = tokio::time::timeout(Duration::from_secs(5), body.frame())
            .await
            .expect("first echo streams back")
            .expect("frame")
            .expect("ok");
        assert_eq!(f.into_data().expect("data"), msg("first"));
        btx.send(Ok(hyper::body::Frame::data(msg("second"))))
            .await
            .expect("send");
        let f = tokio::time::timeout(Duration::from_secs(5), body.frame())
            .await
            .expect("second echo")
            .expect("frame")
            .expect("ok");
        assert_eq!(f.into_data().expect("data"), msg("second"));
        drop(btx);
        let mut trailers = None;
        while let Some(f) = body.frame().await {
            if let Ok(t) = f.expect("frame").into_trailers() {
                trailers = Some(t);
            }
        }
        let t = trailers.expect("trailers arrive");
        assert_eq!(t.get("grpc-status").map(|v| v.as_bytes()), Some(&b"0"[..]));
    });

    // The gateway's own errors reach a gRPC client (tonic) as call
    // statuses, as Envoy sends them: trailers-only, `grpc-status` by
    // gRPC's HTTP mapping, the reason in `grpc-message`.
    rt().block_on(async {
        let channel =
            tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{}", env.port))
                .expect("endpoint")
                .connect()
                .await
                .expect("connect");
        let mut grpc = tonic::client::Grpc::new(channel);
        let mut call = async |path: &'static str| {
            grpc.ready().await.expect("ready");
            let codec = tonic_prost::ProstCodec::<
                portico_proto::google::protobuf::Duration,
                portico_proto::google::protobuf::Duration,
            >::default();
            grpc.unary(
                tonic::Request::new(portico_proto::google::protobuf::Duration::default()),
                http::uri::PathAndQuery::from_static(path),
                codec,
            )
            .await
            .expect_err("the gateway answers with an error status")
        };
        let e = call("/down.Down/Call").await;
        assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
        assert!(e.message().starts_with("upstream connect error"), "{e:?}");
        let e = call("/nowhere.Nothing/Call").await;
        assert_eq!(e.code(), tonic::Code::Unimplemented, "{e:?}");
    });

    // WebSocket: 101 through the gateway, then bytes both ways.
    let mut s = super::dp_common::upgrade(env.port, "/ws/chat");
    super::dp_common::echo(&mut s, b"ping over the tunnel");
}
