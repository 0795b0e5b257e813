//! Scope ids that survive reloads. A scope keeps its id while its name stays in the policy, so
//! its cgroups, counters and port ownership never pass through "unscoped" during a swap; new
//! scopes take ids no running scope uses.

use portguard_common::MAX_SCOPES;

use super::Policy;

/// The id of each scope of `policy`, in policy order. `running` holds the names and ids of the
/// policy in force (empty at start).
pub fn assign_ids(running: &[(String, u32)], policy: &Policy) -> Result<Vec<u32>, String> {
    let kept = |name: &str| {
        running
            .iter()
            .find(|(running_name, _)| running_name == name)
            .map(|(_, id)| *id)
    };
    // Ids of running scopes that the new policy keeps are taken; ids of dropped scopes are not
    // reused by this reload either, so no id changes meaning while the swap is under way.
    let mut taken: Vec<u32> = running.iter().map(|(_, id)| *id).collect();
    let mut ids = Vec::with_capacity(policy.scopes.len());
    let mut next = 0u32;
    for scope in &policy.scopes {
        if let Some(id) = kept(&scope.name) {
            ids.push(id);
            continue;
        }
        while taken.contains(&next) {
            next += 1;
        }
        if next >= MAX_SCOPES {
            return Err(format!(
                "no free scope id for `{}`: at most {MAX_SCOPES} scopes, counting those being replaced",
                scope.name
            ));
        }
        taken.push(next);
        ids.push(next);
    }
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::parse;

    fn policy(names: &[&str]) -> Policy {
        let mut text = String::new();
        for (i, name) in names.iter().enumerate() {
            text += &format!(
                "[[scope]]\nname = \"{name}\"\ncgroup = \"c{i}\"\nephemeral = \"{}\"\n",
                20000 + i * 10
            );
        }
        parse(&text).expect("valid")
    }

    #[test]
    fn start_numbers_in_order() {
        assert_eq!(
            assign_ids(&[], &policy(&["a", "b", "c"])),
            Ok(vec![0, 1, 2])
        );
    }

    #[test]
    fn kept_scopes_keep_their_ids_and_dropped_ids_are_not_reused_at_once() {
        let running = [
            ("a".to_owned(), 0),
            ("b".to_owned(), 1),
            ("c".to_owned(), 2),
        ];
        // b dropped, d added, order changed: a and c keep 0 and 2; d must not take b's 1.
        assert_eq!(
            assign_ids(&running, &policy(&["c", "d", "a"])),
            Ok(vec![2, 3, 0])
        );
    }

    #[test]
    fn running_out_of_ids_is_an_error() {
        let running: Vec<(String, u32)> = (0..MAX_SCOPES).map(|i| (format!("old{i}"), i)).collect();
        assert!(assign_ids(&running, &policy(&["new"])).is_err());
    }
}
