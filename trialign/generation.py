"""Batched greedy or sampled generation from chat prompts (left padding, KV cache, stop at EOS).

Used by `evaluate --mode generate` and the Pref-Aligner baseline; the rollout has its own sampler because it also
records the behavior policy's log-probabilities.
"""

from __future__ import annotations

from typing import Sequence

import torch
from tqdm.auto import tqdm

from trialign.tokens import padding_id, stop_token_ids


@torch.inference_mode()
def generate_texts(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 128,
    batch_size: int = 16,
    temperature: float = 0.0,
    seed: int = 0,
    autocast: bool = False,
    progress: bool = False,
) -> list[str]:
    """Complete each already-templated prompt; greedy when `temperature == 0`. Order of outputs = order of prompts."""
    if max_new_tokens <= 0:
        raise ValueError("max_new_tokens must be positive")
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths share a batch: less padding
    outputs: list[str] = [""] * len(prompts)
    stop_ids = stop_token_ids(tokenizer, model)
    device = next(model.parameters()).device
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        for batch_number, batch in enumerate(tqdm(batches, desc="generate", disable=not progress, unit="batch")):
            encoded = tokenizer([prompts[i] for i in batch], return_tensors="pt", padding=True,
                                add_special_tokens=False)
            encoded = {k: v.to(device) for k, v in encoded.items()}
            sampling = {"do_sample": False}
            if temperature > 0:
                torch.manual_seed(seed + batch_number)
                sampling = {"do_sample": True, "temperature": temperature, "top_p": 1.0, "top_k": 0}
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                generated = model.generate(
                    **encoded, max_new_tokens=max_new_tokens, eos_token_id=stop_ids,
                    pad_token_id=padding_id(tokenizer), **sampling,
                )
            new_tokens = generated[:, encoded["input_ids"].shape[1] :]
            for row, index in enumerate(batch):
                outputs[index] = tokenizer.decode(new_tokens[row], skip_special_tokens=True).strip()
    finally:
        tokenizer.padding_side = padding_side
    return outputs
