//! Arbitrary bytes as a job message: parsing, id salvage and validation must never panic, every refusal carries a
//! code from the right stage, and whatever validates respects the limits.

#![no_main]

use imago::job::{parse, salvage_id, valid_id, validate, ErrorCode, JobKind, JobLimits};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let limits = JobLimits::default();
    if let Some(id) = salvage_id(data) {
        assert!(valid_id(&id), "salvaged an unusable id");
    }
    let message = match parse(data) {
        Ok(message) => message,
        Err(e) => {
            assert_eq!(e.code, ErrorCode::InvalidJson);
            return;
        }
    };
    let spec = match validate(message, &limits) {
        Ok(spec) => spec,
        Err(e) => {
            assert_ne!(e.code, ErrorCode::InvalidJson, "a parsed message was refused as unparseable");
            assert!(!e.message.is_empty());
            return;
        }
    };
    assert!(valid_id(&spec.id));
    assert!((1..=limits.max_batch).contains(&spec.batch));
    assert!(spec.steps.is_none_or(|s| (1..=limits.max_steps).contains(&s)));
    assert!(spec.size.is_none_or(|(w, h)| [w, h].iter().all(|s| s % 8 == 0 && (8..=limits.max_side).contains(s))));
    assert!(spec.guidance.is_none_or(|g| g.is_finite() && (0.0..=limits.max_guidance).contains(&g)));
    assert!(spec.prompt.expose().chars().count() <= limits.max_prompt_chars);
    assert_eq!(spec.edit.is_some(), spec.kind == JobKind::Edit);
    // A sealed job is private and carries no clear content; an unsealed private one names its reply subject.
    if spec.sealed.is_some() {
        assert!(spec.private && spec.prompt.is_empty() && spec.negative_prompt.is_empty());
        assert!(spec.edit.as_ref().is_none_or(|e| e.image.is_none() && e.mask.is_none()));
    } else {
        assert!(!spec.private || spec.reply.is_some());
    }
    if let Some(edit) = &spec.edit {
        assert!(edit.strength.is_none_or(|s| (0.0..=1.0).contains(&s)));
        assert!((0.0..=64.0).contains(&edit.mask_blur));
    }
});
