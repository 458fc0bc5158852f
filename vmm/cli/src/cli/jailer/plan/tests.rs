use std::path::PathBuf;

use clap::Parser;

use super::*;
use crate::cli::jailer::JailerCli;

/// A fake "this binary" and a `firecracker` link to it in a temporary directory.
struct Bin {
    dir: tempfile::TempDir,
    exe: PathBuf,
    link: PathBuf,
}

fn bin() -> Bin {
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join("dormouse");
    std::fs::write(&exe, "").unwrap();
    let link = dir.path().join("firecracker");
    std::os::unix::fs::symlink(&exe, &link).unwrap();
    Bin { dir, exe, link }
}

fn args(extra: &[&str]) -> JailerArgs {
    let argv = ["jailer"].iter().chain(extra).copied();
    JailerCli::try_parse_from(argv)
        .unwrap_or_else(|e| panic!("{e}"))
        .args
}

fn base(b: &Bin) -> Vec<String> {
    [
        "--id",
        "vm-1",
        "--exec-file",
        b.link.to_str().unwrap(),
        "--uid",
        "123",
        "--gid",
        "100",
    ]
    .map(String::from)
    .to_vec()
}

fn plan_of(b: &Bin, extra: &[&str]) -> anyhow::Result<Plan> {
    let mut argv = base(b);
    argv.extend(extra.iter().map(|s| s.to_string()));
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    plan(&args(&argv), &b.exe)
}

#[test]
fn firecrackers_example_maps_onto_the_jail() {
    let b = bin();
    let p = plan_of(
        &b,
        &[
            "--chroot-base-dir",
            "/tmp/jails",
            "--netns",
            "/var/run/netns/my_netns",
            "--daemonize",
            "--new-pid-ns",
            "--cgroup",
            "cpu.shares=10",
            "--cgroup",
            "memory.limit_in_bytes=268435456",
            "--resource-limit",
            "fsize=250000000",
            "--resource-limit",
            "no-file=1024",
            "--",
            "--api-sock",
            "/run/api.sock",
            "--level",
            "Debug",
        ],
    )
    .unwrap();
    let s = &p.spec;
    assert_eq!((s.id.as_str(), s.uid, s.gid), ("vm-1", 123, 100));
    assert_eq!(
        s.root_dir(),
        PathBuf::from("/tmp/jails/firecracker/vm-1/root")
    );
    assert_eq!(
        s.netns.as_deref(),
        Some(Path::new("/var/run/netns/my_netns"))
    );
    assert!(s.daemonize && s.new_pid_ns);
    assert_eq!(s.cgroup_version, CgroupVersion::V1);
    let cgroups: Vec<String> = s.cgroups.iter().map(|c| format!("{c:?}")).collect();
    assert_eq!(cgroups.len(), 2, "{cgroups:?}");
    assert!(
        cgroups[0].contains("cpu.shares") && cgroups[0].contains("10"),
        "{cgroups:?}"
    );
    // Firecracker's default parent cgroup is the exec file's name.
    assert_eq!(s.cgroup_parent, "firecracker");
    assert_eq!(s.rlimits.fsize, Some(250_000_000));
    assert_eq!(s.rlimits.nofile, Some(1024));
    assert_eq!(s.vmm_dirs, ["run"]);
    assert_eq!(s.pid_file.as_deref(), Some("firecracker.pid"));
    let fc = &p.firecracker;
    assert_eq!(fc.api_sock, Path::new("/run/api.sock"));
    assert_eq!(fc.id, "vm-1", "the jailer passes its --id on");
    assert_eq!(fc.level.as_deref(), Some("Debug"));
}

#[test]
fn defaults_are_firecrackers() {
    let b = bin();
    let p = plan_of(&b, &[]).unwrap();
    assert_eq!(
        p.spec.root_dir(),
        PathBuf::from("/srv/jailer/firecracker/vm-1/root")
    );
    assert_eq!(p.spec.cgroup_version, CgroupVersion::V1);
    assert_eq!(p.spec.rlimits.nofile, Some(2048));
    assert_eq!(p.spec.rlimits.fsize, None);
    assert!(p.spec.netns.is_none() && !p.spec.daemonize && !p.spec.new_pid_ns);
    assert_eq!(p.firecracker.api_sock, Path::new("/run/firecracker.socket"));
    let v2 = plan_of(
        &b,
        &[
            "--cgroup-version",
            "2",
            "--parent-cgroup",
            "fc",
            "--cgroup",
            "pids.max=64",
        ],
    )
    .unwrap();
    assert_eq!(v2.spec.cgroup_version, CgroupVersion::V2);
    assert_eq!(v2.spec.cgroup_parent, "fc");
}

#[test]
fn the_binary_itself_lays_out_under_its_own_name() {
    let b = bin();
    let mut argv = base(&b);
    argv[3] = b.exe.to_str().unwrap().to_string();
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let p = plan(&args(&argv), &b.exe).unwrap();
    assert_eq!(
        p.spec.root_dir(),
        PathBuf::from("/srv/jailer/dormouse/vm-1/root")
    );
    assert_eq!(p.spec.pid_file.as_deref(), Some("dormouse.pid"));
}

fn refused(b: &Bin, extra: &[&str], why: &str) {
    match plan_of(b, extra) {
        Ok(_) => panic!("{extra:?} accepted"),
        Err(e) => assert!(format!("{e:#}").contains(why), "{extra:?}: {e:#}"),
    }
}

#[test]
fn what_dormouse_cannot_honour_is_refused() {
    let b = bin();
    refused(&b, &["--cgroup-version", "3"], "1 or 2");
    refused(&b, &["--resource-limit", "nproc=10"], "not supported");
    refused(&b, &["--resource-limit", "no-file"], "<resource>=<value>");
    refused(
        &b,
        &["--resource-limit", "fsize=1", "--resource-limit", "fsize=2"],
        "twice",
    );
    refused(
        &b,
        &["--parent-cgroup", "fc"],
        "--parent-cgroup without --cgroup",
    );
    refused(
        &b,
        &["--parent-cgroup", "../up", "--cgroup", "pids.max=1"],
        "cgroup-parent",
    );
    refused(&b, &["--cgroup", "nonsense"], "cgroup");
    refused(&b, &["--", "--id", "other"], "passes the jail's --id");
    refused(&b, &["--", "--boot-timer-typo"], "after `--`");
    refused(&b, &["--", "--boot-timer"], "--boot-timer is not supported");
    refused(&b, &["--chroot-base-dir", "relative"], "absolute");
    // Root is refused: the VMM runs unprivileged.
    let mut argv = base(&b);
    argv[5] = "0".into();
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let e = plan(&args(&argv), &b.exe).err().expect("uid 0 accepted");
    assert!(format!("{e:#}").contains("uid 0"), "{e:#}");
    // An invalid id.
    let mut argv = base(&b);
    argv[1] = "bad/id".into();
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    assert!(plan(&args(&argv), &b.exe).is_err());
}

#[test]
fn exec_file_must_be_this_binary() {
    let b = bin();
    let other = b.dir.path().join("firecracker-real");
    std::fs::write(&other, "another VMM").unwrap();
    let mut argv = base(&b);
    argv[3] = other.to_str().unwrap().to_string();
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let e = plan(&args(&argv), &b.exe)
        .err()
        .expect("another binary accepted");
    assert!(
        format!("{e:#}").contains("is not this dormouse binary"),
        "{e:#}"
    );
    argv_missing(&b);
}

fn argv_missing(b: &Bin) {
    let missing = b.dir.path().join("nowhere/firecracker");
    let mut argv = base(b);
    argv[3] = missing.to_str().unwrap().to_string();
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    assert!(plan(&args(&argv), &b.exe).is_err());
}

#[test]
fn required_flags_and_version() {
    assert!(JailerCli::try_parse_from(["jailer", "--id", "x"]).is_err());
    let v = JailerCli::try_parse_from(["jailer", "--version"]).unwrap();
    assert!(v.args.version);
}
