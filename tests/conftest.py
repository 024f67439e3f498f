"""Shared fixtures: the real embedded model (session-scoped) and a tiny random model with the same tokenizer."""

from __future__ import annotations

import os

import pytest
import torch

import deprecation_guard

deprecation_guard.install()

# Tests must never reach a hub; CI has no network beyond package registries.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

EMBEDDED = "smollm2-135m-instruct"


@pytest.fixture(scope="session")
def embedded_tokenizer():
    from trialign.backbone import load_tokenizer

    return load_tokenizer(EMBEDDED)


@pytest.fixture(scope="session")
def embedded_model():
    """The real SmolLM2-135M-Instruct (fp32, eval mode). Tests using it should be marked `slow`."""
    from trialign.backbone import load_model

    return load_model(EMBEDDED)


def make_tiny_model(vocab_size: int, seed: int = 0, layers: int = 2):
    """A randomly initialised Llama small enough for fast CPU tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
        pad_token_id=2, bos_token_id=1, eos_token_id=2,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture()
def tiny_model(embedded_tokenizer):
    return make_tiny_model(len(embedded_tokenizer))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, embedded_tokenizer):
    """A tiny random model saved as a local HF directory (a valid `model source`)."""
    path = tmp_path_factory.mktemp("tiny_model")
    make_tiny_model(len(embedded_tokenizer)).save_pretrained(path, safe_serialization=True)
    embedded_tokenizer.save_pretrained(path)
    return str(path)
