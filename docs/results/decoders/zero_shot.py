"""The untrained SmolLM2-135M-Instruct on the sweep's validation and test examples, scored as the runs score them.

    PYTHONPATH=src python docs/results/decoders/zero_shot.py > docs/results/decoders/zero_shot.json

(the same 100 + 100 examples as configs/sweep/smollm2-lm-cpu.yaml: max_eval_examples 100, seed 0;
greedy, at most 8 new tokens; the first five generations of each split are kept).
"""
import json
from types import SimpleNamespace

import torch
from transformers import AutoTokenizer

from progtuning.runs.models import resolve_model
from progtuning.tasks.builtin_lm import load_builtin_lm
from progtuning.tasks.lm import CausalLMCollator, greedy_generate, token_nll
from progtuning.tasks.metrics import generation_scores

torch.set_num_threads(1)
path = resolve_model("smollm2-135m")
tokenizer = AutoTokenizer.from_pretrained(path)
task, data = load_builtin_lm("sms-spam-instruct", 120, 100, seed=0, max_new_tokens=8, generate_examples=100)
model = task.load_model(path).eval()
features = task.preprocess(data, tokenizer, SimpleNamespace(max_length=128))
scores = {}
for split in ("validation", "test"):
    s = token_nll(model, features.eval[split], CausalLMCollator(features.extra["pad_token_id"]), 16)
    g = features.extra["generation"][split]
    texts = greedy_generate(model, tokenizer, g["prompts"], 8, 16)
    s.update(generation_scores(texts, g["references"]))
    s["examples"] = list(zip(texts[:5], g["references"][:5]))
    scores[split] = s
print(json.dumps(scores, indent=1))
