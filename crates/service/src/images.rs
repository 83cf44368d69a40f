//! Environment images: the base image, presets and custom environments, built or pulled
//! on demand with live progress. Tags carry the definition hash (see
//! `conductor_core::environment`), so "is it built?" is "does the tag exist?".
//!
//! Batch builds (`conductor env build --all`) run independent images at the same time: the
//! base image first, then every environment whose `FROM` images exist, at most
//! [`default_build_jobs`] at once. [`BuildScheduler`] decides what may start; it is pure.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;

use conductor_core::config::LOCAL_BASE_IMAGE;
use conductor_core::engine::{BuildSpec, ImageInfo, Progress, ProgressSink};
use conductor_core::environment::{Environment, ImagePlan};
use serde::Serialize;

use crate::{Conductor, Result, ServiceError};

/// What `conductor env list` and `GET /environments` show.
#[derive(Debug, Clone, Serialize)]
pub struct EnvStatus {
    pub name: String,
    pub description: String,
    /// The image reference workspaces of this environment run.
    pub image: String,
    pub built: bool,
    pub size_bytes: Option<u64>,
    pub builtin: bool,
    /// `preset`, `dockerfile`, `packages` or `image`.
    pub kind: &'static str,
}

/// The image an environment resolved to.
#[derive(Debug, Clone)]
pub struct EnvImage {
    pub reference: String,
    /// Whether this call built or pulled it (false: it was already there).
    pub made_now: bool,
    pub info: ImageInfo,
}

fn kind(env: &Environment) -> &'static str {
    use conductor_core::environment::ImageSource::*;
    match (&env.source, env.builtin) {
        (_, true) => "preset",
        (Containerfile(_), false) => "dockerfile",
        (Packages(_), _) => "packages",
        (Image(_), _) => "image",
    }
}

/// One image of a batch build.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum BuildTarget {
    /// The base image every preset builds `FROM` (bootstrapped or pulled).
    Base,
    /// An environment's image.
    Environment(String),
    /// The sidecar service images (postgres, redis), made one after the other.
    Services,
}

impl fmt::Display for BuildTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BuildTarget::Base => f.write_str("base"),
            BuildTarget::Environment(name) => f.write_str(name),
            BuildTarget::Services => f.write_str("services"),
        }
    }
}

/// What building a [`BuildTarget`] made.
#[derive(Debug, Clone)]
pub enum Built {
    Image(EnvImage),
    /// The references of the service images.
    Services(Vec<String>),
}

/// Memory one concurrent image build is allowed to count on (apt, dpkg, the build
/// container and Podman committing its layer). Generous: four builds at once took less
/// than 1 GB together; the bound protects small machines.
pub const BUILD_MEMORY_PER_JOB: u64 = 2 << 30;
/// Most image builds at once. Builds are CPU-bound (dpkg, Podman writing layers at
/// ~15 CPU-seconds per GB), so they gain from overlapping one another's waits, not from
/// more than two per CPU: on 2 cores the base, every preset and the service images took
/// 440–560 s one at a time, 421 s two, 377 s three and 314 s four at a time.
pub const MAX_BUILD_JOBS: usize = 4;

/// How many image builds may run at once: one per [`BUILD_MEMORY_PER_JOB`] of available
/// memory, at most two per CPU and [`MAX_BUILD_JOBS`], at least one. Unknown memory counts
/// as room for two.
pub fn default_build_jobs(mem_available: Option<u64>, cpus: usize) -> usize {
    let by_memory = mem_available.map_or(2, |m| usize::try_from(m / BUILD_MEMORY_PER_JOB).unwrap_or(usize::MAX));
    by_memory.min(cpus.max(1) * 2).clamp(1, MAX_BUILD_JOBS)
}

/// `MemAvailable` of `/proc/meminfo`, in bytes.
pub fn mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let mut words = line.split_whitespace().skip(1);
    let value: u64 = words.next()?.parse().ok()?;
    match words.next() {
        Some("kB") => value.checked_mul(1024),
        None => Some(value),
        Some(_) => None,
    }
}

/// [`default_build_jobs`] for this host.
pub fn host_build_jobs() -> usize {
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| mem_available(&m));
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    default_build_jobs(memory, cpus)
}

/// The images a Containerfile builds `FROM`, with `${BASE_IMAGE}` resolved to `base`
/// (stage names of multi-stage builds are left out).
pub fn from_images(containerfile: &str, base: &str) -> Vec<String> {
    let mut stages = BTreeSet::new();
    let mut out = Vec::new();
    for line in containerfile.lines().map(str::trim) {
        let Some((keyword, rest)) = line.split_once(char::is_whitespace) else {
            continue;
        };
        if !keyword.eq_ignore_ascii_case("FROM") {
            continue;
        }
        let mut words = rest.split_whitespace().filter(|w| !w.starts_with("--"));
        let Some(image) = words.next() else { continue };
        let image = image.replace("${BASE_IMAGE}", base).replace("$BASE_IMAGE", base);
        if let (Some(as_), Some(stage)) = (words.next(), words.next()) {
            if as_.eq_ignore_ascii_case("AS") {
                stages.insert(stage.to_ascii_lowercase());
            }
        }
        if !stages.contains(&image.to_ascii_lowercase()) {
            out.push(image);
        }
    }
    out
}

/// Rough build times of the presets and the service images (seconds, measured two at a
/// time on a 2-core machine), so that a batch starts the longest first and does not end
/// waiting for one long build. Other environments count as [`UNKNOWN_BUILD_SECONDS`].
const EXPECTED_BUILD_SECONDS: [(&str, u32); 6] = [
    ("python-ml", 200),
    ("security-tools", 150),
    ("fullstack", 130),
    ("nodejs-dev", 125),
    ("python-dev", 40),
    ("minimal", 25),
];
const SERVICES_BUILD_SECONDS: u32 = 45;
const UNKNOWN_BUILD_SECONDS: u32 = 60;

impl BuildTarget {
    /// About how long building this takes, to start the longest first.
    pub fn expected_seconds(&self) -> u32 {
        match self {
            BuildTarget::Base => u32::MAX,
            BuildTarget::Environment(name) => EXPECTED_BUILD_SECONDS
                .iter()
                .find(|(n, _)| n == name)
                .map_or(UNKNOWN_BUILD_SECONDS, |(_, s)| *s),
            BuildTarget::Services => SERVICES_BUILD_SECONDS,
        }
    }
}

/// An image reference without its tag or digest: `localhost/conductor/x:1f2e` →
/// `localhost/conductor/x`.
fn repository(reference: &str) -> &str {
    let reference = reference.split_once('@').map_or(reference, |(r, _)| r);
    let name_start = reference.rfind('/').map_or(0, |slash| slash + 1);
    match reference[name_start..].rfind(':') {
        Some(colon) => &reference[..name_start + colon],
        None => reference,
    }
}

/// What an environment's image needs before it can be built: the base image when its
/// Containerfile builds on it, and every other environment whose image (any tag of it) it
/// builds `FROM`. `others` are (name, image reference) of the environments known.
pub fn environment_dependencies(
    name: &str,
    containerfile: Option<&str>,
    base: &str,
    others: &[(String, String)],
) -> BTreeSet<BuildTarget> {
    let mut deps = BTreeSet::new();
    let Some(containerfile) = containerfile else {
        return deps;
    };
    for image in from_images(containerfile, base) {
        if repository(&image) == repository(base) {
            deps.insert(BuildTarget::Base);
        }
        for (other, reference) in others {
            if other != name && repository(&image) == repository(reference) {
                deps.insert(BuildTarget::Environment(other.clone()));
            }
        }
    }
    deps
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum JobState {
    Waiting,
    Running,
    Done,
    Failed,
    /// Not started because something it needs failed.
    Skipped,
}

/// Decides which builds of a batch may start: a job starts when every job it depends on
/// is done and fewer than `limit` are running; jobs start in the order given. Dependencies
/// on targets outside the batch count as met. Pure: the caller runs the builds and reports
/// each end with [`BuildScheduler::finished`].
#[derive(Debug, Clone)]
pub struct BuildScheduler<K> {
    jobs: Vec<(K, BTreeSet<K>, JobState)>,
    limit: usize,
}

impl<K: Ord + Clone> BuildScheduler<K> {
    pub fn new(jobs: impl IntoIterator<Item = (K, BTreeSet<K>)>, limit: usize) -> Self {
        let jobs: Vec<(K, BTreeSet<K>, JobState)> =
            jobs.into_iter().map(|(k, deps)| (k, deps, JobState::Waiting)).collect();
        let known: BTreeSet<K> = jobs.iter().map(|(k, _, _)| k.clone()).collect();
        let jobs = jobs
            .into_iter()
            .map(|(k, deps, state)| {
                let deps = deps.into_iter().filter(|d| known.contains(d) && *d != k).collect();
                (k, deps, state)
            })
            .collect();
        BuildScheduler {
            jobs,
            limit: limit.max(1),
        }
    }

    fn state_of(&self, key: &K) -> Option<JobState> {
        self.jobs.iter().find(|(k, _, _)| k == key).map(|(_, _, s)| *s)
    }

    /// The jobs that may start now, marked running.
    pub fn start_ready(&mut self) -> Vec<K> {
        let mut free = self.limit.saturating_sub(self.running().len());
        let mut started = Vec::new();
        for i in 0..self.jobs.len() {
            if free == 0 {
                break;
            }
            let (_, deps, state) = &self.jobs[i];
            if *state == JobState::Waiting && deps.iter().all(|d| self.state_of(d) == Some(JobState::Done)) {
                self.jobs[i].2 = JobState::Running;
                started.push(self.jobs[i].0.clone());
                free -= 1;
            }
        }
        started
    }

    /// Records the end of a running job; when it failed, returns the waiting jobs that
    /// needed it (directly or not), which will not start.
    pub fn finished(&mut self, key: &K, ok: bool) -> Vec<K> {
        let Some(job) = self
            .jobs
            .iter_mut()
            .find(|(k, _, s)| k == key && *s == JobState::Running)
        else {
            return Vec::new();
        };
        job.2 = if ok { JobState::Done } else { JobState::Failed };
        let mut skipped = Vec::new();
        if ok {
            return skipped;
        }
        let mut broken = BTreeSet::from([key.clone()]);
        loop {
            let mut more = false;
            for (k, deps, state) in &mut self.jobs {
                if *state == JobState::Waiting && deps.iter().any(|d| broken.contains(d)) {
                    *state = JobState::Skipped;
                    broken.insert(k.clone());
                    skipped.push(k.clone());
                    more = true;
                }
            }
            if !more {
                return skipped;
            }
        }
    }

    /// The running jobs, in the order given.
    pub fn running(&self) -> Vec<K> {
        self.jobs
            .iter()
            .filter(|(_, _, s)| *s == JobState::Running)
            .map(|(k, _, _)| k.clone())
            .collect()
    }

    /// Once nothing runs: the jobs that can never start (their images build `FROM` each
    /// other), marked failed. Empty while something runs.
    pub fn take_stuck(&mut self) -> Vec<K> {
        if !self.running().is_empty() {
            return Vec::new();
        }
        let mut stuck = Vec::new();
        for (k, _, state) in &mut self.jobs {
            if *state == JobState::Waiting {
                *state = JobState::Skipped;
                stuck.push(k.clone());
            }
        }
        stuck
    }

    /// How far the batch is.
    pub fn progress(&self) -> BatchProgress {
        let count = |f: fn(&JobState) -> bool| self.jobs.iter().filter(|(_, _, s)| f(s)).count();
        BatchProgress {
            done: count(|s| *s == JobState::Done),
            failed: count(|s| matches!(s, JobState::Failed | JobState::Skipped)),
            total: self.jobs.len(),
        }
    }
}

/// Jobs of a batch that are done, that failed or were not started because of a failure,
/// and all of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchProgress {
    pub done: usize,
    pub failed: usize,
    pub total: usize,
}

impl Conductor {
    pub fn base_image(&self) -> &str {
        &self.config.isolated_workspace.agent_containers.base_image
    }

    /// Makes sure the base image exists: bootstraps the local one, pulls any other.
    pub async fn ensure_base(&self, progress: ProgressSink) -> Result<ImageInfo> {
        let base = self.base_image().to_string();
        if let Some(info) = self.engine.image_inspect(&base).await? {
            return Ok(info);
        }
        if base == LOCAL_BASE_IMAGE {
            self.bootstrap_base(&base, progress).await
        } else {
            progress(Progress::Line(format!("pulling base image {base}")));
            Ok(self.engine.image_pull(&base, progress).await?)
        }
    }

    /// Like [`Conductor::ensure_base`], saying whether this call made the image.
    pub async fn ensure_base_image(&self, progress: ProgressSink) -> Result<EnvImage> {
        let reference = self.base_image().to_string();
        let existed = self.engine.image_inspect(&reference).await?;
        let made_now = existed.is_none();
        let info = match existed {
            Some(info) => info,
            None => self.ensure_base(progress).await?,
        };
        Ok(EnvImage {
            reference,
            made_now,
            info,
        })
    }

    /// The batch that builds `names` (and, with `services`, the sidecar images): each
    /// target with the targets it needs first, the longest builds first. The base image is
    /// part of it when anything builds on it; environments another one builds `FROM` are
    /// added when not named.
    pub fn build_targets(&self, names: &[String], services: bool) -> Result<Vec<(BuildTarget, BTreeSet<BuildTarget>)>> {
        let base = self.base_image();
        let others: Vec<(String, String)> = self
            .catalog
            .iter()
            .map(|e| (e.name.clone(), e.plan(base).reference().to_string()))
            .collect();
        let mut out: Vec<(BuildTarget, BTreeSet<BuildTarget>)> = Vec::new();
        let mut queue: VecDeque<String> = names.iter().cloned().collect();
        let mut seen = BTreeSet::new();
        while let Some(name) = queue.pop_front() {
            if !seen.insert(name.clone()) {
                continue;
            }
            let env = self
                .catalog
                .require(&name)
                .map_err(|m| ServiceError::invalid("environment", m))?;
            let deps = environment_dependencies(&name, env.containerfile().as_deref(), base, &others);
            for d in &deps {
                if let BuildTarget::Environment(other) = d {
                    queue.push_back(other.clone());
                }
            }
            out.push((BuildTarget::Environment(name), deps));
        }
        if services {
            out.push((BuildTarget::Services, BTreeSet::from([BuildTarget::Base])));
        }
        if out.iter().any(|(_, deps)| deps.contains(&BuildTarget::Base)) {
            out.push((BuildTarget::Base, BTreeSet::new()));
        }
        // Longest first (stable: equal estimates keep the order asked for).
        out.sort_by_key(|(target, _)| std::cmp::Reverse(target.expected_seconds()));
        Ok(out)
    }

    /// Builds one target of a batch (`force`: environments are rebuilt even when present).
    pub async fn build_target(&self, target: &BuildTarget, progress: ProgressSink, force: bool) -> Result<Built> {
        match target {
            BuildTarget::Base => self.ensure_base_image(progress).await.map(Built::Image),
            BuildTarget::Environment(name) => self.ensure_environment(name, progress, force).await.map(Built::Image),
            BuildTarget::Services => self.build_service_images(progress).await.map(Built::Services),
        }
    }

    /// Status of every environment.
    pub async fn environments(&self) -> Result<Vec<EnvStatus>> {
        let mut out = Vec::new();
        for env in self.catalog.iter() {
            let plan = env.plan(self.base_image());
            let info = self.engine.image_inspect(plan.reference()).await?;
            out.push(EnvStatus {
                name: env.name.clone(),
                description: env.description.clone(),
                image: plan.reference().to_string(),
                built: info.is_some(),
                size_bytes: info.map(|i| i.size_bytes),
                builtin: env.builtin,
                kind: kind(env),
            });
        }
        Ok(out)
    }

    /// The image reference of an environment (without building it).
    pub fn environment_image(&self, name: &str) -> Result<String> {
        let env = self
            .catalog
            .require(name)
            .map_err(|m| ServiceError::invalid("environment", m))?;
        Ok(env.plan(self.base_image()).reference().to_string())
    }

    /// Builds (or pulls) an environment's image unless it already exists; `force`
    /// rebuilds anyway.
    pub async fn ensure_environment(&self, name: &str, progress: ProgressSink, force: bool) -> Result<EnvImage> {
        let env = self
            .catalog
            .require(name)
            .map_err(|m| ServiceError::invalid("environment", m))?;
        let plan = env.plan(self.base_image());
        let reference = plan.reference().to_string();
        if !force {
            if let Some(info) = self.engine.image_inspect(&reference).await? {
                return Ok(EnvImage {
                    reference,
                    made_now: false,
                    info,
                });
            }
        }
        let wrap = |e: ServiceError| match e {
            ServiceError::Engine(err) => ServiceError::Environment {
                name: name.to_string(),
                message: err.to_string(),
            },
            other => other,
        };
        let info = match plan {
            ImagePlan::Use(r) => {
                progress(Progress::Line(format!("pulling {r}")));
                self.engine.image_pull(&r, progress).await.map_err(|e| wrap(e.into()))?
            }
            ImagePlan::Build {
                tag,
                containerfile,
                base,
                labels,
                ..
            } => {
                if containerfile.contains("BASE_IMAGE") {
                    self.ensure_base(progress.clone()).await?;
                }
                let spec = BuildSpec {
                    tag,
                    containerfile,
                    context_files: Vec::new(),
                    build_args: BTreeMap::from([("BASE_IMAGE".to_string(), base)]),
                    labels,
                    host_network: true,
                };
                self.engine
                    .image_build(spec, progress)
                    .await
                    .map_err(|e| wrap(e.into()))?
            }
        };
        Ok(EnvImage {
            reference,
            made_now: true,
            info,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> BuildTarget {
        BuildTarget::Environment(name.into())
    }

    fn deps<const N: usize>(d: [BuildTarget; N]) -> BTreeSet<BuildTarget> {
        BTreeSet::from(d)
    }

    #[test]
    fn the_base_goes_first_then_independent_images_within_the_bound() {
        let mut s = BuildScheduler::new(
            [
                (BuildTarget::Base, deps([])),
                (env("a"), deps([BuildTarget::Base])),
                (env("b"), deps([BuildTarget::Base])),
                (env("c"), deps([BuildTarget::Base])),
                (BuildTarget::Services, deps([BuildTarget::Base])),
            ],
            2,
        );
        assert_eq!(s.start_ready(), vec![BuildTarget::Base]);
        assert_eq!(s.start_ready(), vec![], "nothing more while the base builds");
        assert_eq!(s.finished(&BuildTarget::Base, true), vec![]);
        assert_eq!(s.start_ready(), vec![env("a"), env("b")], "two at a time, in order");
        assert_eq!(s.start_ready(), vec![]);
        s.finished(&env("b"), true);
        assert_eq!(s.start_ready(), vec![env("c")]);
        s.finished(&env("a"), true);
        assert_eq!(s.start_ready(), vec![BuildTarget::Services]);
        assert_eq!(
            s.progress(),
            BatchProgress {
                done: 3,
                failed: 0,
                total: 5
            }
        );
        assert_eq!(s.running(), vec![env("c"), BuildTarget::Services]);
        s.finished(&env("c"), true);
        s.finished(&BuildTarget::Services, true);
        assert_eq!(s.progress().done, 5);
        assert!(s.start_ready().is_empty() && s.take_stuck().is_empty());
    }

    #[test]
    fn an_image_built_from_another_waits_for_it_and_is_skipped_when_it_fails() {
        let mut s = BuildScheduler::new(
            [
                (BuildTarget::Base, deps([])),
                (env("child"), deps([env("parent")])),
                (env("grandchild"), deps([env("child")])),
                (env("parent"), deps([BuildTarget::Base])),
                (env("other"), deps([BuildTarget::Base])),
            ],
            4,
        );
        assert_eq!(s.start_ready(), vec![BuildTarget::Base]);
        s.finished(&BuildTarget::Base, true);
        assert_eq!(s.start_ready(), vec![env("parent"), env("other")]);
        assert_eq!(s.finished(&env("parent"), false), vec![env("child"), env("grandchild")]);
        assert_eq!(s.start_ready(), vec![]);
        s.finished(&env("other"), true);
        assert_eq!(
            s.progress(),
            BatchProgress {
                done: 2,
                failed: 3,
                total: 5
            }
        );
        assert!(s.take_stuck().is_empty());
    }

    #[test]
    fn dependencies_outside_the_batch_count_as_met_and_cycles_are_reported() {
        let mut s = BuildScheduler::new([(env("a"), deps([BuildTarget::Base]))], 1);
        assert_eq!(s.start_ready(), vec![env("a")], "the base is not part of this batch");
        let mut s = BuildScheduler::new(
            [
                (env("x"), deps([env("y")])),
                (env("y"), deps([env("x")])),
                (env("z"), deps([])),
            ],
            0,
        );
        assert_eq!(s.start_ready(), vec![env("z")], "a bound of 0 still runs one");
        assert!(s.take_stuck().is_empty(), "not while z runs");
        s.finished(&env("z"), true);
        assert_eq!(s.start_ready(), vec![]);
        assert_eq!(s.take_stuck(), vec![env("x"), env("y")]);
        assert_eq!(s.progress().failed, 2);
        assert!(s.take_stuck().is_empty());
    }

    #[test]
    fn the_longest_builds_are_expected_to_be_the_longest() {
        let mut targets = vec![
            env("minimal"),
            BuildTarget::Services,
            env("custom"),
            env("python-ml"),
            BuildTarget::Base,
            env("python-dev"),
        ];
        targets.sort_by_key(|t| std::cmp::Reverse(t.expected_seconds()));
        assert_eq!(
            targets,
            vec![
                BuildTarget::Base,
                env("python-ml"),
                env("custom"),
                BuildTarget::Services,
                env("python-dev"),
                env("minimal")
            ]
        );
    }

    #[test]
    fn build_jobs_follow_memory_and_cpus() {
        const GIB: u64 = 1 << 30;
        assert_eq!(default_build_jobs(Some(22 * GIB), 2), 4, "capped at 2 per CPU and 4");
        assert_eq!(default_build_jobs(Some(22 * GIB), 1), 2);
        assert_eq!(default_build_jobs(Some(22 * GIB), 16), MAX_BUILD_JOBS);
        assert_eq!(default_build_jobs(Some(5 * GIB), 8), 2, "2 GiB each");
        assert_eq!(default_build_jobs(Some(GIB), 8), 1, "at least one");
        assert_eq!(default_build_jobs(None, 8), 2);
        assert_eq!(default_build_jobs(Some(22 * GIB), 0), 2);
        let meminfo = "MemTotal:       24558592 kB\nMemFree:        17000000 kB\nMemAvailable:   23068672 kB\n";
        assert_eq!(mem_available(meminfo), Some(23068672 * 1024));
        assert_eq!(mem_available("MemTotal: 1 kB\n"), None);
    }

    #[test]
    fn from_images_resolve_the_base_and_skip_stages() {
        let base = "localhost/conductor/base:bookworm";
        assert_eq!(
            from_images("ARG BASE_IMAGE\nFROM ${BASE_IMAGE}\nRUN x\n", base),
            vec![base]
        );
        assert_eq!(
            from_images(
                "FROM --platform=linux/amd64 localhost/conductor/python-dev:abc AS build\nfrom build\nCOPY --from=build /a /a\n",
                base
            ),
            vec!["localhost/conductor/python-dev:abc"]
        );
        assert_eq!(
            from_images("# FROM nothing\nRUN echo FROM x\n", base),
            Vec::<String>::new()
        );
    }

    #[test]
    fn environments_depend_on_the_base_and_on_environments_they_build_from() {
        let base = "localhost/conductor/base:bookworm";
        let others = vec![
            (
                "python-dev".to_string(),
                "localhost/conductor/python-dev:5adca386169c".to_string(),
            ),
            ("py".to_string(), "python:3.11-slim".to_string()),
        ];
        let preset = "ARG BASE_IMAGE\nFROM ${BASE_IMAGE}\n";
        assert_eq!(
            environment_dependencies("minimal", Some(preset), base, &others),
            deps([BuildTarget::Base])
        );
        assert_eq!(
            environment_dependencies(
                "mine",
                Some("FROM localhost/conductor/python-dev:latest\n"),
                base,
                &others
            ),
            deps([env("python-dev")]),
            "any tag of another environment's image"
        );
        assert_eq!(
            environment_dependencies("mine", Some("FROM python:3.11-slim\n"), base, &others),
            deps([env("py")])
        );
        assert_eq!(
            environment_dependencies(
                "python-dev",
                Some("FROM localhost/conductor/python-dev:old\n"),
                base,
                &others
            ),
            deps([]),
            "not on itself"
        );
        assert_eq!(
            environment_dependencies("py", None, base, &others),
            deps([]),
            "pulled images need nothing"
        );
        assert_eq!(repository("localhost:5000/a/b:t@sha256:00"), "localhost:5000/a/b");
        assert_eq!(repository("localhost:5000/a/b"), "localhost:5000/a/b");
    }
}
