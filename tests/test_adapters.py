import pytest
import torch

from knowedit import UnsupportedArchitecture
from knowedit.hooks import ablate, record
from knowedit.models.adapters import adapter_for
from knowedit.models.handle import ModelHandle


def _neox():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
    cfg = GPTNeoXConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, intermediate_size=128,
                        vocab_size=200, max_position_embeddings=64)
    return GPTNeoXForCausalLM(cfg)


def _gptj():
    from transformers import GPTJConfig, GPTJForCausalLM
    cfg = GPTJConfig(n_embd=64, n_head=4, n_layer=2, vocab_size=200, n_positions=64, rotary_dim=8)
    return GPTJForCausalLM(cfg)


@pytest.mark.parametrize("make", [_neox, _gptj])
def test_other_families_record_heads(make, gpt2_tok):
    torch.manual_seed(0)
    model = make()
    model.resize_token_embeddings(len(gpt2_tok))
    h = ModelHandle(model, gpt2_tok, name="tiny")
    a = h.adapter
    batch = h.tokenize(["The capital of France is"])
    with torch.no_grad(), record(h) as rec:
        h.forward(batch)
    assert rec["a1.h3"].shape == (1, batch.input_ids.shape[1], a.d_head)
    # q/k/v slices of one head are d_head rows each, inside the fused or separate projections.
    for s in a.head_slices(1, 3, "qkv"):
        assert len(s.indices) == a.d_head
    params = dict(model.named_parameters())
    assert all(s.param in params for s in a.head_slices(0, 0) + a.mlp_slices(0, [1, 2]))
    with torch.no_grad(), ablate(h, ["a0.h0"], how="zero"):
        h.forward(batch)


def test_gqa_kv_slices_are_shared_by_group(tiny_llama):
    a = tiny_llama.adapter
    assert (a.n_heads, a.n_kv_heads) == (4, 2)
    k0 = [s for s in a.head_slices(0, 0, "k")][0]
    k1 = [s for s in a.head_slices(0, 1, "k")][0]
    k2 = [s for s in a.head_slices(0, 2, "k")][0]
    assert k0.indices == k1.indices != k2.indices
    q1 = a.head_slices(0, 1, "q")[0]
    assert q1.indices == tuple(range(a.d_head, 2 * a.d_head))


def test_gpt2_conv1d_orientation(tiny_gpt2):
    a = tiny_gpt2.adapter
    c_attn = a.attn(0).c_attn
    s = a.head_slices(0, 1, "k")
    assert s[0].dim == 1 and s[0].indices[0] == a.d_model + a.d_head  # Conv1D stores [in, out]
    assert s[1].param.endswith("c_attn.bias") and s[1].dim == 0
    assert a.weight_in_out(c_attn).shape == (a.d_model, 3 * a.d_model)
    assert a.head_o_weight(0, 1).shape == (a.d_head, a.d_model)


def test_unsupported_architecture_lists_supported():
    from transformers import BertConfig, BertLMHeadModel
    model = BertLMHeadModel(BertConfig(hidden_size=32, num_attention_heads=2, num_hidden_layers=1,
                                       intermediate_size=32, is_decoder=True))
    with pytest.raises(UnsupportedArchitecture, match="'bert'.*gpt2.*llama"):
        adapter_for(model)


def test_real_gpt2_tokenizer_on_random_gpt2(gpt2_tok):
    from transformers import GPT2Config, GPT2LMHeadModel
    model = GPT2LMHeadModel(GPT2Config(n_layer=2))  # GPT2Config() shape, fewer layers to stay fast
    h = ModelHandle(model, gpt2_tok, name="gpt2-random")
    assert h.token_id(" Mary") == 5335
    assert h.token_id(" John") == 1757
    assert h.adapter.n_heads == 12 and h.adapter.d_head == 64
