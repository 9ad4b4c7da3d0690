//! The QMP wire protocol on the control socket: greeting, negotiation, id
//! echo, framing, malformed and oversized input, argument checking, the
//! command table, and many clients at once.

use blkfs_tests::*;
use serde_json::{json, Value};
use std::sync::{Arc, Barrier};
use std::time::Duration;

/// A daemon with one small raw device `d0`.
fn daemon(dir: &TestDir) -> Daemon {
    let img = raw_image(dir, "a.img", "1M");
    Daemon::start(dir, &[raw_spec("d0", &img, json!({}))])
}

fn assert_error(r: &Value, class: &str) -> String {
    let e = r
        .get("error")
        .unwrap_or_else(|| panic!("expected a {class} error, got {r}"));
    assert_eq!(e["class"], class, "error class in {r}");
    let desc = e["desc"]
        .as_str()
        .unwrap_or_else(|| panic!("error without a string desc: {r}"));
    assert!(!desc.is_empty(), "empty desc in {r}");
    desc.to_string()
}

#[test]
fn greeting_has_version_and_empty_capabilities() {
    let dir = TestDir::new("qmp-greeting");
    let d = daemon(&dir);
    let mut q = Qmp::connect(&d.sock);
    let g = obj(&q.greeting);
    assert_eq!(
        g.len(),
        1,
        "greeting has only the QMP member: {}",
        q.greeting
    );
    let greeting = q.greeting.clone();
    let qmp = &greeting["QMP"];
    assert_eq!(qmp["capabilities"], json!([]), "greeting: {}", q.greeting);
    let v = &qmp["version"];
    for k in ["major", "minor", "micro"] {
        assert!(
            v["qemu"][k].is_u64(),
            "version.qemu.{k} must be an integer: {v}"
        );
    }
    assert!(
        v["package"].is_string(),
        "version.package must be a string: {v}"
    );
    // query-version answers the same version as the greeting.
    q.ok("qmp_capabilities", json!({}));
    assert_eq!(q.ok("query-version", json!({})), *v);
}

#[test]
fn commands_before_negotiation_are_refused_and_quit_is_ignored() {
    let dir = TestDir::new("qmp-neg");
    let mut d = daemon(&dir);
    let mut q = Qmp::connect(&d.sock);
    for cmd in ["query-version", "query-block", "quit", "no-such-command"] {
        q.send_raw(format!("{}\n", json!({"execute": cmd, "id": cmd})).as_bytes());
        let r = q.reply();
        assert_error(&r, "CommandNotFound");
        assert_eq!(r["id"], cmd, "id echoed on the error: {r}");
    }
    // The refused quit did not stop the daemon; this connection still works.
    assert_eq!(q.ok("qmp_capabilities", json!({})), json!({}));
    assert!(q.ok("query-block", json!({})).is_array());
    assert!(d.dev("d0").exists());
    // A second negotiation is refused the same way, and the session lives on.
    let (class, _) = q.err("qmp_capabilities", json!({}));
    assert_eq!(class, "CommandNotFound");
    assert!(q.ok("query-version", json!({})).is_object());
    // The daemon is still running: it exits only on a negotiated quit.
    assert_eq!(q.ok("quit", json!({})), json!({}));
    assert!(d.wait(Duration::from_secs(20)).success());
}

#[test]
fn id_is_echoed_verbatim_for_every_json_type() {
    let dir = TestDir::new("qmp-id");
    let d = daemon(&dir);
    let mut q = d.qmp();
    let ids = [
        json!(7),
        json!(-3),
        json!(1.5),
        json!("abc"),
        json!(""),
        json!(true),
        json!(null),
        json!([1, "two", {"three": 3}]),
        json!({"x": [1, true], "y": {"z": null}}),
    ];
    for id in ids {
        // On success ...
        q.send_raw(format!("{}\n", json!({"execute": "query-version", "id": id})).as_bytes());
        let r = q.reply();
        assert!(r.get("return").is_some(), "{r}");
        assert_eq!(r.get("id"), Some(&id), "id on a return: {r}");
        assert_eq!(obj(&r).len(), 2, "a reply has return and id only: {r}");
        // ... and on error.
        q.send_raw(format!("{}\n", json!({"execute": "no-such-command", "id": id})).as_bytes());
        let r = q.reply();
        assert_error(&r, "CommandNotFound");
        assert_eq!(r.get("id"), Some(&id), "id on an error: {r}");
    }
    // No id given: none in the reply.
    let r = q.execute("query-version", json!({}));
    assert!(r.get("id").is_none(), "{r}");
}

#[test]
fn commands_without_result_return_empty_object_and_arguments_are_optional() {
    let dir = TestDir::new("qmp-noargs");
    let d = daemon(&dir);
    let mut q = Qmp::connect(&d.sock);
    // No "arguments" member at all.
    q.send_raw(b"{\"execute\": \"qmp_capabilities\"}\n");
    assert_eq!(q.reply(), json!({"return": {}}));
    q.send_raw(b"{\"execute\": \"query-block\", \"id\": 1}\n");
    let r = q.reply();
    assert_eq!(r["id"], 1);
    assert_eq!(r["return"].as_array().map(Vec::len), Some(1), "{r}");
}

#[test]
fn framing_ignores_whitespace_and_splits_and_joins_messages() {
    let dir = TestDir::new("qmp-framing");
    let d = daemon(&dir);
    let mut q = d.qmp();
    // Two messages in one write, no separator; then one message spread over
    // many writes with newlines and tabs inside it.
    q.send_raw(br#"{"execute":"query-version","id":1}{"execute":"query-block","id":2}"#);
    let r1 = q.reply();
    let r2 = q.reply();
    assert_eq!(r1["id"], 1);
    assert!(r1["return"]["qemu"].is_object(), "{r1}");
    assert_eq!(r2["id"], 2);
    assert!(r2["return"].is_array(), "{r2}");
    let msg = "\n\t {\n\"execute\"\t:\n\"query-version\" ,\r\n \"id\" : \"a}{\\\"b\" }\n\n";
    for chunk in msg.as_bytes().chunks(3) {
        q.send_raw(chunk);
        std::thread::sleep(Duration::from_millis(2));
    }
    let r = q.reply();
    assert_eq!(
        r["id"], "a}{\"b",
        "braces and quotes inside strings do not end a message: {r}"
    );
    assert!(r["return"]["qemu"].is_object(), "{r}");
}

#[test]
fn malformed_json_is_reported_and_the_connection_keeps_working() {
    let dir = TestDir::new("qmp-badjson");
    let d = daemon(&dir);
    let mut q = d.qmp();
    for bad in [
        "{\"execute\": query-version}\n",
        "{\"execute\" \"query-version\"}\n",
        "{\"execute\": \"query-version\",}\n",
        "{'execute': 'query-version'}\n",
    ] {
        q.send_raw(bad.as_bytes());
        let r = q.reply();
        let desc = assert_error(&r, "GenericError");
        assert!(
            desc.starts_with("JSON parse error"),
            "desc for {bad:?}: {desc}"
        );
        // The very next message is served normally.
        q.send_raw(b"{\"execute\": \"query-version\", \"id\": \"next\"}\n");
        let r = q.reply();
        assert_eq!(r["id"], "next", "after {bad:?}: {r}");
        assert!(r["return"].is_object(), "after {bad:?}: {r}");
    }
}

#[test]
fn non_object_messages_are_refused() {
    let dir = TestDir::new("qmp-nonobj");
    let d = daemon(&dir);
    let mut q = d.qmp();
    for msg in [
        "[1, 2, {\"execute\": \"quit\"}]\n",
        "42\n",
        "\"query-version\"\n",
        "true\n",
        "null\n",
        "[]\n",
    ] {
        q.send_raw(msg.as_bytes());
        let r = q.reply();
        let desc = assert_error(&r, "GenericError");
        assert_eq!(desc, "QMP input must be a JSON object", "for {msg:?}");
    }
    // The quit inside the array above was not executed.
    assert!(q.ok("query-block", json!({})).is_array());
    assert!(d.dev("d0").exists());
}

#[test]
fn unknown_commands_are_command_not_found() {
    let dir = TestDir::new("qmp-unknown");
    let d = daemon(&dir);
    let mut q = d.qmp();
    for cmd in [
        "frobnicate",
        "query-blocks",
        "QUERY-BLOCK",
        "blockdev_add",
        "system_powerdown",
        "",
    ] {
        let (class, desc) = q.err(cmd, json!({}));
        assert_eq!(class, "CommandNotFound", "{cmd:?}: {desc}");
    }
}

#[test]
fn argument_errors_are_generic_errors_with_clear_descriptions() {
    let dir = TestDir::new("qmp-args");
    let img = raw_image(&dir, "a.img", "1M");
    let d = Daemon::start(&dir, &[raw_spec("d0", &img, json!({}))]);
    let mut q = d.qmp();
    let nodes_before = q
        .ok("query-named-block-nodes", json!({}))
        .as_array()
        .unwrap()
        .len();

    let cases = [
        (
            "query-block",
            json!({"x": 1}),
            "Parameter 'x' is unexpected",
        ),
        (
            "query-version",
            json!({"verbose": true}),
            "Parameter 'verbose' is unexpected",
        ),
        (
            "quit",
            json!({"now": true}),
            "Parameter 'now' is unexpected",
        ),
        (
            "blockdev-add",
            json!({"driver": "raw", "id": "e0", "file": {"driver": "file"}}),
            "Parameter 'file.filename' is missing",
        ),
        (
            "blockdev-add",
            json!({"driver": "raw", "id": 5, "file": {"driver": "file", "filename": img}}),
            "Invalid parameter type for 'id', expected: string",
        ),
        (
            "blockdev-add",
            json!({"driver": "raw", "id": "e0", "bogus": 1, "file": {"driver": "file", "filename": img}}),
            "Parameter 'bogus' is unexpected",
        ),
        (
            "blockdev-add",
            json!({"driver": "raw", "id": "e0", "file": {"driver": "file", "filename": img, "bogus": "x"}}),
            "Parameter 'file.bogus' is unexpected",
        ),
        (
            "blockdev-add",
            json!({"driver": "raw", "id": "e0", "read-only": "yes", "file": {"driver": "file", "filename": img}}),
            "Invalid parameter type for 'read-only', expected: boolean",
        ),
    ];
    for (cmd, args, want) in cases {
        let (class, desc) = q.err(cmd, args.clone());
        assert_eq!(class, "GenericError", "{cmd} {args}: {desc}");
        assert_eq!(desc, want, "{cmd} {args}");
    }
    // Less exact wording, same class: missing driver, bad enum value,
    // seed form with a missing member, an argument of the wrong JSON type.
    for (cmd, args, must_contain) in [
        (
            "blockdev-add",
            json!({"id": "e0", "file": {"driver": "file", "filename": img}}),
            "driver",
        ),
        (
            "blockdev-add",
            json!({"driver": "raw", "id": "e0", "discard": "sometimes", "file": {"driver": "file", "filename": img}}),
            "discard",
        ),
        (
            "blockdev-add",
            json!({"driver": "nosuchdriver", "id": "e0"}),
            "driver",
        ),
        (
            "blockdev-add",
            json!({"options": {"driver": "raw", "id": "e0", "file": {"driver": "file"}}}),
            "file.filename",
        ),
        (
            "blockdev-add",
            json!({"driver": "raw", "id": "e0", "file": 42}),
            "file",
        ),
    ] {
        let (class, desc) = q.err(cmd, args.clone());
        assert_eq!(class, "GenericError", "{cmd} {args}: {desc}");
        assert!(
            desc.contains(must_contain),
            "{cmd} {args}: desc {desc:?} should mention {must_contain:?}"
        );
    }
    // "arguments" that is not an object, and members other than
    // execute/arguments/id, are errors too.
    for msg in [
        json!({"execute": "query-block", "arguments": [1]}),
        json!({"execute": "query-block", "arguments": "x"}),
        json!({"execute": 5}),
        json!({"arguments": {}}),
        json!({"execute": "query-block", "extra": 1}),
    ] {
        q.send_raw(format!("{msg}\n").as_bytes());
        let r = q.reply();
        assert_error(&r, "GenericError");
    }
    // None of these added anything; the daemon is fine.
    assert_eq!(
        q.ok("query-named-block-nodes", json!({}))
            .as_array()
            .unwrap()
            .len(),
        nodes_before
    );
    assert_eq!(list_dir(&d.mnt), vec!["d0".to_string()]);
}

#[test]
fn oversized_message_is_refused_and_the_connection_stays_usable() {
    let dir = TestDir::new("qmp-big");
    let d = daemon(&dir);
    let mut q = d.qmp();
    // Just over 1 MiB in one message.
    let pad = "a".repeat((1 << 20) + 4096);
    let big = json!({"execute": "query-version", "arguments": {"pad": pad}, "id": "big"});
    q.send_raw(format!("{big}\n").as_bytes());
    let r = q.reply();
    assert_error(&r, "GenericError");
    q.send_raw(b"{\"execute\": \"query-version\", \"id\": \"after\"}\n");
    let r = q.reply();
    assert_eq!(r["id"], "after", "{r}");
    assert!(r["return"]["qemu"].is_object(), "{r}");
    // A large message under the limit is parsed normally (the error is
    // about the argument, not about the size).
    let pad = "b".repeat(512 << 10);
    let (class, desc) = q.err("query-version", json!({"pad": pad}));
    assert_eq!(class, "GenericError");
    assert_eq!(desc, "Parameter 'pad' is unexpected");
    // And a big oversized array, deeply nested, too.
    let nested = format!("{}{}\n", "[".repeat(600_000), "]".repeat(600_000));
    q.send_raw(nested.as_bytes());
    let r = q.reply();
    assert_error(&r, "GenericError");
    assert!(q.ok("query-block", json!({})).is_array());
}

#[test]
fn query_commands_lists_the_implemented_commands() {
    let dir = TestDir::new("qmp-cmds");
    let d = daemon(&dir);
    let mut q = d.qmp();
    let list = q.ok("query-commands", json!({}));
    let names: Vec<&str> = list
        .as_array()
        .unwrap_or_else(|| panic!("not a list: {list}"))
        .iter()
        .map(|c| {
            assert_eq!(obj(c).len(), 1, "CommandInfo has only a name: {c}");
            c["name"]
                .as_str()
                .unwrap_or_else(|| panic!("name is not a string: {c}"))
        })
        .collect();
    for want in [
        "qmp_capabilities",
        "query-version",
        "query-commands",
        "quit",
        "blockdev-add",
        "query-block",
        "query-named-block-nodes",
        "query-blockstats",
    ] {
        assert!(
            names.contains(&want),
            "query-commands lacks {want}: {names:?}"
        );
    }
    let mut sorted = names.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), names.len(), "duplicate names: {names:?}");
    // Every listed command exists (none answers CommandNotFound).
    for n in names {
        if n == "quit" || n == "qmp_capabilities" || n == "blockdev-add" {
            continue;
        }
        let r = q.execute(n, json!({}));
        assert_ne!(
            r["error"]["class"], "CommandNotFound",
            "{n} is listed but unknown: {r}"
        );
    }
}

#[test]
fn block_job_commands_are_listed() {
    let dir = TestDir::new("qmp-jobs-listed");
    let d = daemon(&dir);
    let mut q = d.qmp();
    let listed = q.ok("query-commands", json!({}));
    for cmd in [
        "query-block-jobs",
        "block-commit",
        "drive-backup",
        "drive-mirror",
        "block-stream",
        "block-job-set-speed",
        "block-job-cancel",
        "block-job-pause",
        "block-job-resume",
        "block-job-complete",
    ] {
        assert!(
            listed.as_array().unwrap().iter().any(|c| c["name"] == cmd),
            "{cmd} missing from {listed}"
        );
    }
    assert_eq!(q.ok("query-block-jobs", json!({})), json!([]));
}

#[test]
fn many_clients_at_once() {
    let dir = TestDir::new("qmp-many");
    let d = daemon(&dir);
    const CLIENTS: usize = 16;
    const ROUNDS: usize = 25;
    let barrier = Arc::new(Barrier::new(CLIENTS));
    let sock = d.sock.clone();
    // An idle, never-negotiated client and one that left mid-message must not disturb the others.
    let _idle = Qmp::connect(&d.sock);
    {
        let mut gone = Qmp::connect(&d.sock);
        gone.send_raw(b"{\"execute\": \"qmp_capa");
    }
    let results = with_timeout(Duration::from_secs(60), move || {
        let handles: Vec<_> = (0..CLIENTS)
            .map(|c| {
                let (sock, barrier) = (sock.clone(), barrier.clone());
                std::thread::spawn(move || {
                    let mut q = Qmp::connect(&sock);
                    assert!(q.greeting["QMP"].is_object());
                    // Everyone is connected before anyone negotiates.
                    barrier.wait();
                    q.ok("qmp_capabilities", json!({}));
                    for i in 0..ROUNDS {
                        let id = json!({"client": c, "i": i});
                        let cmd = if i % 2 == 0 {
                            "query-block"
                        } else {
                            "query-version"
                        };
                        q.send_raw(format!("{}\n", json!({"execute": cmd, "id": id})).as_bytes());
                        let r = q.reply();
                        assert_eq!(r["id"], id, "client {c} got another reply: {r}");
                        if i % 2 == 0 {
                            assert_eq!(r["return"][0]["device"], "d0", "{r}");
                        } else {
                            assert!(r["return"]["qemu"].is_object(), "{r}");
                        }
                    }
                    c
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("client thread panicked"))
            .collect::<Vec<_>>()
    });
    assert_eq!(results, (0..CLIENTS).collect::<Vec<_>>());
    // The daemon still answers a new client.
    assert!(d.qmp().ok("query-version", json!({})).is_object());
}

#[test]
fn quit_replies_then_the_daemon_exits() {
    let dir = TestDir::new("qmp-quit");
    let mut d = daemon(&dir);
    let mut other = d.qmp();
    let mut q = d.qmp();
    q.send_raw(b"{\"execute\": \"quit\", \"id\": \"bye\"}\n");
    assert_eq!(q.reply(), json!({"return": {}, "id": "bye"}));
    let status = d.wait(Duration::from_secs(20));
    assert!(status.success(), "exit status after quit: {status}");
    // Other clients see the end of the stream.
    let mut n = 0;
    while let Some(m) = other.read_msg() {
        assert!(
            m.get("event").is_some(),
            "unexpected message after quit: {m}"
        );
        n += 1;
        assert!(n < 100, "stream does not end");
    }
    assert!(!d.sock.exists(), "socket file must be removed");
    assert!(!is_mounted(&d.mnt), "mount must be gone");
}
