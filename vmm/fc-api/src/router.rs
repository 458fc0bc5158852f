//! Firecracker's paths and methods, parsed as Firecracker's API server does: the body must fit
//! the payload limit, a PUT or PATCH needs one, a GET must not have one, an id in the path must
//! match the body's, and anything unknown is a 400 naming the method and path.

use serde::de::DeserializeOwned;
use serde::Serialize;
use vmm_api::http::{Request, Response};

use super::error::{fault, FcError};
use super::front::FcVmm;
use super::types::{
    ActionType, Balloon, BalloonStatsUpdate, BalloonUpdate, BootSource, Drive, InstanceActionInfo,
    Logger, MachineConfig, MachineConfigUpdate, Metrics, MmdsConfig, NetworkInterface,
    PartialDrive, PartialNetworkInterface, SnapshotCreateParams, SnapshotLoadParams,
    VmStateRequest, Vsock,
};

/// Endpoints of Firecracker's API that dormouse does not serve yet, and why.
const NOT_YET: &[(&str, &str)] = &[
    ("entropy", "dormouse has no virtio-rng device"),
    ("serial", "the serial console goes to dormouse's stdout"),
    ("cpu-config", "dormouse passes the host's CPUID through"),
    ("pmem", "dormouse has no virtio-pmem device"),
    ("hotplug", "dormouse has no memory hot-plug"),
];

fn body<T: DeserializeOwned>(request: &Request) -> Result<T, FcError> {
    serde_json::from_slice(&request.body).map_err(|e| {
        FcError::bad(format!(
            "An error occurred when deserializing the json body of a request: {e}."
        ))
    })
}

fn ok_json(value: &impl Serialize) -> Result<Response, FcError> {
    Ok(Response::json(200, value))
}

fn no_content(result: Result<(), FcError>) -> Result<Response, FcError> {
    result.map(|()| Response::no_content())
}

/// Firecracker's checks of an id in a path, then that it is the body's.
fn same_id(path_id: &str, body_id: &str) -> Result<(), FcError> {
    if path_id.is_empty() {
        return Err(FcError::bad("The ID cannot be empty."));
    }
    if !path_id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_')
    {
        return Err(FcError::bad(
            "API Resource IDs can only contain alphanumeric characters and underscores.",
        ));
    }
    if path_id != body_id {
        return Err(FcError::bad(
            "The id from the path does not match the id from the body!",
        ));
    }
    Ok(())
}

fn invalid(request: &Request) -> FcError {
    FcError::bad(format!(
        "Invalid request method and/or path: {} {}.",
        request.method, request.path
    ))
}

fn dispatch(vmm: &FcVmm, request: &Request) -> Result<Response, FcError> {
    let path = request.path.trim_start_matches('/');
    let mut tokens = path.split_terminator('/');
    let first = tokens.next().unwrap_or("");
    let second = tokens.next();
    if tokens.next().is_some() {
        return Err(invalid(request));
    }
    if let Some((_, why)) = NOT_YET.iter().find(|(name, _)| *name == first) {
        return Err(FcError::unsupported(format!("/{first}"), *why));
    }
    let method = request.method.as_str();
    match (method, first, second) {
        ("GET", "", None) => ok_json(&vmm.instance_info()),
        ("GET", "version", None) => ok_json(&vmm.version()),
        ("GET", "vm", Some("config")) => ok_json(&vmm.vm_config()),
        ("GET", "machine-config", None) => ok_json(&vmm.machine_config()),
        ("PUT", "machine-config", None) => {
            no_content(vmm.put_machine_config(body::<MachineConfig>(request)?))
        }
        ("PATCH", "machine-config", None) => {
            no_content(vmm.patch_machine_config(body::<MachineConfigUpdate>(request)?))
        }
        ("PUT", "boot-source", None) => {
            no_content(vmm.put_boot_source(body::<BootSource>(request)?))
        }
        ("PUT", "drives", Some(id)) => {
            let drive: Drive = body(request)?;
            same_id(id, &drive.drive_id)?;
            no_content(vmm.put_drive(drive))
        }
        ("PATCH", "drives", Some(id)) => {
            let drive: PartialDrive = body(request)?;
            same_id(id, &drive.drive_id)?;
            no_content(vmm.patch_drive(drive))
        }
        ("PUT", "network-interfaces", Some(id)) => {
            let iface: NetworkInterface = body(request)?;
            same_id(id, &iface.iface_id)?;
            no_content(vmm.put_network_interface(iface))
        }
        ("PATCH", "network-interfaces", Some(id)) => {
            let iface: PartialNetworkInterface = body(request)?;
            same_id(id, &iface.iface_id)?;
            no_content(vmm.patch_network_interface(iface))
        }
        ("PUT", "vsock", None) => no_content(vmm.put_vsock(body::<Vsock>(request)?)),
        ("PUT", "metrics", None) => no_content(vmm.put_metrics(body::<Metrics>(request)?)),
        ("PUT", "logger", None) => no_content(vmm.put_logger(body::<Logger>(request)?)),
        ("PUT", "balloon", None) => no_content(vmm.put_balloon(body::<Balloon>(request)?)),
        ("PATCH", "balloon", None) => {
            no_content(vmm.patch_balloon(body::<BalloonUpdate>(request)?))
        }
        ("GET", "balloon", None) => ok_json(&vmm.balloon()?),
        ("GET", "balloon", Some("statistics")) => ok_json(&vmm.balloon_statistics()?),
        ("PATCH", "balloon", Some("statistics")) => {
            no_content(vmm.patch_balloon_statistics(body::<BalloonStatsUpdate>(request)?))
        }
        ("PUT", "mmds", None) => no_content(vmm.put_mmds(body(request)?)),
        ("PATCH", "mmds", None) => no_content(vmm.patch_mmds(&body(request)?)),
        ("GET", "mmds", None) => ok_json(&vmm.mmds()),
        ("PUT", "mmds", Some("config")) => {
            no_content(vmm.put_mmds_config(body::<MmdsConfig>(request)?))
        }
        ("PUT", "actions", None) => {
            let action: InstanceActionInfo = body(request)?;
            no_content(match action.action_type {
                ActionType::InstanceStart => vmm.start(),
                ActionType::SendCtrlAltDel => vmm.send_ctrl_alt_del(),
                ActionType::FlushMetrics => vmm.flush_metrics(),
            })
        }
        ("PATCH", "vm", None) => no_content(vmm.set_state(body::<VmStateRequest>(request)?.state)),
        ("PUT", "snapshot", Some("create")) => {
            no_content(vmm.create_snapshot(body::<SnapshotCreateParams>(request)?))
        }
        ("PUT", "snapshot", Some("load")) => {
            no_content(vmm.load(body::<SnapshotLoadParams>(request)?))
        }
        _ => Err(invalid(request)),
    }
}

/// Answers one request to a Firecracker path.
pub fn route(vmm: &FcVmm, request: &Request) -> Response {
    let limit = vmm.settings().max_payload;
    if request.body.len() > limit {
        return fault(
            400,
            format!(
                "Request payload with size {} is larger than the limit of {limit} allowed by server.",
                request.body.len()
            ),
        );
    }
    let has_body = !request.body.iter().all(u8::is_ascii_whitespace);
    let result = match request.method.as_str() {
        "GET" if has_body => Err(FcError::bad("GET request cannot have a body.")),
        "PUT" if !has_body => Err(FcError::bad("Empty PUT request.")),
        "PATCH" if !has_body => Err(FcError::bad("Empty PATCH request.")),
        _ => dispatch(vmm, request),
    };
    match result {
        Ok(response) => response,
        Err(e) => {
            tracing::debug!("Firecracker API: {} {}: {e}", request.method, request.path);
            Response::from(&e)
        }
    }
}
