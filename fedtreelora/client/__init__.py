"""One client of the federation: models and presets, local training, the two-expert mixing, privacy.

- `models`: tokenizer and model loading (offline presets or any HF folder) and the PEFT LoRA wrap;
- `trainer`: `LocalTrainer`, training and evaluation of one client on a shared PEFT model;
- `mixing`: `ExpertMixer`, the cluster expert + frozen external expert + learnable lam per layer;
- `privacy`: the Gaussian mechanism on uploads.
"""
