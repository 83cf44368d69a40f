//! Resource arithmetic: the limits a workspace actually gets, from the configured defaults
//! and a caller's overrides, which may lower the defaults or raise them up to the
//! configured maxima, never beyond.

use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::size::{ByteSize, Cpu};

/// Per-workspace overrides a caller may ask for.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitOverrides {
    pub memory: Option<ByteSize>,
    pub cpu: Option<Cpu>,
    pub pids: Option<u32>,
    pub volume_size: Option<ByteSize>,
}

/// The limits a workspace runs with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkspaceLimits {
    pub memory: ByteSize,
    pub cpu: Cpu,
    pub pids: u32,
    pub nofile: u32,
    pub nproc: u32,
    pub volume_size: ByteSize,
}

/// A refused override: the field and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitError {
    pub field: &'static str,
    pub message: String,
}

/// `wanted` when given and within `min..=max`, else `default`; the refusal names `field`.
fn pick<T: PartialOrd + Copy + std::fmt::Display>(
    field: &'static str,
    default: T,
    wanted: Option<T>,
    max: T,
    min: T,
) -> Result<T, LimitError> {
    match wanted {
        None => Ok(default),
        Some(v) if v > max => Err(LimitError {
            field,
            message: format!("{v} is above the configured maximum {max}"),
        }),
        Some(v) if v < min => Err(LimitError {
            field,
            message: format!("{v} is below the minimum {min}"),
        }),
        Some(v) => Ok(v),
    }
}

const MIN_MEMORY: ByteSize = ByteSize::mib(6);
const MIN_CPU: Cpu = Cpu(10);
const MIN_PIDS: u32 = 16;
const MIN_VOLUME: ByteSize = ByteSize::mib(16);

impl WorkspaceLimits {
    /// Applies `overrides` to the configured defaults, checking them against the maxima.
    pub fn resolve(config: &Config, overrides: &LimitOverrides) -> Result<Self, LimitError> {
        let r = &config.isolated_workspace.agent_containers.resources;
        let max = &r.maximums;
        Ok(WorkspaceLimits {
            memory: pick("memory", r.limits.memory, overrides.memory, max.memory, MIN_MEMORY)?,
            cpu: pick("cpu", r.limits.cpu, overrides.cpu, max.cpu, MIN_CPU)?,
            pids: pick("pids", r.limits.pids, overrides.pids, max.pids, MIN_PIDS)?,
            nofile: r.limits.nofile,
            nproc: r.limits.nproc,
            volume_size: pick(
                "volume_size",
                config.volume_size(),
                overrides.volume_size,
                max.volume_size,
                MIN_VOLUME,
            )?,
        })
    }

    /// A fork's limits: its source's (`self`), with `overrides` checked against the
    /// configured maxima as for a new workspace. The volume is a copy of the source's file
    /// system, so its size can only be the source's.
    pub fn fork(&self, config: &Config, overrides: &LimitOverrides) -> Result<Self, LimitError> {
        let max = &config.isolated_workspace.agent_containers.resources.maximums;
        if let Some(size) = overrides.volume_size.filter(|s| *s != self.volume_size) {
            return Err(LimitError {
                field: "volume_size",
                message: format!(
                    "{size}: a fork's volume is a copy of its source's ({}), so its size cannot change",
                    self.volume_size
                ),
            });
        }
        Ok(WorkspaceLimits {
            memory: pick("memory", self.memory, overrides.memory, max.memory, MIN_MEMORY)?,
            cpu: pick("cpu", self.cpu, overrides.cpu, max.cpu, MIN_CPU)?,
            pids: pick("pids", self.pids, overrides.pids, max.pids, MIN_PIDS)?,
            ..self.clone()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_come_from_the_config() {
        let c = Config::default();
        let l = WorkspaceLimits::resolve(&c, &LimitOverrides::default()).unwrap();
        assert_eq!(l.memory, ByteSize::gib(2));
        assert_eq!(l.cpu, Cpu(1000));
        assert_eq!(l.volume_size, ByteSize::gib(10));
        assert_eq!((l.nofile, l.nproc, l.pids), (1024, 1024, 512));
    }

    #[test]
    fn overrides_may_lower_or_rise_up_to_the_maximum() {
        let c = Config::default();
        let o = LimitOverrides {
            memory: Some(ByteSize::mib(256)),
            cpu: Some(Cpu(2000)),
            pids: Some(64),
            volume_size: Some(ByteSize::mib(64)),
        };
        let l = WorkspaceLimits::resolve(&c, &o).unwrap();
        assert_eq!(
            (l.memory, l.cpu, l.pids, l.volume_size),
            (ByteSize::mib(256), Cpu(2000), 64, ByteSize::mib(64))
        );
    }

    #[test]
    fn overrides_beyond_the_maximum_name_the_field() {
        let c = Config::default();
        let e = WorkspaceLimits::resolve(
            &c,
            &LimitOverrides {
                memory: Some(ByteSize::gib(64)),
                ..Default::default()
            },
        )
        .unwrap_err();
        assert_eq!(e.field, "memory");
        assert!(e.message.contains("above the configured maximum 8Gi"), "{}", e.message);
        let e = WorkspaceLimits::resolve(
            &c,
            &LimitOverrides {
                pids: Some(1),
                ..Default::default()
            },
        )
        .unwrap_err();
        assert_eq!(e.field, "pids");
    }

    #[test]
    fn a_fork_starts_from_its_sources_limits() {
        let c = Config::default();
        let source = WorkspaceLimits::resolve(
            &c,
            &LimitOverrides {
                memory: Some(ByteSize::mib(512)),
                volume_size: Some(ByteSize::mib(64)),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(source.fork(&c, &LimitOverrides::default()).unwrap(), source);
        let f = source
            .fork(
                &c,
                &LimitOverrides {
                    cpu: Some(Cpu(500)),
                    volume_size: Some(ByteSize::mib(64)),
                    ..Default::default()
                },
            )
            .unwrap();
        assert_eq!(
            (f.memory, f.cpu, f.volume_size),
            (ByteSize::mib(512), Cpu(500), ByteSize::mib(64))
        );
        let e = source
            .fork(
                &c,
                &LimitOverrides {
                    volume_size: Some(ByteSize::gib(1)),
                    ..Default::default()
                },
            )
            .unwrap_err();
        assert_eq!(e.field, "volume_size");
        assert!(e.message.contains("cannot change"), "{}", e.message);
        let e = source
            .fork(
                &c,
                &LimitOverrides {
                    memory: Some(ByteSize::gib(64)),
                    ..Default::default()
                },
            )
            .unwrap_err();
        assert_eq!(e.field, "memory");
    }
}
