"""Small models and model-state snapshots shared by the adapter-file and PEFT tests."""

from __future__ import annotations

import torch
import torch.nn as nn


class Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(6, 6)
        self.q2 = nn.Linear(6, 6)

    def forward(self, x):
        return torch.tanh(self.q(x)) + self.q2(x)


class Nested(nn.Module):
    """``attn.q`` is a suffix of ``block.attn.q`` and a prefix of ``attn.q2``: PEFT's pattern rule (suffix after a
    ".", regex) makes a plain key ``attn.q`` select more than one layer."""

    def __init__(self):
        super().__init__()
        self.attn = Attn()
        self.block = nn.Module()
        self.block.attn = Attn()

    def forward(self, x):
        return self.block.attn(self.attn(x))


def nested(seed=0):
    torch.manual_seed(seed)
    return Nested()


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(model, snap):
    state = model.state_dict()
    assert sorted(state) == sorted(snap)
    for k, v in state.items():
        assert torch.equal(v, snap[k]), k


def tiny_llama(seed=0, hidden_size=32, vocab_size=64, attention_bias=False):
    """A 2-layer transformers Llama (4 heads, 2 KV heads, MLP twice as wide), initialised from ``seed``: the PEFT
    tests' base model. Needs transformers (imported here, so importing this module does not)."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        attention_bias=attention_bias,
    )
    return transformers.LlamaForCausalLM(cfg)
