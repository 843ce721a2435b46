//! Keeps the OpenAPI document (`src/api/openapi.json`, served at `GET /v1/openapi.json`)
//! true: every documented operation is called on a real cluster, every answer's status
//! must be documented for its operation, and every JSON answer must match the documented
//! schema. An operation the document lists but no call exercises fails the test too.

mod common;

use std::collections::BTreeSet;

use common::{http, http_json, Cluster};
use serde_json::{json, Value};

const DOCUMENT: &str = include_str!("../src/api/openapi.json");

/// One call: the documented path template and method, the concrete request, and the
/// status this call must get.
struct Call {
    template: &'static str,
    method: &'static str,
    path: String,
    body: Option<Body>,
    expect: u16,
}

enum Body {
    Json(Value),
    Raw(Vec<u8>),
}

fn call(
    template: &'static str,
    method: &'static str,
    path: &str,
    body: Option<Body>,
    expect: u16,
) -> Call {
    Call {
        template,
        method,
        path: path.to_string(),
        body,
        expect,
    }
}

#[test]
fn the_openapi_document_matches_the_server() {
    let doc: Value = serde_json::from_str(DOCUMENT).expect("the document is JSON");
    let cluster = Cluster::start("openapi", 3, &["--max-value-bytes", "1024"]);
    let node = &cluster.nodes[0];

    let (code, served) = http_json("GET", &node.url("v1/openapi.json"), None);
    assert_eq!(
        (code, &served),
        (200, &doc),
        "the server serves the document"
    );

    let spare_peer = format!("http://127.0.0.1:{}", common::free_port());
    let kv = "/v1/kv/{key}";
    let group_kv = "/v1/groups/{group}/kv/{key}";
    let calls = vec![
        call(
            kv,
            "put",
            "/v1/kv/doc/a",
            Some(Body::Raw(b"raw".to_vec())),
            200,
        ),
        call(
            kv,
            "put",
            "/v1/kv/doc/a",
            Some(Body::Json(json!({"value": "json"}))),
            200,
        ),
        call(
            kv,
            "put",
            "/v1/kv/doc/a?if_revision=1",
            Some(Body::Raw(b"x".to_vec())),
            412,
        ),
        call(
            kv,
            "put",
            "/v1/kv/doc/a?if_revision=x",
            Some(Body::Raw(b"x".to_vec())),
            400,
        ),
        call(
            kv,
            "put",
            "/v1/kv/doc/big",
            Some(Body::Raw(vec![b'x'; 2048])),
            413,
        ),
        call(
            kv,
            "put",
            "/v1/kv/doc/bin",
            Some(Body::Raw(vec![0xff, 0xfe])),
            200,
        ),
        call(kv, "get", "/v1/kv/doc/a", None, 200),
        call(
            kv,
            "get",
            "/v1/kv/doc/a?consistency=serializable",
            None,
            200,
        ),
        call(kv, "get", "/v1/kv/doc/a?consistency=eventual", None, 400),
        call(kv, "get", "/v1/kv/doc/missing", None, 404),
        call(kv, "get", "/v1/kv/doc/bin", None, 406),
        call(kv, "delete", "/v1/kv/doc/a?if_revision=1", None, 412),
        call(kv, "delete", "/v1/kv/doc/a", None, 200),
        call(
            "/v1/kv",
            "post",
            "/v1/kv",
            Some(Body::Json(json!({"doc/x": "1", "doc/y": "2"}))),
            200,
        ),
        call("/v1/kv", "post", "/v1/kv", Some(Body::Json(json!({}))), 400),
        call("/v1/kv", "get", "/v1/kv?prefix=doc%2Fx&limit=5", None, 200),
        call("/v1/kv", "get", "/v1/kv?prefix=doc%2F", None, 406),
        call("/v1/kv", "get", "/v1/kv?limit=0", None, 400),
        call("/v1/kv", "delete", "/v1/kv?prefix=doc%2Fy", None, 200),
        call("/v1/kv", "delete", "/v1/kv", None, 400),
        call(
            "/v1/txn",
            "post",
            "/v1/txn",
            Some(Body::Json(json!({
                "compare": [{"key": "doc/x", "op": "=", "value": "1"}],
                "success": [{"put": {"key": "doc/t", "value": "t"}}, {"get": {"key": "doc/bin"}}],
                "failure": [{"delete": {"key": "doc/t"}}],
            }))),
            200,
        ),
        call(
            "/v1/txn",
            "post",
            "/v1/txn",
            Some(Body::Json(json!({"success": []}))),
            400,
        ),
        call(
            "/v1/txn",
            "post",
            "/v1/txn",
            Some(Body::Json(
                json!({"success": [{"put": {"key": "doc/l", "value": "v", "lease": (1u64 << 32) | 99}}]}),
            )),
            404,
        ),
        call("/v1/members", "get", "/v1/members", None, 200),
        call(
            "/v1/members",
            "post",
            "/v1/members",
            Some(Body::Json(json!({"id": 4, "peer_url": spare_peer}))),
            201,
        ),
        call(
            "/v1/members",
            "post",
            "/v1/members",
            Some(Body::Json(json!({"id": 4, "peer_url": spare_peer}))),
            409,
        ),
        call(
            "/v1/members",
            "post",
            "/v1/members",
            Some(Body::Json(json!({"id": 0}))),
            400,
        ),
        call("/v1/members/{id}", "delete", "/v1/members/4", None, 200),
        call("/v1/members/{id}", "delete", "/v1/members/4", None, 409),
        call("/v1/members/{id}", "delete", "/v1/members/zero", None, 400),
        call("/v1/openapi.json", "get", "/v1/openapi.json", None, 200),
        call(
            "/v1/groups",
            "post",
            "/v1/groups",
            Some(Body::Json(json!({"id": 2, "members": [2, 3]}))),
            201,
        ),
        call(
            "/v1/groups",
            "post",
            "/v1/groups",
            Some(Body::Json(json!({"id": 2, "members": [1]}))),
            409,
        ),
        call(
            "/v1/groups",
            "post",
            "/v1/groups",
            Some(Body::Json(json!({"id": 3, "members": [7]}))),
            400,
        ),
        call("/v1/groups", "get", "/v1/groups", None, 200),
        call("/v1/groups/{group}", "get", "/v1/groups/2", None, 200),
        call("/v1/groups/{group}", "get", "/v1/groups/9", None, 404),
        call("/v1/groups/{group}", "get", "/v1/groups/x", None, 400),
        // Node 1 does not host group 2: these are forwarded.
        call(
            group_kv,
            "put",
            "/v1/groups/2/kv/doc/g",
            Some(Body::Raw(b"v".to_vec())),
            200,
        ),
        call(
            group_kv,
            "put",
            "/v1/groups/2/kv/doc/g?if_revision=99",
            Some(Body::Raw(b"v".to_vec())),
            412,
        ),
        call(
            group_kv,
            "put",
            "/v1/groups/2/kv/doc/big",
            Some(Body::Raw(vec![b'x'; 2048])),
            413,
        ),
        call(group_kv, "get", "/v1/groups/2/kv/doc/g", None, 200),
        call(
            group_kv,
            "get",
            "/v1/groups/2/kv/doc/g?consistency=eventual",
            None,
            400,
        ),
        call(group_kv, "get", "/v1/groups/2/kv/doc/missing", None, 404),
        call(
            group_kv,
            "put",
            "/v1/groups/2/kv/doc/bin",
            Some(Body::Raw(vec![0xff])),
            200,
        ),
        call(group_kv, "get", "/v1/groups/2/kv/doc/bin", None, 406),
        call(
            group_kv,
            "delete",
            "/v1/groups/2/kv/doc/g?if_revision=99",
            None,
            412,
        ),
        call(group_kv, "delete", "/v1/groups/2/kv/doc/g", None, 200),
        call(
            group_kv,
            "delete",
            "/v1/groups/2/kv/doc/g?if_revision=x",
            None,
            400,
        ),
        call(
            "/v1/groups/{group}/leader",
            "post",
            "/v1/groups/2/leader",
            Some(Body::Json(json!({"id": 2}))),
            200,
        ),
        call(
            "/v1/groups/{group}/leader",
            "post",
            "/v1/groups/2/leader",
            Some(Body::Json(json!({"id": 9}))),
            400,
        ),
        call(
            "/v1/groups/{group}/leader",
            "post",
            "/v1/groups/9/leader",
            Some(Body::Json(json!({"id": 1}))),
            404,
        ),
        call(
            "/v1/groups/{group}/members",
            "post",
            "/v1/groups/2/members",
            Some(Body::Json(json!({"id": 1}))),
            201,
        ),
        call(
            "/v1/groups/{group}/members",
            "post",
            "/v1/groups/2/members",
            Some(Body::Json(json!({"id": 1}))),
            409,
        ),
        call(
            "/v1/groups/{group}/members",
            "post",
            "/v1/groups/2/members",
            Some(Body::Json(json!({"id": 8}))),
            400,
        ),
        call(
            "/v1/groups/{group}/members",
            "post",
            "/v1/groups/9/members",
            Some(Body::Json(json!({"id": 1}))),
            404,
        ),
        call(
            "/v1/groups/{group}/members",
            "post",
            "/v1/groups/1/members",
            Some(Body::Json(json!({"id": 1}))),
            409,
        ),
        call(
            "/v1/groups/{group}/members/{id}",
            "delete",
            "/v1/groups/2/members/1",
            None,
            200,
        ),
        call(
            "/v1/groups/{group}/members/{id}",
            "delete",
            "/v1/groups/2/members/1",
            None,
            409,
        ),
        call(
            "/v1/groups/{group}/members/{id}",
            "delete",
            "/v1/groups/2/members/x",
            None,
            400,
        ),
        call(
            "/v1/groups/{group}/members/{id}",
            "delete",
            "/v1/groups/9/members/1",
            None,
            404,
        ),
        call(
            "/v1/groups/{group}/kv",
            "post",
            "/v1/groups/2/kv",
            Some(Body::Json(json!({"doc/m1": "1", "doc/m2": "2"}))),
            200,
        ),
        call(
            "/v1/groups/{group}/kv",
            "post",
            "/v1/groups/2/kv",
            Some(Body::Json(json!({}))),
            400,
        ),
        call(
            "/v1/groups/{group}/kv",
            "post",
            "/v1/groups/9/kv",
            Some(Body::Json(json!({"a": "1"}))),
            404,
        ),
        call(
            "/v1/groups/{group}/kv",
            "get",
            "/v1/groups/2/kv?prefix=doc%2Fm&limit=5",
            None,
            200,
        ),
        call(
            "/v1/groups/{group}/kv",
            "get",
            "/v1/groups/2/kv?limit=0",
            None,
            400,
        ),
        call("/v1/groups/{group}/kv", "get", "/v1/groups/9/kv", None, 404),
        call(
            "/v1/groups/{group}/kv",
            "delete",
            "/v1/groups/2/kv?prefix=doc%2Fm2",
            None,
            200,
        ),
        call(
            "/v1/groups/{group}/kv",
            "delete",
            "/v1/groups/2/kv",
            None,
            400,
        ),
        call(
            "/v1/groups/{group}/kv",
            "delete",
            "/v1/groups/9/kv?prefix=a",
            None,
            404,
        ),
        call("/v1/groups/{group}/kv", "get", "/v1/groups/2/kv", None, 406),
        call(
            "/v1/groups/{group}/txn",
            "post",
            "/v1/groups/2/txn",
            Some(Body::Json(json!({
                "compare": [{"key": "doc/m", "revision": 0}],
                "failure": [{"get": {"key": "doc/m"}}, {"delete": {"key": "doc/gone"}}],
            }))),
            200,
        ),
        call(
            "/v1/groups/{group}/txn",
            "post",
            "/v1/groups/9/txn",
            Some(Body::Json(json!({"success": [{"get": {"key": "a"}}]}))),
            404,
        ),
        call(group_kv, "get", "/v1/groups/9/kv/doc/g", None, 404),
        call(
            group_kv,
            "put",
            "/v1/groups/9/kv/doc/g",
            Some(Body::Raw(b"v".to_vec())),
            404,
        ),
        call(group_kv, "delete", "/v1/groups/9/kv/doc/g", None, 404),
    ];

    let mut exercised = BTreeSet::new();
    for c in &calls {
        check(&doc, &cluster, c, &mut exercised);
    }

    // Leases: their ids are the server's, so these calls follow a grant.
    let grant = call(
        "/v1/leases",
        "post",
        "/v1/leases",
        Some(Body::Json(json!({"ttl_seconds": 60, "key": "doc/leased"}))),
        201,
    );
    let granted: Value = serde_json::from_str(&check(&doc, &cluster, &grant, &mut exercised))
        .expect("the grant's answer");
    let lease = granted["id"].as_u64().unwrap();
    let leases = "/v1/leases/{id}";
    let keepalive = "/v1/leases/{id}/keepalive";
    let missing = lease + 1;
    let lease_calls = vec![
        call(
            "/v1/leases",
            "post",
            "/v1/leases",
            Some(Body::Json(json!({"ttl_seconds": 0}))),
            400,
        ),
        call(
            kv,
            "put",
            &format!("/v1/kv/doc/leased?lease={lease}"),
            Some(Body::Raw(b"held".to_vec())),
            200,
        ),
        call(
            "/v1/kv",
            "post",
            &format!("/v1/kv?lease={lease}"),
            Some(Body::Json(json!({"doc/leased": "held too"}))),
            200,
        ),
        call(
            "/v1/kv",
            "post",
            &format!("/v1/kv?lease={missing}"),
            Some(Body::Json(json!({"doc/leased": "held too"}))),
            404,
        ),
        call(
            kv,
            "put",
            &format!("/v1/kv/doc/leased?lease={missing}"),
            Some(Body::Raw(b"held".to_vec())),
            404,
        ),
        call(
            kv,
            "put",
            &format!("/v1/kv/doc/leased?lease={}", 9u64 << 32 | 1),
            Some(Body::Raw(b"held".to_vec())),
            409,
        ),
        call(
            group_kv,
            "put",
            &format!("/v1/groups/2/kv/doc/g?lease={}", 9u64 << 32 | 1),
            Some(Body::Raw(b"held".to_vec())),
            409,
        ),
        call(leases, "get", &format!("/v1/leases/{lease}"), None, 200),
        call("/v1/leases", "get", "/v1/leases", None, 200),
        call("/v1/leases", "get", "/v1/leases?group=2", None, 200),
        call("/v1/leases", "get", "/v1/leases?group=x", None, 400),
        call(leases, "get", &format!("/v1/leases/{missing}"), None, 404),
        call(leases, "get", "/v1/leases/x", None, 400),
        call(
            keepalive,
            "post",
            &format!("/v1/leases/{lease}/keepalive"),
            None,
            200,
        ),
        call(
            keepalive,
            "post",
            &format!("/v1/leases/{missing}/keepalive"),
            None,
            404,
        ),
        call(keepalive, "post", "/v1/leases/x/keepalive", None, 400),
        call(leases, "delete", &format!("/v1/leases/{lease}"), None, 200),
        call(leases, "delete", &format!("/v1/leases/{lease}"), None, 404),
        call(leases, "delete", "/v1/leases/x", None, 400),
    ];
    for c in &lease_calls {
        check(&doc, &cluster, c, &mut exercised);
    }

    // Backups are bytes: the calls that send one fetch it first.
    let bytes_of = |path: &str| {
        let answer = reqwest::blocking::get(node.url(path)).unwrap();
        assert_eq!(answer.status().as_u16(), 200, "GET {path}");
        Body::Raw(answer.bytes().unwrap().to_vec())
    };
    let whole = || Some(bytes_of("v1/backup"));
    let group_two = || Some(bytes_of("v1/groups/2/backup"));
    let not_a_backup = || Some(Body::Raw(b"RKVDBACK but not one".to_vec()));
    let group_backup = "/v1/groups/{group}/backup";
    let group_restore = "/v1/groups/{group}/restore";
    let backup_calls = vec![
        call("/v1/backup", "get", "/v1/backup", None, 200),
        call(group_backup, "get", "/v1/groups/2/backup", None, 200),
        call(group_backup, "get", "/v1/groups/9/backup", None, 404),
        call(group_backup, "get", "/v1/groups/x/backup", None, 400),
        call("/v1/restore", "post", "/v1/restore", not_a_backup(), 400),
        call("/v1/restore", "post", "/v1/restore", whole(), 409),
        call("/v1/restore", "post", "/v1/restore?merge=yes", whole(), 400),
        call(
            "/v1/restore",
            "post",
            "/v1/restore?merge=true",
            whole(),
            200,
        ),
        call(
            group_restore,
            "post",
            "/v1/groups/2/restore",
            group_two(),
            200,
        ),
        call(
            group_restore,
            "post",
            "/v1/groups/2/restore",
            not_a_backup(),
            400,
        ),
        call(
            group_restore,
            "post",
            "/v1/groups/1/restore",
            group_two(),
            400,
        ),
        call(
            group_restore,
            "post",
            "/v1/groups/9/restore",
            group_two(),
            404,
        ),
    ];
    for c in &backup_calls {
        check(&doc, &cluster, c, &mut exercised);
    }

    let documented: BTreeSet<(String, String)> = doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, item)| {
            item.as_object()
                .unwrap()
                .keys()
                .filter(|m| *m != "parameters")
                .map(move |m| (path.clone(), m.clone()))
        })
        .collect();
    assert_eq!(
        documented, exercised,
        "every documented operation is exercised"
    );
}

/// Makes call `c` on node 1 and checks its status and answer against the document;
/// records its operation in `exercised` and returns the answer's body.
fn check(
    doc: &Value,
    cluster: &Cluster,
    c: &Call,
    exercised: &mut BTreeSet<(String, String)>,
) -> String {
    let node = &cluster.nodes[0];
    let operation = &doc["paths"][c.template][c.method];
    assert!(
        operation.is_object(),
        "{} {} is not documented",
        c.method,
        c.template
    );
    exercised.insert((c.template.to_string(), c.method.to_string()));
    let (code, body) = send(&node.url(&c.path), c.method, c.body.as_ref());
    assert_eq!(code, c.expect, "{} {}: {body}", c.method, c.path);
    if (c.template, c.method, code) == ("/v1/groups", "post", 201) {
        cluster.wait_until("the new group to elect a leader", || {
            let (_, group) = http_json("GET", &node.url("v1/groups/2"), None);
            group["leader"].as_u64().is_some_and(|leader| leader != 0)
        });
    }
    let response = resolve(doc, &operation["responses"][code.to_string()]);
    assert!(
        response.is_object(),
        "{} {} answered {code}, which the document does not list",
        c.method,
        c.template
    );
    if let Some(schema) = response.pointer("/content/application~1json/schema") {
        let body: Value = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("{} {}: not JSON ({e}): {body}", c.method, c.path));
        if let Err(why) = validate(doc, schema, &body) {
            panic!("{} {} -> {code}: {why}\nbody: {body}", c.method, c.path);
        }
    }
    body
}

fn send(url: &str, method: &str, body: Option<&Body>) -> (u16, String) {
    let method = method.to_uppercase();
    match body {
        Some(Body::Json(value)) => {
            let client = reqwest::blocking::Client::new();
            let resp = client
                .request(method.parse().unwrap(), url)
                .header("content-type", "application/json")
                .body(value.to_string())
                .send()
                .unwrap();
            let code = resp.status().as_u16();
            (code, resp.text().unwrap())
        }
        Some(Body::Raw(bytes)) => http(&method, url, Some(bytes.clone())),
        None => http(&method, url, None),
    }
}

/// Follows a `$ref` within the document.
fn resolve<'a>(doc: &'a Value, node: &'a Value) -> &'a Value {
    match node.get("$ref").and_then(Value::as_str) {
        Some(reference) => {
            let target = doc
                .pointer(reference.trim_start_matches('#'))
                .unwrap_or_else(|| panic!("dangling $ref {reference}"));
            resolve(doc, target)
        }
        None => node,
    }
}

/// Checks `value` against the subset of JSON Schema the document uses.
fn validate(doc: &Value, schema: &Value, value: &Value) -> Result<(), String> {
    let schema = resolve(doc, schema);
    let kind = schema.get("type").and_then(Value::as_str);
    if value.is_null() && schema.get("nullable") == Some(&Value::Bool(true)) {
        return Ok(());
    }
    let type_ok = match kind {
        Some("object") => value.is_object(),
        Some("array") => value.is_array(),
        Some("string") => value.is_string(),
        Some("integer") => value.is_u64() || value.is_i64(),
        Some("boolean") => value.is_boolean(),
        Some(other) => return Err(format!("the test does not know type {other}")),
        None => true,
    };
    if !type_ok {
        return Err(format!("{value} is not of type {}", kind.unwrap()));
    }
    if let (Some(min), Some(n)) = (
        schema.get("minimum").and_then(Value::as_i64),
        value.as_i64(),
    ) {
        if n < min {
            return Err(format!("{n} is below the minimum {min}"));
        }
    }
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array) {
        if !allowed.contains(value) {
            return Err(format!("{value} is not one of {allowed:?}"));
        }
    }
    if let Some(object) = value.as_object() {
        for name in schema["required"].as_array().into_iter().flatten() {
            if !object.contains_key(name.as_str().unwrap()) {
                return Err(format!("missing required property {name}"));
            }
        }
        for (name, field) in object {
            match schema["properties"].get(name) {
                Some(field_schema) => {
                    validate(doc, field_schema, field).map_err(|e| format!("{name}: {e}"))?
                }
                None => match schema.get("additionalProperties") {
                    Some(Value::Bool(false)) => {
                        return Err(format!("undocumented property {name}"))
                    }
                    Some(extra @ Value::Object(_)) => validate(doc, extra, field)?,
                    _ => {}
                },
            }
        }
    }
    if let (Some(items), Some(array)) = (schema.get("items"), value.as_array()) {
        for (i, item) in array.iter().enumerate() {
            validate(doc, items, item).map_err(|e| format!("[{i}]: {e}"))?;
        }
    }
    Ok(())
}

#[test]
fn the_validator_rejects_what_the_document_forbids() {
    let doc: Value = serde_json::from_str(DOCUMENT).unwrap();
    let kv = json!({"$ref": "#/components/schemas/KeyValue"});
    assert!(validate(
        &doc,
        &kv,
        &json!({"key": "k", "value": "v", "revision": 3, "group": 1})
    )
    .is_ok());
    for bad in [
        json!({"key": "k", "value": "v", "revision": 3}),
        json!({"key": "k", "value": 1, "revision": 3, "group": 1}),
        json!({"key": "k", "value": "v", "revision": 0, "group": 1}),
        json!({"key": "k", "value": "v", "revision": 3, "group": 1, "extra": true}),
        json!([]),
    ] {
        assert!(validate(&doc, &kv, &bad).is_err(), "{bad}");
    }
}
