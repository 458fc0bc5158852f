//! The host links the agent's protocol and client, never the guest crate `agent` (the server,
//! the PID 1 duties). Cargo would accept such a dependency (even a cycle through
//! dev-dependencies), so this test reads the manifests: no workspace member, this client
//! included, names the package `agent` in any dependency table. The guest crate itself may
//! depend on `agent-client` for its tests.

use std::path::{Path, PathBuf};

const GUEST_PACKAGE: &str = "agent";

fn workspace_root() -> PathBuf {
    // agent/client -> agent -> workspace root
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("agent/client has a grandparent")
        .to_path_buf()
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|err| panic!("{}: {err}", path.display()))
}

/// The `members = [...]` of the root manifest (plain paths; the workspace uses no globs).
fn workspace_members(root_manifest: &str) -> Vec<String> {
    let start = root_manifest
        .find("members")
        .expect("the root Cargo.toml lists members");
    let rest = &root_manifest[start..];
    let open = rest.find('[').expect("members = [");
    let close = rest.find(']').expect("members = [...]");
    let members: Vec<String> = rest[open + 1..close]
        .split(',')
        .map(|item| item.trim().trim_matches('"').to_owned())
        .filter(|item| !item.is_empty())
        .collect();
    assert!(
        members.iter().all(|m| !m.contains('*')),
        "globs in members: extend this test"
    );
    members
}

/// Lines of `manifest` that make the guest package a dependency, in any dependency table
/// (`[dependencies]`, `[dev-dependencies]`, `[build-dependencies]`, `[target.….dependencies]`),
/// by key (`agent = …`, `agent.workspace = true`), table (`[dependencies.agent]`) or rename
/// (`x = { package = "agent", … }`).
fn guest_dependencies(manifest: &str) -> Vec<String> {
    let mut in_dependencies = false;
    let mut found = Vec::new();
    for line in manifest.lines().map(str::trim) {
        if line.starts_with('[') {
            let header = line.trim_matches(|c| c == '[' || c == ']');
            let mut parts = header.rsplitn(2, '.');
            let last = parts.next().unwrap_or_default();
            let parent = parts.next().unwrap_or_default();
            // `[workspace.dependencies]` only declares versions; members opt in.
            in_dependencies = header.ends_with("dependencies") && !header.starts_with("workspace");
            if parent.ends_with("dependencies") && last.trim_matches('"') == GUEST_PACKAGE {
                found.push(line.to_owned());
            }
            continue;
        }
        if !in_dependencies || line.starts_with('#') {
            continue;
        }
        let key = line
            .split(['=', '.'])
            .next()
            .unwrap_or_default()
            .trim()
            .trim_matches('"');
        let renamed = line.replace(' ', "").contains("package=\"agent\"");
        if key == GUEST_PACKAGE || renamed {
            found.push(line.to_owned());
        }
    }
    found
}

#[test]
fn the_client_does_not_depend_on_the_guest_agent() {
    let manifest = read(&Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"));
    assert_eq!(guest_dependencies(&manifest), Vec::<String>::new());
}

#[test]
fn no_workspace_member_depends_on_the_guest_agent() {
    let root = workspace_root();
    let members = workspace_members(&read(&root.join("Cargo.toml")));
    assert!(
        members.iter().any(|m| m == "agent/client"),
        "members: {members:?}"
    );
    for member in &members {
        let manifest = read(&root.join(member).join("Cargo.toml"));
        assert_eq!(
            guest_dependencies(&manifest),
            Vec::<String>::new(),
            "{member}/Cargo.toml depends on the guest crate `{GUEST_PACKAGE}`"
        );
    }
}

#[test]
fn the_manifest_check_sees_every_form_of_dependency() {
    for manifest in [
        "[dependencies]\nagent.workspace = true\n",
        "[dev-dependencies]\nagent = { path = \"../guest\" }\n",
        "[build-dependencies]\n\"agent\" = \"0.1\"\n",
        "[target.'cfg(unix)'.dependencies]\nagent = { workspace = true }\n",
        "[dependencies.agent]\npath = \"../guest\"\n",
        "[dependencies]\nguest = { package = \"agent\", path = \"../guest\" }\n",
    ] {
        assert_eq!(guest_dependencies(manifest).len(), 1, "{manifest}");
    }
    for manifest in [
        "[package]\nname = \"agent\"\n",
        "[dependencies]\nagent-proto.workspace = true\nagent-client = { path = \"x\" }\n",
        "[dependencies]\n# agent.workspace = true\n",
        "[profile.release.package.agent]\nopt-level = \"s\"\n",
        "[workspace.dependencies]\nagent = { path = \"agent/guest\" }\n",
    ] {
        assert_eq!(
            guest_dependencies(manifest),
            Vec::<String>::new(),
            "{manifest}"
        );
    }
}
