//! Every manifest under examples/ parses into the typed API (unknown fields rejected),
//! passes client-side validation, and survives a serde round trip unchanged.

use hvx_api::{OverlayDisk, VirtualNetwork, VmApplication, VmMigration};
use serde::Deserialize;

fn example_documents() -> Vec<(String, serde_yaml::Value)> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut docs = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("examples dir")
        .flatten()
        .map(|e| e.path())
        .collect();
    files.sort();
    for path in files
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
    {
        let text = std::fs::read_to_string(&path).expect("read example");
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let value = serde_yaml::Value::deserialize(doc).expect("yaml");
            if !value.is_null() {
                docs.push((path.display().to_string(), value));
            }
        }
    }
    docs
}

fn round_trip<T>(value: &serde_yaml::Value) -> T
where
    T: serde::de::DeserializeOwned + serde::Serialize + PartialEq + std::fmt::Debug,
{
    let typed: T = serde_yaml::from_value(value.clone()).expect("typed parse");
    let again: T =
        serde_yaml::from_str(&serde_yaml::to_string(&typed).expect("serialize")).expect("reparse");
    assert_eq!(typed, again);
    typed
}

#[test]
fn examples_parse_validate_and_round_trip() {
    let docs = example_documents();
    let mut kinds = std::collections::BTreeMap::new();
    for (file, doc) in &docs {
        let kind = doc["kind"].as_str().unwrap_or_default().to_owned();
        match kind.as_str() {
            "VmApplication" => {
                let app: VmApplication = round_trip(doc);
                let problems = hvx_api::validate::application(&app.spec);
                assert!(problems.is_empty(), "{file}: {problems:?}");
            }
            "VirtualNetwork" => drop(round_trip::<VirtualNetwork>(doc)),
            "OverlayDisk" => drop(round_trip::<OverlayDisk>(doc)),
            "VmMigration" => drop(round_trip::<VmMigration>(doc)),
            other => panic!("{file}: unexpected kind {other:?}"),
        }
        *kinds.entry(kind).or_insert(0) += 1;
    }
    assert_eq!(kinds.get("VmApplication"), Some(&1), "{kinds:?}");
    assert_eq!(kinds.get("VirtualNetwork"), Some(&1), "{kinds:?}");
    assert_eq!(kinds.get("OverlayDisk"), Some(&2), "{kinds:?}");
}

#[test]
fn unknown_fields_are_rejected() {
    let (_, doc) = example_documents()
        .into_iter()
        .find(|(_, d)| d["kind"] == "VmApplication")
        .expect("an application example");
    let mut bad = doc.clone();
    bad["spec"]["vms"][0]["nics"][0]["macAdress"] = "00:50:56:00:00:09".into();
    let err = serde_yaml::from_value::<VmApplication>(bad).expect_err("typo must be rejected");
    assert!(
        err.to_string().contains("unknown field `macAdress`"),
        "{err}"
    );

    let mut bad = doc;
    bad["spec"]["vmz"] = serde_yaml::Value::Sequence(vec![]);
    let err = serde_yaml::from_value::<VmApplication>(bad).expect_err("unknown spec field");
    assert!(err.to_string().contains("unknown field `vmz`"), "{err}");
}

#[test]
fn generated_schema_carries_the_cel_rules_and_list_keys() {
    let yaml = hvx_api::crd_yaml(&<VmApplication as kube::CustomResourceExt>::crd()).expect("yaml");
    for needle in [
        "x-kubernetes-list-map-keys",
        "macAddress is immutable",
        "each disk needs its own controller/bus/unit address",
        "PCI slots must be unique across NICs and controllers",
        "a VM cannot depend on itself",
    ] {
        assert!(yaml.contains(needle), "missing {needle:?}");
    }
}
