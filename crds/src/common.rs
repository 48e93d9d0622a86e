//! Types shared by every hvx resource.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A reference to another hvx object in the same namespace.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalRef {
    /// Name of the referenced object.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// Standard condition types used across hvx status blocks.
pub mod condition {
    /// The object's desired state is fully in effect.
    pub const READY: &str = "Ready";
    /// The spec was rejected by validation that the schema cannot express.
    pub const VALID: &str = "Valid";
    /// Work towards the desired state is under way (import, start, migration).
    pub const PROGRESSING: &str = "Progressing";
    /// Something needs a human: the message says what.
    pub const DEGRADED: &str = "Degraded";
}

/// Builds a condition stamped with the generation it describes.
pub fn new_condition(
    type_: &str,
    status: bool,
    reason: &str,
    message: impl Into<String>,
    observed_generation: Option<i64>,
    now: Time,
) -> Condition {
    Condition {
        type_: type_.to_owned(),
        status: if status { "True" } else { "False" }.to_owned(),
        reason: reason.to_owned(),
        message: message.into(),
        observed_generation,
        last_transition_time: now,
    }
}

/// Inserts or replaces `new` in `conditions` by type. The transition time is kept when
/// the status did not change, as Kubernetes conventions require.
pub fn set_condition(conditions: &mut Vec<Condition>, new: Condition) {
    match conditions.iter_mut().find(|c| c.type_ == new.type_) {
        Some(existing) => {
            let keep_time = existing.status == new.status;
            let time = existing.last_transition_time.clone();
            *existing = new;
            if keep_time {
                existing.last_transition_time = time;
            }
        }
        None => conditions.push(new),
    }
}

/// Finds a condition by type.
pub fn find_condition<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;

    fn at(secs: i64) -> Time {
        Time(Timestamp::from_second(secs).expect("valid timestamp"))
    }

    #[test]
    fn set_condition_keeps_transition_time_when_status_is_unchanged() {
        let mut conds = vec![new_condition(
            "Ready",
            false,
            "Starting",
            "a",
            Some(1),
            at(10),
        )];
        set_condition(
            &mut conds,
            new_condition("Ready", false, "Starting", "b", Some(2), at(20)),
        );
        assert_eq!(conds.len(), 1);
        assert_eq!(conds[0].last_transition_time, at(10));
        assert_eq!(conds[0].message, "b");
        assert_eq!(conds[0].observed_generation, Some(2));
        set_condition(
            &mut conds,
            new_condition("Ready", true, "Running", "c", Some(2), at(30)),
        );
        assert_eq!(conds[0].last_transition_time, at(30));
        assert_eq!(
            find_condition(&conds, "Ready").map(|c| c.status.as_str()),
            Some("True")
        );
        assert!(find_condition(&conds, "Valid").is_none());
    }
}
