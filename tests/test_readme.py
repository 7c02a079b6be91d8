"""README.md's Python snippets run as written, on the CPU, on tiny models: so they stay true.

Conventions (for whoever edits README.md):

- Every ```python fenced block of README.md is a test, run with ``exec`` in a fresh namespace, in a fresh temporary
  working directory (relative paths such as ``"out/adapter"`` land there), on the CPU, with nothing downloaded.
- A block may declare, in an HTML comment on the line right above its opening fence (invisible on GitHub):

      <!-- readme-test: preamble=NAME -->     run the preamble NAME first (the names it defines are listed below)
      <!-- readme-test: continue -->          run in the namespace (and directory) of the block just before
      <!-- readme-test: skip REASON -->       do not run it (say why, e.g. "needs a CUDA GPU"); reported as skipped

  A block without a comment runs with no preamble: it must import what it uses.
- Preambles (defined in ``PREAMBLES`` below; keep them small, the snippet should show the rest):

  ``tensors``: ``torch``, ``nn``, ``lk`` (lora_kernels), ``x`` [4, 32] fp32, ``weight`` [48, 32], ``bias`` [48],
  ``lora_A`` [8, 32], ``lora_B`` [48, 8], ``scale`` = 2.0, ``linear`` = nn.Linear(32, 48),
  ``model`` = a small nn.Module with submodules ``q_proj``, ``k_proj``, ``v_proj`` (nn.Linear 32 → 32).

  ``tiny_llama``: ``torch``, ``lk``, ``transformers``, ``model`` = a 2-layer ``LlamaForCausalLM`` (hidden 64, vocab
  128, random weights, eval mode); ``input_ids`` [2, 8]; ``batches`` = a list of 4 dicts with ``input_ids``,
  ``attention_mask`` and ``labels`` (what ``lk.lora_ga_init`` calls ``model(**batch)`` with).

  ``tiny_peft``: everything of ``tiny_llama``, plus ``peft``; ``peft_model`` = ``get_peft_model`` of another tiny
  Llama with LoRA (r = 8, α = 16) on ``q_proj`` and ``v_proj``, B randomised; two PEFT adapters saved as
  ``adapter_a`` and ``adapter_b`` in the working directory for ``model``; ``hf_model`` = ``model``.
"""

import os
import re
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")

PREAMBLES = {
    "tensors": """
import torch, torch.nn as nn, lora_kernels as lk
torch.manual_seed(0)
x = torch.randn(4, 32)
weight, bias = torch.randn(48, 32) / 32 ** 0.5, torch.randn(48)
lora_A, lora_B, scale = torch.randn(8, 32) / 32 ** 0.5, torch.randn(48, 8) / 8 ** 0.5, 2.0
linear = nn.Linear(32, 48)

class _Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 32)

    def forward(self, x):
        return self.q_proj(x) + self.k_proj(x) + self.v_proj(x)

model = _Attention()
""",
    "tiny_llama": """
import torch, transformers, lora_kernels as lk
torch.manual_seed(0)
_cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
model = transformers.LlamaForCausalLM(_cfg).eval()
input_ids = torch.randint(0, 128, (2, 8))
batches = []
for _ in range(4):
    _ids = torch.randint(0, 128, (2, 8))
    batches.append({"input_ids": _ids, "attention_mask": torch.ones_like(_ids), "labels": _ids})
""",
}
PREAMBLES["tiny_peft"] = (
    PREAMBLES["tiny_llama"]
    + """
import peft
_base = transformers.LlamaForCausalLM(_cfg).eval()
peft_model = peft.get_peft_model(_base, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
for _name in ("adapter_a", "adapter_b"):
    _m = peft.get_peft_model(transformers.LlamaForCausalLM(_cfg),
                             peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for _n, _p in _m.named_parameters():
            if "lora_B" in _n:
                _p.normal_(0, 0.02)
    _m.save_pretrained(_name)
with torch.no_grad():
    for _n, _p in peft_model.named_parameters():
        if "lora_B" in _n:
            _p.normal_(0, 0.02)
hf_model = model
"""
)

_DIRECTIVE = re.compile(r"<!--\s*readme-test:\s*(.*?)\s*-->")


def readme_blocks(text):
    """[(line number of the opening fence, directive or "", code)] for every ```python block of ``text``."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() in ("```python", "```py"):
            start = i + 1
            j = start
            while j < len(lines) and lines[j].strip() != "```":
                j += 1
            prev = lines[i - 1].strip() if i > 0 else ""
            m = _DIRECTIVE.fullmatch(prev)
            blocks.append((i + 1, m.group(1) if m else "", textwrap.dedent("\n".join(lines[start:j])) + "\n"))
            i = j + 1
        else:
            i += 1
    return blocks


def _parse(directive):
    """("run", preamble) | ("continue", None) | ("skip", reason)."""
    if not directive:
        return "run", None
    if directive.startswith("skip"):
        return "skip", directive[4:].strip() or "marked skip in README.md"
    if directive == "continue":
        return "continue", None
    m = re.fullmatch(r"preamble=(\w+)", directive)
    if not m or m.group(1) not in PREAMBLES:
        raise ValueError(
            f"unknown readme-test directive {directive!r}: use preamble=<{'|'.join(PREAMBLES)}>, "
            f"continue, or skip <reason>"
        )
    return "run", m.group(1)


def _blocks():
    with open(README, encoding="utf-8") as f:
        return readme_blocks(f.read())


BLOCKS = _blocks()


def test_readme_has_python_blocks_and_valid_directives():
    assert BLOCKS, "README.md has no ```python block"
    for _line, directive, _ in BLOCKS:
        _parse(directive)  # raises on a typo
    assert _parse(BLOCKS[0][1])[0] != "continue", "the first block cannot continue a previous one"


_state = {}  # line of the last block run -> (namespace, working directory), for "continue"


@pytest.mark.parametrize("line, directive, code", BLOCKS, ids=[f"README.md:{b[0]}" for b in BLOCKS])
def test_readme_block_runs(line, directive, code, tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    kind, arg = _parse(directive)
    if kind == "skip":
        _state.clear()
        pytest.skip(f"README.md:{line}: {arg}")
    if kind == "continue":
        prev = [b[0] for b in BLOCKS if b[0] < line]
        if not prev or prev[-1] not in _state:
            pytest.skip(f"README.md:{line} continues README.md:{prev[-1] if prev else '?'}, which did not run")
        ns, cwd = _state[prev[-1]]
    else:
        ns, cwd = {"__name__": "__readme__"}, tmp_path
    monkeypatch.chdir(cwd)
    if kind == "run" and arg:
        exec(compile(PREAMBLES[arg], f"<readme-test preamble {arg}>", "exec"), ns)
    _state.pop(line, None)
    exec(compile(code, f"README.md:{line}", "exec"), ns)
    _state[line] = (ns, cwd)


def test_readme_block_parser():
    text = "\n".join(
        [
            "# t",
            "```python",
            "a = 1",
            "```",
            "<!-- readme-test: preamble=tensors -->",
            "```python",
            "b = x",
            "```",
            "<!-- readme-test: skip needs a CUDA GPU -->",
            "```python",
            "c = 3",
            "```",
            "```bash",
            "ls",
            "```",
            "<!-- readme-test: continue -->",
            "```python",
            "d = b",
            "```",
        ]
    )
    blocks = readme_blocks(text)
    assert [(b[0], b[1]) for b in blocks] == [
        (2, ""),
        (6, "preamble=tensors"),
        (10, "skip needs a CUDA GPU"),
        (17, "continue"),
    ]
    assert [_parse(b[1]) for b in blocks] == [
        ("run", None),
        ("run", "tensors"),
        ("skip", "needs a CUDA GPU"),
        ("continue", None),
    ]
    with pytest.raises(ValueError, match="unknown readme-test directive"):
        _parse("preamble=nope")
