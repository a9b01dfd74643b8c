//! QEMU's permission model: every edge from a parent to a node states what the parent needs
//! (`perm`) and what it lets other parents do at the same time (`shared`). A node's parents
//! must agree: no parent may need something another parent does not share.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Perm(pub u8);

impl Perm {
    pub const CONSISTENT_READ: Perm = Perm(1);
    pub const WRITE: Perm = Perm(2);
    pub const WRITE_UNCHANGED: Perm = Perm(4);
    pub const RESIZE: Perm = Perm(8);
    pub const NONE: Perm = Perm(0);
    pub const ALL: Perm = Perm(15);

    pub fn contains(self, o: Perm) -> bool {
        self.0 & o.0 == o.0
    }
    pub fn minus(self, o: Perm) -> Perm {
        Perm(self.0 & !o.0)
    }

    /// Names of the bits, in QEMU's spelling and order.
    pub fn names(self) -> Vec<&'static str> {
        let mut v = Vec::new();
        for (bit, name) in [
            (Perm::CONSISTENT_READ, "consistent read"),
            (Perm::WRITE, "write"),
            (Perm::WRITE_UNCHANGED, "write unchanged"),
            (Perm::RESIZE, "resize"),
        ] {
            if self.contains(bit) {
                v.push(name);
            }
        }
        v
    }
}

impl std::ops::BitOr for Perm {
    type Output = Perm;
    fn bitor(self, o: Perm) -> Perm {
        Perm(self.0 | o.0)
    }
}

impl fmt::Display for Perm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.names().join(", "))
    }
}

/// One parent's use of a node, as far as conflicts are concerned.
#[derive(Debug, Clone)]
pub struct Use {
    /// Who: "node 'fmt'" / "block device 'drive0'" etc.
    pub user: String,
    /// The edge's role name ("file", "backing", "root").
    pub role: String,
    pub perm: Perm,
    pub shared: Perm,
}

/// Check that `new` can join `existing` uses of `node_name`. The error text follows QEMU's.
pub fn check(node_name: &str, existing: &[Use], new: &Use) -> Result<(), String> {
    for u in existing {
        let denied_new = new.perm.minus(u.shared);
        if denied_new != Perm::NONE {
            return Err(conflict(node_name, denied_new, new, u));
        }
        let denied_old = u.perm.minus(new.shared);
        if denied_old != Perm::NONE {
            return Err(conflict(node_name, denied_old, u, new));
        }
    }
    Ok(())
}

/// QEMU's wording for `needs` requiring permissions `perms` that `denies` does not share.
fn conflict(node_name: &str, perms: Perm, needs: &Use, denies: &Use) -> String {
    format!(
        "Permission conflict on node '{node_name}': permissions '{perms}' are both required by {} \
         (uses node '{node_name}' as '{}' child) and unshared by {} (uses node '{node_name}' as \
         '{}' child).",
        needs.user, needs.role, denies.user, denies.role
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u(user: &str, perm: Perm, shared: Perm) -> Use {
        Use {
            user: user.into(),
            role: "root".into(),
            perm,
            shared,
        }
    }

    #[test]
    fn writers_conflict_when_not_shared() {
        let a = u(
            "block device 'a'",
            Perm::CONSISTENT_READ | Perm::WRITE,
            Perm::ALL.minus(Perm::WRITE),
        );
        let b = u("block device 'b'", Perm::WRITE, Perm::ALL);
        let e = check("file0", std::slice::from_ref(&a), &b).unwrap_err();
        assert_eq!(
            e,
            "Permission conflict on node 'file0': permissions 'write' are both required by \
             block device 'b' (uses node 'file0' as 'root' child) and unshared by block device \
             'a' (uses node 'file0' as 'root' child)."
        );
        let reader = u("block device 'c'", Perm::CONSISTENT_READ, Perm::ALL);
        assert!(check("file0", std::slice::from_ref(&a), &reader).is_ok());
        let exclusive_reader = u(
            "block device 'd'",
            Perm::CONSISTENT_READ,
            Perm::CONSISTENT_READ,
        );
        let e = check("file0", &[a], &exclusive_reader).unwrap_err();
        assert!(
            e.contains("'write' are both required by block device 'a'"),
            "{e}"
        );
    }
}
