//! The rows the alert engine keeps: rules, their state, silences and the webhook outbox.
//!
//! The engine hands the writer an [`AlertWrite`]: row changes and the events that
//! describe them, applied in one transaction, so that an alert's state, its event and
//! its notification are stored together or not at all.

use rusqlite::{params, Connection, Transaction};
use serde::Serialize;

use super::Emission;
use crate::model::Micros;

/// Notifications kept per rule while its webhook is unreachable; past this the oldest
/// are dropped, so a receiver gone for good cannot fill the card.
pub const OUTBOX_PER_RULE: i64 = 1000;

/// One change to the alert tables.
#[derive(Debug, Clone)]
pub enum AlertOp {
    /// Inserts a rule (no `id`) or replaces one; answers its id.
    SaveRule {
        id: Option<i64>,
        name: String,
        origin: &'static str,
        definition: String,
    },
    /// Deletes a rule with its state, silences and undelivered notifications.
    DeleteRule(i64),
    /// Replaces a rule's state.
    SaveState { rule_id: i64, state: String },
    /// Adds a silence; answers its id.
    AddSilence(SilenceRow),
    /// Removes a silence (ended or lifted).
    DeleteSilence(i64),
    /// Queues a webhook notification behind the rule's earlier ones.
    Notify {
        rule_id: i64,
        url: String,
        /// The rule's rate limit, for the courier that delivers it.
        per_minute: u32,
        body: String,
    },
    /// A notification was delivered: it leaves the outbox.
    Delivered(i64),
}

/// Row changes and the events that describe them, committed together.
#[derive(Debug, Clone, Default)]
pub struct AlertWrite {
    pub ops: Vec<AlertOp>,
    pub emissions: Vec<Emission>,
}

/// What an [`AlertWrite`] produced: the ids of inserted rules and silences, in the
/// order of their operations, and the `seq` of each event.
#[derive(Debug, Clone, Default)]
pub struct AlertReceipt {
    pub ids: Vec<i64>,
    pub seqs: Vec<u64>,
}

/// A stored rule: its definition is the rule as JSON.
#[derive(Debug, Clone)]
pub struct RuleRow {
    pub id: i64,
    pub name: String,
    pub origin: String,
    pub definition: String,
    pub created_at: Micros,
    pub updated_at: Micros,
}

/// A silence still running.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SilenceRow {
    pub id: i64,
    pub rule_id: Option<i64>,
    pub sensor_id: Option<i64>,
    pub ends_at: Micros,
    pub created_by: String,
    pub comment: String,
    pub created_at: Micros,
}

/// A notification waiting for delivery.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxRow {
    pub id: i64,
    pub rule_id: i64,
    pub url: String,
    pub per_minute: u32,
    pub body: String,
}

/// Applies `ops` inside the writer's transaction; answers the ids of inserted rows.
pub(super) fn apply(
    tx: &Transaction<'_>,
    now: Micros,
    ops: Vec<AlertOp>,
) -> rusqlite::Result<Vec<i64>> {
    let mut ids = Vec::new();
    for op in ops {
        match op {
            AlertOp::SaveRule {
                id: None,
                name,
                origin,
                definition,
            } => {
                tx.prepare_cached(
                    "INSERT INTO alert_rules (name, origin, definition, created_at, updated_at) \
                     VALUES (?1, ?2, ?3, ?4, ?4)",
                )?
                .execute(params![name, origin, definition, now])?;
                ids.push(tx.last_insert_rowid());
            }
            AlertOp::SaveRule {
                id: Some(id),
                name,
                origin,
                definition,
            } => {
                tx.prepare_cached(
                    "UPDATE alert_rules SET name = ?2, origin = ?3, definition = ?4, updated_at = ?5 \
                     WHERE id = ?1",
                )?
                .execute(params![id, name, origin, definition, now])?;
                ids.push(id);
            }
            AlertOp::DeleteRule(id) => {
                for table in [
                    "DELETE FROM alert_rules WHERE id = ?1",
                    "DELETE FROM alert_state WHERE rule_id = ?1",
                    "DELETE FROM alert_silences WHERE rule_id = ?1",
                    "DELETE FROM alert_outbox WHERE rule_id = ?1",
                ] {
                    tx.prepare_cached(table)?.execute([id])?;
                }
            }
            AlertOp::SaveState { rule_id, state } => {
                tx.prepare_cached(
                    "INSERT INTO alert_state (rule_id, state, updated_at) VALUES (?1, ?2, ?3) \
                     ON CONFLICT (rule_id) DO UPDATE SET state = excluded.state, \
                     updated_at = excluded.updated_at",
                )?
                .execute(params![rule_id, state, now])?;
            }
            AlertOp::AddSilence(s) => {
                tx.prepare_cached(
                    "INSERT INTO alert_silences \
                     (rule_id, sensor_id, ends_at, created_by, comment, created_at) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                )?
                .execute(params![
                    s.rule_id,
                    s.sensor_id,
                    s.ends_at,
                    s.created_by,
                    s.comment,
                    now
                ])?;
                ids.push(tx.last_insert_rowid());
            }
            AlertOp::DeleteSilence(id) => {
                tx.prepare_cached("DELETE FROM alert_silences WHERE id = ?1")?
                    .execute([id])?;
            }
            AlertOp::Notify {
                rule_id,
                url,
                per_minute,
                body,
            } => {
                tx.prepare_cached(
                    "INSERT INTO alert_outbox (rule_id, url, per_minute, body, created_at) \
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                )?
                .execute(params![rule_id, url, per_minute, body, now])?;
                let dropped = tx
                    .prepare_cached(
                        "DELETE FROM alert_outbox WHERE rule_id = ?1 AND id <= \
                         (SELECT id FROM alert_outbox WHERE rule_id = ?1 \
                          ORDER BY id DESC LIMIT 1 OFFSET ?2)",
                    )?
                    .execute(params![rule_id, OUTBOX_PER_RULE])?;
                if dropped > 0 {
                    log::warn!(
                        "alert rule {rule_id}: {dropped} undelivered webhook notifications \
                         dropped, the oldest, to keep {OUTBOX_PER_RULE}"
                    );
                }
            }
            AlertOp::Delivered(id) => {
                tx.prepare_cached("DELETE FROM alert_outbox WHERE id = ?1")?
                    .execute([id])?;
            }
        }
    }
    Ok(ids)
}

/// Every rule, by id.
pub(super) fn rules(conn: &Connection) -> rusqlite::Result<Vec<RuleRow>> {
    let mut statement = conn.prepare_cached(
        "SELECT id, name, origin, definition, created_at, updated_at FROM alert_rules ORDER BY id",
    )?;
    let rows = statement.query_map([], |row| {
        Ok(RuleRow {
            id: row.get(0)?,
            name: row.get(1)?,
            origin: row.get(2)?,
            definition: row.get(3)?,
            created_at: row.get(4)?,
            updated_at: row.get(5)?,
        })
    })?;
    rows.collect()
}

/// The stored state of every rule that has one, as `(rule_id, state)`.
pub(super) fn states(conn: &Connection) -> rusqlite::Result<Vec<(i64, String)>> {
    let mut statement = conn.prepare_cached("SELECT rule_id, state FROM alert_state")?;
    let rows = statement.query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?;
    rows.collect()
}

/// Silences still stored (running, or ended while the daemon was stopped), by id.
pub(super) fn silences(conn: &Connection) -> rusqlite::Result<Vec<SilenceRow>> {
    let mut statement = conn.prepare_cached(
        "SELECT id, rule_id, sensor_id, ends_at, created_by, comment, created_at \
         FROM alert_silences ORDER BY id",
    )?;
    let rows = statement.query_map([], |row| {
        Ok(SilenceRow {
            id: row.get(0)?,
            rule_id: row.get(1)?,
            sensor_id: row.get(2)?,
            ends_at: row.get(3)?,
            created_by: row.get(4)?,
            comment: row.get(5)?,
            created_at: row.get(6)?,
        })
    })?;
    rows.collect()
}

/// The oldest undelivered notification of each rule, in the order they were queued.
pub(super) fn outbox_heads(conn: &Connection) -> rusqlite::Result<Vec<OutboxRow>> {
    let mut statement = conn.prepare_cached(
        "SELECT id, rule_id, url, per_minute, body FROM alert_outbox \
         WHERE id IN (SELECT min(id) FROM alert_outbox GROUP BY rule_id) ORDER BY id",
    )?;
    let rows = statement.query_map([], |row| {
        Ok(OutboxRow {
            id: row.get(0)?,
            rule_id: row.get(1)?,
            url: row.get(2)?,
            per_minute: row.get(3)?,
            body: row.get(4)?,
        })
    })?;
    rows.collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_outbox_keeps_order_per_rule_and_drops_the_oldest_past_its_bound() {
        let mut conn = Connection::open_in_memory().unwrap();
        super::super::migrate(&mut conn).unwrap();
        let tx = conn.transaction().unwrap();
        let notify = |rule_id, n: i64| AlertOp::Notify {
            rule_id,
            url: "http://127.0.0.1:9/".into(),
            per_minute: 6,
            body: n.to_string(),
        };
        let mut ops: Vec<AlertOp> = (0..OUTBOX_PER_RULE + 5).map(|n| notify(1, n)).collect();
        ops.push(notify(2, 0));
        apply(&tx, 0, ops).unwrap();
        tx.commit().unwrap();
        let heads = outbox_heads(&conn).unwrap();
        assert_eq!(heads.len(), 2);
        assert_eq!(heads[0].rule_id, 1);
        assert_eq!(heads[0].body, "5", "the five oldest of rule 1 were dropped");
        assert_eq!(heads[1].body, "0");
        let kept: i64 = conn
            .query_row(
                "SELECT count(*) FROM alert_outbox WHERE rule_id = 1",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(kept, OUTBOX_PER_RULE);
    }
}
