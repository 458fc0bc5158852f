use std::time::Duration;

use serde_json::Value;

use crate::json::{delta, Flusher};
use crate::VmMetrics;

fn parse(line: &str) -> Value {
    assert!(!line.contains('\n'), "one line: {line}");
    serde_json::from_str(line).unwrap()
}

#[test]
fn delta_is_the_change_since_the_previous_value() {
    let mut prev = 0;
    assert_eq!(delta(&mut prev, 5), 5);
    assert_eq!(delta(&mut prev, 5), 0);
    assert_eq!(delta(&mut prev, 12), 7);
    // A counter going down (never happens) yields 0, not a wrapped number.
    assert_eq!(delta(&mut prev, 3), 0);
    assert_eq!(prev, 3);
}

#[test]
fn json_lines_carry_deltas_per_group_with_firecracker_names() {
    let m = VmMetrics::new("vm1").unwrap();
    let vda = m.block("vda").unwrap();
    let vdb = m.block("vdb").unwrap();
    let eth0 = m.net("eth0").unwrap();
    let vsock = m.vsock().unwrap();
    let mut f = Flusher::new();

    vda.read_count.inc_by(2);
    vda.read_bytes.inc_by(8192);
    vdb.read_bytes.inc_by(512);
    eth0.tx_packets_count.inc();
    vsock.conns_added.inc();
    m.vcpu().exit_io_out.inc_by(3);
    m.api().requests_count.inc();
    m.snapshot().record_create(false, Duration::from_millis(5));
    let first = parse(&f.line(&m, 1234));
    assert_eq!(first["utc_timestamp_ms"], 1234);
    assert_eq!(first["block_vda"]["read_count"], 2);
    assert_eq!(first["block_vda"]["read_bytes"], 8192);
    assert_eq!(first["block_vdb"]["read_bytes"], 512);
    // The aggregate group sums the devices, as Firecracker's `block`.
    assert_eq!(first["block"]["read_bytes"], 8192 + 512);
    assert_eq!(first["net_eth0"]["tx_packets_count"], 1);
    assert_eq!(first["net"]["tx_packets_count"], 1);
    assert_eq!(first["vsock"]["conns_added"], 1);
    assert_eq!(first["vcpu"]["exit_io_out"], 3);
    assert_eq!(first["vcpu"]["exit_mmio_read"], 0);
    assert_eq!(first["api_server"]["requests_count"], 1);
    assert_eq!(first["snapshot"]["full_create_count"], 1);
    let us = first["latencies_us"]["full_create_snapshot"]
        .as_u64()
        .unwrap();
    assert!((4_900..=5_100).contains(&us), "{us}");
    for field in crate::BlockMetrics::FIELDS {
        assert!(
            first["block_vda"].get(field.json).is_some(),
            "{}",
            field.json
        );
    }

    // The next line has only what happened since.
    vda.read_count.inc();
    let second = parse(&f.line(&m, 1300));
    assert_eq!(second["block_vda"]["read_count"], 1);
    assert_eq!(second["block_vda"]["read_bytes"], 0);
    assert_eq!(second["vcpu"]["exit_io_out"], 0);
    assert_eq!(second["latencies_us"]["full_create_snapshot"], 0);
    let third = parse(&f.line(&m, 1400));
    assert_eq!(third["block_vda"]["read_count"], 0);
}

#[test]
fn the_same_device_id_twice_shares_counters_and_one_group() {
    let m = VmMetrics::new("").unwrap();
    let a = m.block("vda").unwrap();
    let b = m.block("vda").unwrap();
    a.write_count.inc();
    b.write_count.inc();
    assert_eq!(a.write_count.get(), 2);
    let line = parse(&Flusher::new().line(&m, 0));
    assert_eq!(line["block_vda"]["write_count"], 2);
    assert_eq!(line["block"]["write_count"], 2);
}

/// The samples of one metric name: (labels as `k="v"` list, value).
fn samples(text: &str, name: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, labels) = match series.split_once('{') {
                Some((m, rest)) => (m, rest.trim_end_matches('}').to_string()),
                None => (series, String::new()),
            };
            (metric == name).then(|| (labels, value.parse().unwrap()))
        })
        .collect()
}

#[test]
fn prometheus_text_has_cumulative_totals_with_vm_and_device_labels() {
    let m = VmMetrics::new("vm-7").unwrap();
    let vda = m.block("vda").unwrap();
    vda.read_bytes.inc_by(4096);
    m.vcpu().exit_hlt.inc();
    m.snapshot().record_load(Duration::from_millis(250));
    // A JSON flush in between does not reset the cumulative counters.
    let _ = Flusher::new().line(&m, 0);
    vda.read_bytes.inc_by(4096);
    let text = m.prometheus_text().unwrap();

    assert!(
        text.contains("# TYPE dormouse_block_read_bytes_total counter"),
        "{text}"
    );
    let reads = samples(&text, "dormouse_block_read_bytes_total");
    assert_eq!(reads.len(), 1, "{text}");
    assert!(reads[0].0.contains("device=\"vda\""), "{:?}", reads[0]);
    assert!(reads[0].0.contains("vm_id=\"vm-7\""), "{:?}", reads[0]);
    assert_eq!(reads[0].1, 8192.0);

    let exits = samples(&text, "dormouse_vcpu_exits_total");
    let hlt = exits
        .iter()
        .find(|(l, _)| l.contains("kind=\"hlt\""))
        .unwrap();
    assert_eq!(hlt.1, 1.0);
    assert_eq!(exits.len(), crate::VcpuMetrics::FIELDS.len(), "{text}");

    let load = samples(&text, "dormouse_snapshot_load_seconds_total");
    assert!((load[0].1 - 0.25).abs() < 1e-9, "{load:?}");
    // Every counter is a `_total`, and every sample line names the VM.
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let name = line.split(['{', ' ']).next().unwrap();
        assert!(
            name.starts_with("dormouse_") && name.ends_with("_total"),
            "{line}"
        );
        assert!(line.contains("vm_id=\"vm-7\""), "{line}");
    }
}

#[test]
fn docs_metrics_md_names_every_counter() {
    let doc = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../docs/metrics.md"
    ))
    .unwrap();
    let sets = [
        crate::BlockMetrics::FIELDS,
        crate::NetMetrics::FIELDS,
        crate::VsockMetrics::FIELDS,
        crate::VcpuMetrics::FIELDS,
        crate::ApiMetrics::FIELDS,
        crate::MmdsMetrics::FIELDS,
    ];
    for field in sets.iter().flat_map(|s| s.iter()) {
        assert!(doc.contains(&format!("`{}`", field.json)), "{}", field.json);
        let prom = field.prom.to_string();
        assert!(doc.contains(&prom), "{prom}");
    }
    // And what the registry actually exports (snapshot counters included).
    let m = VmMetrics::new("").unwrap();
    let _ = m.block("vda").unwrap();
    let _ = m.net("eth0").unwrap();
    let _ = m.vsock().unwrap();
    for line in m.prometheus_text().unwrap().lines() {
        if let Some(name) = line.strip_prefix("# TYPE ") {
            let name = name.split(' ').next().unwrap();
            let short = name.strip_prefix("dormouse_").unwrap();
            assert!(doc.contains(short), "{short} is not in docs/metrics.md");
        }
    }
}

#[test]
fn the_mmds_group_is_in_the_json_line_and_the_prometheus_text() {
    let m = VmMetrics::new("vm-9").unwrap();
    let mmds = m.mmds();
    mmds.rx_accepted.inc_by(3);
    mmds.rx_no_token.inc();
    mmds.tx_bytes.inc_by(1514);
    mmds.connections_created.inc();
    let mut f = Flusher::new();
    let first = parse(&f.line(&m, 10));
    assert_eq!(first["mmds"]["rx_accepted"], 3);
    assert_eq!(first["mmds"]["rx_no_token"], 1);
    assert_eq!(first["mmds"]["tx_bytes"], 1514);
    assert_eq!(first["mmds"]["connections_created"], 1);
    for field in crate::MmdsMetrics::FIELDS {
        assert!(first["mmds"].get(field.json).is_some(), "{}", field.json);
    }
    // VM-wide, as Firecracker's: no per-device groups, no aggregate.
    assert!(first.get("mmds_eth0").is_none());
    // Deltas, as every group.
    mmds.rx_accepted.inc();
    let second = parse(&f.line(&m, 20));
    assert_eq!(second["mmds"]["rx_accepted"], 1);
    assert_eq!(second["mmds"]["tx_bytes"], 0);

    let text = m.prometheus_text().unwrap();
    let frames = samples(&text, "dormouse_mmds_rx_frames_total");
    assert_eq!(frames.len(), 1, "{text}");
    assert_eq!(frames[0].1, 4.0);
    assert!(frames[0].0.contains("vm_id=\"vm-9\""), "{:?}", frames[0]);
    assert!(!frames[0].0.contains("device="), "{:?}", frames[0]);
    assert_eq!(
        samples(&text, "dormouse_mmds_tx_bytes_total")[0].1,
        1514.0,
        "{text}"
    );
    for field in crate::MmdsMetrics::FIELDS {
        assert!(field.prom.starts_with("mmds_") && field.prom.ends_with("_total"));
        let name = format!("dormouse_{}", field.prom);
        assert_eq!(samples(&text, &name).len(), 1, "{name}: {text}");
    }
}
