"""What the prompt-guided families (Wan, LTX-Video) share: a transformer as the denoiser and the prompt's place in
the pipeline call."""

from __future__ import annotations

from typing import Any


def denoiser(pipe):
    return pipe.transformer


def call_arguments(image, params: dict[str, Any]) -> dict[str, Any]:
    return {"image": image, "prompt": params["prompt"], "negative_prompt": params["negative_prompt"],
            "width": image.width, "height": image.height, "num_frames": params["num_frames"],
            "num_inference_steps": params["num_inference_steps"], "guidance_scale": params["guidance_scale"]}
