//! QEMU's job states, the transitions allowed between them and which verbs each state
//! accepts (qapi/job.json's JobStatus and JobVerb; the tables of job.c, as listed in
//! shared/reference/qmp.md §1e).

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobStatus {
    Undefined,
    Created,
    Running,
    Paused,
    Ready,
    Standby,
    Waiting,
    Pending,
    Aborting,
    Concluded,
    Null,
}

impl JobStatus {
    pub const ALL: [JobStatus; 11] = [
        JobStatus::Undefined,
        JobStatus::Created,
        JobStatus::Running,
        JobStatus::Paused,
        JobStatus::Ready,
        JobStatus::Standby,
        JobStatus::Waiting,
        JobStatus::Pending,
        JobStatus::Aborting,
        JobStatus::Concluded,
        JobStatus::Null,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Undefined => "undefined",
            JobStatus::Created => "created",
            JobStatus::Running => "running",
            JobStatus::Paused => "paused",
            JobStatus::Ready => "ready",
            JobStatus::Standby => "standby",
            JobStatus::Waiting => "waiting",
            JobStatus::Pending => "pending",
            JobStatus::Aborting => "aborting",
            JobStatus::Concluded => "concluded",
            JobStatus::Null => "null",
        }
    }

    /// The allowed-transition table.
    pub fn can_become(self, to: JobStatus) -> bool {
        use JobStatus::*;
        matches!(
            (self, to),
            (Undefined, Created)
                | (Created, Running | Aborting | Null)
                | (Running, Paused | Ready | Waiting | Aborting)
                | (Paused, Running)
                | (Ready, Standby | Waiting | Aborting)
                | (Standby, Ready)
                | (Waiting, Pending | Aborting)
                | (Pending, Aborting | Concluded)
                | (Aborting, Aborting | Concluded)
                | (Concluded, Null)
        )
    }

    /// The job has finished its work (QEMU's `job_is_completed`).
    pub fn is_completed(self) -> bool {
        matches!(
            self,
            JobStatus::Waiting
                | JobStatus::Pending
                | JobStatus::Aborting
                | JobStatus::Concluded
                | JobStatus::Null
        )
    }
}

impl fmt::Display for JobStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verb {
    Cancel,
    Pause,
    Resume,
    SetSpeed,
    Complete,
    Finalize,
    Dismiss,
    Change,
}

impl Verb {
    pub const ALL: [Verb; 8] = [
        Verb::Cancel,
        Verb::Pause,
        Verb::Resume,
        Verb::SetSpeed,
        Verb::Complete,
        Verb::Finalize,
        Verb::Dismiss,
        Verb::Change,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Verb::Cancel => "cancel",
            Verb::Pause => "pause",
            Verb::Resume => "resume",
            Verb::SetSpeed => "set-speed",
            Verb::Complete => "complete",
            Verb::Finalize => "finalize",
            Verb::Dismiss => "dismiss",
            Verb::Change => "change",
        }
    }

    /// The verb table.
    pub fn allowed_in(self, s: JobStatus) -> bool {
        use JobStatus::*;
        match self {
            Verb::Cancel => matches!(
                s,
                Created | Running | Paused | Ready | Standby | Waiting | Pending
            ),
            Verb::Pause | Verb::Resume | Verb::SetSpeed | Verb::Change => {
                matches!(s, Created | Running | Paused | Ready | Standby)
            }
            Verb::Complete => matches!(s, Ready | Standby),
            Verb::Finalize => s == Pending,
            Verb::Dismiss => s == Concluded,
        }
    }

    /// `Ok` when a job in `status` accepts the verb, otherwise QEMU's error text.
    pub fn check(self, id: &str, status: JobStatus) -> Result<(), String> {
        if self.allowed_in(status) {
            Ok(())
        } else {
            Err(format!(
                "Job '{id}' in state '{status}' cannot accept command verb '{}'",
                self.as_str()
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::JobStatus::*;
    use super::*;

    /// The transition table of qapi/job.json's documentation, row by row (1 = allowed), in
    /// the order undefined created running paused ready standby waiting pending aborting
    /// concluded null.
    const STT: [[u8; 11]; 11] = [
        [0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0], // undefined
        [0, 0, 1, 0, 0, 0, 0, 0, 1, 0, 1], // created
        [0, 0, 0, 1, 1, 0, 1, 0, 1, 0, 0], // running
        [0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0], // paused
        [0, 0, 0, 0, 0, 1, 1, 0, 1, 0, 0], // ready
        [0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0], // standby
        [0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0], // waiting
        [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0], // pending
        [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0], // aborting
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1], // concluded
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], // null
    ];

    /// The verb table (columns as above): cancel, pause, resume, set-speed, complete,
    /// finalize, dismiss, change.
    const VERBS: [[u8; 11]; 8] = [
        [0, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
        [0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0],
        [0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0],
        [0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0],
        [0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0],
    ];

    #[test]
    fn transition_table_matches_qemu() {
        for (i, from) in JobStatus::ALL.iter().enumerate() {
            for (j, to) in JobStatus::ALL.iter().enumerate() {
                assert_eq!(from.can_become(*to), STT[i][j] == 1, "{from} -> {to}");
            }
        }
    }

    #[test]
    fn verb_table_matches_qemu() {
        for (v, verb) in Verb::ALL.iter().enumerate() {
            for (j, s) in JobStatus::ALL.iter().enumerate() {
                assert_eq!(verb.allowed_in(*s), VERBS[v][j] == 1, "{verb:?} in {s}");
            }
        }
    }

    #[test]
    fn refusal_message_is_qemus() {
        assert_eq!(
            Verb::Complete.check("job0", Running).unwrap_err(),
            "Job 'job0' in state 'running' cannot accept command verb 'complete'"
        );
        assert_eq!(
            Verb::SetSpeed.check("j", Concluded).unwrap_err(),
            "Job 'j' in state 'concluded' cannot accept command verb 'set-speed'"
        );
        assert!(Verb::Dismiss.check("j", Concluded).is_ok());
    }

    #[test]
    fn completed_states() {
        assert!(!Ready.is_completed());
        assert!(Waiting.is_completed() && Null.is_completed());
    }
}
