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
    pub const ALL: [WorkspaceState; 7] = [
        Self::Creating,
        Self::Running,
        Self::Stopped,
        Self::Removing,
        Self::Removed,
        Self::Lost,
        Self::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Creating => "creating",
            Self::Running => "running",
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
    pub fn can_stop(self) -> bool {
        self == Self::Running
    }
    pub fn can_start(self) -> bool {
        self == Self::Stopped
    }
    pub fn can_snapshot(self) -> bool {
        matches!(self, Self::Running | Self::Stopped)
    }
    pub fn can_restore(self) -> bool {
        matches!(self, Self::Running | Self::Stopped)
    }
    /// A fork captures the workspace's state (or reads one of its snapshots).
    pub fn can_fork(self) -> bool {
        matches!(self, Self::Running | Self::Stopped)
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
        matches!(self, Self::Creating | Self::Running | Self::Stopped | Self::Removing)
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
