#!/usr/bin/env python3
"""A tiny Medusa-v1 checkpoint written by an independent writer (Python safetensors) in the
published key layout, plus the logits its heads give for fixed hidden states (numpy, float64).

    python3 scripts/make_medusa_fixture.py   # writes tests/fixtures/medusa_tiny/
"""
import json
import os

import numpy as np
from safetensors.numpy import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "tests", "fixtures", "medusa_tiny")
HEADS, LAYERS, HIDDEN, VOCAB = 3, 2, 8, 16

rng = np.random.default_rng(2024)
tensors = {}
for h in range(HEADS):
    for l in range(LAYERS):
        # PyTorch nn.Linear layout: weight [out, in].
        tensors[f"{h}.{l}.linear.weight"] = rng.normal(0, 0.3, (HIDDEN, HIDDEN)).astype(np.float32)
        tensors[f"{h}.{l}.linear.bias"] = rng.normal(0, 0.1, (HIDDEN,)).astype(np.float32)
    tensors[f"{h}.{LAYERS}.weight"] = rng.normal(0, 0.5, (VOCAB, HIDDEN)).astype(np.float32)

hidden = rng.normal(0, 1, (3, HIDDEN)).astype(np.float32)


def silu(x):
    return x / (1 + np.exp(-x))


logits = []
for h in range(HEADS):
    x = hidden.astype(np.float64)
    for l in range(LAYERS):
        w = tensors[f"{h}.{l}.linear.weight"].astype(np.float64)
        b = tensors[f"{h}.{l}.linear.bias"].astype(np.float64)
        x = x + silu(x @ w.T + b)
    logits.append((x @ tensors[f"{h}.{LAYERS}.weight"].astype(np.float64).T).tolist())

os.makedirs(OUT, exist_ok=True)
save_file(tensors, os.path.join(OUT, "medusa_lm_head.safetensors"))
# The published configs' head counts are known to be wrong: this one says 5 on purpose, and
# the loader must infer 3 from the tensor names.
with open(os.path.join(OUT, "config.json"), "w") as f:
    json.dump({"medusa_num_heads": 5, "medusa_num_layers": 1, "base_model_name_or_path": "tiny"}, f)
with open(os.path.join(OUT, "expected.json"), "w") as f:
    json.dump({"heads": HEADS, "layers": LAYERS, "hidden_size": HIDDEN, "vocab_size": VOCAB,
               "hidden": hidden.tolist(), "logits": logits}, f)
