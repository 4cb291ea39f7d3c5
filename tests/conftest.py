"""Test-session settings: small models run fastest on one thread, and nothing writes to ~/.cache."""

from __future__ import annotations

import os
import tempfile

import torch

# Tiny models: worker threads only add overhead (and contention on a shared 2-core machine).
torch.set_num_threads(1)
os.environ.setdefault("LATENTPATCH_CACHE", tempfile.mkdtemp(prefix="latentpatch-test-cache-"))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
