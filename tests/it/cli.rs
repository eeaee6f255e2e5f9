//! SPEC "Command line", run as a user would: the real binary, its stdout and exit codes.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support::*;

const BIN: &str = env!("CARGO_BIN_EXE_permgate");

#[test]
fn hash_token_prints_the_sha256_of_stdin() {
    let mut child = Command::new(BIN)
        .arg("hash-token")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"password\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8(out.stdout).unwrap().trim(),
        "5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8"
    );
}

#[test]
fn check_config_validates_and_redacts() {
    let ok = Command::new(BIN)
        .args(["check-config", "--config", "config/permgate.toml"])
        .env("OPENAI_ADMIN_KEY", ADMIN_KEY)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&ok.stdout);
    assert!(
        ok.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(stdout.contains("billing-service"));
    assert!(stdout.contains("redacted"));
    for piece in key_pieces() {
        assert!(!stdout.contains(piece));
    }

    let no_key = Command::new(BIN)
        .args(["check-config", "--config", "config/permgate.toml"])
        .env_remove("OPENAI_ADMIN_KEY")
        .output()
        .unwrap();
    assert!(!no_key.status.success());
    assert!(String::from_utf8_lossy(&no_key.stderr).contains("OPENAI_ADMIN_KEY"));

    let dir = std::env::temp_dir().join(format!("permgate-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.toml");
    std::fs::write(
        &bad,
        "[server]\nlisten = \"x\"\n[upstream]\nbase_url = \"https://a/v1\"\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(&bad)
        .env("OPENAI_ADMIN_KEY", ADMIN_KEY)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("server.listen") && err.contains("no [[clients]]"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn demo_prints_a_curl_that_works_and_stops_cleanly_on_ctrl_c() {
    let mut child = Process(
        Command::new(BIN)
            .arg("demo")
            .env("PERMGATE_LISTEN", "127.0.0.1:0")
            .env("PERMGATE_ADMIN_LISTEN", "127.0.0.1:0")
            .env("PERMGATE_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let stdout = child.0.stdout.take().unwrap();
    let lines = tokio::task::spawn_blocking(move || {
        let mut lines = Vec::new();
        for line in BufReader::new(stdout).lines() {
            let line = line.unwrap();
            let done = line.contains("Ctrl-C");
            lines.push(line);
            if done {
                break;
            }
        }
        lines
    });
    let lines = tokio::time::timeout(Duration::from_secs(30), lines)
        .await
        .unwrap()
        .unwrap();
    let curl = lines
        .iter()
        .find(|l| l.trim_start().starts_with("curl "))
        .expect("a curl line");
    // curl -i -H 'Authorization: Bearer TOKEN' 'http://ADDR/PATH'
    let parts: Vec<&str> = curl.split('\'').collect();
    let token = parts[1].strip_prefix("Authorization: Bearer ").unwrap();
    let url: hyper::Uri = parts[3].parse().unwrap();
    let client = TestClient::new(url.authority().unwrap().as_str().parse().unwrap());
    let path = url.path_and_query().unwrap().as_str();
    let first = client.get(path, token).await;
    assert_eq!(first.status, 200);
    assert_eq!(first.ids().len(), 3);
    let second = client.get(path, token).await;
    assert_eq!(second.cache_status(), "permgate; hit");

    signal(&child, "INT");
    let status = tokio::task::spawn_blocking(move || child.0.wait().unwrap());
    let status = tokio::time::timeout(Duration::from_secs(15), status)
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "demo exits 0 on Ctrl-C: {status:?}");
}

#[tokio::test]
async fn mock_upstream_serves_openai_shaped_answers_as_a_process() {
    let mut child = Process(
        Command::new(BIN)
            .args([
                "mock-upstream",
                "--listen",
                "127.0.0.1:0",
                "--admin-key",
                ADMIN_KEY,
            ])
            .env("PERMGATE_LOG_FORMAT", "json")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let stderr = child.0.stderr.take().unwrap();
    let addr = tokio::task::spawn_blocking(move || {
        BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .find_map(|line| {
                let event: serde_json::Value = serde_json::from_str(&line).ok()?;
                event["fields"]["addr"].as_str().map(str::to_string)
            })
    })
    .await
    .unwrap()
    .expect("the mock logged its address as JSON");
    let client = TestClient::new(addr.parse().unwrap());
    let path = format!("/v1/fine_tuning/checkpoints/{CP}/permissions?limit=2&order=ascending");
    let ok = client.get(&path, ADMIN_KEY).await;
    assert_eq!(ok.status, 200);
    let page = ok.json();
    assert_eq!(page["object"], "list");
    assert_eq!(page["data"].as_array().unwrap().len(), 2);
    assert_eq!(page["has_more"], true);
    assert_eq!(page["first_id"], page["data"][0]["id"]);
    let denied = client.get(&path, "sk-wrong-key-000000").await;
    assert_eq!(denied.status, 401);
    assert_eq!(denied.json()["error"]["code"], "invalid_api_key");
    let unknown = client
        .get("/v1/fine_tuning/checkpoints/ft:nope/permissions", ADMIN_KEY)
        .await;
    assert_eq!(unknown.status, 404);
    drop(child);
}
