"""The CTranslate2 sampling backend of `trialign rollout` (``backend: ct2``; optional extra ``ct2``).

CTranslate2 (a PyPI wheel, no compiler step) runs the decoder in C++ with int8 weights on CPUs (``ct2_compute_type``:
``int8``, ``int8_float32`` or ``float32``; what the CPU supports is `ctranslate2.get_supported_compute_types`). It
only samples: the behavior log-probability stored in the dataset stays the transformers model's (`score_actions`,
one prefill per turn, as for the vLLM backend and bf16 autocast), so the importance ratio π/μ of the untrained
policy is still exactly 1 and training reads the same quantities whatever the backend. What changes is the
sampler's own distribution: int8 weights move it slightly away from μ. `benchmarks/bench_rollout.py` measures the
speed and that distance (the mean absolute difference between the backend's own token log-probabilities and the
transformers model's, on the same sampled tokens); the tests bound it for float32, where only kernel rounding
differs.

The model is converted once (`TransformersConverter`, a few seconds for the embedded model) into
``<cache>/ct2/<name>-<fingerprint>-<compute type>``, keyed by the sha256 of the source's config and weight files, so
a changed model is converted again; the folder appears only when complete.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

from trialign.errors import TriAlignError, require_module
from trialign.fileio import sha256_file
from trialign.rollout.config import CT2_COMPUTE_TYPES as COMPUTE_TYPES
from trialign.rollout.sampler import Generation, GenerationCache, Sample
from trialign.tokens import stop_token_ids


def require_ct2() -> None:
    """A one-line error when the optional CTranslate2 backend is not installed."""
    require_module("ctranslate2", "backend 'ct2'", "install it with `pip install 'trialign[ct2]'`, or use backend 'hf'")


def _fingerprint(location: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(location.iterdir()):
        if path.is_file() and (path.suffix in (".json", ".safetensors", ".bin") or path.name == "tokenizer.model"):
            digest.update(f"{path.name}:{sha256_file(path)};".encode())
    return digest.hexdigest()[:16]


def converted_model(location: str | os.PathLike, cache_dir: str | os.PathLike, compute_type: str) -> Path:
    """The CTranslate2 copy of the transformers model folder `location` (converted on first use)."""
    require_ct2()
    from ctranslate2.converters import TransformersConverter

    source = Path(location)
    if not (source / "config.json").is_file():
        raise TriAlignError(f"backend 'ct2': {source} is not a transformers model folder (no config.json)")
    quantization = None if compute_type == "float32" else "int8" if compute_type == "int8" else "int8_float32"
    target = Path(cache_dir) / "ct2" / f"{source.name}-{_fingerprint(source)}-{compute_type}"
    if (target / "model.bin").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        TransformersConverter(str(source), load_as_float16=False).convert(str(scratch / "model"),
                                                                           quantization=quantization, force=True)
        os.replace(scratch / "model", target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


class CT2Sampler:
    """Samples with CTranslate2 on CPU; log mu comes from the transformers model (`score_actions`)."""

    def __init__(self, location: str | os.PathLike, tokenizer, *, cache_dir: str | os.PathLike,
                 compute_type: str = "int8", threads: int = 0):
        if compute_type not in COMPUTE_TYPES:
            raise TriAlignError(f"ct2_compute_type: expected one of {', '.join(COMPUTE_TYPES)}, got {compute_type!r}")
        require_ct2()
        import ctranslate2

        supported = ctranslate2.get_supported_compute_types("cpu")
        if compute_type not in supported:
            raise TriAlignError(f"ct2_compute_type: {compute_type!r} is not supported on this CPU (it supports "
                                f"{', '.join(sorted(supported))})")
        self.tokenizer = tokenizer
        self.stop_ids = stop_token_ids(tokenizer)
        self.end_tokens = tokenizer.convert_ids_to_tokens(self.stop_ids)
        self.path = converted_model(location, cache_dir, compute_type)
        self.compute_type = compute_type
        self.threads = threads

    def sample(
        self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float, seed: int,
        cache: GenerationCache | None = None,
    ) -> Generation:
        """One message per prompt (token ids of the rendered state); `cache` is unused."""
        return self.sample_scored(prompts, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                                  with_scores=False)[0]

    def sample_scored(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float, seed: int,
                      with_scores: bool = True) -> tuple[Generation, list[float | None]]:
        """`sample`, and (`with_scores`) the backend's own log-probability of each message at `temperature`,
        stop token included: what measures its distance to mu."""
        import ctranslate2

        # CTranslate2's worker threads seed their generators when they start: a generator made right after
        # set_random_seed samples reproducibly (one load per call, well under a second for the embedded model).
        ctranslate2.set_random_seed(int(seed) % (1 << 32))
        generator = ctranslate2.Generator(str(self.path), device="cpu", compute_type=self.compute_type,
                                          intra_threads=self.threads)
        starts = [self.tokenizer.convert_ids_to_tokens(list(p)) for p in prompts]
        results = generator.generate_batch(
            starts, max_length=max_new_tokens, min_length=1, sampling_topk=0, sampling_temperature=temperature,
            include_prompt_in_result=False, end_token=self.end_tokens, return_end_token=True,
            return_scores=with_scores, length_penalty=0.0)
        samples, scores = [], []
        for result in results:
            tokens = list(result.sequences_ids[0])
            stop = next((i for i, t in enumerate(tokens) if t in self.stop_ids), None)
            samples.append(Sample(tokens[:stop] if stop is not None else tokens,
                                  tokens[stop] if stop is not None else None, None))
            scores.append(float(result.scores[0]) if with_scores else None)
        return Generation(samples), scores
