"""imago beside HF diffusers on the CPU or a CUDA GPU: the same model folders, the same workload, runs interleaved.

Usage:
  side_by_side.py make-sd15 OUT --tokenizer DIR
      Writes a diffusers folder with SD 1.5's architecture (UNet 320/640/1280/1280, CLIP ViT-L/14 with 12 layers of
      768) and random weights, f32 safetensors, using diffusers and transformers themselves. DIR is a CLIP tokenizer
      folder (vocab.json + merges.txt), e.g. the `tokenizer/` of a folder written by `imago dev tiny-model`.
  side_by_side.py compare --imago BIN --model DIR --label NAME [--size WxH --steps N --guidance G --scheduler S
                          --batch B --threads T --rounds R --iterations N --warmup W --markdown FILE
                          --device cpu|cuda --dtype f32|f16|bf16 --reports DIR]
      Runs R rounds of (imago, diffusers), each a fresh process with W warm-up and N measured iterations at T
      threads, pools the samples of all rounds and prints the median of each stage (text encode, one denoising
      step, VAE decode) with the ratio imago / diffusers. Appends the table to FILE when given; keeps each
      process's JSON report (imago's has throughput, peak memory and TFLOP/s) in DIR when given.
  side_by_side.py diffusers-run ...   (one diffusers process; called by compare)

Stage boundaries on the diffusers side: `encode_prompt` (prompt and negative prompt, as imago's text stage), from
the first UNet call to the end of the last scheduler step divided by the step count (as imago's denoising step: UNet,
guidance, scheduler), and `vae.decode`. On CUDA each boundary waits for the GPU (`torch.cuda.synchronize`), as
imago's stage timers do, so a stage is charged for its kernels and not for their launch.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

PROMPT = "a photograph of an astronaut riding a horse"
STAGES = ("text_encode_ms", "unet_step_ms", "vae_decode_ms")
STAGE_NAMES = {"text_encode_ms": "text encode", "unet_step_ms": "denoising step", "vae_decode_ms": "VAE decode"}
DTYPES = ("f32", "f16", "bf16")


def make_sd15(out, tokenizer_dir):
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from safetensors.torch import load_file, save_file
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, attention_head_dim=8,
        block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
    ))
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                              steps_offset=1, set_alpha_to_one=False)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=CLIPTokenizer.from_pretrained(tokenizer_dir), unet=unet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    # transformers 5 writes CLIP's weights without the `text_model.` level; the published SD folders (and imago)
    # name them with it, and transformers reads both.
    path = os.path.join(out, "text_encoder", "model.safetensors")
    weights = load_file(path)
    prefixed = {k if k.startswith(("text_model.", "text_projection")) else "text_model." + k: v
                for k, v in weights.items()}
    save_file(prefixed, path, metadata={"format": "pt"})
    print(f"wrote {out}")


def scheduler_class(name):
    from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                           EulerDiscreteScheduler)
    return {
        "ddim": (DDIMScheduler, {}),
        "euler": (EulerDiscreteScheduler, {}),
        "euler-a": (EulerAncestralDiscreteScheduler, {}),
        "dpm++2m": (DPMSolverMultistepScheduler, {}),
        "dpm++2m-karras": (DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
    }[name]


def diffusers_run(args):
    """One process: load the folder, run warm-up + measured generations, write the per-stage samples as JSON."""
    import torch
    from diffusers import DiffusionPipeline

    torch.set_num_threads(args.threads)
    width, height = parse_size(args.size)
    dtype = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    pipe = DiffusionPipeline.from_pretrained(args.model, torch_dtype=dtype).to(args.device)
    pipe.set_progress_bar_config(disable=True)
    cls, extra = scheduler_class(args.scheduler)
    pipe.scheduler = cls.from_config(pipe.scheduler.config, **extra)

    marks = {}

    def now():
        """The time once the GPU has finished what was queued: CUDA kernels run asynchronously."""
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter()

    def timed(name, fn):
        def wrapper(*a, **k):
            started = now()
            out = fn(*a, **k)
            marks[name] = marks.get(name, 0.0) + now() - started
            return out
        return wrapper

    pipe.encode_prompt = timed("text", pipe.encode_prompt)
    pipe.vae.decode = timed("decode", pipe.vae.decode)
    def unet_start(_module, _args):
        if "denoise_start" not in marks:
            marks["denoise_start"] = now()  # the first call of the generation

    pipe.unet.register_forward_pre_hook(unet_start)

    def step_end(_pipe, _step, _t, kwargs):
        marks["denoise_end"] = now()
        return kwargs

    samples = {stage: [] for stage in STAGES}
    for i in range(args.warmup + args.iterations):
        marks.clear()
        pipe(PROMPT, height=height, width=width, num_inference_steps=args.steps, guidance_scale=args.guidance,
             num_images_per_prompt=args.batch, generator=torch.Generator().manual_seed(0), output_type="np",
             callback_on_step_end=step_end)
        if i >= args.warmup:
            samples["text_encode_ms"].append(marks["text"] * 1e3)
            samples["unet_step_ms"].append((marks["denoise_end"] - marks["denoise_start"]) * 1e3 / args.steps)
            samples["vae_decode_ms"].append(marks["decode"] * 1e3)
    with open(args.out, "w") as f:
        json.dump({"samples": samples, "torch": torch.__version__,
                   "diffusers": __import__("diffusers").__version__}, f)


def parse_size(size):
    w, h = size.lower().split("x")
    return int(w), int(h)


def run_quietly(cmd, env):
    """Runs `cmd`, showing its output only if it fails (both sides log progress and warnings)."""
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"{cmd[0]} failed with exit status {proc.returncode}")


def run_imago(args, out):
    width, height = parse_size(args.size)
    cmd = [args.imago, "bench", "--model", args.model, "--width", str(width), "--height", str(height),
           "--steps", str(args.steps), "--guidance", str(args.guidance), "--scheduler", args.scheduler,
           "--batch", str(args.batch), "--iterations", str(args.iterations), "--warmup", str(args.warmup),
           "--device", args.device, "--dtype", args.dtype, "--json", out]
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads))
    run_quietly(cmd, env)
    with open(out) as f:
        report = json.load(f)
    return report["results"]["samples"], {"imago": report["imago_version"]}


def run_diffusers(args, out):
    cmd = [sys.executable, os.path.abspath(__file__), "diffusers-run", "--model", args.model, "--size", args.size,
           "--steps", str(args.steps), "--guidance", str(args.guidance), "--scheduler", args.scheduler,
           "--batch", str(args.batch), "--iterations", str(args.iterations), "--warmup", str(args.warmup),
           "--threads", str(args.threads), "--device", args.device, "--dtype", args.dtype, "--out", out]
    run_quietly(cmd, os.environ)
    with open(out) as f:
        report = json.load(f)
    return report["samples"], {"torch": report["torch"], "diffusers": report["diffusers"]}


def compare(args):
    pooled = {"imago": {s: [] for s in STAGES}, "diffusers": {s: [] for s in STAGES}}
    versions = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.reports:
            os.makedirs(args.reports, exist_ok=True)
            tmp = args.reports
        for r in range(args.rounds):
            for name, run in (("imago", run_imago), ("diffusers", run_diffusers)):
                samples, info = run(args, os.path.join(tmp, f"{name}-{r}.json"))
                versions.update(info)
                for stage in STAGES:
                    pooled[name][stage].extend(samples[stage])
                print(f"round {r + 1}/{args.rounds} {name}: "
                      + ", ".join(f"{STAGE_NAMES[s]} {statistics.median(samples[s]):.2f} ms" for s in STAGES),
                      file=sys.stderr)
    rows = []
    for stage in STAGES:
        mine, theirs = statistics.median(pooled["imago"][stage]), statistics.median(pooled["diffusers"][stage])
        rows.append(f"| {args.label} | {args.size} | {STAGE_NAMES[stage]} | {mine:.2f} | {theirs:.2f} | "
                    f"{mine / theirs:.2f}× |")
    samples = len(pooled["imago"][STAGES[0]])
    where = f"{args.threads} threads" if args.device == "cpu" else args.device
    header = (f"{args.label}: {args.size}, {args.steps} steps {args.scheduler}, guidance {args.guidance}, "
              f"batch {args.batch}, {args.dtype}, {where}; median of {samples} samples per side "
              f"({args.rounds} interleaved rounds × {args.iterations}); imago {versions['imago']}, "
              f"torch {versions['torch']}, diffusers {versions['diffusers']}")
    table = "\n".join([header, "", "| model | size | stage | imago ms | diffusers ms | imago / diffusers |",
                       "|---|---|---|---:|---:|---:|", *rows])
    print(table)
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write(table + "\n\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    make = sub.add_parser("make-sd15")
    make.add_argument("out")
    make.add_argument("--tokenizer", required=True)
    for name in ("compare", "diffusers-run"):
        p = sub.add_parser(name)
        p.add_argument("--model", required=True)
        p.add_argument("--size", default="128x128")
        p.add_argument("--steps", type=int, default=4)
        p.add_argument("--guidance", type=float, default=7.5)
        p.add_argument("--scheduler", default="dpm++2m")
        p.add_argument("--batch", type=int, default=1)
        p.add_argument("--threads", type=int, default=os.cpu_count())
        p.add_argument("--iterations", type=int, default=3)
        p.add_argument("--warmup", type=int, default=1)
        p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
        p.add_argument("--dtype", choices=DTYPES, default="f32")
        if name == "compare":
            p.add_argument("--imago", required=True)
            p.add_argument("--label", required=True)
            p.add_argument("--rounds", type=int, default=3)
            p.add_argument("--markdown")
            p.add_argument("--reports")
        else:
            p.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.command == "make-sd15":
        make_sd15(args.out, args.tokenizer)
    elif args.command == "compare":
        compare(args)
    else:
        diffusers_run(args)


if __name__ == "__main__":
    main()
