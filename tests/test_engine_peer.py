"""The engine against Hugging Face's `LlamaForCausalLM` with the same weights; checkpoint loading.

The peer runs each request alone with `generate(do_sample=False)`; the engine serves them all
together through continuous batching with chunked prefill, requests joining mid-run. Greedy tokens
must agree exactly. Random weights at the preset's init tend to repeat one token, so the engine is
built with a wider init (sharper logits) and full-forward logits are compared as well.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

from engine.config import PRESETS, ConfigError, EngineConfig, ModelConfig  # noqa: E402
from engine.llm_engine import LLMEngine  # noqa: E402
from engine.kv_cache import AttentionMetadata, KVCache, PrefillChunk  # noqa: E402
from engine.model import Llama  # noqa: E402
from engine.workload import Request  # noqa: E402

CFG = replace(PRESETS["tiny"], initializer_range=0.3)
KV_BUDGET = 1 << 20  # bytes: plenty for these requests, far below the CPU default


def hf_config(cfg: ModelConfig, **changes) -> "transformers.LlamaConfig":
    kwargs = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                  intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
                  num_attention_heads=cfg.num_attention_heads,
                  num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
                  max_position_embeddings=cfg.max_position_embeddings,
                  rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta,
                  tie_word_embeddings=cfg.tie_word_embeddings,
                  initializer_range=cfg.initializer_range,
                  bos_token_id=None, eos_token_id=None, pad_token_id=None)  # no early stop
    kwargs.update(changes)
    return transformers.LlamaConfig(**kwargs)


def hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt),
                                                                          dtype=torch.long),
                      do_sample=False, max_new_tokens=n, min_new_tokens=n)
    return out[0, len(prompt):].tolist()


def engine_logits(model: Llama, ids: list[int]) -> torch.Tensor:
    """One whole-prompt prefill through a one-block paged cache: logits at every position."""
    n = len(ids)
    cache = KVCache(model.config, 1, n, torch.float32, torch.device("cpu"))
    meta = AttentionMetadata(slot_mapping=torch.arange(n), num_decodes=0, decode_block_tables=None,
                             decode_context_lens=None,
                             prefills=[PrefillChunk(0, n, n, torch.tensor([0]))])
    return model(torch.tensor(ids), torch.arange(n), cache, meta, torch.arange(n))


def make_requests(seed: int = 0) -> list[Request]:
    """Prompts of different lengths, several longer than the step's token budget."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(37, 6), (5, 9), (23, 4), (12, 7), (30, 5), (1, 6)]  # (prompt, output)
    return [Request(i, torch.randint(0, CFG.vocab_size, (p,), generator=gen).tolist(), o, 0.0)
            for i, (p, o) in enumerate(shapes)]


@pytest.fixture(scope="module")
def engine() -> LLMEngine:
    return LLMEngine(EngineConfig(model="tiny", device="cpu", kv_budget_bytes=KV_BUDGET,
                                  block_size=4, max_num_seqs=3, max_num_batched_tokens=16,
                                  model_config=CFG))


@pytest.fixture(scope="module")
def peer(engine: LLMEngine):
    hf = transformers.LlamaForCausalLM(hf_config(CFG, attn_implementation="eager")).eval()
    # The engine keeps CPU weights as views into one arena; copy them out.
    state = {k: v.detach().contiguous() for k, v in engine.model.state_dict().items()}
    hf.load_state_dict(state, strict=True)
    return hf


def test_state_dict_names_match_hugging_face(engine: LLMEngine, peer) -> None:
    ours = {k: tuple(v.shape) for k, v in engine.model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in peer.state_dict().items()}
    assert ours == theirs


@torch.no_grad()
def test_full_forward_logits_match(engine: LLMEngine, peer) -> None:
    ids = make_requests()[0].prompt_ids
    ours = engine_logits(engine.model, ids)
    theirs = peer(torch.tensor([ids])).logits[0].float()
    assert theirs.std() > 1.0  # spread enough that the tolerance is meaningful
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_greedy_tokens_match_through_continuous_batching(engine: LLMEngine, peer) -> None:
    requests = make_requests()
    trace = engine.run(requests)
    # The run really did chunk prompts and admit requests while others were mid-flight.
    assert any(0 < it.num_tokens < len(requests[it.request_id].prompt_ids)
               for s in trace.steps for it in s.scheduled if it.is_prefill)
    assert any(s.prefill_tokens and s.decode_seqs for s in trace.steps)
    later = [r for r in trace.requests if r.scheduled_s > trace.steps[0].t_start]
    assert later, "every request joined in the first step; max_num_seqs did not bite"
    outputs = {r.id: r.output_ids for r in trace.requests}
    expected = {r.id: hf_greedy(peer, r.prompt_ids, r.max_tokens) for r in requests}
    assert outputs == expected
    assert len({t for out in expected.values() for t in out}) > 10  # not one repeated token


# -- checkpoints -------------------------------------------------------------------------------

def save_checkpoint(path: Path, tied: bool, rope_theta: float = 10000.0):
    cfg = replace(CFG, tie_word_embeddings=tied, rope_theta=rope_theta)
    torch.manual_seed(3)
    hf = transformers.LlamaForCausalLM(hf_config(cfg, attn_implementation="eager")).eval()
    hf.save_pretrained(str(path))
    return hf


@pytest.mark.parametrize("tied, rope_theta", [(True, 10000.0), (False, 500000.0)])
def test_checkpoint_loads_and_matches(tmp_path: Path, tied: bool, rope_theta: float) -> None:
    hf = save_checkpoint(tmp_path, tied, rope_theta)
    assert list(tmp_path.glob("*.safetensors"))
    eng = LLMEngine(EngineConfig(model=str(tmp_path), device="cpu", kv_budget_bytes=KV_BUDGET,
                                 block_size=4, max_num_seqs=2, max_num_batched_tokens=16))
    cfg = eng.model_config
    assert cfg.tie_word_embeddings is tied
    assert cfg.rope_theta == rope_theta
    lm_head, embed = eng.model.lm_head.weight, eng.model.model.embed_tokens.weight
    assert torch.equal(lm_head, embed) is tied
    requests = make_requests(seed=1)[:4]
    trace = eng.run(requests)
    expected = {r.id: hf_greedy(hf, r.prompt_ids, r.max_tokens) for r in requests}
    assert {r.id: r.output_ids for r in trace.requests} == expected


def _corrupt(path: Path, how: str) -> None:
    cfg_file = path / "config.json"
    weights = next(path.glob("*.safetensors"))
    if how == "no config.json":
        cfg_file.unlink()
    elif how == "bad json":
        cfg_file.write_text('{"hidden_size": 64,')
    elif how == "not an object":
        cfg_file.write_text("[1, 2]")
    elif how == "missing key":
        raw = json.loads(cfg_file.read_text())
        del raw["hidden_size"]
        cfg_file.write_text(json.dumps(raw))
    elif how == "missing tensor":
        state = load_file(str(weights))
        del state["model.layers.1.mlp.up_proj.weight"]
        save_file(state, str(weights))
    elif how == "wrong shape":
        state = load_file(str(weights))
        state["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(8, 64)
        save_file(state, str(weights))
    elif how == "no safetensors":
        weights.unlink()
    elif how == "truncated safetensors":
        weights.write_bytes(weights.read_bytes()[:100])
    elif how == "rope scaling":
        raw = json.loads(cfg_file.read_text())
        raw["rope_parameters"] = {"rope_type": "llama3", "factor": 8.0, "rope_theta": 1e4}
        cfg_file.write_text(json.dumps(raw))
    elif how == "biases":
        raw = json.loads(cfg_file.read_text())
        raw["attention_bias"] = True
        cfg_file.write_text(json.dumps(raw))


@pytest.mark.parametrize("how, message", [
    ("no config.json", "no config.json"),
    ("bad json", "not valid JSON"),
    ("not an object", "expected a JSON object"),
    ("missing key", "missing required key 'hidden_size'"),
    ("missing tensor", "lacks 1 tensors, e.g. model.layers.1.mlp.up_proj.weight"),
    ("wrong shape", "model.layers.0.self_attn.k_proj.weight has shape (8, 64)"),
    ("no safetensors", "no *.safetensors"),
    ("truncated safetensors", "cannot read weights"),
    ("rope scaling", "not supported"),
    ("biases", "biases are not supported"),
])
def test_malformed_checkpoint_raises_config_error(tmp_path: Path, how: str, message: str) -> None:
    save_checkpoint(tmp_path, tied=True)
    _corrupt(tmp_path, how)
    with pytest.raises(ConfigError) as err:
        LLMEngine(EngineConfig(model=str(tmp_path), device="cpu", kv_budget_bytes=KV_BUDGET))
    text = str(err.value)
    assert message in text
    assert str(tmp_path) in text  # names where the problem is
    assert "\n" not in text


def test_missing_checkpoint_directory_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a checkpoint directory"):
        LLMEngine(EngineConfig(model=str(tmp_path / "nowhere"), device="cpu",
                               kv_budget_bytes=KV_BUDGET))


@torch.no_grad()
def test_hf_peer_builder_matches_independent_peer(engine: LLMEngine, peer) -> None:
    """engine.hf_peer (used by the benchmark) builds the same model as the one built here."""
    hf_peer = pytest.importorskip("engine.hf_peer")
    built = hf_peer.hf_llama_like(engine.model, attn_implementation="eager")
    ids = torch.tensor([make_requests()[2].prompt_ids])
    torch.testing.assert_close(built(ids).logits, peer(ids).logits, atol=1e-5, rtol=0)
    req = make_requests()[1]
    assert hf_peer.hf_greedy(built, req.prompt_ids, req.max_tokens) == hf_greedy(
        peer, req.prompt_ids, req.max_tokens)
