//! The parts of a client request, parsed: the error every handler answers with
//! ([`Failure`]), the query string, path segments, group ids and JSON bodies. Pure
//! functions of their input: they never touch raft state, never panic on any input (the
//! `api_request` fuzz target holds them to it), and refuse what they cannot read with a
//! 400 and a message saying why.

use std::collections::{BTreeMap, HashMap};

use bytes::Bytes;
use hyper::{Method, StatusCode};

use crate::command::{Compare, Order, Step, Target, Txn, Write};
use crate::membership::parse_node_id;

/// A request that failed: the status and the message the client sees, and for a failed
/// revision check the key's current revision.
pub struct Failure {
    pub status: StatusCode,
    pub message: String,
    pub revision: Option<u64>,
    /// For 405: the methods the route does accept.
    pub allow: Option<&'static str>,
    /// A forwarded request reached a node that does not host (or know) its group: the
    /// forwarder tries another node (see `forward.rs`).
    pub not_hosted: bool,
}

impl Failure {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Failure {
        Failure {
            status,
            message: message.into(),
            revision: None,
            allow: None,
            not_hosted: false,
        }
    }

    /// The answer to a forwarded request for `group`, which this node does not host.
    pub fn not_hosted_here(group: u64) -> Failure {
        Failure {
            not_hosted: true,
            ..Failure::new(
                StatusCode::MISDIRECTED_REQUEST,
                format!("raft group {group} is not hosted on this node (or not known to it yet)"),
            )
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Failure {
        Failure::new(StatusCode::BAD_REQUEST, message)
    }

    pub fn method_not_allowed(method: &Method, allow: &'static str) -> Failure {
        Failure {
            allow: Some(allow),
            ..Failure::new(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("method {method} is not allowed here; use {allow}"),
            )
        }
    }
}

/// A long poll's (`?wait=true`, `watch_v1.rs`) default and longest wait.
pub const WAIT_DEFAULT: std::time::Duration = std::time::Duration::from_secs(60);
pub const WAIT_LONGEST: std::time::Duration = std::time::Duration::from_secs(600);

/// The query string's parameters, percent-decoded. Any name not in `known` is refused, so
/// that a misspelt condition is never silently ignored.
pub fn parse_query(
    query: Option<&str>,
    known: &[&str],
) -> Result<HashMap<String, String>, Failure> {
    let mut params = HashMap::new();
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let name = percent_decode(name)?;
        if !known.contains(&name.as_str()) {
            return Err(Failure::bad_request(format!(
                "unknown query parameter {name:?}; this route takes: {}",
                known.join(", ")
            )));
        }
        params.insert(name, percent_decode(value)?);
    }
    Ok(params)
}

/// Every value of parameter `name` in the query string, percent-decoded, in order (for
/// the parameters a route takes more than once; `parse_query` keeps the last).
pub fn repeated_param(query: Option<&str>, name: &str) -> Result<Vec<String>, Failure> {
    let mut values = Vec::new();
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if percent_decode(key)? == name {
            values.push(percent_decode(value)?);
        }
    }
    Ok(values)
}

/// Reads an unsigned integer query parameter.
pub fn number_param(params: &HashMap<String, String>, name: &str) -> Result<Option<u64>, Failure> {
    params
        .get(name)
        .map(|text| {
            text.parse::<u64>().map_err(|_| {
                Failure::bad_request(format!("{name}={text:?} is not a non-negative integer"))
            })
        })
        .transpose()
}

pub fn percent_decode(text: &str) -> Result<String, Failure> {
    let plus_as_space = text.replace('+', " ");
    percent_encoding::percent_decode_str(&plus_as_space)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| Failure::bad_request(format!("{text:?} is not UTF-8 once percent-decoded")))
}

/// A key from a `/v1/kv/<key>` path: percent-decoded, UTF-8, not empty.
pub fn decode_path_segment(raw: &str) -> Result<Bytes, Failure> {
    if raw.is_empty() {
        return Err(Failure::bad_request("missing key: use /v1/kv/<key>"));
    }
    let key = percent_encoding::percent_decode_str(raw)
        .decode_utf8()
        .map_err(|_| {
            Failure::bad_request(format!("key {raw:?} is not UTF-8 once percent-decoded"))
        })?;
    Ok(Bytes::from(key.into_owned()))
}

/// For a path (without its leading slash) under `/v1`, the rest after `v1` (empty or
/// starting with `/`); `None` for raftexample's and the admin routes.
pub fn v1_rest(target: &str) -> Option<&str> {
    target
        .strip_prefix("v1")
        .filter(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// Bytes as two lowercase hex digits each (a value JSON cannot carry as text).
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses a JSON body into `T`, with serde's explanation on failure.
pub fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, Failure> {
    serde_json::from_slice(body)
        .map_err(|e| Failure::bad_request(format!("invalid JSON body: {e}")))
}

/// The longest key a JSON body may name (a key in a path is shorter still: hyper refuses
/// a longer request line), and a backup may hold, so that every key written can be
/// restored.
pub const MAX_KEY_BYTES: usize = 64 << 10;

/// The body of a multi-key set: `{"key": "value", ...}`, one key at least, none empty
/// or over [`MAX_KEY_BYTES`].
pub fn parse_pairs(body: &[u8]) -> Result<BTreeMap<String, String>, Failure> {
    let pairs: BTreeMap<String, String> = parse_json(body)?;
    if pairs.is_empty() {
        return Err(Failure::bad_request(
            "the body names no keys: send {\"key\": \"value\", ...}",
        ));
    }
    for key in pairs.keys() {
        check_key(key)?;
    }
    Ok(pairs)
}

/// Refuses an empty key (400) and one over [`MAX_KEY_BYTES`] (413).
fn check_key(key: &str) -> Result<(), Failure> {
    if key.is_empty() {
        return Err(Failure::bad_request("a key must not be empty"));
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(Failure::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "a key of {} bytes is longer than the {MAX_KEY_BYTES} bytes allowed",
                key.len()
            ),
        ));
    }
    Ok(())
}

/// The most compares and steps one transaction may hold, all branches together (etcd's
/// `--max-txn-ops` default).
pub const MAX_TXN_ITEMS: usize = 128;

/// The body of `POST /v1/txn`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TxnBody {
    #[serde(default)]
    compare: Vec<CompareBody>,
    #[serde(default)]
    success: Vec<StepBody>,
    #[serde(default)]
    failure: Vec<StepBody>,
}

/// `{"key", "op", "revision"}` or `{"key", "op", "value"}`; `op` is `=` unless given.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct CompareBody {
    key: String,
    #[serde(default)]
    op: OrderBody,
    revision: Option<u64>,
    value: Option<String>,
}

#[derive(serde::Deserialize, Default)]
enum OrderBody {
    #[default]
    #[serde(rename = "=")]
    Equal,
    #[serde(rename = "!=")]
    NotEqual,
    #[serde(rename = "<")]
    Less,
    #[serde(rename = ">")]
    Greater,
}

/// `{"put": {"key", "value", "lease"}}`, `{"delete": {"key"}}` or `{"get": {"key"}}`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
enum StepBody {
    Put {
        key: String,
        value: String,
        #[serde(default)]
        lease: u64,
    },
    Delete {
        key: String,
    },
    Get {
        key: String,
    },
}

/// The body of a transaction: at least one step, at most [`MAX_TXN_ITEMS`] compares and
/// steps, no key empty or over [`MAX_KEY_BYTES`], each compare on a revision or a value (not both), and no key
/// written twice in one branch (which would leave one of the writes unseen).
pub fn parse_txn(body: &[u8]) -> Result<Txn, Failure> {
    let body: TxnBody = parse_json(body)?;
    let items = body.compare.len() + body.success.len() + body.failure.len();
    if items > MAX_TXN_ITEMS {
        return Err(Failure::bad_request(format!(
            "the transaction holds {items} compares and steps; at most {MAX_TXN_ITEMS} are allowed"
        )));
    }
    if body.success.is_empty() && body.failure.is_empty() {
        return Err(Failure::bad_request(
            "the transaction has no steps: give \"success\" or \"failure\" a put, delete or get",
        ));
    }
    let compares = body
        .compare
        .into_iter()
        .map(|c| {
            let target = match (c.revision, c.value) {
                (Some(revision), None) => Target::Revision(revision),
                (None, Some(value)) => Target::Value(value.into()),
                _ => {
                    return Err(Failure::bad_request(format!(
                        "the compare of key {:?} needs exactly one of \"revision\" and \"value\"",
                        c.key
                    )))
                }
            };
            let order = match c.op {
                OrderBody::Equal => Order::Equal,
                OrderBody::NotEqual => Order::NotEqual,
                OrderBody::Less => Order::Less,
                OrderBody::Greater => Order::Greater,
            };
            Ok(Compare {
                key: txn_key(c.key)?,
                order,
                target,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Txn {
        compares,
        success: txn_branch(body.success, "success")?,
        failure: txn_branch(body.failure, "failure")?,
    })
}

fn txn_branch(steps: Vec<StepBody>, name: &str) -> Result<Vec<Step>, Failure> {
    let mut written = std::collections::HashSet::new();
    let mut branch = Vec::with_capacity(steps.len());
    for step in steps {
        let step = match step {
            StepBody::Get { key } => Step::Get { key: txn_key(key)? },
            StepBody::Delete { key } => Step::Write(Write::Delete { key: txn_key(key)? }),
            StepBody::Put { key, value, lease } => Step::Write(Write::Put {
                key: txn_key(key)?,
                value: value.into(),
                lease,
            }),
        };
        if let Step::Write(Write::Put { key, .. } | Write::Delete { key }) = &step {
            if !written.insert(key.clone()) {
                return Err(Failure::bad_request(format!(
                    "the {name} branch writes key {:?} twice",
                    String::from_utf8_lossy(key)
                )));
            }
        }
        branch.push(step);
    }
    Ok(branch)
}

fn txn_key(key: String) -> Result<Bytes, Failure> {
    check_key(&key)?;
    Ok(key.into())
}

/// Every key a transaction names, in its compares and both branches.
pub fn txn_keys(txn: &Txn) -> impl Iterator<Item = &Bytes> {
    let compared = txn.compares.iter().map(|c| &c.key);
    let stepped = txn
        .success
        .iter()
        .chain(&txn.failure)
        .map(|step| match step {
            Step::Get { key } => key,
            Step::Write(Write::Put { key, .. } | Write::Delete { key }) => key,
            Step::Write(Write::DeletePrefix { prefix }) => prefix,
        });
    compared.chain(stepped)
}

/// A group id from a path: a positive integer.
pub fn parse_group_id(text: &str) -> Result<u64, Failure> {
    parse_node_id(text)
        .map_err(|_| Failure::bad_request(format!("group id {text:?} is not a positive integer")))
}

/// The fuzzers' oracle (`fuzz/fuzz_targets/api_request.rs`, and the corpus replay in the
/// tests): the first byte splits the input into a query string, a path and a body; no
/// parser panics on them, and what they accept holds what they promise.
#[cfg(any(test, fuzzing))]
pub fn check_parsing(data: &[u8]) {
    let Some((&cut, rest)) = data.split_first() else {
        return;
    };
    let cut = (cut as usize).min(rest.len());
    let (head, body) = rest.split_at(cut);
    let head = String::from_utf8_lossy(head);
    let (query, path) = head.split_once('#').unwrap_or((&head, ""));
    const KNOWN: [&str; 3] = ["prefix", "limit", "revision"];
    if let Ok(params) = parse_query(Some(query), &KNOWN) {
        assert!(params.keys().all(|name| KNOWN.contains(&name.as_str())));
        let _ = number_param(&params, "limit");
    }
    if let Ok(key) = decode_path_segment(path) {
        assert!(!key.is_empty(), "an empty key was accepted");
    }
    let _ = percent_decode(path);
    let _ = v1_rest(path);
    if let Ok(group) = parse_group_id(path) {
        assert!(group > 0, "group 0 was accepted");
    }
    if let Ok(pairs) = parse_pairs(body) {
        assert!(!pairs.is_empty() && !pairs.contains_key(""));
        assert!(pairs.keys().all(|key| key.len() <= MAX_KEY_BYTES));
    }
    if let Ok(txn) = parse_txn(body) {
        let items = txn.compares.len() + txn.success.len() + txn.failure.len();
        assert!(items <= MAX_TXN_ITEMS && txn.success.len() + txn.failure.len() > 0);
        assert!(
            txn_keys(&txn).all(|key| !key.is_empty()),
            "an empty key was accepted"
        );
        for branch in [&txn.success, &txn.failure] {
            let written: Vec<_> = branch
                .iter()
                .filter_map(|step| match step {
                    Step::Write(Write::Put { key, .. } | Write::Delete { key }) => Some(key),
                    _ => None,
                })
                .collect();
            let distinct: std::collections::HashSet<_> = written.iter().collect();
            assert_eq!(
                distinct.len(),
                written.len(),
                "a key written twice was accepted"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every input the fuzzer kept (`fuzz/corpus/api_request`) still passes its oracle.
    #[test]
    fn replays_the_fuzz_corpus() {
        crate::fuzz_corpus::replay("api_request", check_parsing);
    }
}
