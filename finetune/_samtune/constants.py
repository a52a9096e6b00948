"""Domain constants, defined once (sources in the comments); imported by every subpackage.

Nothing here imports torch or a data library, so the recipe schema can use them cheaply.
"""

# Label value that never counts in training or metrics: Cityscapes' "ignore" trainId (Cordts et
# al., 2016, cityscapesScripts) and samtune's value for pixels outside any class map.
IGNORE_INDEX = 255

# SAM's pixel statistics on 0-255 RGB (Kirillov et al., 2023; segment_anything's Sam.pixel_mean/std).
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)

# CT window presets, [low, high] in HU (level L, width W -> [L - W/2, L + W/2]).
INTENSITY_PRESETS: dict[str, tuple[float, float]] = {
    "ct_abdomen": (-160.0, 240.0),  # soft tissue W400/L40 (MedSAM, Ma et al., 2024)
    "ct_samed": (-125.0, 275.0),  # SAMed on Synapse (Zhang & Liu, 2023)
    "ct_lung": (-1350.0, 150.0),  # W1500/L-600
    "ct_bone": (-500.0, 1300.0),  # W1800/L400
}
DEFAULT_WINDOW_HU = INTENSITY_PRESETS["ct_abdomen"]
MR_PERCENTILE = "mr_percentile"  # MR: clip to the 0.5-99.5 percentile of each volume (MedSAM)
MR_PERCENTILES = (0.5, 99.5)

# Where LoRA goes, by role; a model family maps each role to its module names
# (samtune.adapters.family). Presets are roles joined by "+"; the older names stay valid aliases.
LORA_ROLES = ("encoder_attention", "encoder_attention_out", "encoder_mlp", "decoder_attention")
LORA_PRESETS: dict[str, tuple[str, ...]] = {
    "encoder_attention": ("encoder_attention",),
    "encoder_qkv": ("encoder_attention",),  # SAM's fused q,k,v projection (SAMed's choice)
    "encoder_qkv_proj": ("encoder_attention", "encoder_attention_out"),
    "encoder_all_linear": ("encoder_attention", "encoder_attention_out", "encoder_mlp"),
    "decoder_attention": ("decoder_attention",),
    "encoder_qkv+decoder_attention": ("encoder_attention", "decoder_attention"),
}
TRAIN_MODES = ("lora", "decoder_only", "full")

# What a model is trained for (recipe key `task`): prompts from the user (boxes, clicks), every
# class of an image with no input (learnt class prompts, samtune.adapters.family.ClassPrompts), or
# both in one checkpoint (the two mixed per step).
TASKS = ("promptable", "automatic", "both")

# ACDC's four adverse conditions, its folder names under rgb_anon/ and gt/ (Sakaridis et al., "ACDC:
# The Adverse Conditions Dataset with Correspondences for Semantic Driving Scene Understanding",
# ICCV 2021): read by samtune.datasets.acdc and drawn by its demo generator
ACDC_CONDITIONS = ("fog", "night", "rain", "snow")
