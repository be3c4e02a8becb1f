//! What the writer is asked to do, and the answers that wait for a batch's commit.

use tokio::sync::oneshot;

use super::alerts::{AlertReceipt, AlertWrite};
use super::{Emission, StoreError};
use crate::model::{
    Micros, NewReading, NewSensor, Reading, ReadingPatch, Sample, Sensor, SensorPatch,
};

pub(super) type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

/// What the writer is asked to do.
pub(crate) enum Command {
    CreateSensor(NewSensor, Reply<Sensor>),
    UpdateSensor(i64, SensorPatch, Reply<Sensor>),
    DeleteSensor(i64, Reply<Sensor>),
    InsertReading(NewReading, Reply<Reading>),
    UpdateReading(i64, ReadingPatch, Reply<Reading>),
    DeleteReading(i64, Reply<Reading>),
    Emit(Emission, Reply<u64>),
    Samples(Vec<Sample>),
    /// Answered once the batch it arrived in is through: proof the writer is not wedged.
    Ping(oneshot::Sender<()>),
    /// Records a token's last use.
    TouchToken(i64, Micros),
    /// Adds a token (its name, scope and the hash of its secret); answers whether it was
    /// added.
    CreateToken {
        name: String,
        scope: &'static str,
        hash: Vec<u8>,
        reply: Reply<bool>,
    },
    /// Removes a token by name; answers whether there was one.
    DeleteToken(String, Reply<bool>),
    /// Saves how far an uplink got (its name, the `seq`).
    SaveUplinkCursor(&'static str, u64, Reply<()>),
    /// Alert rows and their events, together (see [`super::alerts`]).
    Alerts(AlertWrite, Reply<AlertReceipt>),
    Shutdown,
}

/// A command applied inside the open transaction, whose answer waits for the commit.
pub(super) enum Done {
    Unit(Reply<()>),
    Sensor(Reply<Sensor>, Result<Sensor, StoreError>),
    Reading(Reply<Reading>, Result<Reading, StoreError>),
    Seq(Reply<u64>, Result<u64, StoreError>),
    Flag(Reply<bool>, bool),
    Alerts(Reply<AlertReceipt>, AlertReceipt),
    Ping(oneshot::Sender<()>),
    Nothing,
}

impl Done {
    pub(super) fn send(self) {
        // A caller that gave up waiting (client disconnected) is not the writer's problem.
        match self {
            Done::Unit(reply) => drop(reply.send(Ok(()))),
            Done::Sensor(reply, result) => drop(reply.send(result)),
            Done::Reading(reply, result) => drop(reply.send(result)),
            Done::Seq(reply, result) => drop(reply.send(result)),
            Done::Flag(reply, flag) => drop(reply.send(Ok(flag))),
            Done::Alerts(reply, receipt) => drop(reply.send(Ok(receipt))),
            Done::Ping(reply) => drop(reply.send(())),
            Done::Nothing => {}
        }
    }

    /// Replaces a successful answer with the reason the batch was not committed.
    pub(super) fn fail(self, why: &str) {
        let err = || StoreError::Aborted(why.to_owned());
        match self {
            Done::Unit(reply) => drop(reply.send(Err(err()))),
            Done::Sensor(reply, _) => drop(reply.send(Err(err()))),
            Done::Reading(reply, _) => drop(reply.send(Err(err()))),
            Done::Seq(reply, _) => drop(reply.send(Err(err()))),
            Done::Flag(reply, _) => drop(reply.send(Err(err()))),
            Done::Alerts(reply, _) => drop(reply.send(Err(err()))),
            // The writer is alive even when a commit fails (a full disk): answer.
            Done::Ping(reply) => drop(reply.send(())),
            Done::Nothing => {}
        }
    }
}

impl Command {
    /// What the command counts for against the most work one batch takes: a submission of samples
    /// counts each sample (a batched source hands over hundreds at once), anything else
    /// counts one.
    pub(super) fn weight(&self) -> usize {
        match self {
            Command::Samples(samples) => samples.len().max(1),
            _ => 1,
        }
    }

    /// Answers the command with [`StoreError::Damaged`].
    pub(super) fn refuse(self, damage: &str) {
        let err = || StoreError::Damaged(damage.to_owned());
        match self {
            Command::CreateSensor(_, r)
            | Command::UpdateSensor(_, _, r)
            | Command::DeleteSensor(_, r) => drop(r.send(Err(err()))),
            Command::InsertReading(_, r)
            | Command::UpdateReading(_, _, r)
            | Command::DeleteReading(_, r) => drop(r.send(Err(err()))),
            Command::Emit(_, r) => drop(r.send(Err(err()))),
            Command::SaveUplinkCursor(_, _, r) => drop(r.send(Err(err()))),
            Command::CreateToken { reply, .. } | Command::DeleteToken(_, reply) => {
                drop(reply.send(Err(err())))
            }
            Command::Alerts(_, r) => drop(r.send(Err(err()))),
            Command::Ping(reply) => drop(reply.send(())),
            Command::Samples(_) | Command::TouchToken(..) | Command::Shutdown => {}
        }
    }

    pub(super) fn abort(self, why: &str) {
        let done = match self {
            Command::CreateSensor(_, r)
            | Command::UpdateSensor(_, _, r)
            | Command::DeleteSensor(_, r) => Done::Sensor(r, Err(StoreError::Closed)),
            Command::InsertReading(_, r)
            | Command::UpdateReading(_, _, r)
            | Command::DeleteReading(_, r) => Done::Reading(r, Err(StoreError::Closed)),
            Command::Emit(_, r) => Done::Seq(r, Err(StoreError::Closed)),
            Command::SaveUplinkCursor(_, _, r) => Done::Unit(r),
            Command::CreateToken { reply, .. } | Command::DeleteToken(_, reply) => {
                Done::Flag(reply, false)
            }
            Command::Alerts(_, r) => Done::Alerts(r, AlertReceipt::default()),
            Command::Samples(samples) => {
                log::error!("{} samples not stored: {why}", samples.len());
                Done::Nothing
            }
            Command::Ping(reply) => {
                let _ = reply.send(());
                Done::Nothing
            }
            Command::TouchToken(..) | Command::Shutdown => Done::Nothing,
        };
        done.fail(why);
    }
}
