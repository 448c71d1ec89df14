//! SSRF tests of the media fetcher (issue 5): metadata, loopback, IPv4-mapped IPv6 loopback, 10/8
//! and a redirect to localhost are all refused; an explicitly allowed loopback `ip:port` (the
//! test-only hook) is fetched, so the refusals are not an artefact of a broken fetcher.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use tollgate::gateway::fetch::{FetchError, FetchPolicy, Fetcher};

/// A one-route HTTP server on loopback answering every request with `response`.
async fn serve(response: String) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let resp = response.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(resp.as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

fn png_response() -> String {
    let body = "\u{89}PNG-fake";
    format!(
        "HTTP/1.1 200 OK\r\ncontent-type: image/png\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
}

fn redirect_to(location: &str) -> String {
    format!("HTTP/1.1 302 Found\r\nlocation: {location}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
}

fn fetcher(allow: Vec<SocketAddr>) -> Fetcher {
    Fetcher::new(FetchPolicy {
        timeout: Duration::from_secs(5),
        allow,
        ..FetchPolicy::default()
    })
}

fn assert_refused(r: Result<tollgate::gateway::fetch::Fetched, FetchError>, what: &str) {
    match r {
        Err(FetchError::Refused { .. }) => {}
        other => panic!("{what}: expected a refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn private_and_metadata_addresses_are_refused() {
    // A real server on loopback, so a refusal cannot be a connection error in disguise.
    let live = serve(png_response()).await;
    let f = fetcher(Vec::new());
    assert_refused(
        f.fetch("http://169.254.169.254/latest/meta-data/").await,
        "metadata",
    );
    assert_refused(
        f.fetch(&format!("http://127.0.0.1:{}/img.png", live.port()))
            .await,
        "127.0.0.1",
    );
    assert_refused(
        f.fetch(&format!(
            "http://[::ffff:127.0.0.1]:{}/img.png",
            live.port()
        ))
        .await,
        "::ffff:127.0.0.1",
    );
    assert_refused(f.fetch("http://10.0.0.1/img.png").await, "10/8");
    assert_refused(
        f.fetch("http://10.255.255.254:8080/img.png").await,
        "10/8 high",
    );
    assert_refused(
        f.fetch(&format!("http://localhost:{}/img.png", live.port()))
            .await,
        "localhost",
    );
    assert_refused(f.fetch("http://[::1]/").await, "::1");
    assert_refused(f.fetch("file:///etc/passwd").await, "file scheme");
}

#[tokio::test]
async fn allowed_test_address_is_fetched() {
    let live = serve(png_response()).await;
    let got = fetcher(vec![live])
        .fetch(&format!("http://127.0.0.1:{}/img.png", live.port()))
        .await
        .expect("the allow-listed loopback server is reachable");
    assert_eq!(got.content_type, "image/png");
    assert!(!got.bytes.is_empty());
}

#[tokio::test]
async fn redirects_to_localhost_or_metadata_are_refused() {
    let target = serve(png_response()).await;
    let to_localhost = serve(redirect_to(&format!(
        "http://localhost:{}/img.png",
        target.port()
    )))
    .await;
    let to_metadata = serve(redirect_to("http://169.254.169.254/latest/meta-data/")).await;
    let to_allowed = serve(redirect_to(&format!(
        "http://127.0.0.1:{}/img.png",
        target.port()
    )))
    .await;
    // The redirecting servers are allowed; the redirect targets are not.
    let f = fetcher(vec![to_localhost, to_metadata, to_allowed]);
    assert_refused(
        f.fetch(&format!("http://127.0.0.1:{}/a", to_localhost.port()))
            .await,
        "redirect to localhost",
    );
    assert_refused(
        f.fetch(&format!("http://127.0.0.1:{}/a", to_metadata.port()))
            .await,
        "redirect to metadata",
    );
    assert_refused(
        f.fetch(&format!("http://127.0.0.1:{}/a", to_allowed.port()))
            .await,
        "redirect to an unlisted loopback port",
    );
    // Positive control: the same redirect is followed when its target is allowed too.
    let g = fetcher(vec![to_allowed, target]);
    let got = g
        .fetch(&format!("http://127.0.0.1:{}/a", to_allowed.port()))
        .await
        .expect("followed");
    assert_eq!(got.content_type, "image/png");
}

#[tokio::test]
async fn size_cap_is_enforced() {
    let big = "x".repeat(4096);
    let live = serve(format!(
        "HTTP/1.1 200 OK\r\ncontent-type: image/png\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{big}",
        big.len()
    ))
    .await;
    let f = Fetcher::new(FetchPolicy {
        max_bytes: 1024,
        allow: vec![live],
        ..FetchPolicy::default()
    });
    match f
        .fetch(&format!("http://127.0.0.1:{}/big", live.port()))
        .await
    {
        Err(FetchError::TooLarge(..)) => {}
        other => panic!("expected TooLarge, got {other:?}"),
    }
}
