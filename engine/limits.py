"""Size checks for a run, made before any prompt list, weight or cache tensor exists.

A size a user types can be far past what the model or the machine holds: `--context 100000000`
once built eight prompt lists of a hundred million Python ints (24 GB) before any check looked at
them. Everything here reads only the model's shapes (a preset, or a checkpoint's `config.json`), the
flags and, for the KV budget, how much memory the machine has free, so a refusal costs
milliseconds and no memory. The engine's own checks stay where they are; these come first.
"""
from __future__ import annotations

from pathlib import Path

from engine.block_manager import blocks_for
from engine.config import ConfigError, EngineConfig, ModelConfig, element_bytes, preset
from engine.workload import MAX_WORKLOAD_TOKENS, WorkloadSpec, longest_prompt

# Sequences in one batch. Past the KV cache's capacity extra slots stay empty, but CUDA graphs are
# captured per batch size, so an absurd cap would cost memory and minutes before the first step.
MAX_BATCH = 4096


def read_model_config(model: str, override: ModelConfig | None = None) -> ModelConfig:
    """The shapes of `model` (a preset name or a checkpoint directory), read without weights."""
    if override is not None:
        return override
    path = Path(model)
    if path.is_dir():
        from engine.weights import read_checkpoint_config

        return read_checkpoint_config(path)
    if "/" in model or path.exists():
        raise ConfigError(f"{model!r} is not a checkpoint directory (and not a preset name)")
    return preset(model)


def available_memory_bytes() -> int | None:
    """Memory the machine can still hand out (Linux's MemAvailable); None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_run_sizes(cfg: EngineConfig, spec: WorkloadSpec, model_cfg: ModelConfig,
                    bytes_per_elem: int = 4, free_bytes: int | None = None) -> None:
    """Refuse sizes no run could serve, with one line naming the flag; `free_bytes` bounds the
    KV budget on a CPU run (None skips that bound)."""
    max_len = cfg.max_model_len or model_cfg.max_position_embeddings
    if max_len > model_cfg.max_position_embeddings:
        raise ConfigError(f"max_model_len {max_len} is past the model's maximum of "
                          f"{model_cfg.max_position_embeddings} positions")
    if spec.prompt_len > max_len:
        raise ConfigError(f"--context {spec.prompt_len} is past the model's maximum of {max_len} "
                          "tokens (prompt + output)")
    if spec.output_len > max_len:
        raise ConfigError(f"--output {spec.output_len} is past the model's maximum of {max_len} "
                          "tokens (prompt + output)")
    shortest = spec.prompt_len + spec.output_len  # a lognormal mix may draw shorter ones
    if spec.mix != "lognormal" and shortest > max_len:
        raise ConfigError(f"--context {spec.prompt_len} + --output {spec.output_len} = {shortest} "
                          f"tokens is past the model's maximum of {max_len}")
    if cfg.max_num_seqs > MAX_BATCH:
        raise ConfigError(f"--batch {cfg.max_num_seqs} is past the largest batch, {MAX_BATCH}")
    if spec.num_requests > MAX_WORKLOAD_TOKENS // longest_prompt(spec):
        raise ConfigError(f"--requests {spec.num_requests} of up to {longest_prompt(spec)} prompt "
                          f"tokens is past the {MAX_WORKLOAD_TOKENS} prompt tokens a workload may "
                          "hold")
    if cfg.block_size > max_len:
        raise ConfigError(f"--page-size {cfg.block_size} is past the model's maximum of {max_len} "
                          "tokens")
    if cfg.kv_budget_bytes is not None:
        block_bytes = model_cfg.kv_bytes_per_token(bytes_per_elem) * cfg.block_size
        fewest = 2 if spec.mix == "lognormal" else shortest  # tokens of the smallest request
        need = blocks_for(fewest, cfg.block_size) * block_bytes
        if cfg.kv_budget_bytes < block_bytes:
            raise ConfigError(f"--kv-budget-mb {cfg.kv_budget_bytes / 2**20:g} holds no block of "
                              f"{block_bytes} bytes; raise the budget or lower the page size")
        if cfg.kv_budget_bytes < need:
            blocks = cfg.kv_budget_bytes // block_bytes
            raise ConfigError(f"--kv-budget-mb {cfg.kv_budget_bytes / 2**20:g}: the KV budget "
                              f"holds {blocks} blocks of {cfg.block_size} tokens; one request needs "
                              f"{fewest}")
        if free_bytes is not None and cfg.kv_budget_bytes > free_bytes:
            raise ConfigError(f"--kv-budget-mb {cfg.kv_budget_bytes / 2**20:g} is more than the "
                              f"{free_bytes / 2**20:.0f} MiB of memory free on this machine")


def check_cli_run(cfg: EngineConfig, spec: WorkloadSpec) -> None:
    """`check_run_sizes` for a run the CLI is about to start: the model's shapes read from its
    preset or config.json; on the CPU the budget also checked against free memory."""
    model_cfg = read_model_config(cfg.model, cfg.model_config)
    on_cpu = cfg.device == "cpu" or (cfg.device == "auto" and not _cuda_available())
    device_type = "cpu" if on_cpu else "cuda"
    check_run_sizes(cfg, spec, model_cfg, bytes_per_elem=element_bytes(device_type),
                    free_bytes=available_memory_bytes() if on_cpu else None)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()
