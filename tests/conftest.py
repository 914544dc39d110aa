import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"


@pytest.fixture(scope="session")
def gpt2_tok():
    from knowedit.models.gpt2_tokenizer import gpt2_tokenizer
    return gpt2_tokenizer()


def _tiny(kind, tok):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from knowedit.models.handle import ModelHandle

    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = GPT2Config(n_embd=64, n_head=4, n_layer=3, n_positions=128, vocab_size=len(tok))
        model = GPT2LMHeadModel(cfg)
    else:
        cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=3,
                          intermediate_size=96, vocab_size=len(tok), max_position_embeddings=128,
                          tie_word_embeddings=False)
        model = LlamaForCausalLM(cfg)
    # Random init with small biases hides orientation bugs; give biases real values.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.1)
    return ModelHandle(model, tok, name=f"tiny-{kind}")


@pytest.fixture(params=["gpt2", "llama"])
def tiny(request, gpt2_tok):
    """A tiny random model in each layout (fresh per test, so edits cannot leak)."""
    return _tiny(request.param, gpt2_tok)


@pytest.fixture
def tiny_gpt2(gpt2_tok):
    return _tiny("gpt2", gpt2_tok)


@pytest.fixture
def tiny_llama(gpt2_tok):
    return _tiny("llama", gpt2_tok)


@pytest.fixture(scope="session")
def smol():
    """The real default model, loaded once for the session. Tests must not leave it edited."""
    from knowedit import load_model
    return load_model()


@pytest.fixture(scope="session")
def shared_datasets():
    if not SHARED.exists():
        pytest.skip("../shared/datasets is absent")
    return SHARED
