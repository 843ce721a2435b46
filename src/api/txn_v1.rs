//! `POST /v1/txn`: etcd's transaction. If every compare holds, the `success` steps run,
//! else the `failure` steps; either way atomically, at one revision.
//!
//! | request                                  | does |
//! |------------------------------------------|------|
//! | `POST /v1/txn` body `{"compare":[...],"success":[...],"failure":[...]}` | 200 `{"succeeded","revision","group","responses":[...]}` |
//! | `POST /v1/groups/<g>/txn`                | the same on group g (what `/v1/txn` asks of a node that hosts the keys' group) |
//!
//! A compare is `{"key","op","revision"}` or `{"key","op","value"}` (`op` one of `=`
//! (the default), `!=`, `<`, `>`; revision 0 is an absent key, and a compare on the
//! value of an absent key fails). A step is `{"put":{"key","value","lease"}}`,
//! `{"delete":{"key"}}` or `{"get":{"key"}}`; a get sees the writes before it in its
//! branch. Each step answers in order: `{"put":{}}`, `{"delete":{"deleted"}}`, `{"get":
//! {"key","found","value","revision"}}`.
//!
//! The compares are evaluated where the entry is applied, in log order, so on every
//! member alike: nothing between the check and the writes. Every key a transaction
//! names must belong to one group (409 otherwise, as for `POST /v1/kv`). A transaction
//! that writes is proposed only once every member reads entry format 6
//! (`entry_formats::TXN`; 409 before): an older release would stop at the entry. One
//! that only reads takes no entry: it is evaluated after a read index, as a GET is.

use std::collections::BTreeSet;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde_json::{json, Value};

use super::request::{hex, parse_txn, txn_keys};
use super::{json_response, read_body, Api, Consistency, Failure, Reply};
use crate::command::{Op, Step, Txn, Write, NO_LEASE};
use crate::entry_formats;
use crate::kv::{StepOutcome, TxnOutcome};

impl Api {
    /// `POST /v1/txn`: run by the group that owns every key the transaction names, here
    /// or on a node that hosts it.
    pub(super) async fn txn(&self, req: Request<Incoming>) -> Reply {
        let body = read_body(req, self.max_value_bytes).await?;
        let txn = parse_txn(&body)?;
        self.settle_shards(None).await?;
        let groups: BTreeSet<u64> = txn_keys(&txn).map(|key| self.owner_of(key)).collect();
        if groups.len() > 1 {
            return Err(Failure::new(
                StatusCode::CONFLICT,
                format!(
                    "the keys belong to different groups ({groups:?}); a transaction is \
                     atomic within one group only: split it, or keep related keys under \
                     one group (see /v1/groups/<g>/txn)"
                ),
            ));
        }
        let group = groups
            .into_iter()
            .next()
            .expect("a transaction names a key");
        if self.router.serving(group).is_some() {
            return self.run_txn(group, txn).await;
        }
        self.post_json(group, format!("/v1/groups/{group}/txn"), body)
            .await
    }

    /// `POST /v1/groups/<g>/txn`, on a node that hosts g.
    pub(super) async fn txn_in(&self, group: u64, req: Request<Incoming>) -> Reply {
        let body = read_body(req, self.max_value_bytes).await?;
        let txn = parse_txn(&body)?;
        for key in txn_keys(&txn) {
            self.check_owner(group, key)?;
        }
        self.run_txn(group, txn).await
    }

    async fn run_txn(&self, group: u64, txn: Txn) -> Reply {
        if is_read_only(&txn) {
            return self.read_txn(group, txn).await;
        }
        self.check_every_member_reads_txns()?;
        for step in txn.success.iter().chain(&txn.failure) {
            if let Step::Write(Write::Put { key, lease, .. }) = step {
                if *lease != NO_LEASE {
                    self.check_lease_holds(*lease, group, key)?;
                }
            }
        }
        let written = self
            .router
            .propose_op(group, Op::Txn(txn), self.request_timeout)
            .await?;
        let Some(outcome) = written.txn else {
            return Err(Failure::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the transaction was applied but its outcome was lost; read its keys to see it",
            ));
        };
        Ok(txn_response(*outcome, written.revision, group))
    }

    /// A transaction that only reads (etcd serves these without a log entry too): after
    /// a read index, as a linearizable GET, its compares and reads are evaluated on this
    /// replica's map under one lock, so at one revision. It writes nothing, so any
    /// release's members allow it.
    async fn read_txn(&self, group: u64, txn: Txn) -> Reply {
        self.wait_until_readable(group, Consistency::Linearizable)
            .await?;
        let map = self.map_of(group)?;
        let map = map.read().unwrap();
        Ok(txn_response(map.read_txn(&txn), map.revision(), group))
    }

    fn check_every_member_reads_txns(&self) -> Result<(), Failure> {
        if self.every_member_reads(entry_formats::TXN) {
            return Ok(());
        }
        Err(Failure::new(
            StatusCode::CONFLICT,
            format!(
                "transactions need every member to run a release that reads entry format {} \
                 (retry after a rolling upgrade)",
                entry_formats::TXN
            ),
        ))
    }
}

/// Whether every step of both branches is a read.
fn is_read_only(txn: &Txn) -> bool {
    (txn.success.iter().chain(&txn.failure)).all(|step| matches!(step, Step::Get { .. }))
}

/// The answer to a transaction that took (or, read-only, saw) `revision`.
fn txn_response(outcome: TxnOutcome, revision: u64, group: u64) -> Response<Full<Bytes>> {
    let TxnOutcome { succeeded, steps } = outcome;
    json_response(
        StatusCode::OK,
        &json!({
            "succeeded": succeeded,
            "revision": revision,
            "group": group,
            "responses": steps.into_iter().map(step_json).collect::<Vec<Value>>(),
        }),
    )
}

/// One step's answer. A value that is not UTF-8 comes as `value_hex`: the transaction
/// has been applied by then, so it cannot be refused as a plain GET would be.
fn step_json(step: StepOutcome) -> Value {
    match step {
        StepOutcome::Put => json!({"put": {}}),
        StepOutcome::Deleted(deleted) => json!({"delete": {"deleted": deleted}}),
        StepOutcome::Got { key, found } => {
            let key = String::from_utf8_lossy(&key);
            let Some(found) = found else {
                return json!({"get": {"key": key, "found": false}});
            };
            let mut got = json!({"key": key, "found": true, "revision": found.revision});
            match std::str::from_utf8(&found.value) {
                Ok(text) => got["value"] = text.into(),
                Err(_) => got["value_hex"] = hex(&found.value).into(),
            }
            json!({ "get": got })
        }
    }
}
