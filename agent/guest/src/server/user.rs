//! Resolves the `user` of a process spec (`NAME_OR_UID[:GROUP_OR_GID]`) through `/etc/passwd`
//! and `/etc/group`.
//!
//! The agent is a static binary, so NSS (`getpwnam`) is not available; the
//! passwd file is parsed directly.

use std::path::{Path, PathBuf};

use tonic::Status;

/// Identity a process runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserIdentity {
    pub name: Option<String>,
    pub uid: u32,
    pub gid: u32,
    pub home: Option<PathBuf>,
}

/// Looks up `user` (a name or a numeric uid) in the passwd file at `passwd`.
/// A numeric uid without a passwd entry runs with gid = uid and no home.
pub fn resolve_user(user: &str, passwd: &Path) -> Result<UserIdentity, Status> {
    let contents = std::fs::read_to_string(passwd).unwrap_or_default();
    let numeric = user.parse::<u32>().ok();
    let found = contents
        .lines()
        .filter_map(parse_line)
        .find(|entry| match numeric {
            Some(uid) => entry.uid == uid,
            None => entry.name.as_deref() == Some(user),
        });
    match (found, numeric) {
        (Some(entry), _) => Ok(entry),
        (None, Some(uid)) => Ok(UserIdentity {
            name: None,
            uid,
            gid: uid,
            home: None,
        }),
        (None, None) => Err(Status::not_found(format!(
            "user `{user}` not found in {}",
            passwd.display()
        ))),
    }
}

/// `NAME_OR_UID[:GROUP_OR_GID]` (the form of an OCI image's `User`): the user through
/// [`resolve_user`], the group, when given, by number or through the `group` file beside
/// `passwd`, replacing the user's primary group.
pub fn resolve_identity(user: &str, passwd: &Path) -> Result<UserIdentity, Status> {
    let Some((user, group)) = user.split_once(':') else {
        return resolve_user(user, passwd);
    };
    let mut identity = resolve_user(user, passwd)?;
    identity.gid = match group.parse::<u32>() {
        Ok(gid) => gid,
        Err(_) => {
            let groups = passwd.with_file_name("group");
            let contents = std::fs::read_to_string(&groups).unwrap_or_default();
            contents
                .lines()
                .find_map(|line| {
                    let mut fields = line.split(':');
                    let name = fields.next()?;
                    let gid = fields.nth(1)?.parse::<u32>().ok()?;
                    (name == group && !group.is_empty()).then_some(gid)
                })
                .ok_or_else(|| {
                    Status::not_found(format!("group `{group}` not found in {}", groups.display()))
                })?
        }
    };
    Ok(identity)
}

fn parse_line(line: &str) -> Option<UserIdentity> {
    let mut fields = line.split(':');
    let name = fields.next()?;
    let _password = fields.next()?;
    let uid = fields.next()?.parse().ok()?;
    let gid = fields.next()?.parse().ok()?;
    let _gecos = fields.next()?;
    let home = fields.next()?;
    if name.is_empty() || name.starts_with('#') {
        return None;
    }
    Some(UserIdentity {
        name: Some(name.to_owned()),
        uid,
        gid,
        home: (!home.is_empty()).then(|| PathBuf::from(home)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn passwd_file() -> tempfile::NamedTempFile {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        writeln!(file, "root:x:0:0:root:/root:/bin/sh").unwrap();
        writeln!(file, "broken line").unwrap();
        writeln!(
            file,
            "nobody:x:65534:65533:nobody:/nonexistent:/usr/sbin/nologin"
        )
        .unwrap();
        file
    }

    #[test]
    fn by_name_and_uid() {
        let file = passwd_file();
        let nobody = resolve_user("nobody", file.path()).unwrap();
        assert_eq!((nobody.uid, nobody.gid), (65534, 65533));
        assert_eq!(nobody.home, Some(PathBuf::from("/nonexistent")));
        let root = resolve_user("0", file.path()).unwrap();
        assert_eq!(root.name.as_deref(), Some("root"));
        let unknown_uid = resolve_user("1234", file.path()).unwrap();
        assert_eq!((unknown_uid.uid, unknown_uid.gid), (1234, 1234));
    }

    #[test]
    fn user_with_group() {
        let dir = tempfile::tempdir().unwrap();
        let passwd = dir.path().join("passwd");
        std::fs::write(&passwd, "sandbox:x:1000:1000::/home/sandbox:/bin/sh\n").unwrap();
        std::fs::write(
            dir.path().join("group"),
            "sandbox:x:1000:\nstaff:x:50:sandbox\n",
        )
        .unwrap();
        let plain = resolve_identity("sandbox", &passwd).unwrap();
        assert_eq!((plain.uid, plain.gid), (1000, 1000));
        let named = resolve_identity("sandbox:staff", &passwd).unwrap();
        assert_eq!((named.uid, named.gid), (1000, 50));
        let numeric = resolve_identity("1000:7", &passwd).unwrap();
        assert_eq!((numeric.uid, numeric.gid), (1000, 7));
        let err = resolve_identity("sandbox:wheel", &passwd).unwrap_err();
        assert_eq!(err.code(), tonic::Code::NotFound);
        assert!(err.message().contains("group `wheel`"));
    }

    #[test]
    fn unknown_name_is_not_found() {
        let file = passwd_file();
        let err = resolve_user("mallory", file.path()).unwrap_err();
        assert_eq!(err.code(), tonic::Code::NotFound);
    }
}
