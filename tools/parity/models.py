"""Reference tensors from HF diffusers for one miniature model folder written by `imago dev tiny-model`.

Usage: python tools/parity/models.py MODEL_DIR FAMILY OUT_PREFIX
Writes OUT_PREFIX.safetensors (tensors) and OUT_PREFIX.json (the settings the Rust test must use).

Each stage is recorded separately so a mismatch points at one component: tokenizer ids, text-encoder hidden
states, the pipeline's prompt embeddings, one UNet call, VAE decode/encode, and a full txt2img from given noise.
The script fails if the folder's tensor names differ from the diffusers/transformers module tree in either
direction, which is what proves the miniature has the real layout.
"""

import json
import sys

import torch
from safetensors.torch import load_file, save_file
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)

PROMPT = "a photograph of an astronaut riding a horse"
NEGATIVE = "blurry, low quality"


def check_layout(module, path, prefix=""):
    """Fails unless the file's tensor names are exactly the module's weights, as published checkpoints name them.

    transformers 5 drops the `text_model.` level from CLIP's state_dict but still reads (and the hub's SD repos
    still store) the prefixed names, so the prefix is restored for the comparison."""
    stored = set(load_file(path).keys())
    expected = set()
    for k in module.state_dict().keys():
        if k.endswith("position_ids"):  # a buffer, not a weight
            continue
        if prefix and not k.startswith((prefix, "text_projection")):
            k = prefix + k
        expected.add(k)
    if stored != expected:
        raise SystemExit(
            f"{path}: layout differs from diffusers\n  missing: {sorted(expected - stored)[:10]}\n"
            f"  unexpected: {sorted(stored - expected)[:10]}"
        )


def main():
    model_dir, family, out = sys.argv[1], sys.argv[2], sys.argv[3]
    torch.manual_seed(0)
    xl = family.startswith("sdxl")
    cls = StableDiffusionXLPipeline if xl else StableDiffusionPipeline
    pipe = cls.from_pretrained(model_dir, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)

    check_layout(pipe.unet, f"{model_dir}/unet/diffusion_pytorch_model.safetensors")
    check_layout(pipe.vae, f"{model_dir}/vae/diffusion_pytorch_model.safetensors")
    check_layout(pipe.text_encoder, f"{model_dir}/text_encoder/model.safetensors", "text_model.")
    if xl:
        check_layout(pipe.text_encoder_2, f"{model_dir}/text_encoder_2/model.safetensors", "text_model.")

    t = {}
    with torch.no_grad():
        # 1. tokenizers and text encoders
        encoders = [(pipe.tokenizer, pipe.text_encoder, "te1")]
        if xl:
            encoders.append((pipe.tokenizer_2, pipe.text_encoder_2, "te2"))
        for tok, enc, name in encoders:
            ids = tok(PROMPT, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
            t[f"{name}/ids"] = ids.to(torch.int64)
            o = enc(ids, output_hidden_states=True)
            t[f"{name}/last_hidden"] = o.last_hidden_state
            t[f"{name}/penultimate_hidden"] = o.hidden_states[-2]
            if hasattr(o, "text_embeds"):
                t[f"{name}/pooled"] = o.text_embeds

        # 2. the pipeline's prompt embeddings (with negative; SDXL zeroes an absent negative, which imago's
        #    empty negative prompt means)
        if xl:
            pe, ne, pp, npool = pipe.encode_prompt(PROMPT, device="cpu", num_images_per_prompt=1,
                                                   do_classifier_free_guidance=True, negative_prompt=None)
            t["prompt_embeds"], t["negative_embeds"], t["pooled"], t["negative_pooled"] = pe, ne, pp, npool
        else:
            pe, ne = pipe.encode_prompt(PROMPT, "cpu", 1, True, negative_prompt=NEGATIVE)
            t["prompt_embeds"], t["negative_embeds"] = pe, ne

        # 3. one UNet call on a batch of two
        g = torch.Generator().manual_seed(1)
        x = torch.randn((2, 4, 8, 8), generator=g)
        ctx = torch.cat([ne, pe])
        kwargs = {}
        if xl:
            time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * 2)
            kwargs["added_cond_kwargs"] = {"text_embeds": torch.cat([npool, pp]), "time_ids": time_ids}
            t["unet/time_ids"] = time_ids
        t["unet/sample"] = x
        for step in (999.0, 500.0, 1.0):
            t[f"unet/out_t{int(step)}"] = pipe.unet(x, torch.tensor(step), encoder_hidden_states=ctx, **kwargs).sample

        # 4. VAE decode of scaled latents, encode of an image (distribution mean)
        z = torch.randn((1, 4, 8, 8), generator=g)
        t["vae/latents"] = z
        t["vae/decoded"] = pipe.vae.decode(z / pipe.vae.config.scaling_factor).sample
        img = torch.rand((1, 3, 64, 64), generator=g) * 2 - 1
        t["vae/image"] = img
        t["vae/encoded_mean"] = pipe.vae.encode(img).latent_dist.mean

        # 5. txt2img from given noise with a deterministic scheduler
        settings = {
            "sd15": ("dpm++2m", DPMSolverMultistepScheduler, 4, 7.5),
            "sd21": ("ddim", DDIMScheduler, 4, 7.5),
            "sd-turbo": ("euler", EulerDiscreteScheduler, 1, 0.0),
            "sdxl": ("euler", EulerDiscreteScheduler, 4, 5.0),
            "sdxl-turbo": ("euler", EulerDiscreteScheduler, 2, 0.0),
        }[family]
        name, sched_cls, steps, guidance = settings
        pipe.scheduler = sched_cls.from_config(pipe.scheduler.config)
        noise = torch.randn((1, 4, 8, 8), generator=g)
        t["txt2img/noise"] = noise
        common = dict(num_inference_steps=steps, guidance_scale=guidance, latents=noise.clone(), height=64, width=64)
        neg = None if xl else NEGATIVE
        t["txt2img/final_latents"] = pipe(PROMPT, negative_prompt=neg, output_type="latent", **common).images
        t["txt2img/image"] = pipe(PROMPT, negative_prompt=neg, output_type="pt", **common).images

    save_file({k: v.contiguous().float() if v.is_floating_point() else v.contiguous() for k, v in t.items()},
              out + ".safetensors")
    with open(out + ".json", "w") as f:
        json.dump({"family": family, "prompt": PROMPT, "negative_prompt": neg or "", "scheduler": name, "steps": steps,
                   "guidance": guidance, "diffusers": __import__("diffusers").__version__,
                   "torch": torch.__version__}, f, indent=2)
        f.write("\n")


if __name__ == "__main__":
    main()
