"""Reference tensors from HF diffusers for image-to-image and inpainting on miniature folders.

Usage: python tools/parity/edit.py TINY_ROOT OUT_DIR
TINY_ROOT holds folders written by `imago dev tiny-model` (sd15, sd-turbo, sdxl, sd15-inpaint, sdxl-inpaint).
For each case writes OUT_DIR/CASE.safetensors (noise, image, mask, final latents) and OUT_DIR/CASE.json.

Two things are pinned so both sides compute the same thing: the pipelines' noise comes from the saved tensor
(diffusers draws it from torch's RNG, imago from its own), and the VAE posterior is read at its mean (imago's
choice; diffusers samples it).
"""

import json
import os
import sys

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from diffusers import (
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
)
from diffusers.models.autoencoders import vae as vae_module
import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img as sd_img2img
import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_inpaint as sd_inpaint
import diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_img2img as xl_img2img
import diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_inpaint as xl_inpaint

PROMPT = "a photograph of an astronaut riding a horse"
NEGATIVE = "blurry, low quality"

# (case, folder, pipeline, scheduler, steps, guidance, strength, with mask)
CASES = [
    ("sd15-img2img", "sd15", StableDiffusionImg2ImgPipeline, ("dpm++2m", DPMSolverMultistepScheduler), 4, 7.5, 0.6, False),
    ("sd-turbo-img2img", "sd-turbo", StableDiffusionImg2ImgPipeline, ("euler", EulerDiscreteScheduler), 2, 0.0, 0.5, False),
    ("sdxl-img2img", "sdxl", StableDiffusionXLImg2ImgPipeline, ("euler", EulerDiscreteScheduler), 4, 5.0, 0.75, False),
    ("sd15-blend-inpaint", "sd15", StableDiffusionInpaintPipeline, ("dpm++2m", DPMSolverMultistepScheduler), 4, 7.5, 0.75, True),
    ("sd15-inpaint", "sd15-inpaint", StableDiffusionInpaintPipeline, ("dpm++2m", DPMSolverMultistepScheduler), 4, 7.5, 1.0, True),
    ("sdxl-inpaint", "sdxl-inpaint", StableDiffusionXLInpaintPipeline, ("euler", EulerDiscreteScheduler), 4, 5.0, 0.6, True),
]


def main():
    root, out_dir = sys.argv[1], sys.argv[2]
    os.makedirs(out_dir, exist_ok=True)
    vae_module.DiagonalGaussianDistribution.sample = lambda self, generator=None: self.mean

    rng = np.random.default_rng(0)
    ys, xs = np.mgrid[0:64, 0:64]
    image = np.stack([(ys * 4) % 256, (xs * 4) % 256, ((xs + ys) * 2) % 256], -1).astype(np.uint8)
    image = np.clip(image.astype(np.int32) + rng.integers(-20, 20, image.shape), 0, 255).astype(np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 24:60] = 255

    for case, folder, cls, (sched_name, sched_cls), steps, guidance, strength, with_mask in CASES:
        xl = folder.startswith("sdxl")
        pipe = cls.from_pretrained(os.path.join(root, folder), dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        pipe.scheduler = sched_cls.from_config(pipe.scheduler.config)
        noise = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(7))
        for module in (sd_img2img, sd_inpaint, xl_img2img, xl_inpaint):
            module.randn_tensor = lambda shape, **kwargs: noise.clone()
        kwargs = dict(image=Image.fromarray(image), num_inference_steps=steps, guidance_scale=guidance,
                      strength=strength, output_type="latent")
        if with_mask:
            kwargs.update(mask_image=Image.fromarray(mask), height=64, width=64)
        negative = None if xl else NEGATIVE
        with torch.no_grad():
            latents = pipe(PROMPT, negative_prompt=negative, **kwargs).images
        tensors = {"noise": noise, "image": torch.from_numpy(image.copy()), "final_latents": latents}
        if with_mask:
            tensors["mask"] = torch.from_numpy(mask.copy())
        save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(out_dir, case + ".safetensors"))
        with open(os.path.join(out_dir, case + ".json"), "w") as f:
            json.dump({"folder": folder, "prompt": PROMPT, "negative_prompt": negative or "", "scheduler": sched_name,
                       "steps": steps, "guidance": guidance, "strength": strength}, f, indent=2)
            f.write("\n")
        print(f"edit: {case}")


if __name__ == "__main__":
    main()
