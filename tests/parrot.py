import torch
from transformers import LlamaConfig, LlamaForCausalLM


class Parrot(LlamaForCausalLM):
    """A tiny Llama whose greedy answer is planted: a prompt whose ids sum to k (mod 10) < threshold
    gets ``refuse``, any other ``comply``, then <eos>. ``threshold`` is a parameter, so a variant
    (a name -> tensor dict) can change which prompts it refuses."""

    def __init__(self, config, refuse, comply, eos):
        super().__init__(config)
        self.threshold = torch.nn.Parameter(torch.tensor(3.0), requires_grad=False)
        self.answers, self.eos = (list(refuse) + [eos], list(comply) + [eos]), eos

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, **kw):
        if "past_key_values" in kw:  # transformers 5 renamed it ``cache``; GCG's driver may send the old name
            kw["cache"] = kw.pop("past_key_values")
        cache = kw.get("cache")
        fresh = cache is None or cache.get_seq_length() == 0
        out = super().forward(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kw)
        if fresh:
            E = inputs_embeds if inputs_embeds is not None else self.get_input_embeddings()(input_ids)
            W = self.get_input_embeddings().weight
            ids = torch.cdist(E.float(), W.float()[None].expand(E.shape[0], -1, -1)).argmin(-1)
            mask = attention_mask[:, -ids.shape[1]:] if attention_mask is not None else torch.ones_like(ids)
            keys = ((ids * mask).sum(-1) % 10).tolist()
            self._plan = [self.answers[0] if k < float(self.threshold) else self.answers[1] for k in keys]
            self._step = 0
        planted = torch.full_like(out.logits[:, -1], -1e4)
        for b, plan in enumerate(self._plan[:planted.shape[0]]):
            planted[b, plan[self._step] if self._step < len(plan) else self.eos] = 1e4
        out.logits = out.logits * 0  # keeps the graph (GCG's gradient is zero, not missing)
        out.logits[:, -1] = out.logits[:, -1] + planted
        self._step += 1
        return out


def make_parrot(tok, refuse: str, comply: str):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=257, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    enc = lambda s: tok(s, add_special_tokens=False).input_ids
    return Parrot(cfg, enc(refuse), enc(comply), tok.eos_token_id).eval()
