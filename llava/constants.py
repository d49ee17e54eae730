"""Shared constants of LLaVA-1.5: special token strings and the sentinel ids used in input_ids and labels."""

CONTROLLER_HEART_BEAT_EXPIRATION = 30
WORKER_HEART_BEAT_INTERVAL = 15

LOGDIR = "."

# Labels equal to IGNORE_INDEX are skipped by torch's cross-entropy, so prompts are not supervised.
IGNORE_INDEX = -100
# Negative so it can never collide with a real vocabulary id; replaced by image features in the model.
IMAGE_TOKEN_INDEX = -200
DEFAULT_IMAGE_TOKEN = "<image>"
DEFAULT_IMAGE_PATCH_TOKEN = "<im_patch>"
DEFAULT_IM_START_TOKEN = "<im_start>"
DEFAULT_IM_END_TOKEN = "<im_end>"
IMAGE_PLACEHOLDER = "<image-placeholder>"
