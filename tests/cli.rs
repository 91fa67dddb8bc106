//! The `imago` binary as a user runs it: files written, metadata, latents dump, and failures that exit non-zero
//! with a message naming the problem.

use std::path::Path;
use std::process::Command;

fn imago(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_imago")).args(args).output().expect("run imago")
}

fn png_text(path: &Path) -> Vec<(String, String)> {
    let reader = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap())).read_info().unwrap();
    reader.info().utf8_text.iter().map(|c| (c.keyword.clone(), c.get_text().unwrap())).collect()
}

#[test]
fn tiny_model_then_generate_writes_a_png_with_parameters_and_latents() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("sd15");
    let out = imago(&["dev", "tiny-model", "--family", "sd15", model.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let png = dir.path().join("out.png");
    let latents = dir.path().join("latents");
    let args = ["generate", "a blue square", "--model", model.to_str().unwrap(), "-o", png.to_str().unwrap()];
    let out =
        imago(&[&args[..], &["--steps", "2", "--seed", "5", "--dump-latents", latents.to_str().unwrap()]].concat());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), png.to_str().unwrap());

    let image = image::open(&png).unwrap();
    assert_eq!((image.width(), image.height()), (64, 64));
    let text = png_text(&png);
    assert!(text.contains(&("prompt".into(), "a blue square".into())), "{text:?}");
    assert!(text.contains(&("seed".into(), "5".into())), "{text:?}");
    assert!(text.contains(&("steps".into(), "2".into())), "{text:?}");
    let dumped =
        candle_core::safetensors::load(latents.join("latents.safetensors"), &candle_core::Device::Cpu).unwrap();
    assert_eq!(dumped["initial_noise"].dims(), &[1, 4, 8, 8]);
    assert_eq!(dumped["final_latents"].dims(), &[1, 4, 8, 8]);

    let bare = dir.path().join("bare.png");
    let out =
        imago(&["generate", "x", "--model", model.to_str().unwrap(), "-o", bare.to_str().unwrap(), "--no-metadata"]);
    assert!(out.status.success());
    assert!(png_text(&bare).is_empty(), "--no-metadata must leave no text chunks");
}

#[test]
fn bad_input_exits_non_zero_naming_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m");
    assert!(imago(&["dev", "tiny-model", "--family", "sd-turbo", model.to_str().unwrap()]).status.success());
    let m = model.to_str().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (&["generate", "x", "--model", m, "--size", "60x64"], "width 60 is not a positive multiple of 8"),
        (&["generate", "x", "--model", m, "--steps", "0"], "steps 0"),
        (&["generate", "x", "--model", m, "--scheduler", "plms"], "unknown scheduler"),
        (&["generate", "x", "--model", "/nonexistent/folder"], "not a folder with model_index.json"),
        (&["generate", "x", "--model", m, "--device", "tpu"], "unknown device"),
        (&["dev", "tiny-model", "--family", "sd9", "/tmp/never"], "unknown family"),
        (&["edit", "--image", "/nonexistent.png", "x", "--model", m], "/nonexistent.png"),
    ];
    for (args, expected) in cases {
        let out = imago(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
    }
}

#[test]
fn worker_configuration_layers_file_then_environment_then_flags() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("worker.toml");
    std::fs::write(
        &file,
        "slots = 3\nprefix = \"acme\"\nack_wait = 45\nnats_password = \"hunter2\"\nnats_user = \"w\"\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_imago"))
        .args(["worker", "--config", file.to_str().unwrap(), "--slots", "2", "--print-config"])
        .env("IMAGO_NATS", "nats://10.9.8.7:4222")
        .env("IMAGO_PREFIX", "from-env")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let printed: toml::Table = toml::from_str(&String::from_utf8_lossy(&out.stdout)).unwrap();
    assert_eq!(printed["slots"].as_integer(), Some(2), "flag beats file");
    assert_eq!(printed["ack_wait"].as_integer(), Some(45), "file beats default");
    assert_eq!(printed["prefix"].as_str(), Some("from-env"), "environment beats file");
    assert_eq!(printed["nats"].as_str(), Some("nats://10.9.8.7:4222"));
    assert_eq!(printed["max_deliver"].as_integer(), Some(5), "default");
    assert_eq!(printed["nats_password"].as_str(), Some("<redacted>"), "secrets are never printed");

    std::fs::write(&file, "slotz = 3\n").unwrap();
    let out = imago(&["worker", "--config", file.to_str().unwrap(), "--print-config"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown field `slotz`"));
}

#[test]
fn batching_and_cache_settings_are_configurable_and_printed() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("worker.toml");
    std::fs::write(&file, "max_batch = 4\nmodel_cache_bytes = 1000000\n").unwrap();
    let out = imago(&["worker", "--config", file.to_str().unwrap(), "--batch-wait-ms", "20", "--print-config"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let printed: toml::Table = toml::from_str(&String::from_utf8_lossy(&out.stdout)).unwrap();
    assert_eq!(printed["max_batch"].as_integer(), Some(4));
    assert_eq!(printed["batch_wait_ms"].as_integer(), Some(20));
    assert_eq!(printed["model_cache_bytes"].as_integer(), Some(1_000_000));
    assert_eq!(printed["prompt_cache_bytes"].as_integer(), Some(64 << 20), "default");
}
