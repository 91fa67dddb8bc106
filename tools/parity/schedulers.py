#!/usr/bin/env python3
"""Reference scheduler trajectories from HF diffusers, for tests/parity_schedulers.rs.

Usage: $PYTHON tools/parity/schedulers.py OUT.safetensors

Writes OUT.safetensors and, next to it, OUT.json (the manifest: the scheduler configs used, the cases recorded and
the combinations diffusers rejected). For every scheduler kind x model config x step count it records, under
"<kind>/<variant>/steps<N>/":
  timesteps         f64 [n]          scheduler.timesteps after set_timesteps(N)
  init_noise_sigma  f64 [1]
  model_outputs     f32 [n, *SHAPE]  model output fed to step i: 0.5 * scale_model_input(x_i) + 0.1 * cos(t_i / 100)
  samples           f32 [n, *SHAPE]  x_{i+1}, the sample step i returns (x_0 = inputs/x * init_noise_sigma)
  step_noise        f32 [n, *SHAPE]  euler-a only: the noise diffusers' step i drew (randn is patched to replay it)
  add_noise         f32 [*SHAPE]     add_noise(inputs/clean, inputs/noise) at timesteps[add_noise_step]
Shared inputs are "inputs/x", "inputs/clean" and "inputs/noise". The latent is 1x4x4x4: scheduler math is
elementwise, so more elements would add file size but no coverage.
"""

import json
import math
import sys
from pathlib import Path

import diffusers
import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
)
from diffusers.schedulers import scheduling_euler_ancestral_discrete
from safetensors.numpy import save_file

SHAPE = (1, 4, 4, 4)
SEED = 20240611

# Published scheduler_config.json files (plus two synthetic ones for the remaining schedules and spacings).
SD15 = {  # runwayml/stable-diffusion-v1-5: a PNDM config, so every other scheduler falls back on its defaults.
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}
SD21 = {  # stabilityai/stable-diffusion-2-1 (768, v-prediction)
    "_class_name": "DDIMScheduler",
    "_diffusers_version": "0.8.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}
TURBO = {  # stabilityai/sd-turbo: Euler with trailing spacing
    "_class_name": "EulerDiscreteScheduler",
    "_diffusers_version": "0.24.0.dev0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "trailing",
    "trained_betas": None,
    "use_karras_sigmas": False,
}
SDXL = {  # stabilityai/stable-diffusion-xl-base-1.0: leading spacing with offset for every scheduler
    "_class_name": "EulerDiscreteScheduler",
    "_diffusers_version": "0.19.0.dev0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}
DEFAULTS = {}  # every class default: linear betas, DDIM clip_sample and set_alpha_to_one on
COSINE = {  # cosine schedule, v-prediction, trailing; "_use_default_values" must drop the listed key
    "beta_schedule": "squaredcos_cap_v2",
    "prediction_type": "v_prediction",
    "timestep_spacing": "trailing",
    "steps_offset": 7,
    "_use_default_values": ["steps_offset"],
}

VARIANTS = {
    "sd15": (SD15, [1, 4, 25]),
    "sd21": (SD21, [1, 4, 25]),
    "turbo": (TURBO, [1, 4, 25]),
    "sdxl": (SDXL, [1, 4, 25]),
    "defaults": (DEFAULTS, [4]),
    "cosine": (COSINE, [4]),
}

DPM_2M = {"algorithm_type": "dpmsolver++", "solver_order": 2, "solver_type": "midpoint"}
KINDS = {
    "ddim": (DDIMScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler-a": (EulerAncestralDiscreteScheduler, {}),
    "dpm++2m": (DPMSolverMultistepScheduler, {**DPM_2M, "use_karras_sigmas": False}),
    "dpm++2m-karras": (DPMSolverMultistepScheduler, {**DPM_2M, "use_karras_sigmas": True}),
}


class ReplayNoise:
    """Stands in for diffusers' randn_tensor in the Euler-ancestral module, drawing from a seeded numpy RNG and
    remembering what it returned."""

    def __init__(self, rng):
        self.rng = rng
        self.drawn = []

    def __call__(self, shape, generator=None, device=None, dtype=None, layout=None):
        values = self.rng.standard_normal(tuple(shape)).astype(np.float32)
        self.drawn.append(values)
        return torch.from_numpy(values).to(dtype=dtype or torch.float32)


def model_output(scaled, timestep):
    """A deterministic stand-in for the UNet; only its saved values matter to the Rust test."""
    return 0.5 * scaled + 0.1 * math.cos(float(timestep) / 100)


def make_scheduler(kind, config, steps):
    cls, overrides = KINDS[kind]
    scheduler = cls.from_config(dict(config), **overrides)
    scheduler.set_timesteps(steps)
    return scheduler


def record_case(kind, config, steps, inputs, rng, tensors, prefix):
    scheduler = make_scheduler(kind, config, steps)
    replay = ReplayNoise(rng)
    scheduling_euler_ancestral_discrete.randn_tensor = replay

    sample = torch.from_numpy(inputs["x"]) * scheduler.init_noise_sigma
    outputs, samples = [], []
    for t in scheduler.timesteps:
        scaled = scheduler.scale_model_input(sample, t)
        output = model_output(scaled, t)
        sample = scheduler.step(output, t, sample).prev_sample
        outputs.append(output.numpy().copy())
        samples.append(sample.numpy().copy())
    if not all(np.isfinite(s).all() for s in samples):
        raise ValueError("non-finite sample")

    n = len(scheduler.timesteps)
    tensors[f"{prefix}/timesteps"] = scheduler.timesteps.to(torch.float64).numpy()
    tensors[f"{prefix}/init_noise_sigma"] = np.array([float(scheduler.init_noise_sigma)], dtype=np.float64)
    tensors[f"{prefix}/model_outputs"] = np.stack(outputs).reshape(n, *SHAPE)
    tensors[f"{prefix}/samples"] = np.stack(samples).reshape(n, *SHAPE)
    if kind == "euler-a":
        tensors[f"{prefix}/step_noise"] = np.stack(replay.drawn).reshape(n, *SHAPE)

    # img2img: a fresh scheduler, started at the middle step like the img2img pipeline does.
    add_noise_step = n // 2
    fresh = make_scheduler(kind, config, steps)
    if hasattr(fresh, "set_begin_index"):
        fresh.set_begin_index(add_noise_step)
    noisy = fresh.add_noise(
        torch.from_numpy(inputs["clean"]),
        torch.from_numpy(inputs["noise"]),
        fresh.timesteps[add_noise_step : add_noise_step + 1],
    )
    tensors[f"{prefix}/add_noise"] = noisy.numpy().copy()
    return add_noise_step


def main():
    if len(sys.argv) != 2 or not sys.argv[1].endswith(".safetensors"):
        sys.exit("usage: schedulers.py OUT.safetensors")
    out = Path(sys.argv[1])
    rng = np.random.default_rng(SEED)
    inputs = {name: rng.standard_normal(SHAPE).astype(np.float32) for name in ("x", "clean", "noise")}
    tensors = {f"inputs/{name}": values for name, values in inputs.items()}
    cases, skipped = [], []
    for kind in KINDS:
        for variant, (config, step_counts) in VARIANTS.items():
            for steps in step_counts:
                prefix = f"{kind}/{variant}/steps{steps}"
                try:
                    add_noise_step = record_case(kind, config, steps, inputs, rng, tensors, prefix)
                except Exception as error:  # combinations diffusers itself rejects
                    skipped.append({"kind": kind, "variant": variant, "steps": steps, "reason": repr(error)})
                    continue
                cases.append(
                    {"kind": kind, "variant": variant, "steps": steps, "prefix": prefix, "add_noise_step": add_noise_step}
                )
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(out))
    manifest = {
        "generator": "tools/parity/schedulers.py",
        "diffusers_version": diffusers.__version__,
        "torch_version": torch.__version__,
        "numpy_version": np.__version__,
        "shape": list(SHAPE),
        "variants": {name: config for name, (config, _) in VARIANTS.items()},
        "cases": cases,
        "skipped": skipped,
    }
    out.with_suffix(".json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"{len(cases)} cases, {len(skipped)} skipped -> {out} ({out.stat().st_size} bytes)")
    for skip in skipped:
        print(f"skipped {skip['kind']} {skip['variant']} {skip['steps']}: {skip['reason']}")


if __name__ == "__main__":
    main()
