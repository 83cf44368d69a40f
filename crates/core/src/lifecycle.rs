//! Lifecycle state machines. Each state knows, without any I/O, which operations it allows;
//! the service asks before acting and records the transition in the store.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Where a workspace is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkspaceState {
    /// Recorded, container being created (intent written before the engine is called).
    Creating,
    Running,
    /// Every process frozen (cgroup freezer): no CPU, memory kept. Resumed by `resume` or,
    /// unless `auto_resume` is off, by the next exec, file operation or task.
    Paused,
    /// The container stopped by `suspend` (or idle suspend) to free its memory; files,
    /// including the root file system's changes, are kept, processes are not. Resumed like
    /// a paused one: the container starts again.
    Suspended,
    /// Stopped by the user (`stop`); started only by `start` (or `resume`).
    Stopped,
    /// Being removed; a crash here is finished by the reconciler.
    Removing,
    Removed,
    /// The container vanished behind conductor's back; resources were freed.
    Lost,
    /// Creation failed; nothing is left in the engine.
    Failed,
}

impl WorkspaceState {
    pub const ALL: [WorkspaceState; 9] = [
        Self::Creating,
        Self::Running,
        Self::Paused,
        Self::Suspended,
        Self::Stopped,
        Self::Removing,
        Self::Removed,
        Self::Lost,
        Self::Failed,
    ];

    /// The states that hold a container ([`Self::holds_container`]): what listings show by
    /// default and what counts towards `max_containers`.
    pub const LIVE: [WorkspaceState; 6] = [
        Self::Creating,
        Self::Running,
        Self::Paused,
        Self::Suspended,
        Self::Stopped,
        Self::Removing,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Creating => "creating",
            Self::Running => "running",
            Self::Paused => "paused",
            Self::Suspended => "suspended",
            Self::Stopped => "stopped",
            Self::Removing => "removing",
            Self::Removed => "removed",
            Self::Lost => "lost",
            Self::Failed => "failed",
        }
    }
    pub fn can_exec(self) -> bool {
        self == Self::Running
    }
    /// `stop` also ends a paused or suspended workspace for good (until `start`).
    pub fn can_stop(self) -> bool {
        matches!(self, Self::Running | Self::Paused | Self::Suspended)
    }
    pub fn can_start(self) -> bool {
        self == Self::Stopped
    }
    pub fn can_pause(self) -> bool {
        self == Self::Running
    }
    /// `resume` brings a paused, suspended or stopped workspace back to running.
    pub fn can_resume(self) -> bool {
        matches!(self, Self::Paused | Self::Suspended | Self::Stopped)
    }
    /// A paused workspace is suspended too (its memory freed).
    pub fn can_suspend(self) -> bool {
        matches!(self, Self::Running | Self::Paused)
    }
    /// What work on the workspace (exec, files, tasks) may resume on its own: a paused or
    /// suspended one. A stopped one was stopped by someone, and stays so.
    pub fn resumes_on_use(self) -> bool {
        matches!(self, Self::Paused | Self::Suspended)
    }
    /// Whether `self -> next` is a legal transition of the lifecycle.
    pub fn can_become(self, next: WorkspaceState) -> bool {
        use WorkspaceState::*;
        match next {
            Creating => false,
            Running => matches!(self, Creating | Paused | Suspended | Stopped),
            Paused => self.can_pause(),
            Suspended => self.can_suspend(),
            Stopped => self.can_stop(),
            Removing => self.can_remove(),
            Removed => self == Removing,
            Lost => self.holds_container(),
            Failed => self == Creating,
        }
    }
    /// Snapshots (and forks) of a paused workspace are refused: the capture pauses it.
    pub fn can_snapshot(self) -> bool {
        matches!(self, Self::Running | Self::Stopped | Self::Suspended)
    }
    pub fn can_restore(self) -> bool {
        matches!(self, Self::Running | Self::Stopped | Self::Suspended)
    }
    /// A fork captures the workspace's state (or reads one of its snapshots).
    pub fn can_fork(self) -> bool {
        matches!(self, Self::Running | Self::Stopped | Self::Suspended)
    }
    /// Destroy is allowed from every state that may still own engine resources.
    pub fn can_remove(self) -> bool {
        !matches!(self, Self::Removed)
    }
    /// A workspace in this state no longer holds anything in the engine.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Removed | Self::Lost | Self::Failed)
    }
    /// Counts towards `max_containers`.
    pub fn holds_container(self) -> bool {
        matches!(
            self,
            Self::Creating | Self::Running | Self::Paused | Self::Suspended | Self::Stopped | Self::Removing
        )
    }
    /// Its container is not running: files are all there is.
    pub fn is_halted(self) -> bool {
        matches!(self, Self::Suspended | Self::Stopped)
    }
}

/// CPU use (percent of one CPU, averaged between two idle checks) above which a workspace
/// counts as busy: a process in it is working, even though no request came.
pub const IDLE_CPU_PERCENT: f64 = 2.0;

/// What the idle check does to a workspace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdleAction {
    Pause,
    Suspend,
}

/// What the idle check knows of a workspace.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct IdleFacts {
    pub state: WorkspaceState,
    /// Seconds since its last exec, file operation, task or busy CPU reading.
    pub idle_secs: u64,
    /// A task runs in it, or a request is being served.
    pub in_use: bool,
    /// Its CPU use since the previous check; `None` before a second reading.
    pub cpu_percent: Option<f64>,
}

/// The idle policy (`cleanup.idle_pause_after`, `cleanup.idle_suspend_after`, in seconds):
/// never a workspace in use or whose processes use CPU; suspension wins when both delays
/// have passed; a paused workspace can still be suspended later.
pub fn idle_action(f: &IdleFacts, pause_after: Option<u64>, suspend_after: Option<u64>) -> Option<IdleAction> {
    if f.in_use {
        return None;
    }
    let passed = |after: Option<u64>| after.is_some_and(|a| f.idle_secs >= a);
    match f.state {
        WorkspaceState::Running => {
            // Without two CPU readings nobody knows whether a background job works.
            let quiet = f.cpu_percent.is_some_and(|c| c < IDLE_CPU_PERCENT);
            if !quiet {
                None
            } else if passed(suspend_after) {
                Some(IdleAction::Suspend)
            } else if passed(pause_after) {
                Some(IdleAction::Pause)
            } else {
                None
            }
        }
        // Frozen: its processes cannot be working.
        WorkspaceState::Paused if passed(suspend_after) => Some(IdleAction::Suspend),
        _ => None,
    }
}

/// State of a task in the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    Queued,
    Running,
    Succeeded,
    Failed,
    TimedOut,
    Cancelled,
}

impl TaskState {
    pub const ALL: [TaskState; 6] = [
        Self::Queued,
        Self::Running,
        Self::Succeeded,
        Self::Failed,
        Self::TimedOut,
        Self::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::TimedOut => "timed_out",
            Self::Cancelled => "cancelled",
        }
    }
    pub fn is_finished(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::TimedOut | Self::Cancelled)
    }
    pub fn can_cancel(self) -> bool {
        matches!(self, Self::Queued | Self::Running)
    }
    pub fn can_start(self) -> bool {
        self == Self::Queued
    }
    /// Whether `self -> next` is a legal transition.
    pub fn can_become(self, next: TaskState) -> bool {
        match self {
            Self::Queued => matches!(next, Self::Running | Self::Cancelled),
            // Back to queued only for an infrastructure retry.
            Self::Running => next != Self::Running,
            _ => false,
        }
    }
}

/// State of a snapshot; only `Complete` ones are listed and restorable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotState {
    Creating,
    Complete,
    Deleting,
}

impl SnapshotState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Creating => "creating",
            Self::Complete => "complete",
            Self::Deleting => "deleting",
        }
    }
    pub fn can_restore(self) -> bool {
        self == Self::Complete
    }
}

macro_rules! str_enum {
    ($t:ty, $($v:ident),+) => {
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
        impl FromStr for $t {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                $(if s == <$t>::$v.as_str() { return Ok(<$t>::$v); })+
                Err(format!("{s:?} is not a valid {}", stringify!($t)))
            }
        }
    };
}
str_enum!(
    WorkspaceState,
    Creating,
    Running,
    Paused,
    Suspended,
    Stopped,
    Removing,
    Removed,
    Lost,
    Failed
);
str_enum!(TaskState, Queued, Running, Succeeded, Failed, TimedOut, Cancelled);
str_enum!(SnapshotState, Creating, Complete, Deleting);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_running_workspaces_exec() {
        for s in WorkspaceState::ALL {
            assert_eq!(s.can_exec(), s == WorkspaceState::Running, "{s}");
        }
    }

    #[test]
    fn removed_is_final_and_everything_else_can_be_removed() {
        for s in WorkspaceState::ALL {
            assert_eq!(s.can_remove(), s != WorkspaceState::Removed);
        }
        assert!(WorkspaceState::Lost.is_terminal());
        assert!(!WorkspaceState::Removing.is_terminal());
        assert!(WorkspaceState::Removing.holds_container());
    }

    #[test]
    fn start_stop_guards() {
        assert!(WorkspaceState::Stopped.can_start());
        assert!(!WorkspaceState::Running.can_start());
        assert!(WorkspaceState::Running.can_stop());
        assert!(!WorkspaceState::Creating.can_snapshot());
        assert!(WorkspaceState::Stopped.can_fork());
        assert!(!WorkspaceState::Creating.can_fork() && !WorkspaceState::Removed.can_fork());
    }

    #[test]
    fn live_states_are_those_holding_a_container() {
        for s in WorkspaceState::ALL {
            assert_eq!(WorkspaceState::LIVE.contains(&s), s.holds_container(), "{s}");
        }
    }

    #[test]
    fn pause_suspend_resume_guards() {
        use WorkspaceState::*;
        assert!(Running.can_pause());
        for s in WorkspaceState::ALL.into_iter().filter(|s| *s != Running) {
            assert!(!s.can_pause(), "{s}");
            assert!(!s.can_exec(), "{s}");
        }
        assert!(Paused.can_resume() && Suspended.can_resume() && Stopped.can_resume());
        assert!(!Running.can_resume() && !Creating.can_resume() && !Removed.can_resume());
        assert!(Running.can_suspend() && Paused.can_suspend());
        assert!(!Stopped.can_suspend() && !Suspended.can_suspend() && !Creating.can_suspend());
        // Work resumes what conductor paused or suspended, never what a user stopped.
        assert!(Paused.resumes_on_use() && Suspended.resumes_on_use());
        assert!(!Stopped.resumes_on_use() && !Running.resumes_on_use());
        // The capture of a snapshot pauses the container itself.
        assert!(!Paused.can_snapshot() && Suspended.can_snapshot());
        for s in [Paused, Suspended] {
            assert!(s.holds_container() && s.can_stop() && s.can_remove() && !s.is_terminal());
        }
        assert!(Suspended.is_halted() && Stopped.is_halted() && !Paused.is_halted());
    }

    #[test]
    fn idle_policy() {
        use WorkspaceState::*;
        let quiet = IdleFacts {
            state: Running,
            idle_secs: 100,
            in_use: false,
            cpu_percent: Some(0.1),
        };
        assert_eq!(idle_action(&quiet, Some(60), None), Some(IdleAction::Pause));
        assert_eq!(idle_action(&quiet, Some(60), Some(100)), Some(IdleAction::Suspend));
        assert_eq!(idle_action(&quiet, Some(60), Some(600)), Some(IdleAction::Pause));
        assert_eq!(idle_action(&quiet, None, None), None, "off by default");
        assert_eq!(idle_action(&quiet, Some(101), None), None, "not idle long enough");
        // A background job working, a request or task in flight, or no second reading yet.
        let spinning = IdleFacts {
            cpu_percent: Some(99.0),
            ..quiet
        };
        assert_eq!(idle_action(&spinning, Some(60), Some(60)), None);
        let serving = IdleFacts { in_use: true, ..quiet };
        assert_eq!(idle_action(&serving, Some(60), Some(60)), None);
        let unknown = IdleFacts {
            cpu_percent: None,
            ..quiet
        };
        assert_eq!(idle_action(&unknown, Some(60), None), None);
        // A paused one can only be suspended, whatever its last CPU reading.
        let paused = IdleFacts {
            state: Paused,
            cpu_percent: None,
            ..quiet
        };
        assert_eq!(idle_action(&paused, Some(60), None), None);
        assert_eq!(idle_action(&paused, Some(60), Some(90)), Some(IdleAction::Suspend));
        for state in [Stopped, Suspended, Creating, Removing, Removed, Lost, Failed] {
            assert_eq!(
                idle_action(&IdleFacts { state, ..quiet }, Some(1), Some(2)),
                None,
                "{state}"
            );
        }
    }

    #[test]
    fn lifecycle_transitions() {
        use WorkspaceState::*;
        let legal = [
            (Creating, Running),
            (Creating, Failed),
            (Running, Paused),
            (Running, Suspended),
            (Running, Stopped),
            (Paused, Running),
            (Paused, Suspended),
            (Paused, Stopped),
            (Suspended, Running),
            (Suspended, Stopped),
            (Stopped, Running),
            (Running, Removing),
            (Paused, Removing),
            (Suspended, Removing),
            (Removing, Removed),
            (Running, Lost),
            (Paused, Lost),
            (Suspended, Lost),
        ];
        for (from, to) in legal {
            assert!(from.can_become(to), "{from} -> {to}");
        }
        let illegal = [
            (Running, Creating),
            (Stopped, Paused),
            (Suspended, Paused),
            (Stopped, Suspended),
            (Removed, Running),
            (Lost, Running),
            (Failed, Running),
            (Removed, Removing),
            (Running, Removed),
            (Running, Failed),
        ];
        for (from, to) in illegal {
            assert!(!from.can_become(to), "{from} -> {to}");
        }
    }

    #[test]
    fn task_transitions() {
        use TaskState::*;
        assert!(Queued.can_become(Running));
        assert!(Queued.can_become(Cancelled));
        assert!(!Queued.can_become(Succeeded));
        assert!(Running.can_become(TimedOut));
        assert!(Running.can_become(Queued));
        for done in [Succeeded, Failed, TimedOut, Cancelled] {
            assert!(done.is_finished());
            assert!(!done.can_cancel());
            for next in TaskState::ALL {
                assert!(!done.can_become(next));
            }
        }
    }

    #[test]
    fn states_round_trip_through_strings() {
        for s in WorkspaceState::ALL {
            assert_eq!(s.to_string().parse::<WorkspaceState>().unwrap(), s);
        }
        for s in TaskState::ALL {
            assert_eq!(s.to_string().parse::<TaskState>().unwrap(), s);
        }
        assert!("nope".parse::<TaskState>().is_err());
        assert!(SnapshotState::Complete.can_restore());
        assert!(!SnapshotState::Creating.can_restore());
    }
}
