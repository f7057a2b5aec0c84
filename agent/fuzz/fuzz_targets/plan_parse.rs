//! Arbitrary bytes as a plan file: parse, check, render; never panic, errors are one line.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use podmesh_agent::plan::{Plan, PlanError, report};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("fuzz.yaml");
    match Plan::parse(text, path) {
        Ok(plan) => {
            let findings = plan.check();
            for f in &findings {
                assert!(!f.clusters.is_empty() || plan.clusters.is_empty(), "{f:?}");
            }
            let _ = report::table(path, &plan, &findings, true);
            let json = report::json(path, &plan, &findings);
            let v: serde_json::Value = serde_json::from_str(&json).expect("valid JSON");
            assert_eq!(v["findings"].as_array().map(Vec::len), Some(findings.len()));
            // What podmesh accepts it can write back and read again unchanged.
            let yaml = serde_saphyr::to_string(&plan).expect("plan serializes");
            let again = Plan::parse(&yaml, path).expect("serialized plan parses");
            assert_eq!(again, plan);
        }
        Err(e) => {
            assert!(matches!(e, PlanError::Syntax { .. }));
            let msg = e.to_string();
            assert!(msg.starts_with("fuzz.yaml:"), "{msg}");
            assert!(!msg.contains('\n'), "one line: {msg:?}");
        }
    }
});
