//! The committed JSON Schemas (`schema/`) are what `imago schema` produces, and real messages validate against
//! their required fields.

use std::path::PathBuf;

#[test]
fn committed_schemas_match_the_code() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("schema");
    for (name, schema) in imago::job::json_schemas() {
        let path = dir.join(name);
        let committed: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("{}: {e} (run `imago schema --out schema`)", path.display())),
        )
        .unwrap();
        assert_eq!(committed, schema, "{name} is stale: run `cargo run -- schema --out schema`");
    }
}

#[test]
fn the_job_schema_requires_what_the_parser_requires() {
    let (_, job) = imago::job::json_schemas().remove(0);
    let required: Vec<&str> = job["required"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    for field in ["v", "id", "kind", "prompt"] {
        assert!(required.contains(&field), "{field} missing from required: {required:?}");
    }
    assert!(job["properties"]["image"].is_object());
    assert!(job["properties"]["deadline_ms"].is_object());
}
