//! Alerts on the gateway itself: rules over a sensor's readings, their state, operators'
//! acknowledgements and silences, and webhook notifications.
//!
//! One task, the [`Watcher`], owns every rule and its state. It follows the hub like any
//! subscriber (readings, sensor names, sensors going offline and online), looks at the
//! clock once a second (for `for_s`, `no_reading`, silences that end and repeated
//! notifications), and answers the REST handlers through [`Alerts`]. Every change it
//! makes goes through the store writer as one [`AlertWrite`]: the rule's new state, the
//! `system_event` on `general` that tells clients (`alert_firing`, `alert_resolved`,
//! `alert_acknowledged`, `silence_created`, `silence_ended`) and the webhook notification
//! are committed together. The [`webhook`] courier delivers what was queued.
//!
//! Pending is kept in the stored state but announces nothing: a value that hovers at a
//! threshold would otherwise put an event on `general` at every sample.

mod configured;
mod engine;
mod rules;
mod webhook;

pub use configured::ConfiguredRules;
pub use engine::{Ack, AlertState, Phase};
pub use rules::{ConditionKind, RuleSpec};

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Map, Value};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::task::JoinHandle;

use crate::events::{Body, Channel, Event, Hub};
use crate::model::{
    forbidden_char, forbidden_char_message, format_time, now_micros, FieldError, Micros, MAX_TEXT,
};
use crate::shutdown::Shutdown;
use crate::store::alerts::{AlertOp, AlertWrite, SilenceRow};
use crate::store::{Emission, EmissionKind, Store, StoreError};
use engine::{Change, Outcome, Tracker};

/// How often the clock is looked at.
const TICK: Duration = Duration::from_secs(1);

/// Longest silence: thirty days.
const MAX_SILENCE_S: f64 = 30.0 * 24.0 * 3600.0;

/// Requests from the API waiting for the watcher.
const REQUESTS: usize = 64;

/// Why an alert request was refused.
#[derive(Debug)]
pub enum AlertError {
    /// No rule or silence with this id.
    NotFound(String),
    /// The fields named are wrong.
    Invalid(Vec<FieldError>),
    /// The request contradicts the current state (a name in use, a rule of the config
    /// file, an alert that is not firing).
    Conflict(String),
    Store(StoreError),
    /// The daemon is shutting down.
    Stopped,
}

impl fmt::Display for AlertError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AlertError::NotFound(what) | AlertError::Conflict(what) => f.write_str(what),
            AlertError::Invalid(errors) => {
                let fields: Vec<_> = errors.iter().map(|e| e.field.as_str()).collect();
                write!(f, "invalid fields: {}", fields.join(", "))
            }
            AlertError::Store(e) => e.fmt(f),
            AlertError::Stopped => f.write_str("alerts are shutting down"),
        }
    }
}

impl std::error::Error for AlertError {}

impl From<StoreError> for AlertError {
    fn from(e: StoreError) -> Self {
        AlertError::Store(e)
    }
}

type Reply<T> = oneshot::Sender<Result<T, AlertError>>;

enum Request {
    List(Reply<Vec<Value>>),
    Get(i64, Reply<Value>),
    Create(Value, Reply<Value>),
    Update(i64, Value, Reply<Value>),
    Delete(i64, Reply<Value>),
    Acknowledge(i64, Value, Reply<Value>),
    Silences(Reply<Vec<Value>>),
    Silence(Value, Reply<Value>),
    Unsilence(i64, Reply<Value>),
    Configure(Vec<RuleSpec>, Reply<()>),
}

/// The API's handle on the watcher; cheap to clone.
#[derive(Clone)]
pub struct Alerts {
    requests: mpsc::Sender<Request>,
    stats: Arc<AlertStats>,
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct AlertStats {
    firing: AtomicU64,
    delivered: AtomicU64,
    failed: AtomicU64,
}

impl AlertStats {
    /// Rules whose alert fires now.
    pub fn firing(&self) -> u64 {
        self.firing.load(Ordering::Relaxed)
    }

    /// Webhook notifications delivered since start.
    pub fn delivered(&self) -> u64 {
        self.delivered.load(Ordering::Relaxed)
    }

    /// Webhook delivery attempts that failed since start (each is retried).
    pub fn failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }
}

impl Alerts {
    /// Loads rules, state and silences, brings the rules of the config file in, and
    /// starts the watcher and the webhook courier. Both stop at `shutdown`.
    pub async fn start(
        configured: &ConfiguredRules,
        store: Store,
        hub: &Hub,
        shutdown: Shutdown,
    ) -> Result<(Alerts, JoinHandle<()>), StoreError> {
        for problem in configured.problems() {
            log::error!("alert rule left out: {problem}");
        }
        let courier = Arc::new(Notify::new());
        let stats = Arc::new(AlertStats::default());
        let mut watcher = Watcher::load(store.clone(), courier.clone(), stats.clone()).await?;
        let events = hub.subscribe();
        watcher.configure(configured.rules.clone()).await?;
        log::info!("alerts: {} rules watched", watcher.rules.len());
        let (requests, queue) = mpsc::channel(REQUESTS);
        watcher.count_firing();
        let delivering = tokio::spawn(webhook::deliver(
            store,
            courier,
            stats.clone(),
            shutdown.clone(),
        ));
        let task = tokio::spawn(async move {
            watcher.run(events, queue, shutdown).await;
            let _ = delivering.await;
        });
        Ok((Alerts { requests, stats }, task))
    }

    /// The counters of `/metrics`.
    pub fn stats(&self) -> &AlertStats {
        &self.stats
    }

    async fn ask<T>(&self, make: impl FnOnce(Reply<T>) -> Request) -> Result<T, AlertError> {
        let (reply, answer) = oneshot::channel();
        self.requests
            .send(make(reply))
            .await
            .map_err(|_| AlertError::Stopped)?;
        answer.await.map_err(|_| AlertError::Stopped)?
    }

    /// Every rule with its state.
    pub async fn list(&self) -> Result<Vec<Value>, AlertError> {
        self.ask(Request::List).await
    }

    /// One rule with its state.
    pub async fn get(&self, id: i64) -> Result<Value, AlertError> {
        self.ask(|r| Request::Get(id, r)).await
    }

    /// Creates a rule from a REST body.
    pub async fn create(&self, body: Value) -> Result<Value, AlertError> {
        self.ask(|r| Request::Create(body, r)).await
    }

    /// Changes the fields of a rule that `body` gives (`null` clears an optional one).
    pub async fn update(&self, id: i64, body: Value) -> Result<Value, AlertError> {
        self.ask(|r| Request::Update(id, body, r)).await
    }

    /// Deletes a rule; answers it as it was.
    pub async fn delete(&self, id: i64) -> Result<Value, AlertError> {
        self.ask(|r| Request::Delete(id, r)).await
    }

    /// Acknowledges a firing alert: `{"by", "comment"}`.
    pub async fn acknowledge(&self, id: i64, body: Value) -> Result<Value, AlertError> {
        self.ask(|r| Request::Acknowledge(id, body, r)).await
    }

    /// Silences still running.
    pub async fn silences(&self) -> Result<Vec<Value>, AlertError> {
        self.ask(Request::Silences).await
    }

    /// Silences a rule or a sensor: `{"rule_id" | "sensor_id", "duration_s",
    /// "created_by", "comment"}`.
    pub async fn silence(&self, body: Value) -> Result<Value, AlertError> {
        self.ask(|r| Request::Silence(body, r)).await
    }

    /// Ends a silence before its time.
    pub async fn unsilence(&self, id: i64) -> Result<Value, AlertError> {
        self.ask(|r| Request::Unsilence(id, r)).await
    }

    /// Brings the rules of a reloaded config file in.
    pub async fn configure(&self, configured: &ConfiguredRules) -> Result<(), AlertError> {
        for problem in configured.problems() {
            log::error!("alert rule left out: {problem}");
        }
        let rules = configured.rules.clone();
        self.ask(|r| Request::Configure(rules, r)).await
    }
}

/// A rule, its origin and its state.
struct Rule {
    id: i64,
    spec: RuleSpec,
    origin: &'static str,
    created_at: Micros,
    updated_at: Micros,
    tracker: Tracker,
}

const FROM_CONFIG: &str = "config";
const FROM_API: &str = "api";

/// Owns every rule and its state; see the module documentation.
struct Watcher {
    store: Store,
    rules: BTreeMap<i64, Rule>,
    /// Sensor names by id, for rules that name their sensor.
    names: HashMap<i64, String>,
    /// Sensors last announced offline.
    offline: HashSet<i64>,
    silences: Vec<SilenceRow>,
    courier: Arc<Notify>,
    stats: Arc<AlertStats>,
}

impl Watcher {
    async fn load(
        store: Store,
        courier: Arc<Notify>,
        stats: Arc<AlertStats>,
    ) -> Result<Watcher, StoreError> {
        let now = now_micros();
        let mut states: HashMap<i64, AlertState> = HashMap::new();
        for (rule_id, text) in store.alert_states().await? {
            match serde_json::from_str(&text) {
                Ok(state) => {
                    states.insert(rule_id, state);
                }
                Err(e) => {
                    log::warn!("alert rule {rule_id}: stored state unreadable ({e}); starting over")
                }
            }
        }
        let mut rules = BTreeMap::new();
        for row in store.alert_rules().await? {
            let spec = serde_json::from_str::<Value>(&row.definition)
                .map_err(|e| vec![FieldError::new("definition", e.to_string())])
                .and_then(RuleSpec::from_json);
            let spec = match spec {
                Ok(spec) => spec,
                Err(errors) => {
                    log::error!(
                        "alert rule {} ({}) stored unreadable and left out: {}",
                        row.id,
                        row.name,
                        AlertError::Invalid(errors)
                    );
                    continue;
                }
            };
            let state = states.remove(&row.id).unwrap_or_default();
            let Ok(tracker) = tracker(&spec, state, now) else {
                continue;
            };
            rules.insert(
                row.id,
                Rule {
                    id: row.id,
                    origin: if row.origin == FROM_CONFIG {
                        FROM_CONFIG
                    } else {
                        FROM_API
                    },
                    spec,
                    created_at: row.created_at,
                    updated_at: row.updated_at,
                    tracker,
                },
            );
        }
        let names = store
            .sensors(crate::store::SensorFilter {
                limit: u32::MAX,
                ..crate::store::SensorFilter::default()
            })
            .await?
            .into_iter()
            .filter_map(|s| Some((s.id, s.nombre?)))
            .collect();
        let offline = store.sensors_told_offline().await?.into_iter().collect();
        let silences = store.alert_silences().await?;
        Ok(Watcher {
            store,
            rules,
            names,
            offline,
            silences,
            courier,
            stats,
        })
    }

    fn count_firing(&self) {
        let firing = self
            .rules
            .values()
            .filter(|r| r.tracker.state.phase == Phase::Firing)
            .count();
        self.stats.firing.store(firing as u64, Ordering::Relaxed);
    }

    async fn run(
        &mut self,
        mut events: tokio::sync::broadcast::Receiver<Arc<Event>>,
        mut requests: mpsc::Receiver<Request>,
        mut shutdown: Shutdown,
    ) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                _ = shutdown.recv() => return,
                event = events.recv() => match event {
                    Ok(event) => self.on_event(&event).await,
                    Err(RecvError::Lagged(missed)) => log::warn!(
                        "alerts fell {missed} events behind; readings among them were not evaluated"
                    ),
                    Err(RecvError::Closed) => return,
                },
                Some(request) = requests.recv() => self.handle(request).await,
                _ = tick.tick() => self.on_tick().await,
            }
        }
    }

    /// The id of the sensor a rule watches, if it exists.
    fn sensor_of(&self, spec: &RuleSpec) -> Option<i64> {
        match (&spec.sensor_id, &spec.sensor) {
            (Some(id), _) => Some(*id),
            (None, Some(name)) => self
                .names
                .iter()
                .filter(|(_, n)| *n == name)
                .map(|(id, _)| *id)
                .min(),
            (None, None) => None,
        }
    }

    async fn on_event(&mut self, event: &Event) {
        if event.channel == Channel::Readings {
            if let Some(sensor_id) = event.sensor_id {
                self.offline.remove(&sensor_id);
            }
            // Readings are nine in ten events: only those of a watched tipo are looked at.
            let watched = event.event_type == "created"
                && self
                    .rules
                    .values()
                    .any(|r| event.tipo.as_deref() == Some(r.spec.tipo.as_str()));
            if !watched {
                return;
            }
        }
        match (&event.body, event.event_type.as_str()) {
            (Body::Reading(reading), "created") => {
                let (sensor_id, tipo, valor) =
                    (reading.sensor_id, reading.tipo.as_str(), reading.valor);
                let now = now_micros();
                let taken_at = reading.timestamp;
                let ids: Vec<i64> = self
                    .rules
                    .values()
                    .filter(|r| r.spec.tipo == tipo && self.sensor_of(&r.spec) == Some(sensor_id))
                    .map(|r| r.id)
                    .collect();
                for id in ids {
                    self.step(id, now, |t| t.reading(valor, taken_at, now))
                        .await;
                }
            }
            (Body::Sensor(sensor), "created" | "updated") => {
                if let Some(name) = &sensor.nombre {
                    self.names.insert(sensor.id, name.clone());
                }
            }
            (Body::Sensor(sensor), "deleted") => {
                self.names.remove(&sensor.id);
            }
            (Body::Data(_), "sensor_offline") if event.channel == Channel::General => {
                let Some(sensor_id) = event.sensor_id else {
                    return;
                };
                self.offline.insert(sensor_id);
                let ids: Vec<i64> = self
                    .rules
                    .values()
                    .filter(|r| self.sensor_of(&r.spec) == Some(sensor_id))
                    .map(|r| r.id)
                    .collect();
                for id in ids {
                    self.step(id, now_micros(), Tracker::offline).await;
                }
            }
            (Body::Data(_), "sensor_online") if event.channel == Channel::General => {
                if let Some(sensor_id) = event.sensor_id {
                    self.offline.remove(&sensor_id);
                }
            }
            _ => {}
        }
    }

    async fn on_tick(&mut self) {
        let now = now_micros();
        let ended: Vec<SilenceRow> = self
            .silences
            .iter()
            .filter(|s| s.ends_at <= now)
            .cloned()
            .collect();
        for silence in ended {
            if let Err(e) = self.end_silence(&silence, "expired").await {
                log::warn!("silence {} could not be ended: {e}", silence.id);
            }
        }
        let ids: Vec<i64> = self.rules.keys().copied().collect();
        for id in ids {
            let offline = self
                .rules
                .get(&id)
                .and_then(|r| self.sensor_of(&r.spec))
                .is_some_and(|s| self.offline.contains(&s));
            self.step(id, now, |t| t.tick(now, offline)).await;
            self.notify_again(id, now).await;
        }
    }

    /// Feeds one input to a rule's tracker and stores what changed. When the write
    /// fails, the rule goes back to where it was, so the next input tries again.
    async fn step(&mut self, id: i64, now: Micros, input: impl FnOnce(&mut Tracker) -> Outcome) {
        let Some(rule) = self.rules.get_mut(&id) else {
            return;
        };
        let before = rule.tracker.state.clone();
        let outcome = input(&mut rule.tracker);
        if !outcome.changed {
            return;
        }
        let mut write = AlertWrite::default();
        if let Some(change) = outcome.change {
            let silenced = self.silenced(id, now);
            let rule = &self.rules[&id];
            let sensor_id = self.sensor_of(&rule.spec);
            let event_type = match change {
                Change::Fired => "alert_firing",
                Change::Resolved => "alert_resolved",
            };
            let value = rule
                .tracker
                .state
                .value
                .map_or("-".into(), |v| v.to_string());
            match change {
                Change::Fired => log::warn!(
                    "alert \"{}\" firing: {} {} {} (value {value})",
                    rule.spec.name,
                    rule.spec
                        .sensor
                        .clone()
                        .unwrap_or_else(|| format!("sensor {}", sensor_id.unwrap_or_default())),
                    rule.spec.tipo,
                    rule.spec.condition.as_str(),
                ),
                Change::Resolved => {
                    log::info!("alert \"{}\" resolved (value {value})", rule.spec.name)
                }
            }
            let mut data = alert_data(rule, sensor_id);
            data["silenced"] = Value::Bool(silenced);
            write.emissions.push(Emission {
                channel: Channel::General,
                kind: EmissionKind::System(event_type.into()),
                sensor_id,
                data,
            });
            let notified_before = rule.tracker.state.notified_at.is_some();
            let wanted = match change {
                Change::Fired => !silenced,
                // A resolution is told to whoever was told of the firing.
                Change::Resolved => notified_before && !silenced,
            };
            if wanted {
                if let Some(op) = notification(rule, sensor_id, false) {
                    write.ops.push(op);
                    if let Some(rule) = self.rules.get_mut(&id) {
                        rule.tracker.state.notified_at = Some(now);
                    }
                }
            }
        }
        let rule = &self.rules[&id];
        write.ops.insert(0, save_state(rule));
        if let Err(e) = self.write(write).await {
            log::error!("alert rule \"{}\": state not saved: {e}", rule.spec.name);
            if let Some(rule) = self.rules.get_mut(&id) {
                rule.tracker.state = before;
            }
        }
        self.count_firing();
    }

    /// Queues a notification for a firing alert whose last one was held back by a
    /// silence, or is older than the rule's `repeat_s`; never for an acknowledged one.
    async fn notify_again(&mut self, id: i64, now: Micros) {
        let silenced = self.silenced(id, now);
        let Some(rule) = self.rules.get_mut(&id) else {
            return;
        };
        let state = &rule.tracker.state;
        if state.phase != Phase::Firing
            || state.acknowledged.is_some()
            || rule.spec.webhook.is_none()
            || silenced
        {
            return;
        }
        let repeat = match (state.notified_at, rule.spec.repeat_s) {
            (None, _) => false,
            (Some(at), Some(every)) if now - at >= (every * 1e6) as Micros => true,
            _ => return,
        };
        rule.tracker.state.notified_at = Some(now);
        let rule = &self.rules[&id];
        let sensor_id = self.sensor_of(&rule.spec);
        let mut ops = vec![save_state(rule)];
        ops.extend(notification(rule, sensor_id, repeat));
        let write = AlertWrite {
            ops,
            emissions: Vec::new(),
        };
        if let Err(e) = self.write(write).await {
            log::error!("alert rule {id}: notification not queued: {e}");
        }
    }

    fn silenced(&self, id: i64, now: Micros) -> bool {
        let sensor = self.rules.get(&id).and_then(|r| self.sensor_of(&r.spec));
        self.silences.iter().any(|s| {
            s.ends_at > now
                && (s.rule_id == Some(id) || (s.sensor_id.is_some() && s.sensor_id == sensor))
        })
    }

    async fn write(&self, write: AlertWrite) -> Result<Vec<i64>, StoreError> {
        let notifies = write
            .ops
            .iter()
            .any(|op| matches!(op, AlertOp::Notify { .. }));
        let receipt = self.store.alert_write(write).await?;
        if notifies {
            self.courier.notify_one();
        }
        Ok(receipt.ids)
    }

    async fn handle(&mut self, request: Request) {
        match request {
            Request::List(reply) => {
                let now = now_micros();
                let rules = self.rules.values().map(|r| self.view(r, now)).collect();
                let _ = reply.send(Ok(rules));
            }
            Request::Get(id, reply) => {
                let _ = reply.send(self.rule(id).map(|r| self.view(r, now_micros())));
            }
            Request::Create(body, reply) => {
                let _ = reply.send(self.create(body).await);
            }
            Request::Update(id, body, reply) => {
                let _ = reply.send(self.update(id, body).await);
            }
            Request::Delete(id, reply) => {
                let _ = reply.send(self.delete(id, true).await);
            }
            Request::Acknowledge(id, body, reply) => {
                let _ = reply.send(self.acknowledge(id, body).await);
            }
            Request::Silences(reply) => {
                let _ = reply.send(Ok(self.silences.iter().map(silence_view).collect()));
            }
            Request::Silence(body, reply) => {
                let _ = reply.send(self.silence(body).await);
            }
            Request::Unsilence(id, reply) => {
                let result = match self.silences.iter().find(|s| s.id == id).cloned() {
                    Some(silence) => self
                        .end_silence(&silence, "removed")
                        .await
                        .map(|()| silence_view(&silence))
                        .map_err(AlertError::from),
                    None => Err(AlertError::NotFound(format!("Silence {id} not found"))),
                };
                let _ = reply.send(result);
            }
            Request::Configure(rules, reply) => {
                let _ = reply.send(self.configure(rules).await.map_err(AlertError::from));
            }
        }
    }

    fn rule(&self, id: i64) -> Result<&Rule, AlertError> {
        self.rules
            .get(&id)
            .ok_or_else(|| AlertError::NotFound(format!("Alert rule {id} not found")))
    }

    fn name_taken(&self, name: &str, except: Option<i64>) -> Result<(), AlertError> {
        match self
            .rules
            .values()
            .find(|r| r.spec.name == name && Some(r.id) != except)
        {
            Some(other) => Err(AlertError::Conflict(format!(
                "An alert rule named {name:?} exists already (id {})",
                other.id
            ))),
            None => Ok(()),
        }
    }

    async fn create(&mut self, body: Value) -> Result<Value, AlertError> {
        let spec = RuleSpec::from_json(body).map_err(AlertError::Invalid)?;
        self.name_taken(&spec.name, None)?;
        let id = self.save_rule(None, spec, FROM_API).await?;
        Ok(self.view(&self.rules[&id], now_micros()))
    }

    async fn update(&mut self, id: i64, body: Value) -> Result<Value, AlertError> {
        let rule = self.rule(id)?;
        if rule.origin == FROM_CONFIG {
            return Err(AlertError::Conflict(format!(
                "Alert rule {id} is defined in the config file; change it there"
            )));
        }
        let Value::Object(changes) = body else {
            return Err(AlertError::Invalid(vec![FieldError::new(
                "body",
                "must be a JSON object",
            )]));
        };
        let Value::Object(mut merged) = rule.spec.to_json() else {
            return Err(AlertError::Conflict(format!(
                "Alert rule {id} is unreadable"
            )));
        };
        for (key, value) in changes {
            if value.is_null() {
                merged.remove(&key);
            } else {
                merged.insert(key, value);
            }
        }
        let spec = RuleSpec::from_json(Value::Object(merged)).map_err(AlertError::Invalid)?;
        self.name_taken(&spec.name, Some(id))?;
        if spec != rule.spec {
            self.save_rule(Some(id), spec, FROM_API).await?;
        }
        Ok(self.view(&self.rules[&id], now_micros()))
    }

    /// Stores a rule (new when `id` is `None`) and starts tracking it; a changed rule
    /// keeps its state.
    async fn save_rule(
        &mut self,
        id: Option<i64>,
        spec: RuleSpec,
        origin: &'static str,
    ) -> Result<i64, AlertError> {
        let now = now_micros();
        let state = id
            .and_then(|id| self.rules.get(&id))
            .map(|r| r.tracker.state.clone())
            .unwrap_or_default();
        let tracker = tracker(&spec, state, now).map_err(AlertError::Invalid)?;
        let write = AlertWrite {
            ops: vec![AlertOp::SaveRule {
                id,
                name: spec.name.clone(),
                origin,
                definition: spec.to_json().to_string(),
            }],
            emissions: Vec::new(),
        };
        let saved = self.write(write).await?;
        let id = id.or(saved.first().copied()).ok_or(AlertError::Stopped)?;
        let created_at = self.rules.get(&id).map_or(now, |r| r.created_at);
        self.rules.insert(
            id,
            Rule {
                id,
                spec,
                origin,
                created_at,
                updated_at: now,
                tracker,
            },
        );
        Ok(id)
    }

    /// Deletes a rule. A firing alert is resolved on the way out, so that dashboards and
    /// the broker's retained topic do not show it firing for good.
    async fn delete(&mut self, id: i64, from_api: bool) -> Result<Value, AlertError> {
        let rule = self.rule(id)?;
        if from_api && rule.origin == FROM_CONFIG {
            return Err(AlertError::Conflict(format!(
                "Alert rule {id} is defined in the config file; remove it there"
            )));
        }
        let now = now_micros();
        let view = self.view(rule, now);
        let mut write = AlertWrite {
            ops: vec![AlertOp::DeleteRule(id)],
            emissions: Vec::new(),
        };
        if rule.tracker.state.phase == Phase::Firing {
            let sensor_id = self.sensor_of(&rule.spec);
            let mut data = alert_data(rule, sensor_id);
            data["resolved_at"] = json!(format_time(now));
            data["rule_deleted"] = Value::Bool(true);
            write.emissions.push(Emission {
                channel: Channel::General,
                kind: EmissionKind::System("alert_resolved".into()),
                sensor_id,
                data,
            });
        }
        self.write(write).await?;
        self.rules.remove(&id);
        self.silences.retain(|s| s.rule_id != Some(id));
        self.count_firing();
        Ok(view)
    }

    async fn configure(&mut self, configured: Vec<RuleSpec>) -> Result<(), StoreError> {
        for spec in &configured {
            let existing = self.rules.values().find(|r| r.spec.name == spec.name);
            let result = match existing {
                Some(r) if r.origin == FROM_CONFIG && r.spec == *spec => continue,
                Some(r) => self.save_rule(Some(r.id), spec.clone(), FROM_CONFIG).await,
                None => self.save_rule(None, spec.clone(), FROM_CONFIG).await,
            };
            match result {
                Ok(_) => {}
                Err(AlertError::Store(e)) => return Err(e),
                Err(e) => log::error!("alert rule \"{}\" left out: {e}", spec.name),
            }
        }
        let gone: Vec<i64> = self
            .rules
            .values()
            .filter(|r| {
                r.origin == FROM_CONFIG && !configured.iter().any(|c| c.name == r.spec.name)
            })
            .map(|r| r.id)
            .collect();
        for id in gone {
            match self.delete(id, false).await {
                Ok(_) => log::info!("alert rule {id} no longer configured: removed"),
                Err(AlertError::Store(e)) => return Err(e),
                Err(e) => log::error!("alert rule {id} not removed: {e}"),
            }
        }
        Ok(())
    }

    async fn acknowledge(&mut self, id: i64, body: Value) -> Result<Value, AlertError> {
        let rule = self.rule(id)?;
        let mut errors = Vec::new();
        let fields = object(body, &["by", "comment"], &mut errors);
        let by = text_field(&fields, "by", true, &mut errors);
        let comment = text_field(&fields, "comment", false, &mut errors);
        if !errors.is_empty() {
            return Err(AlertError::Invalid(errors));
        }
        if rule.tracker.state.phase != Phase::Firing {
            return Err(AlertError::Conflict(format!(
                "Alert rule {id} is not firing; only a firing alert can be acknowledged"
            )));
        }
        let now = now_micros();
        let ack = Ack {
            by,
            comment,
            at: now,
        };
        let sensor_id = self.sensor_of(&rule.spec);
        let mut data = alert_data(rule, sensor_id);
        data["by"] = json!(ack.by);
        data["comment"] = json!(ack.comment);
        data["acknowledged_at"] = json!(format_time(now));
        let before = rule.tracker.state.acknowledged.clone();
        if let Some(rule) = self.rules.get_mut(&id) {
            rule.tracker.state.acknowledged = Some(ack);
        }
        let rule = &self.rules[&id];
        let write = AlertWrite {
            ops: vec![save_state(rule)],
            emissions: vec![Emission {
                channel: Channel::General,
                kind: EmissionKind::System("alert_acknowledged".into()),
                sensor_id,
                data,
            }],
        };
        if let Err(e) = self.write(write).await {
            if let Some(rule) = self.rules.get_mut(&id) {
                rule.tracker.state.acknowledged = before;
            }
            return Err(e.into());
        }
        Ok(self.view(&self.rules[&id], now))
    }

    async fn silence(&mut self, body: Value) -> Result<Value, AlertError> {
        let mut errors = Vec::new();
        let fields = object(
            body,
            &[
                "rule_id",
                "sensor_id",
                "duration_s",
                "created_by",
                "comment",
            ],
            &mut errors,
        );
        let id_field = |name: &str, errors: &mut Vec<FieldError>| match fields.get(name) {
            None | Some(Value::Null) => None,
            Some(v) => match v.as_i64() {
                Some(id) if id > 0 => Some(id),
                _ => {
                    errors.push(FieldError::new(name, "must be a positive integer"));
                    None
                }
            },
        };
        let rule_id = id_field("rule_id", &mut errors);
        let sensor_id = id_field("sensor_id", &mut errors);
        if rule_id.is_some() == sensor_id.is_some()
            && !errors.iter().any(|e| e.field.ends_with("_id"))
        {
            errors.push(FieldError::new(
                "rule_id",
                "a silence is for one rule (rule_id) or one sensor (sensor_id)",
            ));
        }
        if let Some(id) = rule_id {
            if !self.rules.contains_key(&id) {
                errors.push(FieldError::new("rule_id", format!("no alert rule {id}")));
            }
        }
        let duration = match fields.get("duration_s").and_then(Value::as_f64) {
            Some(d) if d.is_finite() && (1.0..=MAX_SILENCE_S).contains(&d) => d,
            _ => {
                errors.push(FieldError::new(
                    "duration_s",
                    format!("required, between 1 and {MAX_SILENCE_S} seconds (30 days)"),
                ));
                0.0
            }
        };
        let created_by = text_field(&fields, "created_by", true, &mut errors);
        let comment = text_field(&fields, "comment", true, &mut errors);
        if !errors.is_empty() {
            return Err(AlertError::Invalid(errors));
        }
        let now = now_micros();
        let mut silence = SilenceRow {
            id: 0,
            rule_id,
            sensor_id,
            ends_at: now + (duration * 1e6) as Micros,
            created_by,
            comment,
            created_at: now,
        };
        let write = AlertWrite {
            ops: vec![AlertOp::AddSilence(silence.clone())],
            emissions: Vec::new(),
        };
        let ids = self.write(write).await?;
        silence.id = ids.first().copied().ok_or(AlertError::Stopped)?;
        // The event names the silence's id, known only once it is stored: a second
        // write, so a restart in between leaves a silence without its event at worst.
        let write = AlertWrite {
            ops: Vec::new(),
            emissions: vec![Emission {
                channel: Channel::General,
                kind: EmissionKind::System("silence_created".into()),
                sensor_id: silence.sensor_id,
                data: silence_view(&silence),
            }],
        };
        self.write(write).await?;
        self.silences.push(silence.clone());
        Ok(silence_view(&silence))
    }

    async fn end_silence(&mut self, silence: &SilenceRow, reason: &str) -> Result<(), StoreError> {
        let mut data = silence_view(silence);
        data["reason"] = json!(reason);
        let write = AlertWrite {
            ops: vec![AlertOp::DeleteSilence(silence.id)],
            emissions: vec![Emission {
                channel: Channel::General,
                kind: EmissionKind::System("silence_ended".into()),
                sensor_id: silence.sensor_id,
                data,
            }],
        };
        self.write(write).await?;
        self.silences.retain(|s| s.id != silence.id);
        Ok(())
    }

    /// A rule as REST shows it: its definition, id, origin, times and state.
    fn view(&self, rule: &Rule, now: Micros) -> Value {
        let mut view = rule.spec.to_json();
        let state = &rule.tracker.state;
        let time = |t: Option<Micros>| t.map(format_time);
        view["id"] = json!(rule.id);
        view["origin"] = json!(rule.origin);
        view["created_at"] = json!(format_time(rule.created_at));
        view["updated_at"] = json!(format_time(rule.updated_at));
        view["state"] = json!({
            "phase": state.phase,
            "since": time(state.since),
            "fired_at": time(state.fired_at),
            "resolved_at": time(state.resolved_at),
            "value": state.value,
            "acknowledged": state.acknowledged.as_ref().map(|a| json!({
                "by": a.by, "comment": a.comment, "at": format_time(a.at)
            })),
            "silenced": self.silenced(rule.id, now),
        });
        view
    }
}

/// A tracker for a rule, in `state`.
fn tracker(spec: &RuleSpec, state: AlertState, now: Micros) -> Result<Tracker, Vec<FieldError>> {
    let condition = spec.check()?;
    Ok(Tracker::new(
        condition,
        spec.for_s,
        spec.hysteresis,
        state,
        now,
    ))
}

fn save_state(rule: &Rule) -> AlertOp {
    AlertOp::SaveState {
        rule_id: rule.id,
        state: serde_json::to_string(&rule.tracker.state).unwrap_or_default(),
    }
}

/// What events about a rule's alert carry: the rule, the value and when it started.
fn alert_data(rule: &Rule, sensor_id: Option<i64>) -> Value {
    let state = &rule.tracker.state;
    let time = |t: Option<Micros>| t.map(format_time);
    json!({
        "rule_id": rule.id,
        "rule": rule.spec.name,
        "sensor_id": sensor_id,
        "tipo": rule.spec.tipo,
        "condition": rule.spec.condition.as_str(),
        "value": state.value,
        "started_at": time(state.since),
        "fired_at": time(state.fired_at),
        "resolved_at": time(state.resolved_at),
    })
}

/// The webhook notification of a rule's current state, if it has a webhook.
fn notification(rule: &Rule, sensor_id: Option<i64>, repeat: bool) -> Option<AlertOp> {
    let url = rule.spec.webhook.clone()?;
    let mut body = alert_data(rule, sensor_id);
    let status = match rule.tracker.state.phase {
        Phase::Firing => "firing",
        _ => "resolved",
    };
    body["status"] = json!(status);
    body["repeat"] = json!(repeat);
    body["sent_at"] = json!(format_time(now_micros()));
    Some(AlertOp::Notify {
        rule_id: rule.id,
        url,
        per_minute: rule.spec.webhook_per_minute,
        body: body.to_string(),
    })
}

fn silence_view(s: &SilenceRow) -> Value {
    json!({
        "id": s.id,
        "rule_id": s.rule_id,
        "sensor_id": s.sensor_id,
        "created_by": s.created_by,
        "comment": s.comment,
        "created_at": format_time(s.created_at),
        "ends_at": format_time(s.ends_at),
    })
}

/// The fields of a JSON object body, with an error for each one not in `known`.
fn object(body: Value, known: &[&str], errors: &mut Vec<FieldError>) -> Map<String, Value> {
    match body {
        Value::Object(fields) => {
            for key in fields.keys().filter(|k| !known.contains(&k.as_str())) {
                errors.push(FieldError::new(key, "unknown field"));
            }
            fields
        }
        _ => {
            errors.push(FieldError::new("body", "must be a JSON object"));
            Map::new()
        }
    }
}

/// A text field of an operator's request: who, and why.
fn text_field(
    fields: &Map<String, Value>,
    name: &str,
    required: bool,
    errors: &mut Vec<FieldError>,
) -> String {
    match fields.get(name) {
        None | Some(Value::Null) if !required => String::new(),
        Some(Value::String(text)) if !(required && text.trim().is_empty()) => {
            if text.chars().count() > MAX_TEXT * 4 {
                errors.push(FieldError::new(
                    name,
                    format!("must be at most {} characters", MAX_TEXT * 4),
                ));
            } else if let Some(c) = forbidden_char(text) {
                errors.push(FieldError::new(name, forbidden_char_message(c)));
            }
            text.clone()
        }
        _ => {
            errors.push(FieldError::new(name, "required, a non-empty string"));
            String::new()
        }
    }
}
