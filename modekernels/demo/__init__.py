"""``modekernels demo`` and ``modekernels adapt``: domain adaptation end to end on small models.

``corpora`` (the two offline domains and a byte tokenizer), ``model`` (a small GPT-2 or Llama
pretrained briefly, cached), ``train`` (the loop and evaluation), ``methods`` (full fine-tuning,
LoRA, bottleneck adapters, neutral residues, AdaMix, MoDE, MoEBERT), ``report`` (table, JSON,
plot), ``run`` (the demo) and ``adapt`` (the adapt command).
"""
