//! Sweeping what crashed labs left: namespaces, agents, state.

use crate::state::LabState;

/// True when `pid` runs a program a lab starts (trellisd, etcd): checked
/// before any signal is sent, so a recycled PID is never hit.
pub fn is_lab_process(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| {
            c.split(|b| *b == 0).next().is_some_and(|argv0| {
                argv0.ends_with(b"trellisd")
                    || argv0.ends_with(b"etcd")
                    || argv0.ends_with(b"kube-apiserver")
                    || argv0.ends_with(b"kube-controller-manager")
            })
        })
        .unwrap_or(false)
}

fn alive(pid: u32) -> bool {
    // a zombie is dead for our purpose
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            !s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
        .unwrap_or(false)
}

/// Names of all named network namespaces.
pub fn namespaces() -> Vec<String> {
    std::fs::read_dir("/var/run/netns")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Deletes every namespace of lab `id`; returns the failures.
pub fn delete_namespaces(id: &str) -> Vec<String> {
    let prefix = format!("{id}-");
    let mut errors = Vec::new();
    // pods first, the fabric last, so veth pairs go away from the leaf up
    let mut names: Vec<String> = namespaces()
        .into_iter()
        .filter(|n| n.starts_with(&prefix))
        .collect();
    names.sort_by_key(|n| std::cmp::Reverse(n.len()));
    for n in names {
        if let Err(e) = crate::exec::ip(&["netns", "del", &n]) {
            errors.push(e.to_string());
        }
    }
    errors
}

/// What a sweep removed.
#[derive(Debug, Default)]
pub struct GcReport {
    /// Labs removed.
    pub labs: Vec<String>,
    /// Labs left alone because their owner still runs.
    pub kept: Vec<String>,
    /// Stray namespaces without a lab.
    pub strays: Vec<String>,
    /// Failures.
    pub errors: Vec<String>,
}

/// Removes labs whose owner process is gone (every lab with `all`,
/// persistent ones included) and stray `trl*` namespaces of no lab.
pub fn sweep(all: bool) -> GcReport {
    let mut report = GcReport::default();
    let root = crate::state_root();
    let mut known = Vec::new();
    for entry in std::fs::read_dir(&root).into_iter().flatten().flatten() {
        let dir = entry.path();
        let id = entry.file_name().to_string_lossy().into_owned();
        if !id.starts_with(crate::PREFIX) {
            continue;
        }
        let st = LabState::load(&dir).ok();
        let live_owner = st
            .as_ref()
            .is_some_and(|s| s.owner_pid != 0 && alive(s.owner_pid));
        let persistent = st.as_ref().is_some_and(|s| s.owner_pid == 0);
        if !all && (live_owner || persistent) {
            report.kept.push(id.clone());
            known.push(id);
            continue;
        }
        let pids = st.iter().flat_map(|s| {
            s.nodes
                .iter()
                .filter_map(|n| n.agent_pid)
                .chain(s.etcd_pid)
                .chain(s.extra_pids.iter().copied())
        });
        for pid in pids {
            if is_lab_process(pid) {
                crate::lab::stop_pid(pid, None);
            }
        }
        report.errors.extend(delete_namespaces(&id));
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            report.errors.push(format!("{}: {e}", dir.display()));
        }
        report.labs.push(id);
    }
    for ns in namespaces() {
        // a lab made while we swept has its state directory already
        let fresh = ns
            .split('-')
            .next()
            .is_some_and(|id| root.join(id).exists());
        if ns.starts_with(crate::PREFIX)
            && !fresh
            && !known.iter().any(|id| ns.starts_with(&format!("{id}-")))
        {
            match crate::exec::ip(&["netns", "del", &ns]) {
                Ok(_) => report.strays.push(ns),
                Err(e) => report.errors.push(e.to_string()),
            }
        }
    }
    report
}
