//! SPEC "Hygiene rules": the admin key never leaves permgate, whichever config key it was
//! pasted into by mistake (check-config, serve, a SIGHUP reload), and whatever upstream sends
//! back (an answer holding a piece of it is a 502, never passed on, never cached).

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::Method;
use permgate::clock::Clock;
use permgate::config::Config;
use permgate::env::SharedEnv;
use permgate::mock_upstream::Fault;
use permgate::reload;
use permgate::secret::AdminKey;
use permgate::state::AppState;

use crate::support::*;

const BIN: &str = env!("CARGO_BIN_EXE_permgate");

/// A valid config (no upstream needed: nothing here reaches it).
fn valid_config() -> String {
    format!(
        r#"[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"

[upstream]
base_url = "http://127.0.0.1:9/v1"

[[clients]]
name = "reader"
token_sha256 = "{}"
checkpoints = ["ft:gpt-4o-mini-2024-07-18:acme:*"]
"#,
        hex::encode(permgate::auth::digest(READER.as_bytes()))
    )
}

/// A second client, for the cases that need one.
fn second_client(name: &str, checkpoints: &str) -> String {
    format!(
        "\n[[clients]]\nname = \"{name}\"\ntoken_sha256 = \"{}\"\ncheckpoints = [{checkpoints}]\n",
        "ab".repeat(32)
    )
}

/// The admin key pasted into each config key that takes free text, or into a TOML type error
/// or an unknown key: (what the message must say, the config text).
fn pasted_configs() -> Vec<(&'static str, String)> {
    let k = ADMIN_KEY;
    let base = valid_config();
    let in_upstream = |line: String| base.replace("[upstream]\n", &format!("[upstream]\n{line}\n"));
    let in_server = |line: String| base.replace("[server]\n", &format!("[server]\n{line}\n"));
    vec![
        (
            "upstream.admin_key_env looks like an API key",
            in_upstream(format!("admin_key_env = \"{k}\"")),
        ),
        (
            "upstream.admin_key_file looks like an API key",
            in_upstream(format!("admin_key_file = \"/run/secrets/{k}\"")),
        ),
        (
            "upstream.ca_file looks like an API key",
            in_upstream(format!("ca_file = \"{k}\"")),
        ),
        (
            "upstream.base_url looks like an API key",
            base.replace("127.0.0.1:9/v1", &format!("127.0.0.1:9/{k}/v1")),
        ),
        (
            "server.listen looks like an API key",
            base.replace("127.0.0.1:0\"\nadmin", &format!("{k}\"\nadmin")),
        ),
        (
            "clients[1].name is already the name of clients[0]",
            base.replace("name = \"reader\"", &format!("name = \"{k}\""))
                + &second_client(k, "\"*\""),
        ),
        (
            "clients[1].checkpoints[0] looks like an API key",
            format!("{base}{}", second_client("other", &format!("\"[{k}\""))),
        ),
        (
            "line 2, column 18: invalid type: string, expected usize",
            in_server(format!("worker_threads = \"{k}\"")),
        ),
        (
            "line 2, column 1: unknown field `<redacted>`",
            in_server(format!("{k} = 1")),
        ),
        (
            "redis.url may not carry credentials",
            format!("{base}\n[redis]\nurl = \"redis://127.0.0.1:9/?password={k}\"\n"),
        ),
        (
            "redis.key_prefix looks like an API key",
            format!("{base}\n[redis]\nurl = \"redis://127.0.0.1:9\"\nkey_prefix = \"{k}:\"\n"),
        ),
        (
            "audit.path looks like an API key",
            format!("{base}\n[audit]\npath = \"/tmp/{k}.jsonl\"\n"),
        ),
        // Parts of the key that do not look like one: found by the key itself, once loaded.
        (
            "clients[0].name holds a piece of the admin key",
            base.replace(
                "name = \"reader\"",
                &format!("name = \"svc-{}\"", &k[5..17]),
            ),
        ),
        (
            "clients[1].checkpoints[0] holds a piece of the admin key",
            format!(
                "{base}{}",
                second_client("other", &format!("\"ft:x:{}*\"", &k[20..30]))
            ),
        ),
    ]
}

/// Runs the binary with `args` for at most `limit`, killing it then; returns whether it exited
/// unsuccessfully by itself, and everything it wrote on stdout and stderr.
fn run_bounded(args: &[&str], config: &Path, limit: Duration) -> (bool, String) {
    let mut child = Process(
        Command::new(BIN)
            .args(args)
            .arg(config)
            .env("OPENAI_ADMIN_KEY", ADMIN_KEY)
            .env("PERMGATE_LOG", "debug")
            .env_remove("PERMGATE_LISTEN")
            .env_remove("PERMGATE_ADMIN_LISTEN")
            .env_remove("PERMGATE_UPSTREAM_URL")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text);
            text
        })
    };
    let stdout = drain(Box::new(child.0.stdout.take().unwrap()));
    let stderr = drain(Box::new(child.0.stderr.take().unwrap()));
    let deadline = Instant::now() + limit;
    let failed = loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            break !status.success();
        }
        if Instant::now() > deadline {
            let _ = child.0.kill();
            let _ = child.0.wait();
            break false;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let output = stdout.join().unwrap() + &stderr.join().unwrap();
    (failed, output)
}

/// `check-config` and `serve` refuse each config, name the key, and print no piece of the
/// admin key (a `serve` that kept running, as one did with a pasted `key_prefix`, is killed
/// and counts as not refusing).
#[test]
fn a_key_pasted_into_any_config_key_is_refused_and_never_printed() {
    let dir = TempDir::new("pasted");
    for (i, (expected, text)) in pasted_configs().into_iter().enumerate() {
        let config = dir.write(&format!("{i}.toml"), &text);
        for command in [["check-config", "--config"], ["serve", "--config"]] {
            let (refused, output) = run_bounded(&command, &config, Duration::from_secs(10));
            let what = format!("`permgate {}` for \"{expected}\"", command[0]);
            assert_no_key_piece(&output, &what);
            assert!(refused, "{what} was not refused:\n{output}");
            assert!(output.contains(expected), "{what}:\n{output}");
        }
    }
}

/// The message for the commonest paste says what went wrong, in words an operator can act on.
#[test]
fn a_key_pasted_as_admin_key_env_is_explained() {
    let dir = TempDir::new("pasted-env");
    let (_, text) = pasted_configs().swap_remove(0);
    let config = dir.write("env.toml", &text);
    let (_, output) = run_bounded(
        &["check-config", "--config"],
        &config,
        Duration::from_secs(10),
    );
    assert!(
        output.contains("upstream.admin_key_env looks like an API key")
            && output.contains("put the key in the environment"),
        "{output}"
    );
}

/// A SIGHUP (or key file) reload of a config with the key pasted into it fails, and neither
/// its error nor the ERROR line it logs holds a piece of the key.
#[tokio::test]
async fn a_failed_reload_never_logs_a_pasted_key() {
    init_logs();
    let dir = TempDir::new("pasted-reload");
    let path = dir.write("permgate.toml", &valid_config());
    let env: SharedEnv = Arc::new(|name| (name == "OPENAI_ADMIN_KEY").then(|| ADMIN_KEY.into()));
    let config = Config::load(&path, &*env).unwrap();
    let key = AdminKey::load(&config.upstream.admin_key, &*env).unwrap();
    let state = AppState::new(&config, key, Clock::default(), None).unwrap();
    for (expected, text) in pasted_configs() {
        dir.write("permgate.toml", &text);
        let why = reload::reload(&state, &path, &env).unwrap_err();
        assert_no_key_piece(&why, &format!("the reload error for \"{expected}\""));
        assert!(why.contains(expected), "{why}");
    }
    let logs = logs();
    assert!(
        logs.contains("reload failed") && logs.contains("upstream.admin_key_env looks like"),
        "the failures were logged"
    );
    assert_no_key_piece(&logs, "the logs");
}

/// OpenAI's way of quoting a key: its start and end around asterisks.
fn masked_key() -> String {
    let n = ADMIN_KEY.len();
    format!(
        "{}{}{}",
        &ADMIN_KEY[..8],
        "*".repeat(n - 14),
        &ADMIN_KEY[n - 6..]
    )
}

fn answer(status: u16, body: String) -> Fault {
    Fault::Status {
        status,
        body,
        retry_after: None,
    }
}

/// A valid permission list whose only permission's project is the admin key itself.
fn list_holding_the_key() -> String {
    serde_json::json!({
        "object": "list",
        "data": [{
            "object": "checkpoint.permission",
            "id": "cp_leak",
            "created_at": 1721764867,
            "project_id": ADMIN_KEY,
        }],
        "first_id": "cp_leak",
        "last_id": "cp_leak",
        "has_more": false,
    })
    .to_string()
}

#[tokio::test]
async fn a_404_quoting_the_masked_key_is_a_502_and_is_not_remembered() {
    let gw = start().await;
    let message = format!("No such checkpoint for the key {}.", masked_key());
    let body = serde_json::json!({"error": {"message": message, "type": "invalid_request_error",
        "param": null, "code": "model_not_found"}});
    gw.mock.push_fault(answer(404, body.to_string()));
    let r = gw.client.get(&list_path(CP), READER).await;
    assert_eq!(r.status, 502);
    assert_eq!(r.error().0, "upstream_error");
    // Not stored as a negative (404) page either: the next read asks upstream again.
    let r = gw.client.get(&list_path(CP), READER).await;
    assert_eq!(r.status, 200);
    assert!(r.cache_status().starts_with("permgate; fwd=miss"), "{r:?}");
    assert_eq!(gw.upstream_gets(), 2);
    assert!(
        logs().contains("contains a piece of the admin key"),
        "it was logged"
    );
}

/// The attack: a reader puts a guess in a checkpoint id; upstream's 404 quotes the id back. Had
/// a guess that is a piece of the admin key turned the 404 into a 502, each answer would say
/// whether the guess is right, and the key would fall a character at a time. Every guess gets
/// upstream's 404; so does a writer's create listing a guess among its project ids.
#[tokio::test]
async fn guesses_at_the_admin_key_quoted_back_by_upstream_all_get_the_same_answer() {
    let gw = start().await;
    let checkpoint = |guess: &str| format!("ft:gpt-4o-mini-2024-07-18:acme:guess-{guess}");
    for guess in [&ADMIN_KEY[9..15], "zzzzzz"] {
        let r = gw.client.get(&list_path(&checkpoint(guess)), READER).await;
        let text = String::from_utf8_lossy(&r.body);
        assert_eq!(r.status, 404, "guess {guess}: {text}");
        assert!(text.contains(guess), "upstream quoted it: {text}");
    }
    let body = format!(r#"{{"project_ids":["proj_{}"]}}"#, &ADMIN_KEY[20..26]);
    let created = gw.client.post(&list_path(CP), WRITER, &body).await;
    assert_eq!(created.status, 200, "{:?}", created.body);
}

#[tokio::test]
async fn a_200_holding_the_key_is_a_502_never_cached_nor_served_to_another_client() {
    let gw = start().await;
    gw.mock.push_fault(answer(200, list_holding_the_key()));
    gw.mock.push_fault(answer(200, list_holding_the_key()));
    for _ in 0..2 {
        let r = gw.client.get(&list_path(CP), READER).await;
        assert_eq!(r.status, 502);
        assert_eq!(r.error().0, "upstream_error");
        // Upstream would say the same again: the SDKs are told not to ask.
        assert_eq!(r.header("x-should-retry"), "false");
    }
    assert_eq!(
        gw.upstream_gets(),
        2,
        "nothing was cached: both reads went upstream"
    );
    // Another client reading the same page gets upstream's real answer, fetched afresh.
    let r = gw.client.get(&list_path(CP), WRITER).await;
    assert_eq!(r.status, 200);
    assert!(r.cache_status().starts_with("permgate; fwd=miss"), "{r:?}");
    assert_eq!(gw.upstream_gets(), 3);
    // A write's answer is scanned the same way.
    gw.mock.push_fault(answer(200, list_holding_the_key()));
    let r = gw
        .client
        .post(&list_path(CP), WRITER, r#"{"project_ids":["p1"]}"#)
        .await;
    assert_eq!(r.status, 502);
    assert_eq!(r.error().0, "upstream_error");
}

/// `text` with every third character written as a JSON `\uXXXX` escape: no six bytes of the
/// key in a row, the same string to any JSON reader.
fn json_escaped(text: &str) -> String {
    text.chars()
        .enumerate()
        .map(|(i, c)| match i % 3 {
            0 => format!("\\u{:04x}", c as u32),
            _ => c.to_string(),
        })
        .collect()
}

/// Upstream (or anything on its way) writing the key with JSON escapes hides it from a search
/// of the bytes, not from the caller's JSON parser: such answers are 502s too, never stored.
#[tokio::test]
async fn an_answer_holding_the_key_in_json_escapes_is_a_502() {
    let gw = start().await;
    let escaped = list_holding_the_key().replace(ADMIN_KEY, &json_escaped(ADMIN_KEY));
    let parsed: serde_json::Value = serde_json::from_str(&escaped).unwrap();
    assert_eq!(
        parsed["data"][0]["project_id"], ADMIN_KEY,
        "the same list to a reader"
    );
    gw.mock.push_fault(answer(200, escaped));
    let message = format!("The key {} is bad.", json_escaped(ADMIN_KEY));
    let error = format!(
        r#"{{"error":{{"message":"{message}","type":"invalid_request_error","param":null,"code":null}}}}"#
    );
    gw.mock.push_fault(answer(404, error));
    for _ in 0..2 {
        let r = gw.client.get(&list_path(CP), READER).await;
        assert_eq!(r.status, 502, "{}", String::from_utf8_lossy(&r.body));
        assert_eq!(r.error().0, "upstream_error");
    }
    let r = gw.client.get(&list_path(CP), READER).await;
    assert_eq!(r.status, 200);
    assert!(r.cache_status().starts_with("permgate; fwd=miss"), "{r:?}");
    // Escapes alone change nothing: a list written with them passes when it holds no key.
    let plain = list_holding_the_key().replace(ADMIN_KEY, "proj_escaped");
    gw.mock.push_fault(answer(
        200,
        plain.replace("proj_escaped", &json_escaped("proj_escaped")),
    ));
    let r = gw
        .client
        .get(&format!("{}?limit=3", list_path(CP)), READER)
        .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
}

#[tokio::test]
async fn a_2xx_that_is_not_the_endpoints_shape_is_a_502() {
    let gw = start().await;
    let deleted = r#"{"object":"checkpoint.permission","id":"cp_x","deleted":true}"#;
    let list = r#"{"object":"list","data":[],"has_more":false}"#;
    let cases = [
        (Method::GET, r#"{"object":"list"}"#),
        (Method::GET, r#"{"hello":"world"}"#),
        (Method::GET, deleted),
        (Method::POST, deleted),
        (Method::DELETE, list),
    ];
    for (method, body) in cases {
        gw.mock.push_fault(answer(200, body.to_string()));
        let r = match method {
            Method::GET => gw.client.get(&list_path(CP), READER).await,
            Method::POST => {
                gw.client
                    .post(&list_path(CP), WRITER, r#"{"project_ids":["p1"]}"#)
                    .await
            }
            _ => {
                gw.client
                    .delete(&format!("{}/cp_x", list_path(CP)), WRITER)
                    .await
            }
        };
        assert_eq!(r.status, 502, "{method} answered {body}");
        assert_eq!(r.error().0, "upstream_error");
    }
    // Nothing of that was stored.
    let r = gw.client.get(&list_path(CP), READER).await;
    assert_eq!(r.status, 200);
    assert!(r.cache_status().starts_with("permgate; fwd=miss"), "{r:?}");
}
