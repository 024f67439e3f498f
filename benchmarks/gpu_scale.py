"""TriAlign at scale: a fit of a randomly initialised Llama of 1.07B parameters on synthetic rollout data, with
tokens/s and model FLOP utilisation (MFU).

    python benchmarks/gpu_scale.py                  # GPUs: FSDP (configs/strategy/fsdp.yaml), bf16, the 1B model
    python benchmarks/gpu_scale.py --tiny           # CPU: 2-process DDP (configs/strategy/ddp_cpu.yaml), a tiny model
    python benchmarks/gpu_scale.py --no-checkpointing   # FSDP without activation checkpointing (MFU proper)

What runs is `python -m trialign fit` of `configs/trialign.yaml` (every term: policy, values, NSW weights, the
penalty, the truth term on states, both KLs) through the project's CLI, with the strategy config added, LoRA on every
linear layer (`all-linear`), no validation and no checkpoints. The model is a `LlamaForCausalLM` built from a config
(`--preset 1b`: TinyLlama-1.1B's shape, 22 layers of width 2048, with SmolLM2's 49,152-token vocabulary, tied
embeddings) and saved as a local model source, so nothing is downloaded; only the tokenizer comes from
`--tokenizer` (the embedded model's by default, or a saved tokenizer folder on a machine without it). The rollout is
`tests/data_factory.py`'s synthetic one (9 default groups, 2 samples of 3 turns per group, longer assistant turns on
the 1B preset) with cross-group states mixed in, as `trialign rollout` writes it.

Measured by a callback inside the fit (`StepMeter`): the first `--warmup` steps are not timed, and the first of them
runs under `CountedFlops`, which counts the matrix products and attention it executes, forward and backward, on every
rank, with `torch.utils.flop_counter`'s formulas. FLOPs per token of that step (tokens: the unpadded episode sequences
and probe contexts of the batch, all ranks) times the timed steps' tokens gives their FLOPs. That is exact for the
linear layers, which do nearly all the work; the attention's share of the counted step is printed, since it grows
with length instead. With activation checkpointing (the shipped FSDP config) the count includes the replayed forward
passes, so its fraction of peak is hardware utilisation; `--no-checkpointing` counts model FLOPs only, and its
fraction is MFU. The peak is the datasheet's dense bf16 figure for known GPUs (H100/H200 989 TFLOP/s, A100 312) and,
beside it, an 8192^3 bf16 matmul measured in this process (a 1024^3 fp32 one on CPU). The report is printed and
written to `--output` as JSON; benchmarks/results/gpu_scale_h200_*.json are the README's runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

PRESETS = {
    # TinyLlama-1.1B's shape (with the tokenizer's vocabulary): 1.07B parameters with SmolLM2's 49,152 tokens.
    "1b": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
           "num_key_value_heads": 4},
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2},
}
DATASHEET_BF16 = {"H200": 989.4e12, "H100": 989.4e12, "A100": 312e12}
"""Dense bf16 tensor-core peaks (FLOP/s) by device-name substring (SXM parts)."""


class CountedFlops(TorchDispatchMode):
    """FLOPs of the operators `FlopCounterMode` knows (matrix products, attention), counted as they run, forward and
    backward. `FlopCounterMode`'s own formulas without its module tracker, whose hooks FSDP's wrapped and
    checkpointed layers confuse. Attention on CPU (`_scaled_dot_product_flash_attention_for_cpu`) has no formula
    there and counts nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0
        self.attention = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            flops = int(formula(*args, **kwargs, out_val=out))
            self.total += flops
            if "attention" in func._overloadpacket.__name__:
                self.attention += flops
        return out


class StepMeter(Callback):
    """Times training steps after `warmup` and counts the FLOPs of the first step, summed over ranks. With
    `profile` (a folder), the second step (untimed) runs under `torch.profiler` and rank 0 summarizes its trace."""

    def __init__(self, warmup: int = 2, profile: str | None = None) -> None:
        self.warmup = warmup
        self.profile = profile
        self.profiler = None
        self.profile_summary: dict | None = None
        self.counter: CountedFlops | None = None
        self.started = 0.0
        self.seconds: list[float] = []
        self.tokens: list[int] = []
        self.counted_flops = 0
        self.counted_tokens = 0
        self.attention_flops = 0
        self.report: dict | None = None

    @staticmethod
    def batch_tokens(batch: dict) -> int:
        """Tokens the policy runs on: the unpadded episode sequences and probe contexts of the batch."""
        tokens = int(batch["probe_attention_mask"].sum())
        if "attention_mask" in batch:
            tokens += int(batch["attention_mask"].sum())
        return tokens

    def _sync(self, pl_module) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == 0:
            self.counter = CountedFlops()
            self.counter.__enter__()
            self.counted_tokens = self.batch_tokens(batch)
        elif step == 1 and self.profile and step < self.warmup:
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if pl_module.device.type == "cuda" else [])
            self._sync(pl_module)
            self.profiler = profile(activities=activities)
            self.profiler.__enter__()
            self.started = time.perf_counter()
        elif step >= self.warmup:
            self.tokens.append(self.batch_tokens(batch))
            self._sync(pl_module)
            self.started = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step - 1  # the optimizer step of this batch has been taken
        if step == 0 and self.counter is not None:
            self.counter.__exit__(None, None, None)
            self.counted_flops, self.attention_flops = self.counter.total, self.counter.attention
            self.counter = None
        elif step == 1 and self.profiler is not None:
            self._sync(pl_module)
            seconds = time.perf_counter() - self.started
            self.profiler.__exit__(None, None, None)
            if trainer.is_global_zero:
                folder = Path(self.profile)
                folder.mkdir(parents=True, exist_ok=True)
                trace = folder / "step1_trace.json"
                self.profiler.export_chrome_trace(str(trace))
                self.profile_summary = trace_summary(trace, seconds)
            self.profiler = None
        elif step >= self.warmup:
            self._sync(pl_module)
            self.seconds.append(time.perf_counter() - self.started)

    def on_train_end(self, trainer, pl_module) -> None:
        strategy = trainer.strategy
        local = torch.tensor([self.counted_flops, self.counted_tokens, self.attention_flops, sum(self.tokens)],
                             dtype=torch.float64, device=pl_module.device)
        summed = strategy.reduce(local.clone(), reduce_op="sum")
        # Every rank steps together, so a step takes as long as its slowest rank.
        times = strategy.all_gather(torch.tensor(self.seconds, dtype=torch.float64, device=pl_module.device))
        if times.dim() == 1:
            times = times[None]
        step_seconds = times.max(0).values.tolist()
        counted_flops, counted_tokens, attention_flops, timed_tokens = (float(v) for v in summed)
        if not trainer.is_global_zero:
            return
        if not step_seconds:
            raise SystemExit("gpu_scale: no timed steps: raise --steps above --warmup")
        flops_per_token = counted_flops / counted_tokens
        seconds = sum(step_seconds)
        self.report = {
            "world_size": trainer.world_size, "strategy": type(strategy).__name__,
            "precision": str(trainer.precision), "device": _device_name(pl_module.device),
            "timed_steps": len(step_seconds), "seconds_per_step": statistics.median(step_seconds),
            "tokens_per_step": timed_tokens / len(step_seconds), "tokens_per_s": timed_tokens / seconds,
            "counted_flops_step0": counted_flops, "counted_tokens_step0": counted_tokens,
            "flops_per_token": flops_per_token, "attention_share": attention_flops / max(counted_flops, 1.0),
            "achieved_flops_per_s": flops_per_token * timed_tokens / seconds,
        }


def trace_summary(path: Path, seconds: float, top: int = 12) -> dict:
    """From a Chrome trace of one step: how long the GPU ran kernels (the union of their intervals, so overlapping
    streams count once) against the step's wall time, the kernel count, and the kernels that took longest in all."""
    events = json.loads(Path(path).read_text()).get("traceEvents", [])
    kernels = [e for e in events if e.get("cat") == "kernel" and "dur" in e]
    busy, end = 0.0, float("-inf")
    for e in sorted(kernels, key=lambda e: e["ts"]):
        start, stop = float(e["ts"]), float(e["ts"]) + float(e["dur"])
        busy += max(0.0, stop - max(start, end))
        end = max(end, stop)
    by_name: dict[str, float] = {}
    for e in kernels:
        by_name[e["name"]] = by_name.get(e["name"], 0.0) + float(e["dur"])
    ranked = sorted(by_name.items(), key=lambda kv: -kv[1])[:top]
    return {"step_seconds": seconds, "kernels": len(kernels), "gpu_busy_seconds": busy / 1e6,
            "gpu_busy_fraction": busy / 1e6 / seconds,
            "top_kernels": [{"name": name[:120], "seconds": dur / 1e6} for name, dur in ranked]}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.backends.cpu.get_cpu_capability()})"


def matmul_peak(device: str) -> float:
    """FLOP/s of the best of 10 square matrix products: 8192^3 in bf16 on a GPU, 1024^3 in fp32 on CPU
    (`roofline.matmul_peak`)."""
    from roofline import matmul_peak as gflops

    if device == "cuda":
        return gflops(torch.bfloat16, size=8192, repeats=10, device="cuda") * 1e9
    return gflops(torch.float32, size=1024, repeats=10) * 1e9


def build_model(folder: Path, preset: str, tokenizer_source: str, device: str) -> int:
    """A random `LlamaForCausalLM` of the preset's shape and the tokenizer, saved in `folder`; its parameter count."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from trialign.backbone import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_source)
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=2048, tie_word_embeddings=True,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, **PRESETS[preset])
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def prepare(work: Path, args) -> tuple[Path, Path, int]:
    """The model and rollout folders in `work`, built once: DDP's worker processes rerun this script and find them."""
    sys.path.insert(0, str(ROOT / "tests"))
    from data_factory import write_synthetic_rollout

    from trialign.groups import load_groups

    model_dir, data_dir, done = work / "model", work / "data", work / "prepared.json"
    if done.is_file():
        return model_dir, data_dir, json.loads(done.read_text())["parameters"]
    parameters = build_model(model_dir, args.preset, args.tokenizer, "cuda" if torch.cuda.is_available() else "cpu")
    items = args.steps * args.batch_size
    words = (20, 60) if args.preset == "1b" else (3, 14)
    groups = [group.id for group in load_groups("default")]
    write_synthetic_rollout(data_dir, items=items, groups=groups, samples=2, turns=3, seed=0,
                            states=items // 4, assistant_words=words)
    done.write_text(json.dumps({"parameters": parameters}))
    return model_dir, data_dir, parameters


def fit_args(args, model_dir: Path, data_dir: Path, work: Path) -> list[str]:
    strategy = "configs/strategy/ddp_cpu.yaml" if args.tiny else "configs/strategy/fsdp.yaml"
    out = ["fit", "--config", str(ROOT / "configs/trialign.yaml"), "--config", str(ROOT / strategy),
           "--model.model", str(model_dir), "--model.lora.target_modules", "all-linear",
           "--data.data_dir", str(data_dir), "--data.batch_size", str(args.batch_size), "--data.val_fraction", "0",
           "--data.val_task", "null", "--trainer.limit_val_batches", "0", "--trainer.max_steps", str(args.steps),
           "--trainer.default_root_dir", str(work / "fit"), "--trainer.logger", "false",
           "--trainer.enable_progress_bar", "false", "--checkpoint.save_last", "false",
           "--validate_before_fit", "false", "--validate_after_fit", "false",
           "--trainer.callbacks+=gpu_scale.StepMeter", f"--trainer.callbacks.warmup={args.warmup}"]
    if args.profile:
        out.append(f"--trainer.callbacks.profile={args.profile}")
    if not args.tiny and not args.checkpointing:
        out += ["--trainer.strategy.init_args.activation_checkpointing_policy", "null"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="the CPU version: a tiny model, 2-process DDP (gloo)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None, help="model shape (default: 1b; tiny)")
    parser.add_argument("--tokenizer", default="smollm2-135m-instruct", help="a model source or tokenizer folder")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps in all (items: steps x batch)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed first steps (the first is counted)")
    parser.add_argument("--batch_size", type=int, default=4, help="items per step (each: 9 groups)")
    parser.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=True,
                        help="activation checkpointing per decoder layer, as configs/strategy/fsdp.yaml ships")
    parser.add_argument("--work", default=str(ROOT / "runs/gpu_scale"), help="folder for the model, data and fit")
    parser.add_argument("--output", default=None, help="write the report here as JSON")
    parser.add_argument("--profile", default=None, help="profile the second (untimed) step; its trace goes here")
    args = parser.parse_args()
    args.preset = args.preset or ("tiny" if args.tiny else "1b")
    if args.steps <= args.warmup:
        parser.error(f"--steps ({args.steps}) must exceed --warmup ({args.warmup})")
    if not args.tiny and not torch.cuda.is_available():
        parser.error("no CUDA device: the FSDP run needs GPUs (use --tiny for the CPU version)")
    # DDP's worker processes rerun this script; they must import the callback by the same name.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "benchmarks"), os.environ.get("PYTHONPATH")]))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rank0 = os.environ.get("LOCAL_RANK", "0") == "0"  # DDP's launcher sets it for the worker processes
    model_dir, data_dir, parameters = prepare(work, args)
    peak = matmul_peak("cuda" if not args.tiny else "cpu") if rank0 else 0.0

    import gpu_scale  # the module the CLI imports the callback from (this file runs as __main__)

    from trialign.lightning_cli import make_cli

    cli = make_cli(fit_args(args, model_dir, data_dir, work))
    (meter,) = [c for c in cli.trainer.callbacks if isinstance(c, gpu_scale.StepMeter)]
    if meter.report is None:  # not rank 0
        return
    report = {"preset": args.preset, "parameters": parameters, "batch_size": args.batch_size,
              "activation_checkpointing": bool(args.checkpointing and not args.tiny), **meter.report,
              "measured_peak_flops_per_s": peak}
    report["fraction_of_measured_peak"] = report["achieved_flops_per_s"] / (peak * report["world_size"])
    datasheet = next((v for k, v in DATASHEET_BF16.items() if k in report["device"]), None)
    if datasheet is not None:
        report["datasheet_peak_flops_per_s"] = datasheet
        report["fraction_of_datasheet_peak"] = report["achieved_flops_per_s"] / (datasheet * report["world_size"])
    kind = "hardware utilisation (replayed forwards counted)" if report["activation_checkpointing"] else "MFU"
    print(f"{report['preset']} model, {parameters / 1e9:.2f}B parameters, {report['strategy']} x "
          f"{report['world_size']} on {report['device']}, {report['precision']}, batch {args.batch_size} items")
    print(f"{report['seconds_per_step']:.3f} s/step (median of {report['timed_steps']}), "
          f"{report['tokens_per_step']:.0f} tokens/step, {report['tokens_per_s']:.0f} tokens/s")
    print(f"{report['flops_per_token'] / 1e9:.2f} GFLOP/token counted (attention "
          f"{100 * report['attention_share']:.1f}%), {report['achieved_flops_per_s'] / 1e12:.2f} TFLOP/s achieved")
    versus_datasheet = (f", {100 * report['fraction_of_datasheet_peak']:.1f}% of the datasheet's "
                        f"{datasheet / 1e12:.0f} TFLOP/s") if datasheet else ""
    print(f"{kind}: {100 * report['fraction_of_measured_peak']:.1f}% of the measured matmul peak "
          f"({peak / 1e12:.2f} TFLOP/s){versus_datasheet}")
    if meter.profile_summary:
        summary = report["profile"] = meter.profile_summary
        print(f"profiled step: {summary['step_seconds']:.3f} s, GPU busy {summary['gpu_busy_seconds']:.3f} s "
              f"({100 * summary['gpu_busy_fraction']:.0f}%), {summary['kernels']} kernels; longest in all:")
        for kernel in summary["top_kernels"]:
            print(f"  {kernel['seconds'] * 1e3:8.1f} ms  {kernel['name']}")
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
