"""Tiny random models and a byte-level tokenizer, built from configs: no download."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" / "data"
WIKI_TEST = SHARED / "wikitext-2-raw" / "wiki.test.raw"
WIKI_VALID_TOK = SHARED / "wikitext-2-tokenized" / "valid.txt"

torch.set_num_threads(2)


def make_tokenizer():
    """A byte-level tokenizer: ids 0..255 are bytes, 256 is <eos>. Lossless round trip."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_map = {chr(c): i for i, c in enumerate(sorted(ord(ch) for ch in alphabet))}
    tok = Tokenizer(models.BPE(vocab=byte_map, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")
    return fast


VOCAB = 257


def make_llama(seed: int = 0, layers: int = 2, hidden: int = 32, vocab: int = VOCAB, **kw):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=kw.pop("tie_word_embeddings", False), **kw)
    return LlamaForCausalLM(cfg).eval()


def make_gpt2(seed: int = 0, layers: int = 2, hidden: int = 32, vocab: int = VOCAB):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=4, n_positions=512,
                     bos_token_id=vocab - 1, eos_token_id=vocab - 1)
    return GPT2LMHeadModel(cfg).eval()


def plant_super_weight(m, layer=1, row=7, col=5):
    """Make W_down[row, col] of ``layer`` a super weight: channel ``col`` of the MLP fires on
    every token and the large weight turns it into a spike on output channel ``row``."""
    with torch.no_grad():
        mlp = m.model.layers[layer].mlp
        mlp.gate_proj.weight[col] = 3.0
        mlp.up_proj.weight[col] = 3.0
        mlp.down_proj.weight[row, col] = 40.0
    return layer, row, col


@pytest.fixture(scope="session")
def tok():
    return make_tokenizer()


# The builders as fixtures: a test asks for ``tiny_llama`` and calls it with the sizes it needs.
@pytest.fixture(scope="session")
def tiny_llama():
    return make_llama


@pytest.fixture(scope="session")
def tiny_gpt2():
    return make_gpt2


@pytest.fixture(scope="session")
def byte_tokenizer():
    return make_tokenizer


@pytest.fixture(params=["llama", "gpt2"])
def tiny_model(request):
    return make_llama() if request.param == "llama" else make_gpt2()


@pytest.fixture(scope="session")
def sample_text():
    if WIKI_TEST.is_file():
        return WIKI_TEST.read_text()[:20000]
    import llm_common

    return llm_common.embedded_corpus("test")[:20000]
