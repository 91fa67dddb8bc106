//! Text-to-image on miniature models of every family: determinism, seeds, batches, guidance, precision variants,
//! the hub cache layout, and clear errors for bad folders and bad requests.

mod common;

use common::{load, max_abs_diff, max_rel_diff, tiny_model_dir};
use imago::diffusion::hub::{resolve_model, HubOptions};
use imago::diffusion::model::{DiffusionModel, LoadOptions};
use imago::diffusion::pipeline::{GenerateParams, GenerateRequest, Generated};
use imago::diffusion::schedulers::SchedulerKind;
use imago::diffusion::tiny::TinyFamily;
use imago::diffusion::Error;

fn request(seed: u64) -> GenerateRequest {
    GenerateRequest {
        prompt: "a red circle on a blue background".into(),
        seed,
        steps: Some(2),
        batch: 1,
        ..Default::default()
    }
}

fn run(model: &DiffusionModel, req: GenerateRequest) -> Generated {
    let params = model.params(req).unwrap();
    model.generate(&params, &mut |_| true).unwrap()
}

#[test]
fn every_family_generates_deterministic_images_of_the_requested_size() {
    for family in TinyFamily::ALL.into_iter().filter(|f| !f.is_inpaint()) {
        let model = load(&tiny_model_dir(family));
        let a = run(&model, request(7));
        let b = run(&model, request(7));
        let c = run(&model, request(8));
        assert_eq!(a.images.dims4().unwrap(), (1, 3, 64, 64), "{family}");
        assert_eq!(max_abs_diff(&a.images, &b.images), 0.0, "{family}: same seed, different image");
        assert!(max_abs_diff(&a.initial_noise, &c.initial_noise) > 0.5, "{family}: seeds give the same noise");
        let finite = a.final_latents.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().all(|v| v.is_finite());
        assert!(finite, "{family}: non-finite latents");
    }
}

#[test]
fn non_square_sizes_that_are_not_multiples_of_64_work() {
    let model = load(&tiny_model_dir(TinyFamily::Sdxl));
    let g = run(&model, GenerateRequest { size: Some((72, 40)), ..request(1) });
    assert_eq!(g.images.dims4().unwrap(), (1, 3, 40, 72));
}

#[test]
fn image_i_of_a_batch_is_the_single_image_of_seed_plus_i() {
    let model = load(&tiny_model_dir(TinyFamily::Sd15));
    let batch = run(&model, GenerateRequest { batch: 3, ..request(100) });
    let single = run(&model, request(102));
    assert_eq!(batch.images.dims4().unwrap().0, 3);
    let third = batch.final_latents.get(2).unwrap();
    // Batched matmuls sum in another order: equal up to float rounding.
    let diff = max_rel_diff(&third, &single.final_latents.get(0).unwrap());
    assert!(diff < 1e-5, "batch entry differs from its single run by {diff} (relative)");
}

#[test]
fn guidance_at_or_below_one_runs_unguided() {
    let model = load(&tiny_model_dir(TinyFamily::Sd15));
    let g = |guidance| run(&model, GenerateRequest { guidance: Some(guidance), ..request(3) }).final_latents;
    let (one, half, guided) = (g(1.0), g(0.5), g(7.5));
    assert_eq!(max_abs_diff(&one, &half), 0.0, "guidance ≤ 1 must not depend on the scale");
    assert!(max_abs_diff(&one, &guided) > 1e-3, "guidance 7.5 had no effect");
}

#[test]
fn every_scheduler_runs_on_a_v_prediction_model() {
    let model = load(&tiny_model_dir(TinyFamily::Sd21));
    for kind in SchedulerKind::ALL {
        let g = run(&model, GenerateRequest { scheduler: Some(kind), steps: Some(3), ..request(5) });
        assert_eq!(g.images.dims4().unwrap(), (1, 3, 64, 64), "{}", kind.name());
    }
}

#[test]
fn fp16_weight_variant_loads_and_matches_full_precision() {
    let dir = tiny_model_dir(TinyFamily::SdTurbo);
    let copy = tempfile::tempdir().unwrap();
    copy_dir(&dir, copy.path());
    for sub in ["unet", "vae"] {
        std::fs::remove_file(copy.path().join(sub).join("diffusion_pytorch_model.safetensors")).unwrap();
    }
    std::fs::remove_file(copy.path().join("text_encoder/model.safetensors")).unwrap();
    let full = run(&load(&dir), request(9));
    let half = run(&load(copy.path()), request(9));
    let diff = max_rel_diff(&half.final_latents, &full.final_latents);
    assert!(diff > 0.0 && diff < 5e-3, "fp16 weights gave latents {diff} (relative) away from f32");
}

#[test]
fn a_model_is_found_by_repo_id_in_an_offline_hub_cache() {
    let cache = tempfile::tempdir().unwrap();
    let repo = cache.path().join("models--acme--tiny-sd");
    let snapshot = repo.join("snapshots").join("0123456789abcdef");
    copy_dir(&tiny_model_dir(TinyFamily::Sd15), &snapshot);
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "0123456789abcdef").unwrap();
    let options =
        HubOptions { cache_dir: cache.path().into(), offline: true, revision: "main".into(), prefer_fp16: false };
    let root = resolve_model("acme/tiny-sd", &options).unwrap();
    assert_eq!(root, snapshot);
    let g = run(&load(&root), request(1));
    assert_eq!(g.images.dims4().unwrap(), (1, 3, 64, 64));
}

#[test]
fn prompts_over_77_tokens_are_truncated_and_reported() {
    let model = load(&tiny_model_dir(TinyFamily::Sd15));
    let long = "red ".repeat(100);
    let g = run(&model, GenerateRequest { prompt: long, ..request(1) });
    assert_eq!(g.truncated_tokens, 25);
}

#[test]
fn bad_requests_name_the_parameter() {
    let model = load(&tiny_model_dir(TinyFamily::Sd15));
    let err = |req: GenerateRequest| model.params(req).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err(GenerateRequest { size: Some((60, 64)), ..request(1) })
        .contains("width 60 is not a positive multiple of 8"));
    assert!(err(GenerateRequest { size: Some((64, 4096)), ..request(1) }).contains("height 4096 exceeds"));
    assert!(err(GenerateRequest { steps: Some(0), ..request(1) }).contains("steps 0"));
    assert!(err(GenerateRequest { guidance: Some(f64::NAN), ..request(1) }).contains("guidance"));
    assert!(err(GenerateRequest { batch: 99, ..request(1) }).contains("batch 99"));
    let unknown = "plms".parse::<SchedulerKind>().unwrap_err();
    assert!(matches!(&unknown, Error::UnknownScheduler { name, .. } if name == "plms"), "{unknown}");
    let p = GenerateParams { steps: 0, ..model.params(request(1)).unwrap() };
    assert!(matches!(model.generate(&p, &mut |_| true), Err(Error::InvalidRequest(_))));
}

#[test]
fn cancelling_stops_at_the_next_step() {
    let model = load(&tiny_model_dir(TinyFamily::Sd15));
    let params = model.params(GenerateRequest { steps: Some(5), ..request(1) }).unwrap();
    let mut seen = 0;
    let result = model.generate(&params, &mut |p| {
        seen = p.step;
        p.step < 2
    });
    assert!(matches!(result, Err(Error::Cancelled)));
    assert_eq!(seen, 2);
}

#[test]
fn broken_folders_give_errors_that_name_the_problem() {
    let dir = tiny_model_dir(TinyFamily::Sd15);
    let load_err = |f: &dyn Fn(&std::path::Path)| {
        let copy = tempfile::tempdir().unwrap();
        copy_dir(&dir, copy.path());
        f(copy.path());
        DiffusionModel::load(copy.path(), &LoadOptions::cpu()).err().expect("load should fail")
    };
    // a missing weights file
    let err = load_err(&|p| {
        for v in ["", ".fp16"] {
            std::fs::remove_file(p.join(format!("unet/diffusion_pytorch_model{v}.safetensors"))).unwrap();
        }
    });
    assert!(
        matches!(&err, Error::MissingFile { path } if path.ends_with("unet/diffusion_pytorch_model.safetensors")),
        "{err}"
    );
    // a config that does not match the weights: the tensor is named
    let err = load_err(&|p| {
        let path = p.join("unet/config.json");
        let text =
            std::fs::read_to_string(&path).unwrap().replace("\"layers_per_block\": 2", "\"layers_per_block\": 3");
        std::fs::write(path, text).unwrap();
    });
    let msg = err.to_string();
    assert!(matches!(err, Error::Weights { .. }) && msg.contains("cannot find tensor down_blocks.0."), "{msg}");
    assert!(!msg.contains("stack backtrace") && !msg.contains("candle_core::"), "backtrace leaked into {msg}");
    // a wrong tensor shape: the text encoder width differs from the UNet's cross-attention width
    let err = load_err(&|p| {
        let path = p.join("text_encoder/config.json");
        let text =
            std::fs::read_to_string(&path).unwrap().replace("\"intermediate_size\": 64", "\"intermediate_size\": 48");
        std::fs::write(path, text).unwrap();
    });
    assert!(err.to_string().contains("mlp.fc1"), "{err}");
    // unparseable JSON names the file
    let err = load_err(&|p| std::fs::write(p.join("vae/config.json"), "{not json").unwrap());
    assert!(matches!(&err, Error::Config { path, .. } if path.ends_with("vae/config.json")), "{err}");
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// The shared miniatures live in a folder held by a static, which Rust never drops: without the exit handler in
/// `common`, every test binary would leave tens of MB in the temp directory on every run (it filled CI's disk).
/// Runs this binary again as a child that writes a miniature, then checks the child's temp directory is empty.
#[test]
fn shared_miniatures_are_deleted_when_the_test_process_exits() {
    const CHILD: &str = "IMAGO_TEST_FIXTURE_CHILD";
    if std::env::var_os(CHILD).is_some() {
        let dir = tiny_model_dir(TinyFamily::SdTurbo);
        assert!(dir.join("model_index.json").is_file());
        return;
    }
    let temp = tempfile::tempdir().unwrap();
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "shared_miniatures_are_deleted_when_the_test_process_exits", "--test-threads", "1"])
        .env(CHILD, "1")
        .env("TMPDIR", temp.path())
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "the child test failed: {status}");
    let left: Vec<_> = std::fs::read_dir(temp.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(left.is_empty(), "left behind in the temp directory: {left:?}");
}
