//! [`VmMetrics`]: one VM's counters in one Prometheus registry (prefix `dormouse_`, constant
//! label `vm_id`), handed out as typed handles, plus the list of JSON groups they form.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use prometheus::{CounterVec, IntCounter, IntCounterVec, Opts, Registry, TextEncoder};

use crate::groups::{Group, GroupValues, Source};
use crate::handles::{
    ApiMetrics, BlockMetrics, Field, MmdsMetrics, NetMetrics, SnapshotMetrics, VcpuMetrics,
    VsockMetrics,
};

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("metrics registry: {0}")]
    Prometheus(#[from] prometheus::Error),
    #[error("metrics registry: a counter set came back incomplete")]
    Incomplete,
}

/// One VM's counters. Cheap to clone (one `Arc`); every clone sees the same counters.
#[derive(Clone)]
pub struct VmMetrics {
    inner: Arc<Inner>,
}

struct Inner {
    vm_id: String,
    registry: Registry,
    block: Vec<IntCounterVec>,
    net: Vec<IntCounterVec>,
    vsock: Vec<IntCounterVec>,
    vcpu: VcpuMetrics,
    api: ApiMetrics,
    mmds: MmdsMetrics,
    snapshot: SnapshotMetrics,
    /// JSON groups in the order they were created; devices add theirs at construction.
    groups: Mutex<Vec<Group>>,
}

impl std::fmt::Debug for VmMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmMetrics")
            .field("vm_id", &self.inner.vm_id)
            .finish_non_exhaustive()
    }
}

impl VmMetrics {
    /// Counters for the VM `vm_id` (the `vm_id` label; may be empty).
    pub fn new(vm_id: &str) -> Result<Self, MetricsError> {
        let labels = HashMap::from([("vm_id".to_string(), vm_id.to_string())]);
        let registry = Registry::new_custom(Some("dormouse".into()), Some(labels))?;
        let block = families(&registry, BlockMetrics::FIELDS, true)?;
        let net = families(&registry, NetMetrics::FIELDS, true)?;
        let vsock = families(&registry, VsockMetrics::FIELDS, true)?;
        let vcpu = VcpuMetrics::from_counters(counters(
            VcpuMetrics::FIELDS,
            &families(&registry, VcpuMetrics::FIELDS, false)?,
            None,
        )?)
        .ok_or(MetricsError::Incomplete)?;
        let api = ApiMetrics::from_counters(counters(
            ApiMetrics::FIELDS,
            &families(&registry, ApiMetrics::FIELDS, false)?,
            None,
        )?)
        .ok_or(MetricsError::Incomplete)?;
        // VM-wide as in Firecracker: every interface serving the MMDS counts into one set.
        let mmds = MmdsMetrics::from_counters(counters(
            MmdsMetrics::FIELDS,
            &families(&registry, MmdsMetrics::FIELDS, false)?,
            None,
        )?)
        .ok_or(MetricsError::Incomplete)?;
        let snapshot = snapshot_metrics(&registry)?;
        let groups = vec![
            int_group("vcpu", None, VcpuMetrics::FIELDS, vcpu.counters()),
            int_group("api_server", None, ApiMetrics::FIELDS, api.counters()),
            int_group("mmds", None, MmdsMetrics::FIELDS, mmds.counters()),
            Group {
                name: "snapshot".into(),
                aggregate: None,
                fields: vec![
                    (
                        "full_create_count",
                        Source::Int(snapshot.full_creates.clone()),
                    ),
                    (
                        "diff_create_count",
                        Source::Int(snapshot.diff_creates.clone()),
                    ),
                    ("load_count", Source::Int(snapshot.loads.clone())),
                ],
            },
            Group {
                name: "latencies_us".into(),
                aggregate: None,
                fields: vec![
                    (
                        "full_create_snapshot",
                        Source::Micros(snapshot.full_create_seconds.clone()),
                    ),
                    (
                        "diff_create_snapshot",
                        Source::Micros(snapshot.diff_create_seconds.clone()),
                    ),
                    (
                        "load_snapshot",
                        Source::Micros(snapshot.load_seconds.clone()),
                    ),
                ],
            },
        ];
        Ok(Self {
            inner: Arc::new(Inner {
                vm_id: vm_id.to_string(),
                registry,
                block,
                net,
                vsock,
                vcpu,
                api,
                mmds,
                snapshot,
                groups: Mutex::new(groups),
            }),
        })
    }

    pub fn vm_id(&self) -> &str {
        &self.inner.vm_id
    }

    /// Counters of the virtio-blk device `id` (JSON group `block_<id>`). Asking twice for
    /// one id returns the same counters (a restore rebuilds its devices).
    pub fn block(&self, id: &str) -> Result<BlockMetrics, MetricsError> {
        let c = counters(BlockMetrics::FIELDS, &self.inner.block, Some(id))?;
        self.add_group(int_group(
            &format!("block_{id}"),
            Some("block"),
            BlockMetrics::FIELDS,
            c.clone(),
        ));
        BlockMetrics::from_counters(c).ok_or(MetricsError::Incomplete)
    }

    /// Counters of the virtio-net device `id` (JSON group `net_<id>`).
    pub fn net(&self, id: &str) -> Result<NetMetrics, MetricsError> {
        let c = counters(NetMetrics::FIELDS, &self.inner.net, Some(id))?;
        self.add_group(int_group(
            &format!("net_{id}"),
            Some("net"),
            NetMetrics::FIELDS,
            c.clone(),
        ));
        NetMetrics::from_counters(c).ok_or(MetricsError::Incomplete)
    }

    /// Counters of the vsock device (JSON group `vsock`; a VM has at most one).
    pub fn vsock(&self) -> Result<VsockMetrics, MetricsError> {
        let c = counters(VsockMetrics::FIELDS, &self.inner.vsock, Some("vsock"))?;
        self.add_group(int_group("vsock", None, VsockMetrics::FIELDS, c.clone()));
        VsockMetrics::from_counters(c).ok_or(MetricsError::Incomplete)
    }

    pub fn vcpu(&self) -> &VcpuMetrics {
        &self.inner.vcpu
    }

    pub fn api(&self) -> &ApiMetrics {
        &self.inner.api
    }

    /// Counters of the VM's MMDS (JSON group `mmds`), shared by every interface serving it.
    pub fn mmds(&self) -> &MmdsMetrics {
        &self.inner.mmds
    }

    pub fn snapshot(&self) -> &SnapshotMetrics {
        &self.inner.snapshot
    }

    /// Every counter, cumulative, in Prometheus' text exposition format 0.0.4.
    pub fn prometheus_text(&self) -> Result<String, MetricsError> {
        Ok(TextEncoder::new().encode_to_string(&self.inner.registry.gather())?)
    }

    /// The JSON groups and their counters' current values.
    pub(crate) fn snapshot_groups(&self) -> Vec<GroupValues> {
        let groups = match self.inner.groups.lock() {
            Ok(g) => g,
            // A panic while pushing a group leaves the list usable.
            Err(poisoned) => poisoned.into_inner(),
        };
        groups
            .iter()
            .map(|g| {
                let values = g
                    .fields
                    .iter()
                    .map(|(name, src)| (*name, src.value()))
                    .collect();
                (g.name.clone(), g.aggregate, values)
            })
            .collect()
    }

    fn add_group(&self, group: Group) {
        let mut groups = match self.inner.groups.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        if !groups.iter().any(|g| g.name == group.name) {
            groups.push(group);
        }
    }
}

/// The content type of [`VmMetrics::prometheus_text`].
pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4";

/// One counter family per field (fields sharing a Prometheus name share the family),
/// registered; returned in field order.
fn families(
    registry: &Registry,
    fields: &[Field],
    per_device: bool,
) -> Result<Vec<IntCounterVec>, MetricsError> {
    let mut by_name: HashMap<&str, IntCounterVec> = HashMap::new();
    let mut out = Vec::with_capacity(fields.len());
    for f in fields {
        if let Some(family) = by_name.get(f.prom) {
            out.push(family.clone());
            continue;
        }
        let mut labels = Vec::new();
        if per_device {
            labels.push("device");
        }
        if f.kind.is_some() {
            labels.push("kind");
        }
        let family = IntCounterVec::new(Opts::new(f.prom, f.help), &labels)?;
        registry.register(Box::new(family.clone()))?;
        by_name.insert(f.prom, family.clone());
        out.push(family);
    }
    Ok(out)
}

/// The counter of each field for `device`.
fn counters(
    fields: &[Field],
    families: &[IntCounterVec],
    device: Option<&str>,
) -> Result<Vec<IntCounter>, MetricsError> {
    fields
        .iter()
        .zip(families)
        .map(|(f, family)| {
            let values: Vec<&str> = device.into_iter().chain(f.kind).collect();
            Ok(family.get_metric_with_label_values(&values)?)
        })
        .collect()
}

fn int_group(
    name: &str,
    aggregate: Option<&'static str>,
    fields: &[Field],
    counters: Vec<IntCounter>,
) -> Group {
    Group {
        name: name.to_string(),
        aggregate,
        fields: fields
            .iter()
            .zip(counters)
            .map(|(f, c)| (f.json, Source::Int(c)))
            .collect(),
    }
}

fn snapshot_metrics(registry: &Registry) -> Result<SnapshotMetrics, MetricsError> {
    let creates = IntCounterVec::new(
        Opts::new("snapshot_creates_total", "Snapshots written, by kind."),
        &["kind"],
    )?;
    let create_seconds = CounterVec::new(
        Opts::new(
            "snapshot_create_seconds_total",
            "Time spent writing snapshots, by kind.",
        ),
        &["kind"],
    )?;
    let loads = IntCounter::with_opts(Opts::new(
        "snapshot_loads_total",
        "Restores from a snapshot.",
    ))?;
    let load_seconds = prometheus::Counter::with_opts(Opts::new(
        "snapshot_load_seconds_total",
        "Time spent restoring from snapshots.",
    ))?;
    registry.register(Box::new(creates.clone()))?;
    registry.register(Box::new(create_seconds.clone()))?;
    registry.register(Box::new(loads.clone()))?;
    registry.register(Box::new(load_seconds.clone()))?;
    Ok(SnapshotMetrics {
        full_creates: creates.get_metric_with_label_values(&["full"])?,
        diff_creates: creates.get_metric_with_label_values(&["diff"])?,
        loads,
        full_create_seconds: create_seconds.get_metric_with_label_values(&["full"])?,
        diff_create_seconds: create_seconds.get_metric_with_label_values(&["diff"])?,
        load_seconds,
    })
}
