"""Each served model's full-size architecture from its published configs, with random weights: no download.

The configs are the values in each repository's `*/config.json` (Wan-AI/Wan2.2-TI2V-5B-Diffusers,
Wan-AI/Wan2.1-I2V-14B-720P-Diffusers, Lightricks/LTX-Video, stabilityai/stable-video-diffusion-img2vid-xt);
where a diffusers class's defaults are the published values, the defaults are used and said so. Two things are not
the real ones and change no shapes or work: the VAE's latent statistics (zeros and ones for random weights) and the
tokenizer (a T5 vocabulary built with no files; ids stay inside the text encoder's embedding).

    build("wan2.2-ti2v-5b", device="cuda", dtype=torch.bfloat16)   # the pipeline class the service serves
    build("ltx-video", device="meta")                              # shapes only: parameter counts, no memory

Used by bench/gpu_stages.py (--random-weights: real step times and peak memory on a GPU machine),
bench/families.py (FLOPs on fake tensors) and bench/full_size.py (SVD-XT served from a saved folder).
"""

from __future__ import annotations

import contextlib

# Transformer (or UNet) configs; the 14B model's differ from the 5B's in width, depth and the CLIP image branch.
TRANSFORMERS = {
    "wan2.2-ti2v-5b": ("WanTransformer3DModel", dict(
        patch_size=(1, 2, 2), num_attention_heads=24, attention_head_dim=128, in_channels=48, out_channels=48,
        text_dim=4096, freq_dim=256, ffn_dim=14336, num_layers=30, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)),
    "wan2.1-i2v-14b-720p": ("WanTransformer3DModel", dict(
        patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=36, out_channels=16,
        text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=1280, added_kv_proj_dim=5120, rope_max_seq_len=1024)),
    "ltx-video": ("LTXVideoTransformer3DModel", dict(
        in_channels=128, out_channels=128, patch_size=1, patch_size_t=1, num_attention_heads=32, attention_head_dim=64,
        cross_attention_dim=2048, num_layers=28, caption_channels=4096)),
    "svd-xt": ("UNetSpatioTemporalConditionModel", {}),  # its defaults are SVD's
}
TRANSFORMERS["wan2.1-i2v-14b-480p"] = TRANSFORMERS["wan2.1-i2v-14b-720p"]  # the same network, trained at 480p
# Published sizes of the denoiser, billions of parameters (model cards; SVD's UNet from its config): a check that
# the configs above are the real ones.
PUBLISHED_BILLIONS = {"wan2.2-ti2v-5b": 5.0, "wan2.1-i2v-14b-720p": 14.0, "wan2.1-i2v-14b-480p": 14.0,
                      "ltx-video": 1.9, "svd-xt": 1.5}
NAMES = tuple(TRANSFORMERS)

XXL = dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, feed_forward_proj="gated-gelu",
           relative_attention_num_buckets=32)  # T5 v1.1 XXL and UMT5-XXL's encoder: the text encoders of Wan and LTX
CLIP_VIT_H = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                  patch_size=14, image_size=224, projection_dim=1024, hidden_act="gelu")


def denoiser(name: str):
    """The denoiser alone, on whatever device and dtype are current."""
    import diffusers

    cls, config = TRANSFORMERS[name]
    return getattr(diffusers, cls)(**config)


@contextlib.contextmanager
def _building(device: str, dtype):
    """Parameters made directly on `device` in `dtype` (no float32 copy on the host first)."""
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def build(name: str, device: str = "cpu", dtype=None):
    """The pipeline the service serves for `name`, every part at full size with random weights (seeded), in
    eval mode. The Wan VAE in float32 whatever `dtype` is, as the service loads it."""
    import diffusers
    import torch
    from transformers import T5Tokenizer

    dtype = dtype or torch.float32
    torch.manual_seed(0)
    if name == "svd-xt":
        from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

        from video_diffusion.models.svd import assemble

        with _building(device, dtype):
            unet = denoiser(name)
            vae = diffusers.AutoencoderKLTemporalDecoder(block_out_channels=[128, 256, 512, 512], layers_per_block=2,
                                                         latent_channels=4, down_block_types=["DownEncoderBlock2D"] * 4)
            encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**CLIP_VIT_H))
        return _eval(assemble(unet, vae, encoder))
    if name.startswith("wan"):
        from transformers import UMT5Config, UMT5EncoderModel

        ti2v = name == "wan2.2-ti2v-5b"
        with _building(device, dtype):
            transformer = denoiser(name)
            text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=256384, **XXL))
            parts = {"image_encoder": None, "image_processor": None, "expand_timesteps": True}
            if not ti2v:
                from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModel

                parts = {"image_encoder": CLIPVisionModel(CLIPVisionConfig(**CLIP_VIT_H)),
                         "image_processor": CLIPImageProcessorPil(crop_size=224, size=224)}
        with _building(device, torch.float32):
            vae = (diffusers.AutoencoderKLWan(base_dim=160, decoder_base_dim=256, z_dim=48, in_channels=12,
                                              out_channels=12, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                                              temperal_downsample=[False, True, True], is_residual=True, patch_size=2,
                                              scale_factor_spatial=16, scale_factor_temporal=4,
                                              latents_mean=[0.0] * 48, latents_std=[1.0] * 48)
                   if ti2v else diffusers.AutoencoderKLWan())  # its defaults are Wan 2.1's VAE
        scheduler = diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                      flow_shift=3.0 if name.endswith("480p") else 5.0)
        return _eval(diffusers.WanImageToVideoPipeline(tokenizer=T5Tokenizer(), text_encoder=text_encoder, vae=vae,
                                                       scheduler=scheduler, transformer=transformer, **parts))
    if name == "ltx-video":
        from transformers import T5Config, T5EncoderModel

        with _building(device, dtype):
            transformer = denoiser(name)
            text_encoder = T5EncoderModel(T5Config(vocab_size=32128, **XXL))
            vae = diffusers.AutoencoderKLLTXVideo()  # its defaults are LTX-Video 0.9's VAE
        return _eval(diffusers.LTXImageToVideoPipeline(
            scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text_encoder,
            tokenizer=T5Tokenizer(), transformer=transformer))
    raise ValueError(f"no full-size architecture for {name}; one of {', '.join(NAMES)}")


def _eval(pipe):
    for component in pipe.components.values():
        if hasattr(component, "eval"):
            component.eval()  # built from configs they start in train mode; from_pretrained gives eval mode
    return pipe


def parameters(module) -> int:
    return sum(p.numel() for p in module.parameters())
