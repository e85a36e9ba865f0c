//! Who a command runs as (`ExecRequest::user`): `NAME`, `UID`,
//! `NAME:GROUP` or `UID:GID`, as Docker and OCI images spell a `User`.
//! Names are looked up in the guest's own `/etc/passwd` and `/etc/group`
//! (the image's); a numeric uid needs no entry.

/// A resolved identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ident {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (from `/etc/group`, for a user found by name
    /// or uid there).
    pub groups: Vec<u32>,
    /// `HOME` and the name for `USER`/`LOGNAME`, when `/etc/passwd` has them.
    pub home: Option<String>,
    pub name: Option<String>,
}

struct Passwd<'a> {
    name: &'a str,
    uid: u32,
    gid: u32,
    home: &'a str,
}

fn passwd_entries(text: &str) -> impl Iterator<Item = Passwd<'_>> {
    text.lines().filter_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() >= 7).then_some(())?;
        Some(Passwd {
            name: f[0],
            uid: f[2].parse().ok()?,
            gid: f[3].parse().ok()?,
            home: f[5],
        })
    })
}

/// `/etc/group` entries: (name, gid, members).
fn group_entries(text: &str) -> impl Iterator<Item = (&str, u32, Vec<&str>)> {
    text.lines().filter_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() >= 4).then_some(())?;
        let members = f[3].split(',').filter(|m| !m.is_empty()).collect();
        Some((f[0], f[2].parse().ok()?, members))
    })
}

/// Resolve `spec` against the text of `/etc/passwd` and `/etc/group`.
pub fn resolve(spec: &str, passwd: &str, group: &str) -> Result<Ident, String> {
    let (user, grp) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    if user.is_empty() || grp.is_some_and(str::is_empty) {
        return Err(format!(
            "user {spec:?} is not NAME, UID, NAME:GROUP or UID:GID"
        ));
    }
    let entry = match user.parse::<u32>() {
        Ok(uid) => passwd_entries(passwd).find(|p| p.uid == uid),
        Err(_) => Some(
            passwd_entries(passwd)
                .find(|p| p.name == user)
                .ok_or_else(|| format!("user {user:?} is not in the guest's /etc/passwd"))?,
        ),
    };
    let uid = match &entry {
        Some(p) => p.uid,
        None => user.parse::<u32>().map_err(|e| e.to_string())?,
    };
    let gid = match grp {
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => group_entries(group)
                .find(|(n, _, _)| *n == g)
                .map(|(_, gid, _)| gid)
                .ok_or_else(|| format!("group {g:?} is not in the guest's /etc/group"))?,
        },
        None => entry.as_ref().map_or(0, |p| p.gid),
    };
    let mut groups = vec![gid];
    if let Some(p) = &entry {
        groups.extend(
            group_entries(group)
                .filter(|(_, _, m)| m.contains(&p.name))
                .map(|(_, g, _)| g),
        );
    }
    groups.sort_unstable();
    groups.dedup();
    Ok(Ident {
        uid,
        gid,
        groups,
        home: entry
            .as_ref()
            .map(|p| p.home.to_string())
            .filter(|h| !h.is_empty()),
        name: entry.as_ref().map(|p| p.name.to_string()),
    })
}

/// Resolve `spec` against the guest's files.
pub fn lookup(spec: &str) -> Result<Ident, String> {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let group = std::fs::read_to_string("/etc/group").unwrap_or_default();
    resolve(spec, &passwd, &group)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/bash\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\napp:x:1000:1000::/home/app:/bin/sh\nbroken line\n";
    const GROUP: &str = "root:x:0:\nstaff:x:50:app\nnogroup:x:65534:\napp:x:1000:\n";

    #[test]
    fn names_numbers_and_groups() {
        let app = resolve("app", PASSWD, GROUP).expect("app");
        assert_eq!((app.uid, app.gid), (1000, 1000));
        assert_eq!(app.groups, vec![50, 1000]);
        assert_eq!(app.home.as_deref(), Some("/home/app"));
        assert_eq!(app.name.as_deref(), Some("app"));
        let n = resolve("65534", PASSWD, GROUP).expect("uid");
        assert_eq!(
            (n.uid, n.gid, n.name.as_deref()),
            (65534, 65534, Some("nobody"))
        );
        let anon = resolve("4242:77", PASSWD, GROUP).expect("numeric");
        assert_eq!(
            (anon.uid, anon.gid, anon.groups.clone(), anon.home),
            (4242, 77, vec![77], None)
        );
        assert_eq!(resolve("4242", PASSWD, GROUP).expect("no entry").gid, 0);
        assert_eq!(resolve("app:staff", PASSWD, GROUP).expect("group").gid, 50);
        for bad in ["ghost", "app:ghosts", "", ":1", "app:"] {
            assert!(resolve(bad, PASSWD, GROUP).is_err(), "{bad:?}");
        }
    }
}
