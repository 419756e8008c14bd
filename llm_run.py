"""What the steps of one pipeline run share: the live model, its variants and their parents, the texts, the results.

The orchestrator (``llm_main_v4``) makes one ``Run`` and hands it to each step module's
``pipeline_step(run, config)``. A step reads the model, tokenizer and texts from it, records
its results under its own section, and registers the variant it makes (``add_variant``). A
variant is a record in results.json (a 1-bit mask, changed tensors, quantization codes or a
recipe) that ``llm_variants.variant_weights`` turns back into weights for the live model.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

import llm_common as C
import llm_data as D
import llm_io as IO
import llm_model as LM
import llm_variants as V


@dataclass
class Run:
    """The config, model, tokenizer, corpora, variants and results of one pipeline run."""

    cfg: object                    # llm_config.PipelineConfig
    out: Path
    model: torch.nn.Module = None
    tokenizer: object = None
    label: str = ""
    live: str = "base"  # the variant the live model is
    results: dict = field(default_factory=dict)
    variants: dict = field(default_factory=lambda: {"base": None})  # name -> None (the live model) or weights
    parents: dict = field(default_factory=dict)   # name -> the variant it was derived from
    texts: dict = field(default_factory=dict)    # "eval" / "train" -> Corpus, read before the model

    def ids(self, which: str) -> torch.Tensor:
        """Token ids [n_tokens] of the 'eval' or 'train' text (tokenized once, cached on the corpus)."""
        return D.tokenize_corpus(self.tokenizer, self.texts[which])

    def save(self) -> None:
        if C.dist_rank_world()[0] == 0:  # under accelerate launch only rank 0 writes
            IO.write_json(self.out / "results.json", self.results)

    def add_variant(self, name: str, weights, parent: Optional[str] = None) -> bool:
        """Register variant ``name`` with its weights (what ``llm_variants.applied_variant`` takes),
        made on variant ``parent`` (default: the live model; another one is applied first); False,
        and left out, when ``weights`` is None (its file is gone) or the parent is not in this run."""
        parent = parent or self.live
        if weights is None or parent not in self.variants:
            self.variants.pop(name, None)
            return False
        if parent != self.live:  # a mask or recipe made on another variant applies on top of it
            weights = V.stacked(self.variants[parent], weights)
        self.variants[name], self.parents[name] = weights, parent
        return True

    def chosen(self, patterns) -> dict:
        """{name: weights} of the variants ``patterns`` choose (``llm_variants.select_variants``:
        all, live, names or patterns), in the order they were made; what the steps that measure
        every variant (noise sweep, attacks, analysis) iterate over."""
        return {n: self.variants[n] for n in V.select_variants(list(self.variants), patterns, self.live)}

    def base_weights(self):
        """The unmodified weights, read back for the base row once the live model is fine-tuned:
        the folder they were loaded from, else a copy in checkpoints/."""
        base = LM.weights_dir(self.model)
        if base is None:
            base = self.out / "checkpoints" / "base.safetensors"
            IO.save_tensors(base, V.named_tensors(self.model), metadata={"variant": "base"})
        return base

    def make_live(self, name: str, base) -> None:
        """The live model has become variant ``name`` (a fine-tune) of the base at ``base``."""
        self.variants, self.parents, self.live = {"base": base, name: None}, {name: "base"}, name
