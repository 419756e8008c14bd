"""Tiny random models and a byte-level tokenizer, built from configs: no download."""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import llm_config as K  # noqa: E402  (after the path insert above)

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
                      num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=kw.pop("max_position_embeddings", 512),
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
        mlp.down_proj.weight[:, col] = 0.0  # the active channel feeds only ``row`` ...
        mlp.down_proj.weight[row, col] = 40.0  # ... through the super weight
    return layer, row, col


def make_super_weight_matter(m, ids: torch.Tensor, row: int = 7):
    """Give the massive activation on residual channel ``row`` a job, as in a trained model:
    once it dominates the final RMSNorm, the logits read the text's unigram log-probabilities
    from lm_head column ``row``. Zeroing the super weight then multiplies perplexity by ~6,
    where in an untrained random model it would change nothing."""
    import math

    with torch.no_grad():
        counts = torch.bincount(ids, minlength=m.lm_head.weight.shape[0]).float() + 1
        m.lm_head.weight[:, row] = (counts / counts.sum()).log() / math.sqrt(m.config.hidden_size)


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


def make_pipeline_config(model_dir, text, out, steps=None, **overrides):
    """A PipelineConfig that runs every step on a tiny model in seconds; ``overrides`` maps a
    section (run, prune, ...) to the fields to change, e.g. ``prune={"pattern": "2:4"}``."""
    cfg = K.PipelineConfig(
        run=K.RunConfig(steps=tuple(steps or K.ALL_STEPS), output_dir=str(out), model=str(model_dir), dataset=str(text),
                        train_dataset=str(text), seed=3, log_level="WARNING",
                        allow_overlap=True),  # one small text serves as both
        finetune=K.FinetuneConfig(steps=3, batch_size=2, seq_len=32, lr=1e-3),
        prune=K.PruneConfig(calib_samples=4, calib_seq_len=32, protect="auto"),
        noise=K.NoiseConfig(sweep_eps=(0.1, 1.0), sweep_seeds=2, sweep_tokens=64, sweep_seq_len=32,
                            protect_fraction=0.05, fisher_windows=2, fisher_seq_len=32, map=True, map_tokens=64),
        eval=K.EvalConfig(seq_len=32, eval_tokens=256, max_new_tokens=3, kl=True),
        adversarial=K.AdversarialConfig(pgd_steps=2, n_windows=2, prompt_len=16, continuation_len=8,
                                        targeted_steps=2, gcg_steps=2, gcg_batch=4, gcg_topk=4, gcg_suffix_len=2,
                                        defence_steps=2, max_new_tokens=3),
        safety=K.SafetyConfig(enabled=True, n_prompts=3, max_new_tokens=3, gcg_behaviours=1, gcg_steps=1, gcg_batch=4,
                              gcg_topk=4, gcg_suffix_len=2),
        analysis=K.AnalysisConfig(calib_windows=1, calib_seq_len=16, fisher_windows=2, max_probes=2, power_iters=2,
                                  quant_group=16, eval_tokens=128, eval_seq_len=32))
    return dataclasses.replace(cfg, **{k: dataclasses.replace(getattr(cfg, k), **v) for k, v in overrides.items()})


@pytest.fixture(scope="session")
def pipeline_config():
    return make_pipeline_config


def without(obj, keys: set):
    """``obj`` (nested dicts and lists) with every dict entry whose key is in ``keys`` left out:
    results compared without their timings, paths or bookkeeping."""
    if isinstance(obj, dict):
        return {k: without(v, keys) for k, v in obj.items() if k not in keys}
    if isinstance(obj, list):
        return [without(v, keys) for v in obj]
    return obj


@pytest.fixture(scope="session")
def tiny_run_dir(tmp_path_factory, sample_text):
    """A saved tiny Llama (``model/``) and 3000 characters of text (``text.txt``) for CLI runs;
    tests read them and write elsewhere."""
    d = tmp_path_factory.mktemp("tiny_run")
    make_llama().save_pretrained(d / "model")
    make_tokenizer().save_pretrained(d / "model")
    (d / "text.txt").write_text(sample_text[:3000])
    return d


def planted_model_dir(d, text: str):
    """A saved 3-block tiny Llama whose layer-1 super weight matters on ``text`` (``model/``),
    with the byte tokenizer, and ``text`` itself (``text.txt``), in folder ``d``."""
    import llm_data

    m = make_llama(layers=3)
    plant_super_weight(m, layer=1)
    make_super_weight_matter(m, llm_data.tokenize_corpus(make_tokenizer(), text))
    m.save_pretrained(d / "model")
    make_tokenizer().save_pretrained(d / "model")
    (d / "text.txt").write_text(text)
    return d


def tiny_argv(tiny, out, *extra) -> list:
    """Command-line flags of a fast run on ``tiny_run_dir``'s model and text into ``out``."""
    return ["--model", str(tiny / "model"), "--dataset", str(tiny / "text.txt"), "--train-dataset",
            str(tiny / "text.txt"), "--allow-overlap", "--seq-len", "32", "--eval-tokens", "128", "--max-new-tokens",
            "2", "--calib-samples", "2", "--calib-seq-len", "32", "--output-dir", str(out), "--log-level", "WARNING",
            *extra]


def counting(mp, module, name: str, counts: dict) -> None:
    """Count the calls of ``module.name`` into ``counts[name]`` (through the monkeypatch ``mp``):
    what a run computes once, it calls once."""
    real = getattr(module, name)

    def counted(*a, **k):
        counts[name] = counts.get(name, 0) + 1
        return real(*a, **k)

    mp.setattr(module, name, counted)


def one_error(capsys) -> str:
    """The one error line of a failed run (progress bars of library loaders may precede it; no traceback may)."""
    text = capsys.readouterr().err
    err = [ln for ln in text.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "Traceback" not in text, text[-2000:]
    return err[0]


@pytest.fixture(params=["llama", "gpt2"])
def tiny_model(request):
    return make_llama() if request.param == "llama" else make_gpt2()


@pytest.fixture(scope="session")
def sample_text():
    if WIKI_TEST.is_file():
        return WIKI_TEST.read_text()[:20000]
    import llm_data

    return llm_data.embedded_corpus("test")[:20000]
